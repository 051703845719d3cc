"""Does an int8 GRU pay? The native fp32 GRU node against the GRU unrolled into MatMuls, in
fp32 and in int8 (dynamic MatMulInteger and static QDQ), measured as trials are.

ONNX Runtime has no int8 GRU kernel; a trial that plans a GRU int8 exports it unrolled
(search/trial/compress/unrolled.py). This prints each form's median latency (ONNX
Runtime on this CPU, the profile's threads and batch), the median over interleaved
rounds, and its speed against the native fp32 node.

    python experiments/gru_latency.py
    python experiments/gru_latency.py --hidden 128 256 512 --steps 40 --layers 2
"""

from __future__ import annotations

import argparse
import statistics

import onnx
import torch
from torch import nn

from search._base.records import Choices
from search.latency.measure import measure_latency
from search.profiles import load_profile
from search.trial.compress import apply_precision_plan, compressible_layers, export_onnx, onnx_node_names


class _Classifier(nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _forms(hidden: int, layers: int, steps: int) -> dict[str, bytes]:
    """The model's ONNX forms: native fp32 GRU, unrolled fp32, unrolled int8 (both modes)."""
    torch.manual_seed(0)
    model = _Classifier(hidden, layers).eval()
    shape = (steps, 3)
    x = torch.randn(64, *shape)
    layers_ = compressible_layers(model, x[:1])
    unroll = {"rnn": "int8", "head": "fp32"}
    native = export_onnx(model, shape)
    flat = export_onnx(model, shape, precisions=unroll)  # unrolled, not yet quantized
    names = onnx_node_names(onnx.load_from_string(flat), layers_)
    out = {"native fp32 GRU": native, "unrolled fp32": flat}
    for mode in ("dynamic", "static"):
        out[f"unrolled int8 {mode}"] = apply_precision_plan(
            flat, unroll, names, Choices(precisions=unroll, quant_mode=mode), x, reduce_range=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    print(f"profile {profile.name}: {profile.measure.threads} thread(s), batch "
          f"{profile.measure.batch_size}; GRU {args.layers} layers x {args.steps} steps")
    print("| hidden | form | median ms | x native fp32 |\n|---|---|---|---|")
    for hidden in args.hidden:
        forms = _forms(hidden, args.layers, args.steps)
        times: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(args.rounds):  # interleaved: a burst of other work hits every form
            for name, model in forms.items():
                times[name].append(measure_latency(model, profile, (args.steps, 3)).median_ms)
        base = statistics.median(times["native fp32 GRU"])
        for name, values in times.items():
            ms = statistics.median(values)
            print(f"| {hidden} | {name} | {ms:.3f} | {base / ms:.2f} |")


if __name__ == "__main__":
    main()

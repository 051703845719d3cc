"""MLflow logging cost per trial on a 100-trial study (issue 6).

Runs a study whose trials are cheap (no fine-tuning, predicted latency) so that
logging is visible, and reports the driver's time in MLflow child-run logging
per trial and as a share of the trial loop, plus the end-of-study logging
(front models, artifacts).

    python experiments/mlflow_logging_overhead.py --budget 100
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from search.config import SearchConfig
from search.study.run import run_search

SPACE = "distillation:\n  epochs: {low: 0, high: 0}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    args = parser.parse_args()
    logging.getLogger("search").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "cheap.yaml"
        space.write_text(SPACE)
        result = run_search(SearchConfig(profile=args.profile, budget=args.budget,
                                         runs_root=Path(tmp), space=str(space),
                                         latency="predict", study_name="overhead"),
                            show_progress=False)
    n = len(result.trials) + result.n_failed
    logging_s = result.phases["mlflow_trial_logging"]
    print(f"{n} trials, trial loop {result.phases['trials']:.1f} s; MLflow child-run logging "
          f"{logging_s:.2f} s = {1000 * logging_s / n:.1f} ms per trial "
          f"({logging_s / result.phases['trials']:.1%} of the loop); end of study (CSVs, plots, "
          f"front models, artifacts) {result.phases['finish']:.1f} s; setup "
          f"{result.phases['setup']:.1f} s")


if __name__ == "__main__":
    main()

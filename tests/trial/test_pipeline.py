import pytest
import torch

from search._base.errors import TrialError
from search._base.records import Choices, TrialRecord
from search.trial.pipeline import compress, run_trial


def test_one_trial_runs_every_stage(task, layers, fast_profile):
    choices = Choices(structured_ratio=0.25, unstructured_sparsity=0.3, epochs=1, lr=2e-3,
                      precisions={layer.name: "int8" for layer in layers})
    record = run_trial(TrialRecord(0, choices, seed=1), task, fast_profile, threads=2)
    assert set(record.timings) == {"prune", "train", "export", "quantize", "evaluate", "measure"}
    assert record.accuracy > 90 and record.test_accuracy > 90
    assert record.latency.source == "measured" and record.latency.median_ms > 0
    assert record.sparsity >= 0.29
    assert record.macs < 0.8 * 48_907_530  # channels really removed
    assert record.onnx_model and record.size_mb == pytest.approx(len(record.onnx_model) / 1e6)


def test_nan_loss_fails_the_fine_tune_stage(task, layers, fast_profile):
    choices = Choices(epochs=1, lr=1e12, alpha=0.0, precisions={x.name: "fp32" for x in layers})
    with pytest.raises(TrialError) as err:
        compress(TrialRecord(0, choices), task, fast_profile)
    assert err.value.stage == "fine-tune"


def test_a_transformer_runs_every_stage_with_heads_removed(task, fast_profile):
    """Attention models go through the same line: heads pruned, projections quantized."""
    from dataclasses import replace

    from search._base.records import Choices, TrialRecord
    from search.trial.pipeline import compress, model_facts, student_layers
    from tests.support.models import TinyViT

    torch.manual_seed(0)
    vit = replace(task, name="tiny-vit", make_model=TinyViT, teacher_state=TinyViT().state_dict())
    facts = model_facts(vit)
    assert facts.attention and facts.droppable_blocks == 2
    layers = student_layers(vit)
    assert "blocks.0.self_attn.q_proj" in {layer.name for layer in layers}
    plan = {layer.name: "int8" for layer in layers}
    full = compress(TrialRecord(0, Choices(precisions=plan)), vit, fast_profile)
    pruned = compress(TrialRecord(1, Choices(head_ratio=0.5, drop_blocks=1, precisions=plan)),
                      vit, fast_profile)
    assert pruned.macs < full.macs and pruned.params < full.params
    assert pruned.dropped_blocks and pruned.accuracy is not None


def test_a_model_that_takes_token_ids_runs_every_stage(fast_profile):
    """A text classifier (``nn.Embedding`` of int64 token ids, ``nn.TransformerEncoder``)
    as a ``--task`` plugin: its teacher trains, it is pruned, exported with an int64 input,
    quantized and calibrated on token ids, scored and measured."""
    from search.latency.measure import measure_latency
    from search.tasks import load_task
    from search.trial.pipeline import compress, student_layers

    task = load_task("tests.families:make_token_task")
    assert task.train.x.dtype == torch.long and task.teacher_info["test_accuracy"] > 90
    plan = {layer.name: "int8" for layer in student_layers(task)}
    full = compress(TrialRecord(0, Choices(precisions=plan)), task, fast_profile)
    pruned = compress(TrialRecord(1, Choices(structured_ratio=0.5, head_ratio=0.5,
                                             precisions=plan)), task, fast_profile)
    assert pruned.params < full.params and full.accuracy > 90
    import onnx

    graph = onnx.load_from_string(pruned.onnx_model).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert measure_latency(pruned.onnx_model, fast_profile, task.input_shape).median_ms > 0


def test_channel_ratios_per_segment_with_a_block_dropped(task, layers):
    """Segments are those of the whole model, so a dropped block does not shift them: the
    early layers keep their widths when only the late third is thinned."""
    from torch import nn

    from search.profiles import load_profile
    from search.trial.pipeline import prune_student

    profile = load_profile("cpu-avx2")
    plain = prune_student(TrialRecord(0, Choices(drop_blocks=1)), task, profile)
    choices = Choices(drop_blocks=1, structured_ratio=0.5,
                      segment_ratios={"early": 0.0, "middle": 0.0, "late": 0.5})
    record = TrialRecord(1, choices)
    thinned = prune_student(record, task, profile)
    widths = {n: m.weight.shape[0] for n, m in plain.named_modules()
              if isinstance(m, nn.Conv2d | nn.Linear)}
    after = {n: m.weight.shape[0] for n, m in thinned.named_modules()
             if isinstance(m, nn.Conv2d | nn.Linear)}
    assert after["stem.0"] == widths["stem.0"]  # early: untouched
    assert sum(after.values()) < sum(widths.values())
    assert after["fc"] == 10
    assert thinned(torch.zeros(2, *task.input_shape)).shape == (2, 10)
    assert record.choices.applied()["structured_ratio.late"] == 0.5


def test_blocks_are_ranked_once_per_starting_model_and_drop_alike_in_every_trial(task):
    """The block ranking depends on the starting model only (a fixed training sample), so
    trials of any seed drop the same blocks, the ranking is computed once per process, and
    the least-changing blocks go first."""
    from search.profiles import load_profile
    from search.trial import pipeline
    from search.trial.compress.blocks import rank_blocks

    profile = load_profile("cpu-avx2")
    pipeline._RANKINGS.clear()
    records = [TrialRecord(n, Choices(drop_blocks=1), seed=seed) for n, seed in enumerate((0, 5, 11))]
    for record in records:
        pipeline.prune_student(record, task, profile)
    assert len(pipeline._RANKINGS) == 1
    ranking = next(iter(pipeline._RANKINGS.values()))
    assert all(r.dropped_blocks == ranking[:1] for r in records) and ranking
    assert set(rank_blocks(task.teacher(), task.train.x[:256])) == set(ranking)


def test_a_model_that_also_returns_its_features_runs_every_stage(task, fast_profile):
    """A classifier returning ``(logits, embedding)`` in every mode (as metric-learning and
    multi-head models do): scored, pruned with gradient importance, fine-tuned, exported
    and quantized on its logits, the ONNX model's first output."""
    from dataclasses import replace

    from torch import nn

    from search.trial.pipeline import finetune, student_layers

    class WithFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.body(x)
            return self.head(features), features

    torch.manual_seed(0)
    model = replace(task, name="with-features", make_model=WithFeatures,
                    teacher_state=WithFeatures().state_dict())
    assert 0 <= model.score(model.teacher(), model.val) <= 100
    plan = {layer.name: "int8" for layer in student_layers(model)}
    record = finetune(TrialRecord(0, Choices(structured_ratio=0.5, structured_importance="taylor",
                                             epochs=1, precisions=plan)), model, fast_profile)
    full = sum(p.numel() for p in model.teacher().parameters())
    assert record.accuracy is not None and record.params < full


def test_a_regression_task_runs_every_stage(fast_profile):
    """A ``--task`` plugin that is not classification (float labels, an MSE loss, R^2 as the
    metric): the teacher trains on its loss, Taylor channel importance and Fisher sparsity take
    its gradients, distillation matches the teacher's outputs, and the int8 ONNX model scores
    what the PyTorch student scores."""
    from search.tasks import load_task
    from search.trial.pipeline import compress, finetune, student_layers

    task = load_task("tests.families:make_regression_task")
    assert task.train.y.dtype == torch.float32 and task.teacher_info["val_accuracy"] > 20
    fp32 = {layer.name: "fp32" for layer in student_layers(task)}
    one_shot = compress(TrialRecord(0, Choices(precisions=fp32)), task, fast_profile)
    assert one_shot.accuracy == pytest.approx(task.teacher_info["val_accuracy"], abs=1e-3)
    int8 = {name: "int8" for name in fp32}
    choices = Choices(structured_ratio=0.5, structured_importance="taylor",
                      unstructured_sparsity=0.3, unstructured_criterion="fisher", epochs=3,
                      alpha=0.5, distill_loss="relation", precisions=int8)
    record = finetune(TrialRecord(1, choices), task, fast_profile)
    assert record.params < one_shot.params and record.sparsity >= 0.25
    # fine-tuned on the task's loss, not cross-entropy on one output column: still fits
    assert record.accuracy > task.teacher_info["val_accuracy"] - 30


def test_a_dense_prediction_task_runs_every_stage(fast_profile):
    """A segmentation net (per-pixel logits from a final 1x1 convolution, no Linear): the
    default metric is pixel accuracy, channels are pruned with the output convolution kept
    at the number of classes, and relation distillation compares the embeddings that feed
    that convolution."""
    from search.tasks import load_task
    from search.trial.pipeline import finetune, student_layers

    task = load_task("tests.families:make_segmentation_task")
    background = 100.0 * float((task.test.y == 0).float().mean())
    assert background < task.teacher_info["test_accuracy"] <= 100.0
    plan = {layer.name: "int8" for layer in student_layers(task)}
    choices = Choices(structured_ratio=0.5, epochs=1, distill_loss="relation", precisions=plan)
    record = finetune(TrialRecord(0, choices), task, fast_profile)
    assert 0.0 <= record.accuracy <= 100.0
    assert record.params < sum(p.numel() for p in task.teacher().parameters())


def test_a_sequence_tagger_runs_every_stage(fast_profile):
    """One label per token, logits (N, L, C) with the classes last: the teacher trains, the
    default metric is token accuracy, and distillation softens over the classes' axis (the
    sequence axis was once taken for the classes)."""
    from search.tasks import load_task, top1_accuracy
    from search.trial.compress.distill import distillation_loss
    from search.trial.pipeline import finetune, student_layers

    task = load_task("tests.families:make_tagging_task")
    assert 60 < task.teacher_info["val_accuracy"] <= 100
    with torch.no_grad():
        logits = task.teacher()(task.val.x[:8])
    assert logits.shape == (8, 16, 4)
    labels = task.val.y[:8]
    assert top1_accuracy(logits, labels) == pytest.approx(
        100 * float((logits.argmax(-1) == labels).float().mean()))
    assert float(distillation_loss(logits, logits, labels, 4.0, 1.0)) == pytest.approx(0, abs=1e-5)
    plan = {layer.name: "int8" for layer in student_layers(task)}
    choices = Choices(structured_ratio=0.5, head_ratio=0.5, epochs=1, alpha=0.9, precisions=plan)
    record = finetune(TrialRecord(0, choices), task, fast_profile)
    assert 0.0 <= record.accuracy <= 100.0
    assert record.params < sum(p.numel() for p in task.teacher().parameters())


def test_a_recurrent_model_runs_every_stage_with_an_int8_lstm(fast_profile):
    """A time-series classifier with a 2-layer ``nn.LSTM`` as a ``--task`` plugin: its
    teacher trains, channels are pruned around the LSTM, the LSTM runs int8 in ONNX Runtime
    (DynamicQuantizeLSTM), scored and measured."""
    import onnx

    from search.latency.measure import measure_latency
    from search.tasks import load_task
    from search.trial.pipeline import compress, student_layers

    task = load_task("tests.families:make_series_task")
    assert task.teacher_info["test_accuracy"] > 90
    plan = {layer.name: "int8" for layer in student_layers(task)}
    assert "rnn" in plan
    runs = [compress(TrialRecord(i, Choices(structured_ratio=0.5, precisions=plan, epochs=1,
                                            distill_loss=loss, qat=i == 1,
                                            structured_importance="taylor")),
                     task, fast_profile)
            for i, loss in enumerate(("response", "feature", "relation"))]
    done = runs[0]
    graph = onnx.load_from_string(done.onnx_model).graph
    assert sum(n.op_type == "DynamicQuantizeLSTM" for n in graph.node) == 2
    assert done.accuracy > 80
    assert measure_latency(done.onnx_model, fast_profile, task.input_shape).median_ms > 0


def test_a_gru_model_is_pruned_and_runs_int8_unrolled(fast_profile):
    """The GRU plugin task (2 layers, hidden 128, 40 steps; 99 % of the parameters in the
    GRU): structured pruning halves the GRU's hidden width, and int8 runs it unrolled as
    integer MatMuls (ONNX Runtime has no int8 GRU node), scored and measured."""
    import onnx

    from search.latency.measure import measure_latency
    from search.tasks import load_task
    from search.trial.pipeline import compress, student_layers

    task = load_task("tests.support.recurrent_families:make_gru_task")
    assert task.teacher_info["test_accuracy"] > 90
    plan = {layer.name: "int8" for layer in student_layers(task)}
    assert plan == {"rnn": "int8", "head": "int8"}
    done = compress(TrialRecord(0, Choices(structured_ratio=0.5, precisions=plan,
                                           quant_mode="dynamic")), task, fast_profile)
    assert done.error is None and done.accuracy is not None
    assert done.params < 0.3 * sum(p.numel() for p in task.teacher().parameters())
    ops = {n.op_type for n in onnx.load_from_string(done.onnx_model).graph.node}
    assert "MatMulInteger" in ops and "GRU" not in ops
    assert measure_latency(done.onnx_model, fast_profile, task.input_shape).median_ms > 0

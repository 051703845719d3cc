import optuna
import pytest
import torch
import yaml

from search._base.errors import ConfigError
from search._base.records import Layer
from search.space.resolve import ModelFacts, resolve_space
from search.space.schema import IntRange, load_space
from search.space.starts import baselines, seeds
from search.study.sampling import sample


def test_default_space_resolves_to_profile_precisions(profile, layers):
    resolved = resolve_space(load_space("default"), profile, layers)
    for layer in layers:
        assert set(resolved.layer_precisions[layer.name]) == set(profile.allowed(layer.op_type))


def test_space_asking_a_forbidden_precision_is_rejected(tmp_path, profile):
    path = tmp_path / "fp16.yaml"
    path.write_text(yaml.safe_dump({"name": "wants-fp16",
                                    "quantization": {"precisions": ["fp32", "fp16"]}}))
    with pytest.raises(ConfigError) as err:
        resolve_space(load_space(path), profile, [Layer("stem.0", "Conv")])
    text = str(err.value)
    assert "stem.0" in text and "Conv" in text and "fp16" in text and "allowed: fp32, int8" in text


def test_space_typo_is_rejected(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("pruning:\n  structured_ration: {low: 0, high: 0.5}\n")
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert "structured_ration" in str(err.value) and "structured_ratio" in str(err.value)


def test_inverted_range_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distillation:\n  epochs: {low: 3, high: 1}\n")
    with pytest.raises(ConfigError, match="distillation.epochs"):
        load_space(path)


def test_sampling_stays_inside_the_space(profile, layers):
    resolved = resolve_space(load_space("default"), profile, layers)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(30):
        trial = study.ask()
        choices = sample(resolved, trial)
        assert choices.unstructured_sparsity == 0.0  # no sparse kernels on this profile
        high = load_space("default").pruning.structured_ratio.high
        assert 0 <= choices.structured_ratio <= high
        assert set(choices.precisions) == {layer.name for layer in layers}
        assert set(choices.precisions.values()) <= {"fp32", "int8", "int4"}
        assert choices.precisions["fc"] in ("fp32", "int8", "int4")  # int4: Gemm only
        assert all(choices.precisions[n] != "int4" for n in choices.precisions if n != "fc")
        if choices.epochs == 0:
            assert "temperature" not in trial.params  # conditional dimension
        study.tell(trial, [0.0, 1.0])


def test_baselines_are_fp32_then_uniform_u8s8(profile, layers):
    resolved = resolve_space(load_space("default"), profile, layers)
    (label_a, fp32), (label_b, int8) = baselines(resolved)
    assert (label_a, label_b) == ("fp32", "int8")
    assert {v for k, v in fp32.items() if k.startswith("precision.")} == {"fp32"}
    assert {v for k, v in int8.items() if k.startswith("precision.")} == {"int8"}
    assert int8["activation_type"] == "uint8" and int8["per_channel"] is True


def test_block_and_stage_granularity_group_layer_precisions(tmp_path, profile, layers):
    from search.space.resolve import layer_group

    assert layer_group("layer1.0.conv1", "block") == "layer1.0"  # torchvision ResNet
    assert layer_group("features.3.conv.0.0", "block") == "features.3"  # MobileNetV2
    assert layer_group("layer2.conv1", "block") == "layer2"
    assert layer_group("layer2.shortcut.0", "stage") == "layer2"
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"quantization": {"granularity": "stage"}}))
    resolved = resolve_space(load_space(path), profile, layers)
    assert set(resolved.groups) == {"stem", "layer1", "layer2", "layer3", "fc"}
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        choices = sample(resolved, trial)
        precision_params = {k for k in trial.params if k.startswith("precision.")}
        assert precision_params <= {f"precision.{g}" for g in resolved.groups}
        for names in resolved.groups.values():  # one precision per stage
            assert len({choices.precisions[n] for n in names}) == 1
        study.tell(trial, [0.0, 1.0])
    anchors = dict(baselines(resolved))
    assert anchors["fp32"]["precision.layer2"] == "fp32"


def test_profile_decides_patterns_and_modes(layers):
    from search.profiles import load_profile

    space = load_space("default")
    cpu = resolve_space(space, load_profile("cpu-avx512-vnni"), layers)
    a100 = resolve_space(space, load_profile("a100-gpu"), layers)
    assert cpu.patterns == ("unstructured",) and a100.patterns == ("unstructured", "2:4")
    assert cpu.modes == ("static",) and a100.modes == ("static",)  # a conv model: no dynamic
    exhaustive = load_space("exhaustive")
    assert resolve_space(exhaustive, load_profile("cpu-avx512-vnni"), layers).modes == \
        ("static", "dynamic")
    assert resolve_space(exhaustive, load_profile("a100-gpu"), layers).modes == ("static",)
    assert cpu.inits == ("teacher",)


def test_space_asking_what_profile_or_model_cannot_do_is_rejected(tmp_path, layers):
    from search.profiles import load_profile
    from search.space.resolve import ModelFacts

    dynamic = tmp_path / "dynamic.yaml"
    dynamic.write_text(yaml.safe_dump({"quantization": {"quant_mode": ["dynamic"]}}))
    with pytest.raises(ConfigError, match="dynamic.*allowed: \\[static\\]"):
        resolve_space(load_space(dynamic), load_profile("t4-gpu"), layers)
    sparse = tmp_path / "sparse.yaml"
    sparse.write_text(yaml.safe_dump({"pruning": {"init": ["sparse"]}}))
    with pytest.raises(ConfigError, match="no pre-sparsified checkpoint"):
        resolve_space(load_space(sparse), load_profile("cpu-avx512-vnni"), layers)
    assert resolve_space(load_space(sparse), load_profile("cpu-avx512-vnni"), layers,
                         ModelFacts(sparse_init=True)).inits == ("sparse",)
    bad = tmp_path / "pattern.yaml"
    bad.write_text(yaml.safe_dump({"pruning": {"sparsity_pattern": ["4:2"]}}))
    with pytest.raises(ConfigError, match="0 < N < M"):
        load_space(bad)


def test_conditional_dimensions_appear_only_when_their_parent_allows(profile, layers):
    from search.space.resolve import ModelFacts

    resolved = resolve_space(load_space("default"), profile, layers,
                             ModelFacts(droppable_blocks=1, attention=False))
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=5))
    for _ in range(40):
        trial = study.ask()
        c = sample(resolved, trial)
        p = trial.params
        assert ("distill_loss" in p) == (c.epochs > 0)
        assert ("distill_weight" in p) == (c.epochs > 0 and c.distill_loss != "response")
        assert ("qat" in p) == (c.epochs > 0 and c.quant_mode == "static"
                                and "int8" in c.precisions.values())
        assert ("calibration_method" in p) == (c.quant_mode == "static"
                                               and "int8" in c.precisions.values())
        assert ("structured_importance" in p) == (c.structured_ratio > 0)
        assert "head_ratio" not in p  # no attention in this model
        assert c.drop_blocks <= 1
        study.tell(trial, [0.0, 1.0])


def _draws(resolved, n=40, seed=0):
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(sample(resolved, trial))
        study.tell(trial, [0.0, 1.0])
    return out


def test_default_space_samples_only_what_the_device_turns_into_speed(profile, layers):
    """No sparse kernels: no unstructured sparsity; convolutions: no dynamic int8 (ConvInteger
    runs slower than fp32); x86: only the fused U8S8 activations. Exhaustive keeps them all."""
    assert profile.sparse_kernels == "none"
    default = _draws(resolve_space(load_space("default"), profile, layers))
    assert all(c.unstructured_sparsity == 0 for c in default)
    assert {c.quant_mode for c in default} == {"static"}
    assert {c.activation_type for c in default} == {"uint8"}
    exhaustive = _draws(resolve_space(load_space("exhaustive"), profile, layers))
    assert max(c.unstructured_sparsity for c in exhaustive) > 0.2
    assert {c.quant_mode for c in exhaustive} == {"static", "dynamic"}
    assert {c.activation_type for c in exhaustive if c.quant_mode == "static"} == {"uint8", "int8"}


def test_default_space_samples_sparsity_where_the_profile_has_kernels(profile, layers):
    sparse = profile.model_copy(update={"sparse_kernels": "unstructured"})
    draws = _draws(resolve_space(load_space("default"), sparse, layers))
    assert max(c.unstructured_sparsity for c in draws) > 0.2
    nm = profile.model_copy(update={"sparse_kernels": "2:4"})
    draws = _draws(resolve_space(load_space("default"), nm, layers))
    assert {c.sparsity_pattern for c in draws} == {"unstructured", "2:4"}
    assert all(c.unstructured_sparsity == 0 for c in draws)  # dense or 2:4, nothing between


def test_dynamic_int8_is_offered_for_a_model_without_convolutions(profile):
    mlp = [Layer("fc1", "Gemm"), Layer("fc2", "Gemm")]
    resolved = resolve_space(load_space("default"), profile, mlp)
    assert resolved.modes == ("static", "dynamic")
    rows = {dim: (offered, why) for dim, offered, why in resolved.describe()}
    assert "without convolutions" in rows["quant_mode"][1]


def test_describe_says_why_each_dimension_is_or_is_not_sampled(profile, layers):
    rows = {dim: (offered, why) for dim, offered, why in
            resolve_space(load_space("default"), profile, layers).describe()}
    assert rows["unstructured_sparsity"][0] == "0" and "no unstructured sparse kernels" in \
        rows["unstructured_sparsity"][1]
    assert rows["quant_mode"][0] == "static" and "ConvInteger" in rows["quant_mode"][1]
    assert rows["activation_type"][0] == "uint8" and "int8 not sampled" in rows["activation_type"][1]


def test_seeds_are_pruned_quantized_and_distilled_within_the_space(profile, layers):
    resolved = resolve_space(load_space("default"), profile, layers,
                             ModelFacts(droppable_blocks=1))
    starts = dict(seeds(resolved))
    assert set(starts) == {"pruned-0.5", "pruned-0.3-dropped-1", "pruned-0.65"}
    for params in starts.values():
        assert params["epochs"] >= 1 and params["structured_ratio.late"] > 0
        assert {v for k, v in params.items() if k.startswith("precision.")} == {"int8"}
    # a baseline is what it says even where the space fixes a dimension otherwise
    fixed = load_space("default").model_copy(update={"distillation": load_space(
        "default").distillation.model_copy(update={"epochs": IntRange(low=2, high=2)})})
    resolved = resolve_space(fixed, profile, layers)
    label, params = baselines(resolved)[0]
    study = optuna.create_study(directions=["maximize", "minimize"])
    assert sample(resolved, study.ask(), params).epochs == 0
    assert sample(resolved, study.ask()).epochs == 2


def test_segment_granularity_samples_a_channel_ratio_per_depth_segment(profile, layers):
    resolved = resolve_space(load_space("default"), profile, layers,
                             ModelFacts(droppable_blocks=1))
    draws = _draws(resolved)
    assert all(set(c.segment_ratios) == {"early", "middle", "late"} for c in draws)
    assert all(c.structured_ratio == max(c.segment_ratios.values()) for c in draws)
    assert any(len(set(c.segment_ratios.values())) == 3 for c in draws)  # drawn apart
    assert all(f"structured_ratio.{s}" in c.applied() for c in draws for s in c.segment_ratios)
    study = optuna.create_study(directions=["maximize", "minimize"])

    def enqueued(params):  # as the study enqueues baselines and seeds
        study.enqueue_trial(params)
        return sample(resolved, study.ask(), params)

    for _, params in baselines(resolved):  # nothing pruned, in every segment
        assert enqueued(params).segment_ratios == {"early": 0.0, "middle": 0.0, "late": 0.0}
    for _, params in seeds(resolved):  # one ratio everywhere, as the seed says
        ratios = enqueued(params).segment_ratios
        assert len(set(ratios.values())) == 1 and next(iter(ratios.values())) > 0
    rows = {dim: offered for dim, offered, _ in resolved.describe()}
    assert "per depth segment (early, middle, late)" in rows["structured_ratio"]
    uniform = load_space("default").model_copy(update={"pruning": load_space(
        "default").pruning.model_copy(update={"structured_granularity": "uniform"})})
    assert all(c.segment_ratios == {} for c in _draws(resolve_space(uniform, profile, layers)))


def test_the_int8_baseline_leaves_in_float_what_the_profile_cannot_run_in_int8():
    """An LSTM on a GPU profile runs fp32 only: uniform int8 still comes, with every other
    layer int8, as a post-training quantizer would leave the LSTM in float."""
    from search.profiles import load_profile
    from search.space.resolve import resolve_space
    from search.tasks import Split, Task
    from search.trial.pipeline import model_facts, student_layers
    from tests.families import SeriesClassifier

    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randn(16, 32, 3, generator=gen), torch.randint(0, 4, (16,), generator=gen))
    task = Task(name="series", make_model=SeriesClassifier,
                teacher_state=SeriesClassifier().state_dict(), train=split, val=split,
                test=split, input_shape=(32, 3), num_classes=4)
    profile = load_profile("t4-gpu")
    resolved = resolve_space(load_space("default"), profile, student_layers(task),
                             model_facts(task))
    anchors = dict(baselines(resolved))
    assert set(anchors) == {"fp32", "int8"}
    plan = {k: v for k, v in anchors["int8"].items() if k.startswith("precision.")}
    assert plan == {"precision.proj": "int8", "precision.rnn": "fp32", "precision.head": "int8"}


def test_auto_granularity_keeps_a_deep_models_body_in_one_precision(profile, layers):
    """A precision per layer for a small model; for a deep one, the two layers at each end
    their own and the body one, so a drawn plan does not scatter fp32 islands (each paying
    its quantize / dequantize boundary) through an int8 model."""
    import torchvision

    from search.trial.compress.export import compressible_layers

    default = load_space("default")
    assert default.quantization.granularity == "auto"
    small = resolve_space(default, profile, layers)  # the digits ResNet: 10 layers
    assert small.granularity == "layer" and len(small.groups) == len(layers)

    deep_layers = compressible_layers(torchvision.models.mobilenet_v2(num_classes=10))
    deep = resolve_space(default, profile, deep_layers)
    names = [layer.name for layer in deep_layers]
    assert deep.granularity == "ends"
    assert list(deep.groups) == [*names[:2], "body", *names[-2:]]
    assert deep.groups["body"] == tuple(names[2:-2])
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        choices = sample(deep, trial)
        assert len({choices.precisions[n] for n in names[2:-2]}) == 1
        assert {k for k in trial.params if k.startswith("precision.")} == \
            {f"precision.{g}" for g in deep.groups}
        study.tell(trial, [0.0, 1.0])
    (_, fp32), (_, int8) = baselines(deep)
    assert fp32["precision.body"] == "fp32" and int8["precision.body"] == "int8"
    assert "precision.body" in dict(seeds(deep))["pruned-0.5"]
    assert "one for the 49 layers between" in dict((d, w) for d, w, _ in deep.describe())[
        "precision"]


def test_symmetric_activation_ranges_are_sampled_only_where_they_run_fast(profile, layers):
    """ONNX Runtime's x86 int8 kernels ran uniform-int8 MobileNetV2 1.6x slower with
    symmetric uint8 activations (0.33 against 0.21 ms, fp32 0.35): the default space leaves
    them out on CPU profiles and says why; the exhaustive space keeps them."""
    from search.profiles import Int8Settings

    default = resolve_space(load_space("default"), profile, layers)
    assert default.activation_symmetric == (False,)
    why = {d: reason for d, _, reason in default.describe()}["activation_symmetric"]
    assert "true not sampled" in why
    assert resolve_space(load_space("exhaustive"), profile, layers).activation_symmetric == \
        (False, True)
    with pytest.raises(ValueError, match="fast_activation_symmetric lists"):
        Int8Settings(activation_symmetric=[False], fast_activation_symmetric=[True])


def test_importances_and_losses_a_model_has_no_signal_for_are_not_offered(profile, layers,
                                                                         tmp_path):
    """bn_scale ranks channels by BatchNorm scales, feature distillation compares stage
    outputs: a model without them is not offered them, and `search spaces` says why."""
    plain = resolve_space(load_space("default"), profile, layers,
                          ModelFacts(batchnorm=False, feature_taps=False))
    assert "bn_scale" not in plain.importances and "magnitude" in plain.importances
    assert plain.distill_losses == ("response", "relation")
    why = {row[0]: row[2] for row in plain.describe()}
    assert "no BatchNorm" in why["structured_importance"]
    assert "feature not offered" in why["distill_loss"]
    drawn = _draws(plain, n=60)
    assert not {c.structured_importance for c in drawn} & {"bn_scale"}
    assert not {c.distill_loss for c in drawn} & {"feature"}
    full = resolve_space(load_space("default"), profile, layers, ModelFacts())
    assert "bn_scale" in full.importances and "feature" in full.distill_losses
    only = tmp_path / "only.yaml"
    only.write_text(yaml.safe_dump({"pruning": {"structured_importance": ["bn_scale"]}}))
    with pytest.raises(ConfigError, match="lists only 'bn_scale'.*no BatchNorm"):
        resolve_space(load_space(only), profile, layers, ModelFacts(batchnorm=False))


def test_seeds_keep_the_references_precisions_where_int8_measured_slower(profile, layers):
    """The driver asks for these when uniform int8 ran slower than the reference (a GRU's
    unrolled int8): the same structures and fine-tunes, the reference's precisions."""
    resolved = resolve_space(load_space("default"), profile, layers,
                             ModelFacts(droppable_blocks=1))
    fast, kept = dict(seeds(resolved)), dict(seeds(resolved, reference_precisions=True))
    assert set(fast) == set(kept)
    reference = {k: v for k, v in baselines(resolved)[0][1].items() if k.startswith("precision")}
    for label, params in kept.items():
        assert {k: v for k, v in params.items() if k.startswith("precision")} == reference
        same = {k: v for k, v in params.items() if not k.startswith("precision")}
        assert same.items() <= fast[label].items()


def test_seeds_keep_the_first_layer_at_the_references_precision_where_int8_lost_too_much(
        profile, layers):
    """After a lossy uniform int8 the driver asks for these: that int8 plan with its first
    group at fp32 as a start of its own, and the pruned starts on the same plan."""
    resolved = resolve_space(load_space("default"), profile, layers,
                             ModelFacts(droppable_blocks=1))
    plain, kept = dict(seeds(resolved)), dict(seeds(resolved, first_kept=True))
    first = next(iter(resolved.group_precisions))
    assert list(kept) == ["int8-first-fp32", *plain]
    start = kept["int8-first-fp32"]
    int8 = dict(baselines(resolved))["int8"]
    assert start == {**int8, f"precision.{first}": "fp32"}
    for label in plain:
        assert kept[label] == {**plain[label], f"precision.{first}": "fp32"}
    # a GRU's slower int8 keeps every layer at the reference's precision already
    assert "int8-first-fp32" not in dict(seeds(resolved, reference_precisions=True,
                                               first_kept=True))

"""A trial records only the choices that shaped its model."""

from search._base.records import Choices


def test_choices_that_had_no_effect_are_not_recorded():
    fp16 = Choices(precisions={"conv": "fp16", "fc": "fp16"})  # a VPU: no integer layer
    shown = fp16.applied()
    assert "activation_type" not in shown and "weight_type" not in shown
    assert "lr" not in shown and "temperature" not in shown  # no fine-tune
    assert shown["precision.conv"] == "fp16" and shown["epochs"] == 0

    int8 = Choices(precisions={"conv": "int8"}, epochs=2, structured_ratio=0.5,
                   distill_loss="feature")
    shown = int8.applied()
    assert shown["activation_type"] == "uint8" and shown["lr"] == int8.lr
    assert shown["distill_weight"] == 1.0 and shown["structured_importance"] == "magnitude"
    dynamic = Choices(precisions={"fc": "int8"}, quant_mode="dynamic").applied()
    assert "activation_type" not in dynamic and dynamic["weight_type"] == "int8"


def test_two_trials_differing_only_in_idle_settings_build_the_same_model():
    a = Choices(precisions={"conv": "fp32"}, lr=1e-3, calibration_method="entropy")
    b = Choices(precisions={"conv": "fp32"}, lr=5e-3, calibration_method="minmax")
    assert a.flat() != b.flat() and a.applied() == b.applied()

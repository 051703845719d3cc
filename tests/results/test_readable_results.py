"""Results a person reads lead with what can be deployed: the points within the allowed drop.

The study holds a collapsed model (16 % accurate, the fastest, so on the front) and a slow
outlier; the front table, summary.md and pareto.png must put the usable points first,
keep the others listed, and not let the outliers squash the plot.
"""

from __future__ import annotations

import optuna
import pandas as pd

from search.cli import _print_result, main
from search.config import SearchConfig
from search.results.outputs import _summary
from search.results.pareto import best_speedup, readable_front, trials_frame
from search.results.render import _draw_front, plot_front
from search.study.run import StudyResult

# (accuracy, latency ms, baseline): fp32 reference, int8 baseline, a good point, a slow
# but most accurate outlier, a collapsed fast model and a poor one between
POINTS = [(95.0, 1.0, "fp32"), (94.8, 0.4, "int8"), (94.5, 0.3, ""), (95.1, 4.0, ""),
          (16.0, 0.05, ""), (60.0, 0.1, "")]


def _study(storage: str | None = None) -> optuna.Study:
    study = optuna.create_study(study_name="readable", storage=storage,
                                directions=["maximize", "minimize"])
    for i, (acc, lat, baseline) in enumerate(POINTS):
        attrs = {"baseline": baseline, "reference": i == 0, "latency_source": "predicted",
                 "layer_precisions": {"a": "int8" if i else "fp32", "b": "fp32"}}
        study.add_trial(optuna.trial.create_trial(values=[acc, lat], user_attrs=attrs))
    return study


def test_the_front_leads_with_the_points_within_the_drop():
    df = trials_frame(_study())
    assert df.loc[df["trial"] == 4, "on_front"].item()  # the collapsed model is on the front
    shown = readable_front(df, 1.0)
    assert shown["trial"].tolist() == [2, 1, 0, 3, 4, 5]
    assert shown["within_drop"].tolist() == [True] * 4 + [False] * 2


def test_summary_lists_usable_points_first_and_the_rest_below(tmp_path):
    df = trials_frame(_study())
    shown = readable_front(df, 1.0)
    text = _summary(SearchConfig(profile="t4-gpu", budget=6, study_name="readable"), df,
                    shown[shown["on_front"]], [], 3.3)
    rest = text.index("The rest of the front, more than 1 point(s) below")
    assert text.index("| 2 | 94.50") < text.index("| 3 | 95.10") < rest
    assert rest < text.index("| 4 | 16.00") and rest < text.index("| 5 | 60.00")


def test_the_plot_has_a_log_latency_axis_and_marks_the_outliers(tmp_path):
    df = trials_frame(_study())
    fig = _draw_front(df, "readable", 1.0)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    bottom, _ = ax.get_ylim()
    assert 80 < bottom < 16 + 80  # the 16 % model no longer stretches the axis to 0
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("below" in label for label in labels) and any("allowed drop" in label for label in labels)
    assert {"fp32", "int8"} <= {t.get_text() for t in ax.texts}  # the baselines are named
    assert plot_front(df, tmp_path / "p.png", "readable", 1.0).stat().st_size > 1000


def _rows_in_order(text: str, trials: list[int]) -> list[int]:
    lines = [line.split() for line in text.splitlines()]
    return [int(w[0]) for w in lines if w and w[0].isdigit() and int(w[0]) in trials]


def test_the_terminal_table_and_search_report_lead_with_usable_points(tmp_path, capsys):
    df = trials_frame(_study())
    result = StudyResult(study_name="readable", output_dir=tmp_path, trials=df,
                         front=readable_front(df, 1.0), tracking_uri="sqlite:///x.db",
                         parent_run_id="p", best_speedup=3.3, n_failed=0, wall_s=1.0)
    _print_result(result)
    out = capsys.readouterr().out
    assert _rows_in_order(out, [0, 1, 2, 3, 4, 5]) == [2, 1, 0, 3, 4, 5]
    assert out.index("the rest of the front, beyond the allowed accuracy drop") < out.index("16.000")

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    _study(storage)
    assert main(["report", "--study", "readable", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert _rows_in_order(out, [0, 1, 2, 3, 4, 5]) == [2, 1, 0, 3, 4, 5]


def test_a_re_measured_front_shows_its_side_by_side_speedup_beside_the_trials_own():
    """The headline best speedup uses the side-by-side re-measurement; the table must show
    that number too, not only the trial's own (measured alone, maybe on a busy machine)."""
    study = _study()
    study.set_user_attr("remeasured", {"0": {"median_ms": 1.2}, "1": {"median_ms": 0.6},
                                       "2": {"median_ms": 0.4}})
    df = trials_frame(study)
    shown = readable_front(df, 1.0)
    text = _summary(SearchConfig(profile="t4-gpu", budget=6, study_name="readable"), df,
                    shown[shown["on_front"]], [], best_speedup(df, 1.0))
    best = next(line for line in text.splitlines() if line.startswith("- best speedup"))
    assert "side by side" in best and ": 3.00x" in best
    assert "- metric: accuracy on the validation split" in text  # a classifier's metric
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert row.split("|")[4].strip() == "3.33x" and row.split("|")[5].strip() == "3.00x"
    slow = next(line for line in text.splitlines() if line.startswith("| 3 |"))
    assert slow.split("|")[5].strip() == "-"  # not re-measured


def test_the_best_speedup_comes_from_the_side_by_side_measurement_alone():
    """After the study the front and the baselines are re-measured side by side; a trial left
    out of that (a refinement's dominated source, the same model size) keeps its
    screening-time number, measured at another moment, which must not be reported (one
    run here printed 5.64x from such a source while its refinement re-measured 4.00x)."""
    df = trials_frame(_study())
    df["speedup_remeasured"] = float("nan")
    for trial, speedup in ((0, 1.0), (1, 2.1), (2, 2.9)):  # the front within the drop
        df.loc[df["trial"] == trial, "speedup_remeasured"] = speedup
    source = df[df["trial"] == 2].assign(trial=99, accuracy=94.4, speedup=5.6,
                                         speedup_remeasured=float("nan"), on_front=False)
    df = pd.concat([df, source], ignore_index=True)
    assert best_speedup(df, 1.0) == 2.9
    assert best_speedup(df.drop(columns="speedup_remeasured"), 1.0) == 5.6

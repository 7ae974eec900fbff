"""``memdistill matched-quality``: the selection applied to the audited candidates, the table and figures, and the
whole command end to end in its quick configuration (with the localized-memorization set, for the per-group rows)."""

import json
import math

import pytest
import torch

from diffusers_memdistill.analysis.matched_quality_cli import (
    DYNAMICS_NAME,
    REPORT_NAME,
    SCATTER_NAME,
    parse_sigmas,
    plot_dynamics,
    plot_scatter,
    render_markdown,
    select_matched,
)
from diffusers_memdistill.cli import main as cli_main


def _candidate(name, method, checkpoint, step, quality, memorized, groups=None):
    return {"name": name, "method": method, "checkpoint": checkpoint, "step": step, "quality": quality,
            "fd_pixel": quality, "memorized": memorized, "p95": 0.9, "groups": groups or {}}


# Two methods' candidates in run order; the teacher's quality is 1.0.
CANDIDATES = [
    _candidate("CD step 1 (1-step)", "CD (1 step)", "step 1", 1, 3.0, 0.0),
    _candidate("CD step 2 (1-step)", "CD (1 step)", "step 2", 2, 1.3, 0.1),
    _candidate("CD step 3 (1-step)", "CD (1 step)", "step 3", 3, 0.7, 0.2),  # as far as step 2: the better score
    _candidate("CD step 4 (1-step)", "CD (1 step)", "step 4", 4, math.nan, 0.0),
    _candidate("PD+refine sigma 0.5", "PD+refine", "σ = 0.5", None, 0.2, 0.9),
    _candidate("PD+refine sigma 2", "PD+refine", "σ = 2", None, 1.05, 0.5),
]


def test_each_method_gets_its_candidate_of_the_teachers_quality():
    selected = select_matched(CANDIDATES, 1.0)
    assert list(selected) == ["CD (1 step)", "PD+refine"]
    assert selected["CD (1 step)"]["name"] == "CD step 3 (1-step)"
    assert selected["CD (1 step)"]["distance"] == pytest.approx(0.3)
    assert selected["PD+refine"]["checkpoint"] == "σ = 2" and selected["PD+refine"]["distance"] == pytest.approx(0.05)
    # A method is matched among its own candidates only: PD+refine's 1.05 does not displace CD's choice.
    assert select_matched(CANDIDATES[:4], 1.0)["CD (1 step)"]["name"] == "CD step 3 (1-step)"


def test_refine_levels_are_checked():
    assert parse_sigmas("2, 0.5,2") == [0.5, 2.0]
    for bad in ("", "0", "-1,2", "a", "nan"):
        with pytest.raises(ValueError, match="--refine_sigmas"):
            parse_sigmas(bad)


def test_table_and_figures_from_a_fixed_result(tmp_path):
    groups = {"repeated": {"memorized": 0.75, "p95": 0.4}, "non-repeated": {"memorized": 0.0, "p95": 0.95}}
    candidates = [{**c, "groups": groups} for c in CANDIDATES]
    cfg = {"regime": "severe (localized)", "quality_metric": "fd_pixel", "repeat_classes": [0, 1],
           "repeat_images_per_class": 4, "repeat_times": 5, "num_other_images": 16, "num_train_images": 32,
           "teacher_steps": 10, "cd_steps": 4, "dmd_steps": 4, "pd_steps": 2, "pd_teacher_steps": 4,
           "refine_sigmas": [0.5, 2.0], "num_samples": 8}
    results = {"config": cfg, "seed": 0, "candidates": candidates, "selected": select_matched(candidates, 1.0),
               "teacher": {"name": "teacher", "quality": 1.0, "memorized": 0.5, "p95": 0.3, "groups": groups}}
    text = render_markdown(results)
    assert "| Model | selected | FD (pixels) ↓ | Δ to teacher | Repeated | Non-repeated | Overall" in text
    assert "| CD (1 step) | step 3 | 0.7 | 0.3 | 75.00% / 0.4 | 0.00% / 0.95 | 20.00% / 0.9 |" in text
    assert "| PD+refine | σ = 2 | 1.05 | 0.05 |" in text and "Selection rule" in text
    assert "| CD step 4 (1-step) | CD (1 step) | step 4 | – |" in text  # the unmeasured checkpoint is listed
    plot_scatter(results, tmp_path / "s.png")
    fig = plot_dynamics(results, tmp_path / "d.png")
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "d.png").stat().st_size > 0
    assert [ax.get_title() for ax in fig.axes] == ["overall", "repeated classes"]
    ungrouped = render_markdown({**results, "teacher": {**results["teacher"], "groups": {}}})
    assert "| Model | selected | FD (pixels) ↓ | Δ to teacher | Mem (L2) / p95 ratio |" in ungrouped


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    from diffusers_memdistill.pipelines.pipeline_dmd import DMDGeneratorPipeline
    from diffusers_memdistill.training.runner import export_snapshot, load_checkpoint_weights

    out = tmp_path / "mq"
    assert cli_main(["matched-quality", "--quick", "--output_dir", str(out), "--device", "cpu", "--repeat_classes",
                     "0,1", "--repeat_images_per_class", "4", "--num_other_images", "16"]) == 0
    results = json.loads((out / "results.json").read_text())
    audit = json.loads((out / "eval" / "metrics.json").read_text())["models"]
    methods = ["CD (1 step)", "CD (2 steps)", "DMD", "PD (1 step)", "PD+refine", "DMD+refine"]
    assert list(results["selected"]) == methods
    # Every candidate's numbers are the audit's; the selected one is the closest to the teacher's pixel FD.
    target = audit["teacher"]["fd_pixel"]
    assert results["teacher"]["quality"] == target
    for c in results["candidates"]:
        assert c["quality"] == audit[c["name"]]["fd_pixel"]
        assert c["memorized"] == audit[c["name"]]["l2"]["fraction_memorized"]
        assert set(c["groups"]) == {"repeated", "non-repeated"}
    for method in methods:
        own = [c for c in results["candidates"] if c["method"] == method]
        assert len(own) == 2  # two checkpoints, or two refinement levels
        best = min(abs(c["quality"] - target) for c in own)
        assert results["selected"][method]["distance"] == pytest.approx(best)
        assert abs(results["selected"][method]["quality"] - target) == pytest.approx(best)
    # The checkpoints: the earlier one exported from the checkpoint's EMA (the generator's, for DMD), the last
    # one the finished model.
    dmd = [c["name"] for c in results["candidates"] if c["method"] == "DMD"]
    assert dmd == ["DMD step 5", "DMD step 10"]
    snapshot = DMDGeneratorPipeline.from_pretrained(out / "snapshots" / "dmd-5")
    ema = load_checkpoint_weights(str(out / "dmd" / "checkpoints" / "checkpoint-5"))["ema_generator"]
    assert all(torch.equal(v, ema[k]) for k, v in snapshot.unet.state_dict().items())
    assert json.loads((out / "snapshots" / "dmd-5" / "training_set.json").read_text()) == \
        json.loads((out / "teacher" / "training_set.json").read_text())
    with pytest.raises(KeyError, match="holds no network 'ema_unet'"):
        export_snapshot(str(out / "dmd" / "checkpoints" / "checkpoint-5"), str(out / "dmd"), str(tmp_path / "x"), 5)
    # The table (000 Table 4 layout, with groups) and the figures.
    text = (out / REPORT_NAME).read_text()
    assert "Repeated | Non-repeated | Overall" in text and all(f"| {m} |" in text for m in methods)
    assert (out / SCATTER_NAME).stat().st_size > 0 and (out / DYNAMICS_NAME).stat().st_size > 0
    with pytest.raises(FileExistsError, match="already holds a finished matched-quality run"):
        cli_main(["matched-quality", "--quick", "--output_dir", str(out)])

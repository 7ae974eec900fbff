"""The teacher-length sweep of 003 §4.2.2 end to end in a reduced configuration."""

import json

import pytest
import torch

from diffusers_memdistill.analysis.dmd_sweep import parse_lengths
from diffusers_memdistill.cli import main as cli_main
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.training.runner import load_checkpoint_weights

pytestmark = pytest.mark.slow


def test_lengths_are_checked():
    assert parse_lengths("1024,256, 1024") == [256, 1024]
    for bad in ("", "0,4", "a,2"):
        with pytest.raises(ValueError, match="--teacher_steps"):
            parse_lengths(bad)


def test_quick_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    assert cli_main(["dmd-sweep", "--quick", "--output_dir", str(out), "--num_train_images", "40",
                     "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["teacher_steps"] for r in results["rows"]] == [2, 4]
    for row in results["rows"]:
        assert row["delta_e"] >= 0 and 0 <= row["delta_fraction_negative"] <= 1
        assert (out / row["report"]).is_file()
    # Each snapshot holds the EMA weights of its checkpoint, and the student was distilled from that snapshot.
    for length in (2, 4):
        snapshot = EDMPipeline.from_pretrained(out / f"teacher-{length}")
        ema = load_checkpoint_weights(str(out / "teacher" / "checkpoints" / f"checkpoint-{length}"))["ema_unet"]
        assert all(torch.equal(v, ema[k]) for k, v in snapshot.unet.state_dict().items())
        config = json.loads((out / f"dmd-{length}" / "training_config.json").read_text())
        assert config["teacher"] == str(out / f"teacher-{length}")
    two, four = (EDMPipeline.from_pretrained(out / f"teacher-{n}").unet.state_dict() for n in (2, 4))
    assert not all(torch.equal(v, four[k]) for k, v in two.items())
    assert (out / "delta_e_vs_teacher_steps.png").is_file() and "003" in (out / "sweep.md").read_text()
    with pytest.raises(FileExistsError, match="already holds a finished sweep"):
        cli_main(["dmd-sweep", "--quick", "--output_dir", str(out)])

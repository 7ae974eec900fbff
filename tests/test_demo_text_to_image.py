"""memdistill demo --text_to_image: the captioned digits it writes, and the whole demo end to end in its quick mode."""

import json

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

from diffusers_memdistill.cli import main as cli_main
from diffusers_memdistill.data import index_dataset
from diffusers_memdistill.demo_text_to_image import (
    DMD_NAME,
    LCM_NAME,
    MODEL_NAME,
    UNDISTILLED_NAME,
    write_captioned_digits,
)


def test_captioned_digits_name_one_image_per_memorized_prompt(tmp_path):
    folders = write_captioned_digits(str(tmp_path), num_memorized=10, extra_ratio=3, seed=0)
    memorized, heldout = index_dataset(folders["memorized"]), index_dataset(folders["memorized"], "test")
    extra = index_dataset(folders["extra"])
    assert (len(memorized), len(heldout), len(extra)) == (10, 10, 30)
    # Unique captions for the memorized and held-out digits (numbers never shared), class captions for the rest.
    unique = memorized.captions + heldout.captions
    assert len(set(unique)) == 20 and all(", sample " in c for c in unique)
    assert all(c.startswith("a handwritten digit ") and ", " not in c for c in extra.captions)
    assert sorted(c.split(", ")[0][-1] for c in memorized.captions) == [str(d) for d in range(10)]  # class-balanced
    # No digit is in two sets; the autoencoder's digits are the others.
    sources = [set(ix.sources) for ix in (memorized, heldout, extra)]
    names = [{s.split("/")[-1] for s in src} for src in sources]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert len(folders["autoencoder"]) == 1797 - 50


@pytest.mark.slow
def test_text_to_image_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--text_to_image", "--quick", "--output_dir", str(out)]) == 0
    results = json.loads((out / "report" / "metrics.json").read_text())
    assert results["task"] == "text-to-image" and results["metrics"] == ["l2"] and results["guidance_scale"] == 1.0
    # Teacher, LCM student and DMD generator audited in one call: the same prompts and seeds, each with its own step
    # count.
    assert list(results["models"]) == [MODEL_NAME, LCM_NAME, DMD_NAME, UNDISTILLED_NAME]
    assert results["num_prompts"] == results["num_heldout_prompts"] == 4
    teacher, student, generator = (results["models"][name] for name in (MODEL_NAME, LCM_NAME, DMD_NAME))
    assert (teacher["pipeline_class"], teacher["steps"]) == ("StableDiffusionPipeline", 2)
    assert (student["pipeline_class"], student["steps"]) == ("LatentConsistencyModelPipeline", 4)
    assert (generator["pipeline_class"], generator["steps"]) == ("StableDiffusionPipeline", 1)
    # The control: the model's own UNet in the student's pipeline, 4 LCM steps, identical to the model's weights.
    control = LatentConsistencyModelPipeline.from_pretrained(out / "undistilled_lcm").unet
    model_unet = StableDiffusionPipeline.from_pretrained(out / "model").unet.state_dict()
    assert results["models"][UNDISTILLED_NAME]["steps"] == 4 and not control.time_embedding.cond_proj.weight.any()
    assert all(torch.equal(v, model_unet[k]) for k, v in control.state_dict().items() if k in model_unet)
    for model in (teacher, student, generator):
        for section in (model, model["heldout_prompts"]):
            for measure in ("l2_own", "l2"):
                stats = section[measure]
                assert stats["num_samples"] == 4 * 2 and stats["num_nan"] == 0
                assert 0 <= stats["fraction_memorized"] <= 1
    assert results["training_sets"]["train0"]["num_images"] == 4 + 2 * 4  # memorized and extra digits
    report = (out / "report" / "report.md").read_text()
    for name in (MODEL_NAME, LCM_NAME, DMD_NAME):
        assert f"| {name} | training |" in report and f"| {name} | held-out |" in report
    timings = json.loads((out / "report" / "demo.json").read_text())["wall_seconds"]
    assert "- LCM student" in report and "- DMD generator" in report and timings["LCM"] > 0 and timings["DMD"] > 0
    assert "*floor: 4 held-out real images*" in report and "## How this model was made" in report
    # The model is a standard Stable Diffusion folder; the records name its memorized set.
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained autoencoder's latents
    assert len(json.loads((out / "model" / "memorized_set.json").read_text())["entries"]) == 4
    # The student is a stock LCM pipeline distilled on the teacher's own memorized set.
    lcm = LatentConsistencyModelPipeline.from_pretrained(out / "lcm")
    assert lcm.unet.config.time_cond_proj_dim is not None
    assert (json.loads((out / "lcm" / "memorized_set.json").read_text())
            == json.loads((out / "model" / "memorized_set.json").read_text()))
    # The generator is a stock Stable Diffusion pipeline sampled by an LCMScheduler in one step, on the same records.
    dmd = StableDiffusionPipeline.from_pretrained(out / "dmd")
    assert type(dmd.scheduler).__name__ == "LCMScheduler" and dmd.scheduler.config.original_inference_steps == 1
    assert (json.loads((out / "dmd" / "memorized_set.json").read_text())
            == json.loads((out / "model" / "memorized_set.json").read_text()))
    with pytest.raises(FileExistsError, match="already holds a finished demo"):
        cli_main(["demo", "--text_to_image", "--quick", "--output_dir", str(out)])

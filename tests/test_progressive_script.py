"""End to end: progressive distillation of a tiny digits teacher with training_scripts/distill_progressive.py, round
after round; the rounds load through the registry, resume, and refuse a mixed-up run."""

import json
import os
import shutil

import pytest
import torch

from conftest import run_script, run_without_package, tiny_unet
from diffusers_memdistill.data import build_training_set
from diffusers_memdistill.registry import load_pipeline, sample_images
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from diffusers_memdistill.training import distill_progressive
from diffusers_memdistill.training.runner import load_checkpoint_weights, reset_accelerate_state
from diffusers_memdistill.utils.hashing import file_sha256

pytestmark = pytest.mark.slow
UNET = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def _args(teacher_dir, out, *extra):
    return ["--pretrained_model_name_or_path", str(teacher_dir), "--output_dir", str(out), "--loss", "l2",
            "--train_batch_size", "4", "--report_to", "none", "--num_validation_images", "2", "--teacher_steps", "4",
            "--final_steps", "1", "--teacher_solver", "heun", "--max_train_steps", "2", "--checkpointing_steps", "1",
            *extra]


@pytest.fixture(scope="module")
def pd_dir(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pd")
    run_script("distill_progressive", _args(teacher_dir, out))
    return out


def _config(folder):
    with open(os.path.join(folder, "training_config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_each_round_halves_the_steps_and_loads_through_the_registry(pd_dir, teacher_dir, tmp_path):
    round_1 = pd_dir / "rounds" / "round-01-2-steps"
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    teacher_sha = file_sha256(str(teacher_dir / UNET))
    expected = [(round_1, 2, str(teacher_dir), teacher_sha, "heun"),
                (pd_dir, 1, str(round_1), file_sha256(str(round_1 / UNET)), "euler")]
    for r, (folder, steps, round_teacher, sha, solver) in enumerate(expected, 1):
        pipe, registration = load_pipeline(str(folder))
        assert type(pipe).__name__ == "ProgressiveDistillationPipeline" and registration.kind == "generator"
        assert registration.steps(pipe) == steps == pipe.scheduler.config.num_inference_steps
        images = sample_images(pipe, z)
        assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
        record = _config(folder)["progressive_round"]
        assert record == {"round": r, "num_rounds": 2, "student_steps": steps, "round_teacher_steps": 2 * steps,
                          "round_teacher": round_teacher, "round_teacher_solver": solver, "round_teacher_sha256": sha}
        assert (folder / f"samples/step-0000002-{steps}-step.png").is_file()
        assert (folder / "checkpoints" / "checkpoint-2").is_dir()
        assert (folder / "training_set.json").read_text() == (teacher_dir / "training_set.json").read_text()
    # The saved weights are each round's EMA; the rounds trained (the student moved away from the teacher).
    teacher_weights = load_checkpoint_weights(str(round_1 / "checkpoints" / "checkpoint-2"))
    assert set(teacher_weights) == {"unet", "ema_unet"}
    final = load_pipeline(str(pd_dir))[0].unet.state_dict()
    first = load_pipeline(str(round_1))[0].unet.state_dict()
    assert not all(torch.equal(v, first[k]) for k, v in final.items())

    # The model card tells what the folder holds.
    from diffusers_memdistill.hub import render_model_card

    card = str(render_model_card(str(pd_dir))[0])
    assert "progressive distillation" in card and "round 2 of 2: 1 step(s) where its teacher took 2" in card

    # Without the package: the single-file pipeline shipped in the folder samples the same 1-step images.
    pipe = load_pipeline(str(pd_dir))[0]
    pipe.set_progress_bar_config(disable=True)
    expected_images = pipe(batch_size=2, latents=z[:2], output_type="np").images
    import numpy as np

    np.save(tmp_path / "expected.npy", expected_images)
    result = run_without_package(f"""
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(pd_dir)!r}, trust_remote_code=True)
assert type(pipe).__name__ == "ProgressiveDistillationPipeline" and type(pipe.scheduler).__name__ == "EDMDDIMScheduler"
pipe.set_progress_bar_config(disable=True)
z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))[:2]
out = pipe(batch_size=2, latents=z, output_type="np").images
assert np.allclose(out, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-6)
print("OK", pipe.scheduler.num_inference_steps)
""", tmp_path)
    assert "OK 1" in result.stdout


def test_a_round_starts_from_the_previous_rounds_student(tmp_path):
    """build_plan of round r: the student is a copy of the network it is handed (the previous round's student), which
    is also its frozen teacher, sampled with DDIM steps whatever round 1 used."""
    args = distill_progressive.parse_args(_args(tmp_path / "teacher", tmp_path / "out"))
    previous = tiny_unet(seed=7)
    training_set = build_training_set("digits", 8, num_train_images=16)
    plan = distill_progressive.build_plan(args, 2, 1, previous, EDMHeunScheduler().config, training_set,
                                          "round-1", "0" * 64)
    student = plan.models["unet"]
    assert student is not previous and plan.frozen["teacher"] is previous
    assert all(torch.equal(v, previous.state_dict()[k]) for k, v in student.state_dict().items())
    assert plan.fingerprint["student_steps"] == 1 and plan.fingerprint["round_teacher_steps"] == 2
    assert plan.fingerprint["round_teacher_solver"] == "euler" and plan.fingerprint["round_teacher_sha256"] == "0" * 64
    first = distill_progressive.build_plan(args, 1, 2, previous, EDMHeunScheduler().config, training_set, "t", "1")
    assert first.fingerprint["round_teacher_solver"] == "heun" and first.fingerprint["round_teacher_steps"] == 4


class Interrupt(Exception):
    pass


def test_resume_continues_the_unfinished_round_and_ends_as_an_uninterrupted_run(teacher_dir, pd_dir, tmp_path):
    out = tmp_path / "pd"
    args = distill_progressive.parse_args([str(a) for a in _args(teacher_dir, out)])

    def stop(round_index, step):
        if (round_index, step) == (2, 1):
            raise Interrupt

    with pytest.raises(Interrupt):
        distill_progressive.main(args, step_callback=stop)
    reset_accelerate_state()
    assert (out / "rounds" / "round-01-2-steps" / "model_index.json").is_file()
    assert (out / "checkpoints" / "checkpoint-1").is_dir() and not (out / "model_index.json").exists()
    with pytest.raises(FileExistsError, match="resume_from_checkpoint latest"):
        run_script("distill_progressive", _args(teacher_dir, out))
    reset_accelerate_state()
    seen = []
    resumed = distill_progressive.parse_args([str(a) for a in _args(teacher_dir, out, "--resume_from_checkpoint",
                                                                     "latest")])
    distill_progressive.main(resumed, step_callback=lambda r, s: seen.append((r, s)))
    reset_accelerate_state()
    assert seen == [(2, 2)]  # round 1 kept, round 2 resumed at its step 1
    for folder in ("", "rounds/round-01-2-steps"):
        a = load_checkpoint_weights(str(out / folder / "checkpoints" / "checkpoint-2"))
        b = load_checkpoint_weights(str(pd_dir / folder / "checkpoints" / "checkpoint-2"))
        for name in a:
            assert all(torch.equal(v, b[name][k]) for k, v in a[name].items()), (folder, name)
    # Everything finished: a resumed run has nothing to do.
    assert run_script("distill_progressive", _args(teacher_dir, out, "--resume_from_checkpoint", "latest")) == 0
    reset_accelerate_state()
    # A new run over it (one round, 2 -> 1 step) replaces it, old rounds included.
    args = _args(teacher_dir, out, "--overwrite_output_dir")
    args[args.index("--teacher_steps") + 1] = "2"
    run_script("distill_progressive", args)
    assert not (out / "rounds").exists()
    assert _config(out)["progressive_round"]["num_rounds"] == 1
    assert _config(out)["progressive_round"]["round_teacher"] == str(teacher_dir)


def test_a_round_from_another_teacher_is_refused(teacher_dir, pd_dir, tmp_path):
    out = tmp_path / "pd"
    shutil.copytree(pd_dir, out)
    for name in ("model_index.json", "training_config.json"):
        os.remove(out / name)  # the last round is unfinished...
    config_path = out / "rounds" / "round-01-2-steps" / "training_config.json"
    config = json.loads(config_path.read_text())
    config["progressive_round"]["round_teacher_sha256"] = "f" * 64  # ...and round 1 came from another teacher
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="round-01-2-steps holds a finished round distilled from another teacher"):
        run_script("distill_progressive", _args(teacher_dir, out, "--resume_from_checkpoint", "latest"))
    with pytest.raises(ValueError, match="is not a checkpoint of any round"):
        run_script("distill_progressive", _args(teacher_dir, out, "--resume_from_checkpoint",
                                                str(tmp_path / "elsewhere" / "checkpoint-1")))
    assert not (out / "model_index.json").exists()  # nothing written

"""The training runner on toy networks: optimizer ratios, accumulation, exact resume with dropout, divergence,
accelerate checkpoints, trackers, and the flags refused before any work."""

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_memdistill.data import TrainingSet, images_sha256
from diffusers_memdistill.training import runner as runner_module
from diffusers_memdistill.training.arguments import add_training_args, validate_training_args
from diffusers_memdistill.training.ema import ModelEMA
from diffusers_memdistill.training.runner import (
    Average,
    Phase,
    TrainingDivergedError,
    TrainingPlan,
    TrainingRunner,
    build_optimizer,
    load_checkpoint_weights,
    reset_accelerate_state,
    run_cli,
    seed_micro_step,
)
from diffusers_memdistill.training.utils import list_checkpoints, resolve_checkpoint


class Toy(torch.nn.Module):
    def __init__(self, dropout=0.3):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(dropout), torch.nn.Linear(16, 16))

    def forward(self, x):
        return self.net(x.flatten(1)).view_as(x)


class ToyPipeline:
    def __init__(self, module):
        self.module = module

    def save_pretrained(self, folder):
        os.makedirs(folder)
        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, os.path.join(folder, "toy.safetensors"))
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            json.dump({"_class_name": "ToyPipeline"}, f)


def toy_set(n=24):
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    record = {"format": 1, "dataset": "toy", "sha256": images_sha256(images), "num_images": n, "num_examples": n}
    return TrainingSet(images, None, torch.ones(n, dtype=torch.long), record)


def toy_args(out, *flags):
    parser = argparse.ArgumentParser()
    add_training_args(parser, learning_rate=1e-2, tracker_project_name="toy")
    args = parser.parse_args(["--output_dir", str(out), "--max_train_steps", "6", "--report_to", "none", "--cpu",
                              "--train_batch_size", "4", "--num_validation_images", "0", *map(str, flags)])
    validate_training_args(parser, args)
    return args


def run_toy(args, phases=(("a", 1),), dropout=0.3, noise=0.1, nan_at=None, stop_at=None, optimizer=None, log_with=None,
            validate=None, finalize=True):
    """Train one Toy per phase name (``(name, every)``), each followed by a power-function EMA ``ema_<name>``."""
    reset_accelerate_state()
    runner = TrainingRunner(args, "toy.py", log_with=log_with)
    current = {"step": 0}
    torch.manual_seed(0)
    models = {name: Toy(dropout) for name, _ in phases}

    def step_of(name):
        def step(nets, batch, generator):
            x = batch["pixel_values"]
            noisy = x + noise * torch.randn(x.shape, generator=generator, device=x.device)
            loss = (nets[name](noisy) - x).square().flatten(1).mean(1)
            return loss * float("nan") if current["step"] == nan_at else loss
        return step

    def callback(done):
        current["step"] = done
        if done == stop_at:
            raise KeyboardInterrupt(f"stopped at {done}")

    plan = TrainingPlan(
        models=models,
        phases=[Phase(name, optimizer(models[name]) if optimizer else build_optimizer("adam", models[name].parameters(),
                                                                                      args), step_of(name), every=every)
                for name, every in phases],
        averages={f"ema_{name}": Average(name, ModelEMA(models[name])) for name, _ in phases},
        validate=validate, export=lambda nets: (ToyPipeline(nets[f"ema_{phases[0][0]}"]), {}),
        description="toy",
    )
    runner.train(plan, toy_set(), finalize=finalize, callback=callback)
    return plan


def test_two_optimizers_update_at_their_own_ratio(tmp_path):
    # DMD2's two-time-scale rule: "fake" every step, "generator" every third (steps 0, 3, 6 of 7).
    args = toy_args(tmp_path, "--max_train_steps", 7, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 100)
    plan = run_toy(args, phases=(("fake", 1), ("generator", 3)))
    for phase, expected in zip(plan.phases, (7, 3)):
        states = [phase.optimizer.state[p] for p in plan.models[phase.name].parameters()]
        assert all(int(s["step"]) == expected for s in states), phase.name
        assert plan.averages[f"ema_{phase.name}"].ema.num_updates == expected
    config = json.loads((tmp_path / "training_config.json").read_text())
    assert config["optimizer_updates"] == {"fake": 7, "generator": 3}
    assert config["averages"]["ema_generator"]["num_updates"] == 3
    assert config["averages"]["ema_fake"]["kind"] == "power" and config["averages"]["ema_fake"]["sigma_rel"] == 0.05
    assert [s for s, _ in list_checkpoints(tmp_path)] == [7]


def test_accumulation_equals_one_step_on_the_larger_batch(tmp_path):
    # Without noise or dropout, 2 micro-batches of 4 give the SGD step of the batch of 8 (same 8 examples).
    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.5)  # the runner sets the rate of --learning_rate

    def deterministic(plan):
        return plan.models["a"].state_dict()

    results = []
    for flags in (("--train_batch_size", 4, "--gradient_accumulation_steps", 2), ("--train_batch_size", 8)):
        args = toy_args(tmp_path / str(len(results)), "--max_train_steps", 1, "--learning_rate", 0.5, *flags)
        plan = run_toy(args, dropout=0.0, noise=0.0, optimizer=sgd, finalize=False)
        results.append(deterministic(plan))
    before = (torch.manual_seed(0), Toy(0.0).state_dict())[1]
    assert all(not torch.equal(results[0][k], before[k]) for k in before)
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=0, atol=2e-7)


def test_seed_micro_step_depends_only_on_seed_step_and_process():
    def mask(process, micro_step, burn=0):
        torch.randn(burn)  # whatever the global RNG went through before
        generator = seed_micro_step(0, micro_step, process, 0, "cpu")
        return torch.nn.functional.dropout(torch.ones(64), 0.5), torch.randn(3, generator=generator)

    a, noise_a = mask(0, 5)
    b, noise_b = mask(0, 5, burn=17)
    assert torch.equal(a, b) and torch.equal(noise_a, noise_b)
    assert not torch.equal(a, mask(1, 5)[0])  # another DDP rank draws other dropout masks
    assert not torch.equal(a, mask(0, 6)[0])


def test_interrupted_and_resumed_equals_uninterrupted_with_dropout(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--checkpointing_steps", 2, "--lr_warmup_steps", 2, "--gradient_accumulation_steps", 2)
    run_toy(toy_args(straight, *flags))
    with pytest.raises(KeyboardInterrupt):  # killed during step 5, after checkpoint-4
        run_toy(toy_args(resumed, *flags), stop_at=5)
    assert not (resumed / "model_index.json").exists()
    with pytest.raises(FileExistsError, match="resume_from_checkpoint latest"):
        run_toy(toy_args(resumed, *flags))
    # Resumed with DataLoader workers: the batches are the same.
    run_toy(toy_args(resumed, *flags, "--resume_from_checkpoint", "latest", "--dataloader_num_workers", 1))
    a = load_checkpoint_weights(str(straight / "checkpoints" / "checkpoint-6"))
    b = load_checkpoint_weights(str(resumed / "checkpoints" / "checkpoint-6"))
    assert set(a) == {"a", "ema_a"} and a.keys() == b.keys()
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    final_a, final_b = load_file(straight / "toy.safetensors"), load_file(resumed / "toy.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    history = json.loads((resumed / "run_history.json").read_text())
    assert [e.get("start_step") for e in history if "start_step" in e] == [0, 4]


def test_checkpoint_loads_with_accelerator_load_state(tmp_path):
    from accelerate import Accelerator

    args = toy_args(tmp_path, "--max_train_steps", 3, "--checkpointing_steps", 3)
    run_toy(args)
    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(123)
    model = Toy()
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    state, ema = runner_module._RunState(), ModelEMA(Toy())
    accelerator.register_for_checkpointing(state, ema)
    accelerator.load_state(str(tmp_path / "checkpoints" / "checkpoint-3"))
    saved = load_checkpoint_weights(str(tmp_path / "checkpoints" / "checkpoint-3"))
    assert all(torch.equal(v, saved["a"][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, saved["ema_a"][k]) for k, v in ema.module.state_dict().items())
    assert state.step == 3 and ema.num_updates == 3
    assert all(int(s["step"]) == 3 for s in optimizer.state_dict()["state"].values())


def test_divergence_keeps_the_checkpoint_from_before_the_blow_up(tmp_path):
    flags = ("--checkpointing_steps", 2, "--checkpoints_total_limit", 1)
    with pytest.raises(TrainingDivergedError, match="Non-finite a loss at step 5") as info:
        run_toy(toy_args(tmp_path, *flags), nan_at=4)  # the weights after 4 updates give a NaN loss
    ckpt = tmp_path / "checkpoints"
    # checkpoint-4 holds those weights: set aside; checkpoint-2 (before the blow-up) survives the total limit of 1.
    assert (ckpt / "checkpoint-4.diverged").is_dir() and (ckpt / "checkpoint-2").is_dir()
    assert str(ckpt / "checkpoint-2") in str(info.value)
    assert resolve_checkpoint(str(tmp_path), "latest").endswith("checkpoint-2")
    assert not (tmp_path / "model_index.json").exists()
    # Resuming with another learning rate and a longer run is allowed, and recorded.
    run_toy(toy_args(tmp_path, *flags, "--resume_from_checkpoint", "latest", "--learning_rate", 1e-3,
                     "--max_train_steps", 8))
    assert (tmp_path / "model_index.json").exists() and [s for s, _ in list_checkpoints(tmp_path)] == [8]
    history = json.loads((tmp_path / "run_history.json").read_text())
    assert [e["event"] for e in history if "event" in e] == ["diverged", "finished"]
    assert history[-2]["changed"] == {"learning_rate": [0.01, 0.001], "max_train_steps": [6, 8]}
    lineage = json.loads((tmp_path / "training_config.json").read_text())["run_history"]
    assert [e["start_step"] for e in lineage] == [0, 2]


def test_a_run_diverging_at_its_last_step_saves_no_model(tmp_path):
    with pytest.raises(TrainingDivergedError, match="at step 6"):
        run_toy(toy_args(tmp_path, "--checkpointing_steps", 2), nan_at=5)
    assert not (tmp_path / "model_index.json").exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    # A script ends with the message and exit status 1, no traceback.
    reset_accelerate_state()
    assert run_cli(lambda args: run_toy(args, nan_at=5), lambda argv: toy_args(tmp_path / "cli", "--checkpointing_steps",
                                                                                 2)) == 1


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    class Overflowing(torch.optim.SGD):  # an update that overflows: the loss was finite, the weights are not
        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1e38).mul_(1e38)

    def explode(model):
        return Overflowing(model.parameters(), lr=1.0)

    args = toy_args(tmp_path, "--checkpointing_steps", 1)
    with pytest.raises(TrainingDivergedError, match="Non-finite weights after step 1.*no checkpoint"):
        run_toy(args, optimizer=explode, dropout=0.0)
    assert not list_checkpoints(tmp_path) and not (tmp_path / "model_index.json").exists()


def test_resume_refuses_another_data_order_or_precision_setup(tmp_path):
    run_toy(toy_args(tmp_path, "--max_train_steps", 2, "--checkpointing_steps", 2))
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "state.json").read_text())
    assert state["fingerprint"]["mixed_precision"] == "no"
    for flags, key in ((("--seed", 1), "seed"), (("--gradient_accumulation_steps", 2), "gradient_accumulation_steps"),
                       (("--train_batch_size", 2), "train_batch_size")):
        with pytest.raises(ValueError, match=f"different configuration.*{key}"):
            run_toy(toy_args(tmp_path, "--max_train_steps", 4, "--resume_from_checkpoint", "latest", *flags))


def test_temporary_folders_are_removed_when_a_save_fails(tmp_path, monkeypatch):
    def failing_save_state(self, output_dir, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        (open(os.path.join(output_dir, "model.safetensors"), "wb")).close()
        raise OSError(28, "No space left on device")

    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "save_state", failing_save_state)
    with pytest.raises(OSError, match="No space left"):
        run_toy(toy_args(tmp_path, "--checkpointing_steps", 2))
    assert os.listdir(tmp_path / "checkpoints") == []
    monkeypatch.undo()

    class FailingPipeline(ToyPipeline):
        def save_pretrained(self, folder):
            super().save_pretrained(folder)
            raise OSError(28, "No space left on device")

    from diffusers_memdistill.training import utils

    with pytest.raises(OSError, match="No space left"):
        utils.save_pipeline_atomically(FailingPipeline(Toy()), str(tmp_path), {})
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".tmp")]


class Recorder:
    """A tracker of one's own (anything with accelerate's tracker methods), recording what it is sent."""

    name, requires_logging_directory, main_process_only = "recorder", False, True

    def __init__(self):
        self.images, self.scalars = [], []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.scalars.append((step, values))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, {k: [v.shape for v in images] for k, images in values.items()}))

    def finish(self):
        pass


def test_validation_images_reach_every_tracker(tmp_path):
    from accelerate.tracking import GeneralTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = type("RecorderTracker", (Recorder, GeneralTracker), {})()
    args = toy_args(tmp_path, "--max_train_steps", 4, "--validation_steps", 2, "--logging_steps", 2,
                    "--num_validation_images", 3, "--checkpointing_steps", 4)
    run_toy(args, log_with=[recorder, "tensorboard"],
            validate=lambda nets, step: {"": torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(step))})
    assert recorder.images == [(2, {"samples": [(4, 4)] * 3}), (4, {"samples": [(4, 4)] * 3})]
    assert [step for step, values in recorder.scalars] == [2, 4] and "loss" in recorder.scalars[0][1]
    assert (tmp_path / "samples" / "step-0000002.png").is_file()
    events = EventAccumulator(str(tmp_path / "logs" / "toy")).Reload()
    assert [e.step for e in events.Images("samples")] == [2, 4]


# ---------------------------------------------------------------- flags, checked before any work


def _parse_error(capsys, parse, argv):
    with pytest.raises(SystemExit) as info:
        parse([str(a) for a in argv])
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--learning_rate=-1e-4"], "--learning_rate must be positive"),
    (["--ema_decay", "1.0"], r"--ema_decay must lie in \[0, 1\)"),
    (["--ema_decay=-0.1"], r"--ema_decay must lie in \[0, 1\)"),
    (["--ema_sigma_rel", "0.5"], "--ema_sigma_rel must lie in"),
    (["--ema_decay", "0.9", "--ema_sigma_rel", "0.05"], "not both"),
    (["--ema_warmup"], "--ema_warmup applies to the constant-decay EMA"),
    (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1"),
    (["--validation_steps", "0"], "--validation_steps must be at least 1"),
    (["--checkpointing_steps", "0"], "--checkpointing_steps must be at least 1"),
    (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
    (["--lr_scheduler", "constant", "--lr_warmup_steps", "10"], "--lr_warmup_steps has no effect"),
    (["--lr_scheduler", "exponential"], "argument --lr_scheduler: invalid choice"),
    (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "--overwrite_output_dir deletes the run"),
    (["--use_8bit_adam"], "--use_8bit_adam needs bitsandbytes"),
    (["--model_preset", "huge"], "argument --model_preset: invalid choice: 'huge'"),
    (["--resolution", "7"], "--resolution 7: Resolution 7 cannot go through the 'tiny' UNet"),
    (["--resolution", "12", "--model_preset", "base"], "must be a multiple of 8"),
])
def test_bad_teacher_flags_are_named_before_any_work(tmp_path, capsys, flags, message, monkeypatch):
    import builtins
    import re

    from diffusers_memdistill.training.train_edm_teacher import parse_args

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    base = ["--output_dir", tmp_path / "out", "--max_train_steps", "5", "--model_preset", "tiny", "--resolution", "8"]
    line = _parse_error(capsys, parse_args, base + flags)
    assert "error: " in line and re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_output_folders_that_would_lose_inputs_are_refused(tmp_path, capsys):
    from diffusers_memdistill.training.distill_consistency import parse_args as cd_args
    from diffusers_memdistill.training.train_edm_teacher import parse_args as teacher_args

    (tmp_path / "a_file").write_text("x")
    line = _parse_error(capsys, teacher_args, ["--output_dir", tmp_path / "a_file", "--max_train_steps", 1])
    assert "--output_dir" in line and "is a file" in line
    data = tmp_path / "data"
    (data / "class0").mkdir(parents=True)
    for out in (data, data / "class0", tmp_path):  # is, lies inside, holds the data
        line = _parse_error(capsys, teacher_args, ["--output_dir", out, "--max_train_steps", 1,
                                                   "--train_data_dir", data])
        assert "--output_dir" in line and "an input of this run" in line
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for out in (teacher, teacher / "student", tmp_path):
        for flag in ("--pretrained_model_name_or_path", "--teacher"):  # the diffusers name and the old alias
            line = _parse_error(capsys, cd_args, ["--output_dir", out, "--max_train_steps", 1, flag, teacher])
            assert "an input of this run" in line
    line = _parse_error(capsys, cd_args, ["--output_dir", tmp_path / "o", "--max_train_steps", 1, "--teacher",
                                          teacher, "--use_8bit_adam"])
    assert "--use_8bit_adam" in line


def test_overwrite_checks_every_input_before_deleting(tmp_path):
    from diffusers_memdistill.training.train_edm_teacher import main, parse_args

    out = tmp_path / "run"
    (out / "unet").mkdir(parents=True)
    (out / "model_index.json").write_text('{"_class_name": "EDMPipeline", "unet": ["x", "y"]}')
    args = parse_args(["--output_dir", str(out), "--max_train_steps", "2", "--overwrite_output_dir",
                       "--dataset", "/nonexistent/folder", "--model_preset", "tiny", "--resolution", "8",
                       "--report_to", "none"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(args)
    assert (out / "model_index.json").exists() and (out / "unet").is_dir()


def test_the_student_records_the_lpips_weights_it_was_trained_with(tmp_path):
    from conftest import tiny_unet
    from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
    from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
    from diffusers_memdistill.training.distill_consistency import build_plan, parse_args

    class FakeLPIPS(torch.nn.Module):
        weights_sha256 = {"vgg16": "a" * 64, "lpips_vgg": "b" * 64}

        def forward(self, a, b):
            return (a - b).abs().flatten(1).mean(1)

    args = parse_args(["--teacher", str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "out"),
                       "--max_train_steps", "1", "--loss", "lpips"])
    teacher = EDMPipeline(tiny_unet(resolution=4), EDMHeunScheduler())
    plan = build_plan(args, teacher, toy_set(), "c" * 64, lpips=FakeLPIPS())
    assert plan.config == {"teacher": str(tmp_path / "teacher"), "teacher_sha256": "c" * 64,
                           "lpips_sha256": FakeLPIPS.weights_sha256}
    assert plan.fingerprint["lpips_sha256"] == FakeLPIPS.weights_sha256
    assert "lpips" in plan.frozen  # moved to the device with the teacher
    without = build_plan(args, teacher, toy_set(), "c" * 64, lpips=torch.nn.Identity())
    assert "lpips_sha256" not in without.config


def test_batches_carry_indices_labels_and_captions_of_the_same_images(tmp_path):
    n = 12
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    record = {"format": 1, "dataset": "toy", "sha256": images_sha256(images), "num_images": n, "num_examples": n}
    training_set = TrainingSet(images, torch.arange(n) % 3, torch.ones(n, dtype=torch.long), record,
                               captions=[f"image {i}" for i in range(n)])
    seen = []

    def step(nets, batch, generator):
        index = ((batch["pixel_values"][:, 0, 0, 0] + 1) * 127.5).round().long()
        seen.append((index.tolist(), batch["class_labels"].tolist(), batch["captions"]))
        assert batch["indices"].tolist() == index.tolist()  # each example's position in the training set
        return (nets["a"](batch["pixel_values"]) - batch["pixel_values"]).square().mean()

    reset_accelerate_state()
    args = toy_args(tmp_path, "--max_train_steps", 3)
    model = Toy()
    plan = TrainingPlan(models={"a": model}, phases=[Phase("a", build_optimizer("adam", model.parameters(), args), step)])
    TrainingRunner(args, "toy.py").train(plan, training_set, finalize=False)
    assert len(seen) == 3 and sorted(i for indices, _, _ in seen for i in indices) == list(range(n))
    for indices, labels, captions in seen:
        assert labels == [i % 3 for i in indices] and captions == [f"image {i}" for i in indices]

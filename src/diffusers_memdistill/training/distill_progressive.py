"""Distil an EDM teacher by progressive distillation (Salimans & Ho 2022; the PD baseline of 000 App. A.1).

    accelerate launch training_scripts/distill_progressive.py --pretrained_model_name_or_path runs/teacher \\
        --output_dir runs/pd --teacher_steps 1024 --final_steps 1 --max_train_steps 20000 --loss lpips

Round r distils a sampler of 2K deterministic DDIM steps into a student of K = teacher_steps / 2^r steps, on the
nested Karras grid of `EDMDDIMScheduler` (the loss: `losses.progressive`). Round 1's teacher is the EDM teacher sampled
with --teacher_steps DDIM (or Heun, --teacher_solver) steps; each later round's teacher is the previous round's
student, and its student starts from the previous round's student's weights. Rounds go on until --final_steps.

Rounds are sequential runs of the training runner, one per round, each with its own folder, checkpoints, EMA and
learning-rate schedule (--max_train_steps is per round):

    output_dir/rounds/round-01-512-steps/   the student of round 1 (a finished pipeline: 512-step DDIM)
    output_dir/rounds/round-02-256-steps/   ...
    output_dir/                             the last round's student (--final_steps steps)

Why separate runs rather than one run with a round schedule: a round's teacher is the previous round's saved student,
a network the runner does not checkpoint (it is frozen); in one run a checkpoint taken after a round boundary could not
be resumed without rebuilding that teacher from weights nobody recorded. Here every round is an ordinary run whose
fingerprint holds the sha256 of its teacher's weights, so `--resume_from_checkpoint latest` keeps the finished rounds,
checks that each was distilled from the one before it, resumes the unfinished round from its latest checkpoint (bit
for bit, as any runner run) and starts the rounds after it fresh. Every round folder loads with
`ProgressiveDistillationPipeline.from_pretrained(dir)` (or `DiffusionPipeline.from_pretrained(dir,
trust_remote_code=True)`), samples with its round's number of steps by default, carries the teacher's
`training_set.json`, and is registered for `memdistill evaluate`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil

import torch

from ..losses.consistency import LPIPS_NETS, build_lpips_distance
from ..losses.progressive import WEIGHTINGS, ProgressiveDistillationLoss
from ..models.denoiser import EDMDenoiser
from ..pipelines.pipeline_progressive import ProgressiveDistillationPipeline
from ..schedulers.scheduling_edm_ddim import EDMDDIMScheduler
from ..solvers import euler_step, heun_step
from .arguments import add_teacher_args, add_training_args, validate_training_args
from .distillation import build_student_unet, file_sha256, load_teacher_for_distillation
from .ema import ModelEMA
from .runner import Average, Phase, TrainingPlan, TrainingRunner, build_optimizer, reset_accelerate_state
from .utils import CHECKPOINT_DIR, list_checkpoints, validation_images

SCRIPT = "distill_progressive.py"
ROUNDS_DIR = "rounds"
UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def round_schedule(teacher_steps: int, final_steps: int = 1) -> list:
    """The students' numbers of steps, round after round: [N / 2, N / 4, ..., final_steps] for N = ``teacher_steps``.

    Raises:
        ValueError: ``final_steps`` is not ``teacher_steps`` divided by a power of two (at least 2).
    """
    for name, value in (("teacher_steps", teacher_steps), ("final_steps", final_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}.")
    ratio = teacher_steps // final_steps
    if teacher_steps % final_steps or ratio < 2 or ratio & (ratio - 1):
        valid = [teacher_steps >> k for k in range(1, teacher_steps.bit_length())
                 if (teacher_steps >> k) << k == teacher_steps]
        raise ValueError(f"--final_steps {final_steps} must be --teacher_steps {teacher_steps} divided by a power of "
                         f"two (each round halves the steps); possible: {valid or 'none: --teacher_steps is odd'}.")
    schedule, steps = [], teacher_steps
    while steps > final_steps:
        steps //= 2
        schedule.append(steps)
    return schedule


def round_dirs(output_dir: str, schedule: list) -> list:
    """The folder of each round: ``output_dir/rounds/round-RR-K-steps`` for all but the last, ``output_dir`` for it."""
    dirs = [os.path.join(output_dir, ROUNDS_DIR, f"round-{r:02d}-{k}-steps") for r, k in enumerate(schedule[:-1], 1)]
    return dirs + [output_dir]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 000 App. A.1: Adam, gradient clipping, a linearly decayed learning rate (per round here).
    add_training_args(parser, learning_rate=1e-4, tracker_project_name="progressive_distillation", max_grad_norm=1.0)
    parser.set_defaults(lr_scheduler="linear")
    add_teacher_args(parser)
    p = parser.add_argument_group("progressive distillation")
    p.add_argument("--teacher_steps", type=int, default=1024,
                   help="N, DDIM steps of the EDM teacher that round 1 distils (000 starts from 4096).")
    p.add_argument("--final_steps", type=int, default=1,
                   help="Steps of the last round's student: --teacher_steps divided by a power of two.")
    p.add_argument("--teacher_solver", choices=["euler", "heun"], default="euler",
                   help="Round 1's teacher step: euler (= DDIM, as in Salimans & Ho) or EDM's Heun. Later rounds' "
                        "teachers are students, which take DDIM steps.")
    p.add_argument("--loss", choices=["lpips", "l2", "pseudo_huber"], default="lpips",
                   help="Distance between the student's denoised output and the target (LPIPS as in 000 App. A.1).")
    p.add_argument("--lpips_net", choices=LPIPS_NETS, default="vgg", help="LPIPS backbone.")
    p.add_argument("--huber_c", type=float, default=None, help="Pseudo-Huber c (default 0.00054 * sqrt(d)).")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="karras",
                   help="Loss weight lambda(sigma): EDM's (karras), uniform, snr+1 or truncated-snr (S&H).")
    p.add_argument("--optimizer", choices=["adam", "adamw", "radam"], default="adam")
    args = parser.parse_args(argv)
    teacher = args.pretrained_model_name_or_path
    validate_training_args(parser, args, protected_paths=[teacher, args.teacher_dataset])
    try:
        round_schedule(args.teacher_steps, args.final_steps)
    except ValueError as exc:
        parser.error(str(exc))
    if args.use_8bit_adam and args.optimizer == "radam":
        parser.error("--use_8bit_adam takes --optimizer adam or adamw (bitsandbytes has no 8-bit RAdam).")
    return args


def build_plan(args, round_index: int, num_steps: int, teacher_unet, sched_cfg, training_set, teacher_ref: str,
               teacher_sha256: str, lpips=None) -> TrainingPlan:
    """One round: a student of ``num_steps`` DDIM steps, initialised from ``teacher_unet`` (the EDM teacher in round
    1, the previous round's student after), against two steps of that teacher."""
    teacher_unet = teacher_unet.eval().requires_grad_(False)
    num_classes = teacher_unet.config.num_class_embeds or 0
    if num_classes and training_set.labels is None:
        raise ValueError("The teacher is class-conditional but its training set has no labels.")
    unet, copied = build_student_unet(teacher_unet, "teacher", None, args.seed)
    ema = ModelEMA(unet, sigma_rel=args.ema_sigma_rel, decay=args.ema_decay, warmup=args.ema_warmup)
    solver_name = args.teacher_solver if round_index == 1 else "euler"
    loss_fn = ProgressiveDistillationLoss(
        num_steps, sched_cfg.sigma_min, sched_cfg.sigma_max, sched_cfg.rho, sched_cfg.sigma_data,
        distance=args.loss, huber_c=args.huber_c, weighting=args.weighting, lpips=lpips,
        solver=heun_step if solver_name == "heun" else euler_step,
    )
    scheduler = EDMDDIMScheduler(sigma_min=sched_cfg.sigma_min, sigma_max=sched_cfg.sigma_max, rho=sched_cfg.rho,
                                 sigma_data=sched_cfg.sigma_data, num_inference_steps=num_steps)

    def step(nets, batch, generator):
        student = EDMDenoiser(nets["unet"], sched_cfg.sigma_data)
        teacher = EDMDenoiser(nets["teacher"], sched_cfg.sigma_data)
        labels = batch.get("class_labels") if num_classes else None
        return loss_fn(student, teacher, batch["pixel_values"], labels, generator)

    @torch.no_grad()
    def validate(nets, _step):
        pipeline = ProgressiveDistillationPipeline(nets["ema_unet"], scheduler)
        return {f"{num_steps}-step": validation_images(pipeline, args.num_validation_images, num_classes, args.seed)}

    def export(nets):
        return ProgressiveDistillationPipeline(nets["ema_unet"].to("cpu"), scheduler), {}

    lpips_sha256 = getattr(lpips, "weights_sha256", None)
    keys = ("teacher_steps", "final_steps", "loss", "lpips_net", "huber_c", "weighting", "optimizer")
    round_record = {"round": round_index, "num_rounds": len(round_schedule(args.teacher_steps, args.final_steps)),
                    "student_steps": num_steps, "round_teacher_steps": 2 * num_steps, "round_teacher": teacher_ref,
                    "round_teacher_solver": solver_name, "round_teacher_sha256": teacher_sha256}
    config = {"teacher": args.pretrained_model_name_or_path, "progressive_round": round_record,
              **({"lpips_sha256": lpips_sha256} if lpips_sha256 is not None else {})}
    n_params = sum(p.numel() for p in unet.parameters())
    return TrainingPlan(
        models={"unet": unet},
        phases=[Phase("unet", build_optimizer(args.optimizer, unet.parameters(), args), step)],
        averages={"ema_unet": Average("unet", ema)},
        frozen={"teacher": teacher_unet, **({"lpips": lpips} if lpips is not None else {})},
        fingerprint={**{k: getattr(args, k) for k in keys}, **round_record, "lpips_sha256": lpips_sha256},
        validate=validate, export=export, config=config,
        description=(
            f"Progressive distillation round {round_index}/{round_record['num_rounds']} on {len(training_set)} images: "
            f"{2 * num_steps} {solver_name} steps of {teacher_ref} -> a {num_steps}-step student "
            f"({n_params / 1e6:.2f}M parameters, {copied} tensors copied), loss {args.loss}"),
    )


def _finished(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "model_index.json"))


def _recorded_round_teacher(folder: str) -> str | None:
    path = os.path.join(folder, "training_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("progressive_round", {}).get("round_teacher_sha256")


def plan_rounds(args, dirs: list, teacher_sha256: str) -> list:
    """What each round does now: ``"done"`` (its finished student is kept), a checkpoint path to resume from, or
    ``None`` (a fresh run). Checked before anything is written.

    Raises:
        FileExistsError: a round folder holds a model or checkpoints and neither --resume_from_checkpoint nor
            --overwrite_output_dir was passed.
        ValueError: the folders do not form one run (a kept round distilled from another teacher, a round after the
            one resumed already started, a checkpoint outside every round).
    """
    if args.overwrite_output_dir:
        return [None] * len(dirs)
    if not args.resume_from_checkpoint:
        for folder in dirs:
            if _finished(folder) or list_checkpoints(folder):
                raise FileExistsError(
                    f"{folder} already holds a round of a progressive distillation. Pass --resume_from_checkpoint "
                    "latest to continue that run, or --overwrite_output_dir to start a new one there.")
        return [None] * len(dirs)
    explicit = None
    if args.resume_from_checkpoint != "latest":
        path = os.path.realpath(args.resume_from_checkpoint)
        owners = [i for i, d in enumerate(dirs)
                  if os.path.dirname(path) == os.path.realpath(os.path.join(d, CHECKPOINT_DIR))]
        if not owners:
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint of any round "
                             f"of {args.output_dir}; pass <round folder>/{CHECKPOINT_DIR}/checkpoint-N or latest.")
        explicit = (owners[0], args.resume_from_checkpoint)
    actions, previous_sha, started = [], teacher_sha256, None
    for i, folder in enumerate(dirs):
        if started is not None:
            if _finished(folder) or list_checkpoints(folder):
                raise ValueError(f"{folder} holds a later round than the one resumed ({dirs[started]}): it was "
                                 "distilled from another teacher; pass --overwrite_output_dir to start again.")
            actions.append(None)
            continue
        if explicit is not None and i == explicit[0]:
            actions.append(explicit[1])
            started = i
        elif _finished(folder) and (explicit is None or i < explicit[0]):
            recorded = _recorded_round_teacher(folder)
            if recorded != previous_sha:
                raise ValueError(f"{folder} holds a finished round distilled from another teacher (sha256 {recorded}, "
                                 f"expected {previous_sha}); pass --overwrite_output_dir to start again.")
            actions.append("done")
            previous_sha = file_sha256(os.path.join(folder, UNET_WEIGHTS))
        elif explicit is not None:
            raise ValueError(f"{folder} is not finished, so the later round of --resume_from_checkpoint "
                             f"{explicit[1]} cannot be resumed.")
        else:
            found = list_checkpoints(folder)
            actions.append(found[-1][1] if found else None)
            started = i
    return actions


def main(args, step_callback=None) -> int:
    """Run the rounds; ``step_callback(round, step)`` (optional) is called after every optimizer step."""
    schedule = round_schedule(args.teacher_steps, args.final_steps)
    dirs = round_dirs(args.output_dir, schedule)
    # 1. The EDM teacher and its exact training set (checked before anything is written), rank 0 first.
    from accelerate import PartialState

    from .utils import use_cpu

    folder, teacher_pipeline, training_set, teacher_sha256 = load_teacher_for_distillation(
        args, PartialState(cpu=use_cpu(args.cpu)).main_process_first)
    sched_cfg = teacher_pipeline.scheduler.config
    # 2. What each round does: kept, resumed or fresh (all checked now).
    actions = plan_rounds(args, dirs, teacher_sha256)
    if all(a == "done" for a in actions):
        print(f"All {len(schedule)} rounds of {args.output_dir} are finished; nothing to do.")
        return 0
    lpips = build_lpips_distance(args.lpips_net) if args.loss == "lpips" else None
    round_teacher, round_ref, round_sha = teacher_pipeline.unet, args.pretrained_model_name_or_path, teacher_sha256
    cleared = not args.overwrite_output_dir
    # 3. The rounds, each an ordinary runner run in its own folder; the next round's teacher is this round's student.
    for r, (num_steps, out, action) in enumerate(zip(schedule, dirs, actions), 1):
        if action != "done":
            round_args = copy.copy(args)
            round_args.output_dir = out
            round_args.resume_from_checkpoint = action
            round_args.overwrite_output_dir = args.overwrite_output_dir and action is None
            round_args.push_to_hub = args.push_to_hub and r == len(schedule)
            runner = TrainingRunner(round_args, SCRIPT)
            if not cleared:  # --overwrite_output_dir: the rounds of the old run go (every input is checked by now)
                if runner.accelerator.is_main_process:
                    shutil.rmtree(os.path.join(args.output_dir, ROUNDS_DIR), ignore_errors=True)
                runner.accelerator.wait_for_everyone()
                cleared = True
            plan = build_plan(round_args, r, num_steps, round_teacher, sched_cfg, training_set, round_ref, round_sha,
                              lpips)
            callback = None if step_callback is None else (lambda step, r=r: step_callback(r, step))
            runner.train(plan, training_set, callback=callback)
            reset_accelerate_state()
        if r < len(schedule):
            round_teacher = ProgressiveDistillationPipeline.from_pretrained(out).unet
            round_ref, round_sha = out, file_sha256(os.path.join(out, UNET_WEIGHTS))
    return 0

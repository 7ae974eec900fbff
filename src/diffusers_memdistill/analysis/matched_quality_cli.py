"""``memdistill matched-quality``: 000's claim at matched quality, with the baselines of 000 App. A, on the digits.

1. Train an EDM teacher on the built-in digits (a preset regime, see ``REGIMES``; ``--repeat_classes`` for the
   localized-memorization set of 000 §4.3).
2. Distil from it, each run checkpointing its EMA ``--num_checkpoints`` times: a consistency student (CD, sampled
   with 1 and 2 steps), a one-step DMD generator and a progressive-distillation student down to one step (PD).
3. Export every checkpoint's EMA as a pipeline folder (`training.runner.export_snapshot`), and build the "+refine"
   controls of 000 App. A from the final PD and DMD students: each re-noised to every level of ``--refine_sigmas``
   and reconstructed by the teacher's EDM PF-ODE (`RefinedPipeline`).
4. Audit the teacher and every candidate together with ``memdistill evaluate`` (same noises, same seeds): L2
   memorization (per group with ``--repeat_classes``) and pixel FD, or FID with ``--inception_weights``.
5. Select, per method, the candidate whose quality is closest to the teacher's (`select_matched_checkpoint`: the
   stated rule in ``SELECTION_RULE``), and write ``matched.md`` (000 Table 1 / 4 layout), ``results.json`` and two
   figures: memorization against quality (one point per model and checkpoint) and memorization during distillation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from .matched_quality import select_matched_checkpoint

RESULTS_NAME = "results.json"
REPORT_NAME = "matched.md"
SCATTER_NAME = "memorization_vs_quality.png"
DYNAMICS_NAME = "memorization_during_distillation.png"
SELECTION_RULE = (
    "Per method, among its candidates (checkpoints in run order; for +refine, the refinement levels in increasing "
    "order), the one whose quality score is closest to the teacher's, |score - teacher| smallest; equal distances go "
    "to the better score, then to the earlier candidate (`analysis.matched_quality.select_matched_checkpoint`, no "
    "tolerance: the distance is reported instead).")

# The recipes of the teacher, CD, DMD and PD runs are the digits' CPU recipes (`diffusers_memdistill.recipes`).
# Regimes: "severe" is the demo's teacher (32 digits, memorized almost completely); "moderate" trains on more digits,
# which the teacher memorizes only in part at the same length.
REGIMES = {
    "severe": {"num_train_images": 32, "teacher_steps": 2000, "cd_steps": 1000, "dmd_steps": 1000,
               "pd_steps": 300, "pd_teacher_steps": 16, "num_checkpoints": 4, "num_samples": 512,
               "refine_sigmas": "0.25,0.5,1,2,5"},
    "moderate": {"num_train_images": 300, "teacher_steps": 4000, "cd_steps": 1000, "dmd_steps": 1000,
                 "pd_steps": 300, "pd_teacher_steps": 16, "num_checkpoints": 4, "num_samples": 512,
                 "refine_sigmas": "0.25,0.5,1,2,5"},
}
QUICK = {"teacher_steps": 40, "cd_steps": 6, "dmd_steps": 10, "pd_steps": 4, "pd_teacher_steps": 4,
         "num_checkpoints": 2, "num_samples": 24, "refine_sigmas": "0.5,2"}
# Methods in table order: name, the run folder, whether its candidates are checkpoints (and of which average).
CHECKPOINTED = {"CD": "ema_unet", "DMD": "ema_generator", "PD": "ema_unet"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="Folder of the models, the audit and the report.")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="severe",
                        help="Preset: severe (32 digits, the demo's teacher) or moderate (300 digits).")
    parser.add_argument("--num_train_images", type=int, default=None, help="Override the regime's training set size.")
    parser.add_argument("--repeat_classes", default=None,
                        help="Localized memorization (000 §4.3): comma-separated digit classes whose images are "
                             "repeated; the audit reports repeated and non-repeated groups.")
    parser.add_argument("--repeat_images_per_class", type=int, default=20, help="Repeated images per repeated class.")
    parser.add_argument("--repeat_times", type=int, default=5, help="How often each repeated image appears.")
    parser.add_argument("--num_other_images", type=int, default=300, help="Non-repeated images of the other classes.")
    for key, what in (("teacher_steps", "teacher training steps"), ("cd_steps", "CD steps"),
                      ("dmd_steps", "DMD iterations"), ("pd_steps", "PD steps per round"),
                      ("pd_teacher_steps", "DDIM steps of the teacher that PD's first round distils"),
                      ("num_checkpoints", "checkpoints per distillation run (the candidates)"),
                      ("num_samples", "shared noises of the audit")):
        parser.add_argument(f"--{key}", type=int, default=None, help=f"Override the regime's {what}.")
    parser.add_argument("--refine_sigmas", default=None,
                        help="Comma-separated refinement levels of PD+refine and DMD+refine (the regime's grid).")
    parser.add_argument("--inception_weights", default=None,
                        help="FID Inception TorchScript file or URL: match on FID instead of pixel FD.")
    parser.add_argument("--pairing", action="store_true",
                        help="Also measure every candidate's pairing inefficiency ΔE against the teacher's 8-step map "
                             "(003 Def. 3.1), in the audit and the table.")
    parser.add_argument("--quick", action="store_true", help="A few steps of everything (a smoke test, seconds).")
    parser.add_argument("--overwrite", action="store_true", help="Replace the results of an earlier run.")
    parser.add_argument("--device", default=None, help="cuda or cpu for the audit (default: cuda when available).")
    parser.add_argument("--seed", type=int, default=0)


def parse_sigmas(text: str) -> list:
    """Sorted distinct positive refinement levels from ``"0.5,2"``; a clear error otherwise."""
    try:
        sigmas = sorted({float(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--refine_sigmas must be comma-separated numbers, got {text!r}.") from None
    if not sigmas or not all(math.isfinite(s) and s > 0 for s in sigmas):
        raise ValueError(f"--refine_sigmas needs at least one positive finite level, got {text!r}.")
    return sigmas


def resolve_config(args) -> dict:
    """The regime's preset, then ``--quick``, then every explicit flag; checked."""
    cfg = dict(REGIMES[args.regime])
    if args.quick:
        cfg.update(QUICK)
    for key in ("num_train_images", "teacher_steps", "cd_steps", "dmd_steps", "pd_steps", "pd_teacher_steps",
                "num_checkpoints", "num_samples", "refine_sigmas"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    for key in ("num_train_images", "teacher_steps", "cd_steps", "dmd_steps", "pd_steps", "num_checkpoints"):
        if cfg[key] < 1:
            raise ValueError(f"--{key} must be positive, got {cfg[key]}.")
    if cfg["num_samples"] < 2:
        raise ValueError(f"--num_samples must be at least 2, got {cfg['num_samples']}.")
    cfg["refine_sigmas"] = parse_sigmas(str(cfg["refine_sigmas"]))
    cfg["repeat_classes"] = None
    if args.repeat_classes:
        try:
            cfg["repeat_classes"] = [int(c) for c in args.repeat_classes.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--repeat_classes must be comma-separated class numbers, got "
                             f"{args.repeat_classes!r}.") from None
        cfg.update(repeat_images_per_class=args.repeat_images_per_class, repeat_times=args.repeat_times,
                   num_other_images=args.num_other_images)
    cfg["regime"] = args.regime + (" (localized)" if cfg["repeat_classes"] else "")
    cfg["quality_metric"] = "fid" if args.inception_weights else "fd_pixel"
    cfg["pairing"] = bool(getattr(args, "pairing", False))
    return cfg


def checkpoint_candidates(run_dir: str, max_steps: int, average: str, snapshots_dir: str, prefix: str) -> list:
    """``(step, folder)`` of every checkpoint of a run, oldest first: each earlier checkpoint's ``average`` exported
    as a pipeline folder, and the finished model itself for the last step (its saved weights are that EMA)."""
    from ..training.runner import export_snapshot
    from ..training.utils import list_checkpoints

    out = []
    for step, checkpoint in list_checkpoints(run_dir):
        if step < max_steps:
            out.append((step, export_snapshot(checkpoint, run_dir, os.path.join(snapshots_dir, f"{prefix}-{step}"),
                                              step, average=average)))
    return out + [(max_steps, run_dir)]


def select_matched(candidates: list, target: float, quality_key: str = "quality") -> dict:
    """Per method, the candidate selected by ``SELECTION_RULE`` (``candidates``: dicts with ``method``, ``name`` and
    ``quality_key``, in run order). Returns ``{method: {**candidate, "distance": ...}}`` in first-seen order."""
    methods = list(dict.fromkeys(c["method"] for c in candidates))
    selected = {}
    for method in methods:
        own = [c for c in candidates if c["method"] == method]
        match = select_matched_checkpoint([(c, c[quality_key]) for c in own], target, lower_is_better=True)
        selected[method] = {**match.checkpoint, "distance": match.distance}
    return selected


def _stats(model: dict) -> dict:
    l2 = model.get("l2", {})
    groups = {name: {"memorized": g.get("fraction_memorized"), "p95": g.get("p95")}
              for name, g in (l2.get("groups") or {}).items()}
    return {"memorized": l2.get("fraction_memorized"), "p95": l2.get("p95"), "groups": groups,
            "delta_e": (model.get("pairing") or {}).get("delta_e")}


def _fmt(value, pct=False):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.2f}%" if pct else f"{value:.4g}"


def _mem(stats: dict) -> str:
    return f"{_fmt(stats.get('memorized'), True)} / {_fmt(stats.get('p95'))}"


def render_markdown(results: dict) -> str:
    """``matched.md``: the matched rows in the layout of 000 Table 1 (Table 4 with groups), then every candidate."""
    cfg, teacher, selected = results["config"], results["teacher"], results["selected"]
    q = "FID" if cfg["quality_metric"] == "fid" else "FD (pixels)"
    grouped = bool(teacher["groups"])
    if cfg["repeat_classes"]:
        data = (f"{cfg['repeat_images_per_class']} digits of each of classes {cfg['repeat_classes']} repeated "
                f"{cfg['repeat_times']} times and {cfg['num_other_images']} non-repeated digits of the other classes")
    else:
        data = f"{cfg['num_train_images']} digits (8×8)"
    lines = [f"# Memorization at matched quality: {cfg['regime']} regime (000 Tables 1 and 4, App. A)", "",
             f"Teacher: EDM on {data}, {cfg['teacher_steps']} steps. Students: CD {cfg['cd_steps']} steps, DMD "
             f"{cfg['dmd_steps']} iterations, PD {cfg['pd_teacher_steps']} DDIM steps halved to 1 "
             f"({cfg['pd_steps']} steps per round); +refine re-noises the final PD / DMD samples to σ in "
             f"{cfg['refine_sigmas']} and reconstructs them with the teacher's 18-level Heun PF-ODE. "
             f"{cfg['num_samples']} shared noises per model (seed {results['seed']}); memorized: L2 ratio < 1/3.", "",
             f"**Selection rule.** {SELECTION_RULE} Target: the teacher's {q} {_fmt(teacher['quality'])}.", ""]
    header = f"| Model | selected | {q} ↓ | Δ to teacher | "
    if grouped:
        header += "Repeated | Non-repeated | Overall (Mem / p95 ratio) |"
        sep = "|---|---|---|---|---|---|---|"
    else:
        header += "Mem (L2) / p95 ratio |"
        sep = "|---|---|---|---|---|"

    pairing = cfg.get("pairing", False)
    if pairing:  # ΔE of each student against the teacher's 8-step map (003 Def. 3.1)
        header += " ΔE vs teacher |"
        sep += "---|"

    def cells(c):
        if grouped:
            g = c["groups"]
            out = f"{_mem(g.get('repeated', {}))} | {_mem(g.get('non-repeated', {}))} | {_mem(c)} |"
        else:
            out = f"{_mem(c)} |"
        return out + (f" {_fmt(c.get('delta_e'))} |" if pairing else "")

    lines += [header, sep, f"| Teacher | {cfg['teacher_steps']} steps | {_fmt(teacher['quality'])} | – | "
              f"{cells(teacher)}"]
    for method, c in selected.items():
        lines.append(f"| {method} | {c['checkpoint']} | {_fmt(c['quality'])} | {_fmt(c['distance'])} | {cells(c)}")
    lines += ["", "## Every candidate", "", f"| Model (evaluate name) | method | checkpoint | {q} | Mem (L2) / p95 |"
              + (" Repeated | Non-repeated |" if grouped else ""),
              "|---|---|---|---|---|" + ("---|---|" if grouped else "")]
    for c in results["candidates"]:
        row = f"| {c['name']} | {c['method']} | {c['checkpoint']} | {_fmt(c['quality'])} | {_mem(c)} |"
        if grouped:
            row += f" {_mem(c['groups'].get('repeated', {}))} | {_mem(c['groups'].get('non-repeated', {}))} |"
        lines.append(row)
    lines += ["", f"![memorization against quality]({SCATTER_NAME})", "",
              f"![memorization during distillation]({DYNAMICS_NAME})", "",
              "The audit (samples, metrics.json, the most memorized samples beside their nearest training images, per "
              "model, in `eval/figures/memorized_*.png`): [eval/report.md](eval/report.md).", ""]
    return "\n".join(lines)


def plot_scatter(results: dict, path: str):
    """Memorized fraction against quality: one point per model and checkpoint, the selected ones ringed."""
    from ..metrics.figures import _finish, _new_figure

    fig = _new_figure(6.4, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    t = results["teacher"]
    ax.scatter([t["quality"]], [100 * t["memorized"]], marker="*", s=160, color="black", label="teacher", zorder=3)
    methods = list(dict.fromkeys(c["method"] for c in results["candidates"]))
    for method in methods:
        own = [c for c in results["candidates"] if c["method"] == method]
        ax.scatter([c["quality"] for c in own], [100 * c["memorized"] for c in own], label=method, alpha=0.8)
        s = results["selected"][method]
        ax.scatter([s["quality"]], [100 * s["memorized"]], s=140, facecolors="none", edgecolors="black")
    ax.axvline(t["quality"], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel(("FID" if results["config"]["quality_metric"] == "fid" else "pixel FD") + " (lower is better)")
    ax.set_ylabel("memorized (%)")
    ax.set_title("ringed: matched to the teacher's quality")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def plot_dynamics(results: dict, path: str):
    """Memorized fraction against the distillation step, per checkpointed method (and the repeated group)."""
    from ..metrics.figures import _finish, _new_figure

    grouped = bool(results["teacher"]["groups"])
    panels = [("overall", lambda c: c["memorized"])]
    if grouped:
        panels.append(("repeated classes", lambda c: c["groups"].get("repeated", {}).get("memorized")))
    fig = _new_figure(5.2 * len(panels), 3.8)
    for i, (title, get) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        teacher = get(results["teacher"])
        if teacher is not None:
            ax.axhline(100 * teacher, color="black", ls="--", lw=1, label="teacher")
        for method in dict.fromkeys(c["method"] for c in results["candidates"]):
            own = [c for c in results["candidates"] if c["method"] == method and c.get("step") is not None]
            if own:
                ax.plot([c["step"] for c in own], [100 * (get(c) if get(c) is not None else math.nan) for c in own],
                        marker="o", label=method)
        ax.set_xlabel("distillation step (PD: of its last, 1-step round)")
        ax.set_ylabel("memorized (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _finish(fig, path)


def main(args) -> int:
    cfg = resolve_config(args)
    out = os.path.abspath(args.output_dir)
    if os.path.isfile(os.path.join(out, RESULTS_NAME)) and not args.overwrite:
        raise FileExistsError(f"{out} already holds a finished matched-quality run; pass --overwrite to run it again.")
    overwrite = ["--overwrite_output_dir"] if args.overwrite else []
    common = ["--seed", str(args.seed), "--report_to", "none"] + overwrite
    start = time.time()

    from ..recipes import CD_ARGS, DMD_ARGS, PD_ARGS, TEACHER_ARGS
    from ..evaluation import evaluate
    from ..pipelines.pipeline_refined import RefinedPipeline
    from ..training import distill_consistency, distill_dmd, distill_progressive, train_edm_teacher
    from ..training.runner import reset_accelerate_state

    dirs = {name: os.path.join(out, name) for name in ("teacher", "cd", "dmd", "pd", "snapshots", "refined", "eval")}
    every = lambda steps: str(max(1, steps // cfg["num_checkpoints"]))  # noqa: E731

    # 1. The teacher.
    data = ["--dataset_name", "digits"]
    if cfg["repeat_classes"]:
        data += ["--repeat_classes", ",".join(map(str, cfg["repeat_classes"])), "--repeat_images_per_class",
                 str(cfg["repeat_images_per_class"]), "--repeat_times", str(cfg["repeat_times"]),
                 "--num_other_images", str(cfg["num_other_images"])]
    else:
        data += ["--num_train_images", str(cfg["num_train_images"])]
    print(f"[1/5] EDM teacher, {cfg['regime']} regime ({cfg['teacher_steps']} steps) -> {dirs['teacher']}")
    train_edm_teacher.main(train_edm_teacher.parse_args(TEACHER_ARGS + data + common + [
        "--max_train_steps", str(cfg["teacher_steps"]), "--checkpointing_steps", str(cfg["teacher_steps"]),
        "--output_dir", dirs["teacher"]]))
    reset_accelerate_state()

    # 2. The three distillations, each checkpointed num_checkpoints times.
    teacher = ["--pretrained_model_name_or_path", dirs["teacher"]]
    print(f"[2/5] CD ({cfg['cd_steps']} steps), DMD ({cfg['dmd_steps']}), PD ({cfg['pd_teacher_steps']} -> 1 steps, "
          f"{cfg['pd_steps']} per round)")
    distill_consistency.main(distill_consistency.parse_args(CD_ARGS + common + teacher + [
        "--max_train_steps", str(cfg["cd_steps"]), "--checkpointing_steps", every(cfg["cd_steps"]),
        "--output_dir", dirs["cd"]]))
    reset_accelerate_state()
    distill_dmd.main(distill_dmd.parse_args(DMD_ARGS + common + teacher + [
        "--max_train_steps", str(cfg["dmd_steps"]), "--checkpointing_steps", every(cfg["dmd_steps"]),
        "--output_dir", dirs["dmd"]]))
    reset_accelerate_state()
    distill_progressive.main(distill_progressive.parse_args(PD_ARGS + common + teacher + [
        "--teacher_steps", str(cfg["pd_teacher_steps"]), "--final_steps", "1", "--max_train_steps",
        str(cfg["pd_steps"]), "--checkpointing_steps", every(cfg["pd_steps"]), "--output_dir", dirs["pd"]]))
    reset_accelerate_state()

    # 3. Candidates: every checkpoint's EMA as a pipeline; the +refine controls of the final PD and DMD students.
    print("[3/5] Exporting checkpoints and building the +refine controls")
    paths, names, meta = [dirs["teacher"]], ["teacher"], []
    for method, run_steps in (("CD", cfg["cd_steps"]), ("DMD", cfg["dmd_steps"]), ("PD", cfg["pd_steps"])):
        run_dir = dirs[method.lower()]
        for step, folder in checkpoint_candidates(run_dir, run_steps, CHECKPOINTED[method], dirs["snapshots"],
                                                  method.lower()):
            paths.append(folder)
            names.append(f"{method} step {step}")
            if method == "CD":
                meta += [(f"{method} step {step} ({k}-step)", f"CD ({k} step{'s' * (k > 1)})", f"step {step}", step)
                         for k in (1, 2)]
            else:
                label = "PD (1 step)" if method == "PD" else "DMD"
                meta.append((f"{method} step {step}", label, f"step {step}", step))
    for method in ("PD", "DMD"):
        for sigma in cfg["refine_sigmas"]:
            folder = os.path.join(dirs["refined"], f"{method.lower()}-sigma-{sigma:g}")
            RefinedPipeline.from_sources(dirs[method.lower()], dirs["teacher"], sigma).save_pretrained(folder)
            paths.append(folder)
            names.append(f"{method}+refine sigma {sigma:g}")
            meta.append((names[-1], f"{method}+refine", f"σ = {sigma:g}", None))

    # 4. One audit of everything, from the same noises.
    metrics = ("l2", "fd_pixel") + (("fid",) if args.inception_weights else ()) + (("pairing",) if args.pairing else ())
    print(f"[4/5] Auditing {len(paths)} models on {cfg['num_samples']} shared noises -> {dirs['eval']}")
    audit = evaluate(paths, dirs["eval"], num_samples=cfg["num_samples"], metrics=metrics, seed=args.seed,
                     student_steps=(1, 2), device=args.device, names=names,
                     inception_weights=args.inception_weights)
    models = audit["models"]
    key = cfg["quality_metric"]
    t = models["teacher"]
    teacher_row = {"name": "teacher", "quality": t.get(key), "fd_pixel": t.get("fd_pixel"), **_stats(t)}
    if teacher_row["quality"] is None:
        raise RuntimeError(f"The audit did not measure the teacher's {key}: {audit.get('errors')}.")
    candidates = []
    for name, method, checkpoint, step in meta:
        m = models[name]
        quality = m.get(key)
        candidates.append({"name": name, "method": method, "checkpoint": checkpoint, "step": step,
                           "quality": math.nan if quality is None else quality, "fd_pixel": m.get("fd_pixel"),
                           **_stats(m)})

    # 5. Selection, table, figures.
    print("[5/5] Selecting the matched candidates")
    selected = select_matched(candidates, teacher_row["quality"])
    results = {"config": cfg, "seed": args.seed, "selection_rule": SELECTION_RULE, "teacher": teacher_row,
               "candidates": [{**c, "quality": None if not math.isfinite(c["quality"]) else c["quality"]}
                              for c in candidates],
               "selected": {k: {**v, "quality": None if not math.isfinite(v["quality"]) else v["quality"]}
                            for k, v in selected.items()},
               "audit": os.path.join("eval", "metrics.json")}
    plot_scatter({**results, "candidates": candidates, "selected": selected}, os.path.join(out, SCATTER_NAME))
    plot_dynamics(results, os.path.join(out, DYNAMICS_NAME))
    report = render_markdown(results)
    with open(os.path.join(out, REPORT_NAME), "w", encoding="utf-8") as f:
        f.write(report)
    results["seconds"] = time.time() - start
    with open(os.path.join(out, RESULTS_NAME), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, allow_nan=False)
    print(report)
    print(f"Done in {results['seconds']:.0f} s. Report: {os.path.join(out, REPORT_NAME)}")
    return 0

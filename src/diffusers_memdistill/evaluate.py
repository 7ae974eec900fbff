"""``memdistill evaluate``: sample saved models with shared noise and measure their quality and memorization.

Every model is sampled from the same per-sample noise (and class labels), so that pairings between a teacher and
its students, and side-by-side grids, are meaningful. The training data of each model is read from its own
``training_set.json`` unless ``--train_data`` is given. Results go to ``metrics.json`` (machine-readable),
``report.md`` (the table in the layout of 000 Table 1) and figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import build_training_set, load_training_set

METRICS = ("l2", "sscd", "fid", "fd_pixel", "clip", "pairing")
DEFAULT_METRICS = "l2,sscd,fid,fd_pixel,pairing"


@dataclass
class ModelRun:
    """One row of the report: a saved model sampled with a given number of steps."""

    name: str
    path: str
    pipeline: object
    kind: str  # "teacher" (EDM) or "student" (consistency)
    steps: int | None


def pipeline_class_of(path: str):
    """The package pipeline class named by a saved folder's ``model_index.json``."""
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{path} is not a saved model folder (no model_index.json).")
    with open(index_path, encoding="utf-8") as f:
        name = json.load(f)["_class_name"]
    name = name[1] if isinstance(name, list) else name
    if name == "EDMPipeline":
        from .pipelines.pipeline_edm import EDMPipeline

        return EDMPipeline, "teacher"
    if name == "ConsistencyStudentPipeline":
        from .pipelines.pipeline_consistency import ConsistencyStudentPipeline

        return ConsistencyStudentPipeline, "student"
    raise ValueError(f"{path} holds a {name}; memdistill evaluate knows EDMPipeline and ConsistencyStudentPipeline.")


def shared_noise(num_samples: int, shape: tuple, seed: int) -> torch.Tensor:
    """Unit-variance noise, sample i drawn from its own generator seeded ``seed + i`` (batch-size independent)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(num_samples)])


def shared_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor | None:
    if not num_classes:
        return None
    return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed + 10_000_019))


@torch.no_grad()
def generate(run: ModelRun, noise: torch.Tensor, labels, batch_size: int, device, seed: int = 0) -> torch.Tensor:
    """Samples in [0, 1], NCHW float32, on the CPU; NaNs are kept (and reported later)."""
    pipe = run.pipeline.to(device)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in tqdm(range(0, noise.shape[0], batch_size), desc=f"Sampling {run.name}", leave=False):
        chunk = noise[start : start + batch_size].to(device)
        kwargs = {} if run.steps is None else {"num_inference_steps": run.steps}
        if labels is not None:
            kwargs["class_labels"] = labels[start : start + batch_size].tolist()
        # Noise a sampler injects (stochastic or multistep) also comes from per-sample generators.
        generators = [torch.Generator(device).manual_seed(seed + start + i) for i in range(chunk.shape[0])]
        out.append(pipe(batch_size=chunk.shape[0], latents=chunk, generator=generators, output_type="pt",
                        **kwargs).images.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def teacher_pairing_targets(pipeline, noise, labels, batch_size, device, teacher_steps: int = 8):
    """Phi_K(z) (K-step Heun ODE map, 003 uses K = 8) and Phi_1(z) = D(sigma_max z; sigma_max), in [0, 1]."""
    from .models.denoiser import EDMDenoiser

    pipe = pipeline.to(device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = EDMDenoiser(pipe.unet, pipe.scheduler.config.sigma_data)
    sigma_max = pipe.scheduler.config.sigma_max
    multi, single = [], []
    for start in range(0, noise.shape[0], batch_size):
        z = noise[start : start + batch_size].to(device)
        lab = None if labels is None else labels[start : start + batch_size].to(device)
        multi.append(pipe(batch_size=z.shape[0], latents=z, num_inference_steps=teacher_steps, output_type="pt",
                          class_labels=None if lab is None else lab.tolist()).images.float().cpu())
        single.append(((denoiser(z * sigma_max, sigma_max, lab).cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(multi), torch.cat(single)


def finite_samples(samples: torch.Tensor) -> torch.Tensor:
    """The samples without NaN/inf values (those are counted in ``num_nan_samples``, never silently dropped)."""
    return samples[torch.isfinite(samples).flatten(1).all(1)]


def pixel_frechet_distance(samples: torch.Tensor, train: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to raw pixels: an always-available quality proxy, not FID.

    Computed over the finite samples only."""
    from .metrics import fid_from_features

    return float(fid_from_features(finite_samples(samples).flatten(1).double(), train.flatten(1).double()))


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def evaluate(
    model_paths: list,
    output_dir: str,
    num_samples: int = 1000,
    metrics: tuple = ("l2", "pairing"),
    seed: int = 0,
    batch_size: int = 256,
    student_steps: tuple = (1,),
    teacher_steps: int | None = None,
    train_data: str | None = None,
    sscd_weights: str | None = None,
    sscd_onnx: str | None = None,
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    names: list | None = None,
) -> dict:
    """Sample and measure every model; write ``metrics.json``, ``report.md`` and figures to ``output_dir``.

    Returns the results written to ``metrics.json``.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose among {', '.join(METRICS)}.")
    if num_samples < 2:
        raise ValueError(f"--num_samples must be at least 2, got {num_samples}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(output_dir, exist_ok=True)
    figures_dir = os.path.join(output_dir, "figures")
    os.makedirs(figures_dir, exist_ok=True)
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "diffusers_memdistill")

    # 1. Models and their training sets.
    runs, train_sets = [], {}
    for k, path in enumerate(model_paths):
        cls, kind = pipeline_class_of(path)
        pipeline = cls.from_pretrained(path)
        base = names[k] if names else os.path.basename(os.path.normpath(path))
        if train_data is not None:
            res = pipeline.unet.config.sample_size
            train_sets[path] = build_training_set(train_data, res, channels=pipeline.unet.config.in_channels)
        else:
            train_sets[path] = load_training_set(path)
        if kind == "student":
            for steps in student_steps:
                runs.append(ModelRun(f"{base} ({steps}-step)", path, pipeline, kind, steps))
        else:
            runs.append(ModelRun(base, path, pipeline, kind, teacher_steps))
    shapes = {(r.pipeline.unet.config.in_channels, r.pipeline.unet.config.sample_size) for r in runs}
    if len(shapes) != 1:
        raise ValueError(f"All models must produce images of one shape to share noise; got {sorted(shapes)}.")
    channels, resolution = shapes.pop()
    for path, ts in train_sets.items():
        if tuple(ts.images.shape[1:]) != (channels, resolution, resolution):
            raise ValueError(
                f"{path} generates {channels}x{resolution}x{resolution} images but its training set has "
                f"{'x'.join(map(str, ts.images.shape[1:]))}: resolution/channels differ."
            )
    num_classes = max(r.pipeline.unet.config.num_class_embeds or 0 for r in runs)

    # 2. Shared noise and labels; samples of every model.
    noise = shared_noise(num_samples, (channels, resolution, resolution), seed)
    labels = shared_labels(num_samples, num_classes, seed)
    samples = {r.name: generate(r, noise, labels if r.pipeline.unet.config.num_class_embeds else None, batch_size,
                                device, seed) for r in tqdm(runs, desc="Models")}
    from .training.utils import save_image_grid

    for r in runs:
        save_image_grid(samples[r.name][:64], os.path.join(figures_dir, f"samples_{_slug(r.name)}.png"), nrow=8)

    results = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "seed": seed,
        "num_samples": num_samples,
        "noise": f"sample i ~ N(0, I) from torch.Generator().manual_seed({seed} + i), shared by all models",
        "metrics": list(metrics),
        "device": str(device),
        "models": {},
        "errors": {},
    }
    for r in runs:
        nan = torch.isnan(samples[r.name]).flatten(1).any(1)
        results["models"][r.name] = {
            "path": os.path.abspath(r.path), "kind": r.kind, "steps": r.steps,
            "num_nan_samples": int(nan.sum()), "nan_sample_indices": nan.nonzero().flatten().tolist(),
            "training_set": {"num_images": len(train_sets[r.path]), "sha256": train_sets[r.path].record.get("sha256")},
        }

    # 3. Metrics; a metric that cannot run (missing weights, say) is reported and the others still computed.
    def train_images(run):
        return train_sets[run.path].images.float() / 255.0

    def groups(run):
        ts = train_sets[run.path]
        if ts.repeats is None or not bool((ts.repeats > 1).any()):
            return None
        return ["repeated" if int(k) > 1 else "non-repeated" for k in ts.repeats]

    if "l2" in metrics:
        from .metrics import pixel_memorization
        from .metrics.figures import plot_memorized_grid, plot_ratio_histograms

        ratios = {}
        for r in tqdm(runs, desc="L2 memorization"):
            res = pixel_memorization(samples[r.name], train_images(r), train_groups=groups(r), device=device)
            results["models"][r.name]["l2"] = res.to_dict()
            ratios[r.name] = res.ratios
            plot_memorized_grid(samples[r.name], train_images(r), res.nn_indices, res.ratios, num=8,
                                most_memorized="lowest",
                                path=os.path.join(figures_dir, f"memorized_{_slug(r.name)}.png"))
        plot_ratio_histograms(ratios, path=os.path.join(figures_dir, "l2_ratio_histogram.png"))

    if "fd_pixel" in metrics:
        for r in runs:
            results["models"][r.name]["fd_pixel"] = _finite(pixel_frechet_distance(samples[r.name], train_images(r)))

    if "sscd" in metrics:
        _try(results, "sscd", lambda: _sscd(runs, samples, train_images, groups, sscd_weights, sscd_onnx, device,
                                            results, figures_dir))
    if "fid" in metrics:
        _try(results, "fid", lambda: _fid(runs, samples, train_images, inception_weights, cache_dir, device, results))
    if "clip" in metrics:
        results["errors"]["clip"] = "CLIP score needs text-to-image models; these pipelines take no prompts."
    if "pairing" in metrics:
        _try(results, "pairing", lambda: _pairing(runs, samples, noise, labels, train_images, batch_size, device,
                                                  results, figures_dir))

    # 4. metrics.json and report.md.
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=_json_default)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_report(results))
    return results


def _try(results, name, fn):
    from .metrics import MissingWeightsError

    try:
        fn()
    except (MissingWeightsError, ImportError, ValueError) as exc:
        results["errors"][name] = f"{type(exc).__name__}: {exc}"
        tqdm.write(f"[memdistill evaluate] {name} not computed: {exc}")


def _sscd(runs, samples, train_images, groups, weights, onnx, device, results, figures_dir):
    from .metrics import SSCDFeatureExtractor, SSCDOnnxFeatureExtractor, sscd_memorization
    from .metrics.figures import plot_similarity_histograms

    if onnx:
        extractor = SSCDOnnxFeatureExtractor(onnx)
    else:
        kwargs = {"download": True} if weights is None else {}
        extractor = SSCDFeatureExtractor.from_torchscript(*(() if weights is None else (weights,)), device=device,
                                                          **kwargs)
    sims, train_features = {}, {}
    for r in tqdm(runs, desc="SSCD"):
        if r.path not in train_features:
            train_features[r.path] = extractor(train_images(r))
        res = sscd_memorization(extractor(samples[r.name]), train_features[r.path], train_groups=groups(r))
        results["models"][r.name]["sscd"] = res.to_dict()
        sims[r.name] = res.max_similarity
    plot_similarity_histograms(sims, path=os.path.join(figures_dir, "sscd_similarity_histogram.png"))


def _fid(runs, samples, train_images, weights, cache_dir, device, results):
    from .metrics import InceptionFeatureExtractor, cached_feature_stats, fid_from_features

    extractor = InceptionFeatureExtractor.from_torchscript(weights, device=device)
    for r in tqdm(runs, desc="FID"):
        reference = cached_feature_stats(train_images(r), extractor, os.path.join(cache_dir, "fid_stats"),
                                         extractor_id=f"inception:{weights or 'default'}")
        features = extractor(finite_samples(samples[r.name]))  # NaN samples are reported, not scored
        results["models"][r.name]["fid"] = _finite(float(fid_from_features(features, reference)))


def _pairing(runs, samples, noise, labels, train_images, batch_size, device, results, figures_dir):
    from .metrics import copying_diagnostics, pairing_inefficiency
    from .metrics.figures import plot_copying_diagnostics, plot_distance_heatmap, plot_pairing_pca

    teachers = [r for r in runs if r.kind == "teacher"]
    students = [r for r in runs if r.kind == "student"]
    if not teachers or not students:
        raise ValueError("pairing needs a teacher (EDMPipeline) and at least one student among the models.")
    teacher = teachers[0]
    cond = labels if teacher.pipeline.unet.config.num_class_embeds else None
    phi_k, phi_1 = teacher_pairing_targets(teacher.pipeline, noise, cond, batch_size, device)
    train = train_images(teacher)
    for s in students:
        g = samples[s.name]
        res = pairing_inefficiency(phi_k.flatten(1), g.flatten(1))
        diag = copying_diagnostics(phi_k.flatten(1), phi_1.flatten(1), g.flatten(1), train.flatten(1))
        results["models"][s.name]["pairing"] = {
            "teacher": teacher.name, "teacher_steps": 8, **res.to_dict(),
            "delta_mean": float(diag.delta.mean()), "delta_fraction_negative": float((diag.delta < 0).double().mean()),
        }
        slug = _slug(s.name)
        plot_pairing_pca(phi_k.flatten(1), phi_1.flatten(1), g.flatten(1),
                         path=os.path.join(figures_dir, f"pairing_pca_{slug}.png"))
        plot_distance_heatmap(phi_k.flatten(1), g.flatten(1), num=min(100, g.shape[0]),
                              path=os.path.join(figures_dir, f"pairing_heatmap_{slug}.png"))
        plot_copying_diagnostics(diag.delta, diag.mean_train_distance,
                                 path=os.path.join(figures_dir, f"copying_{slug}.png"))


def _fmt(value, percent=False, digits=4):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.2f}%" if percent else f"{value:.{digits}g}"


def render_report(results: dict) -> str:
    """``report.md``: one row per model, quality | memorization ratio | SSCD ratio / p95 (000 Table 1 layout)."""
    lines = [
        "# Memorization report",
        "",
        f"{results['num_samples']} samples per model; {results['noise']}. Memorized (L2): "
        "‖y − NN₁‖ / ‖y − NN₂‖ < 1/3 over the model's exact training set; SSCD: max cosine similarity > 0.5.",
        "",
        "| Model | FID | FD (pixels) | Mem (L2) | SSCD Mem / p95 | NaN samples |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        l2 = m.get("l2", {})
        sscd = m.get("sscd", {})
        sscd_cell = "–" if not sscd else f"{_fmt(sscd.get('fraction_memorized'), True)} / {_fmt(sscd.get('p95'))}"
        lines.append(f"| {name} | {_fmt(m.get('fid'))} | {_fmt(m.get('fd_pixel'))} | "
                     f"{_fmt(l2.get('fraction_memorized'), True)} | {sscd_cell} | {m['num_nan_samples']} |")
    grouped = {n: m["l2"]["groups"] for n, m in results["models"].items() if m.get("l2", {}).get("groups")}
    if grouped:
        lines += ["", "## Localized memorization (L2 memorized / p95 ratio, by the group of the nearest image)", "",
                  "| Model | Repeated | Non-repeated | Overall |", "|---|---|---|---|"]
        for name, g in grouped.items():
            cell = lambda s: "–" if s is None else f"{_fmt(s['fraction_memorized'], True)} / {_fmt(s['p95'])}"
            overall = results["models"][name]["l2"]
            lines.append(f"| {name} | {cell(g.get('repeated'))} | {cell(g.get('non-repeated'))} | {cell(overall)} |")
    paired = {n: m["pairing"] for n, m in results["models"].items() if "pairing" in m}
    if paired:
        lines += ["", "## Pairing with the teacher's 8-step ODE map (003 Def. 3.1)", "",
                  "| Student | ΔE = E_DT/E_OT − 1 | E_DT | E_OT | share of δ(z) < 0 |", "|---|---|---|---|---|"]
        for name, p in paired.items():
            lines.append(f"| {name} | {_fmt(p['delta_e'])} | {_fmt(p['e_dt'])} | {_fmt(p['e_ot'])} | "
                         f"{_fmt(p['delta_fraction_negative'], True)} |")
    if results["errors"]:
        lines += ["", "## Not computed", ""] + [f"- **{k}**: {v}" for k, v in results["errors"].items()]
    figures = ["l2_ratio_histogram.png", "sscd_similarity_histogram.png"]
    lines += ["", "## Figures", ""]
    have = {"l2_ratio_histogram.png": any("l2" in m for m in results["models"].values()),
            "sscd_similarity_histogram.png": any("sscd" in m for m in results["models"].values())}
    lines += [f"![{f}](figures/{f})" for f in figures if have[f]]
    for name in results["models"]:
        slug = _slug(name)
        lines.append(f"- {name}: [samples](figures/samples_{slug}.png), "
                     f"[most memorized vs NN₁/NN₂](figures/memorized_{slug}.png)"
                     + (f", [pairing PCA](figures/pairing_pca_{slug}.png), [distance heatmap](figures/pairing_heatmap_"
                        f"{slug}.png), [δ(z) vs D(z)](figures/copying_{slug}.png)" if name in paired else ""))
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}.", ""]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")


def _versions() -> dict:
    import diffusers

    from . import __version__

    return {"diffusers_memdistill": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, dest="models", metavar="DIR",
                        help="A saved teacher or student folder; repeat for several models.")
    parser.add_argument("--output_dir", required=True, help="Where metrics.json, report.md and figures/ go.")
    parser.add_argument("--num_samples", type=int, default=1000, help="Samples per model (shared noise).")
    parser.add_argument("--metrics", default=DEFAULT_METRICS,
                        help=f"Comma-separated among {', '.join(METRICS)} (default {DEFAULT_METRICS}).")
    parser.add_argument("--seed", type=int, default=0, help="Sample i uses noise seeded seed + i.")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--student_steps", default="1",
                        help="Comma-separated sampling steps for consistency students, one row each (e.g. 1,2).")
    parser.add_argument("--teacher_steps", type=int, default=None, help="Heun steps of EDM teachers (default 18).")
    parser.add_argument("--train_data", default=None,
                        help="Training data to compare against, instead of each model's training_set.json.")
    parser.add_argument("--sscd_weights", default=None, help="sscd_disc_mixup TorchScript file or URL.")
    parser.add_argument("--sscd_onnx", default=None, help="An SSCD ONNX file (int8 scores differ slightly).")
    parser.add_argument("--inception_weights", default=None, help="FID Inception TorchScript file or URL.")
    parser.add_argument("--cache_dir", default=None, help="Cache of training-set feature statistics.")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")


def main(args) -> int:
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    steps = tuple(int(s) for s in args.student_steps.split(",") if s.strip())
    results = evaluate(args.models, args.output_dir, args.num_samples, metrics, args.seed, args.batch_size, steps,
                       args.teacher_steps, args.train_data, args.sscd_weights, args.sscd_onnx, args.inception_weights,
                       args.cache_dir, args.device)
    print(render_report(results))
    print(f"Wrote {os.path.join(args.output_dir, 'report.md')} and metrics.json.")
    return 0

"""The summary stage of the measures (main process): every shard's per-sample outputs turned into the statistics of
``metrics.json``, for models, their held-out prompts and the floor alike, with the figures."""

from __future__ import annotations

import datetime
import os

import torch

from . import measures as M
from .per_sample import MeasureContext, gather
from .results import SCHEMA, strict_json, versions
from .store import TEACHER_TARGETS, load_array, read_json, write_json


def _groups(ts):
    if ts.repeats is None or not bool((ts.repeats > 1).any()):
        return None
    return ["repeated" if int(k) > 1 else "non-repeated" for k in ts.repeats]


def _subset_measures(ctx: MeasureContext, run, per: dict, samples: torch.Tensor, sel: slice) -> dict:
    """The statistics of one run's samples ``sel``: the same dictionary for models, held-out prompts and floors."""
    from ..metrics import fid_from_features, pixel_memorization_from_neighbours, sscd_memorization_from_neighbours

    ts = ctx.train_sets[run["training_set"]]
    groups = None if ctx.text_to_image else _groups(ts)
    entry = {}
    if "l2_nn_indices" in per:
        res = pixel_memorization_from_neighbours(
            per["l2_nn_indices"][sel], per["l2_nn_distances"][sel], num_train=len(ts), threshold=M.L2_THRESHOLD,
            train_groups=groups, num_duplicates_removed=len(ts) - ctx.distinct_pixels[run["training_set"]][1].numel())
        entry["l2"] = res.to_dict()
        entry["_l2"] = res
    for p in ctx.extractors.sscd:
        res = sscd_memorization_from_neighbours(per[f"sscd-{p}_nn_index"][sel], per[f"sscd-{p}_similarity"][sel],
                                                num_train=len(ts), threshold=ctx.settings["sscd_threshold"],
                                                train_groups=groups)
        entry.setdefault("sscd", {})[p] = res.to_dict()
        entry.setdefault("_sscd", {})[p] = res
    if "clip_score" in per:
        entry["clip"] = M.clip_stats(per["clip_score"][sel])
    if not ctx.text_to_image:
        finite = torch.isfinite(samples[sel]).flatten(1).all(1)
        n = int(finite.sum())
        if "fd_pixel" in ctx.settings["metrics"]:
            entry["fd_pixel"] = None
            if n >= 2:
                entry["fd_pixel"] = float(fid_from_features(samples[sel][finite].flatten(1).double(),
                                                            _reference_stats(ctx, run["training_set"], "pixels")))
        if "inception_features" in per:
            entry["fid"] = None
            if n >= 2:
                entry["fid"] = float(fid_from_features(per["inception_features"][sel][finite],
                                                       _reference_stats(ctx, run["training_set"], "inception")))
    return entry


def _reference_stats(ctx, tid, space):
    """The training set's Fréchet statistics in a feature space, computed once per audit."""
    if (tid, space) not in ctx.reference_stats:
        ctx.reference_stats[tid, space] = ctx.references[tid, space].statistics()
    return ctx.reference_stats[tid, space]


def _own_measures(ctx, per, samples, sel, owners, own_set, s) -> dict:
    """Text-to-image: each generation against its own prompt's image(s)."""
    from ..metrics import pixel_own_image_memorization

    from .references import embed

    out, tensors = {}, {}
    unit = lambda ts: ts.images.float() / 255.0  # noqa: E731
    train = ctx.train_sets["train0"]
    if "l2_nn_indices" in per:
        own = pixel_own_image_memorization(samples[sel], unit(own_set), owners, s, unit(train),
                                           threshold=M.L2_THRESHOLD)
        out["l2_own"] = own.to_dict()
        tensors["l2"] = own.ratios
    for p in ctx.extractors.sscd:
        own_features = embed(ctx.extractors.spaces[f"sscd-{p}"], own_set.images)
        sims = M.own_image_similarity(per[f"sscd-{p}_features"][sel], own_features, owners, s)
        out.setdefault("sscd_own", {})[p] = M.score_stats(sims, ctx.settings["sscd_threshold"])
        tensors.setdefault("sscd", {})[p] = sims
    return out, tensors


def _prompt_rows(ctx, prompts, per, sel, own_t, s):
    from ..metrics import memorization_ratio

    first = next(iter(ctx.extractors.sscd), None)
    sscd = (own_t["sscd"][first], per[f"sscd-{first}_similarity"][sel], per[f"sscd-{first}_nn_index"][sel]) \
        if first else (None, None, None)
    l2 = (own_t["l2"], memorization_ratio(per["l2_nn_distances"][sel]), per["l2_nn_indices"][sel][:, 0]) \
        if "l2" in own_t else None
    return M.per_prompt_rows(prompts, s, *sscd, clip=per["clip_score"][sel] if "clip_score" in per else None,
                             threshold=ctx.settings["sscd_threshold"], l2=l2)


def summarize(ctx: MeasureContext, recomputed_from: str | None, errors: dict) -> dict:
    """``metrics.json`` from every shard's per-sample outputs and every run's stage (main process)."""
    m = ctx.manifest
    runs, floors = m["runs"], m["floor_runs"]
    results = {
        "schema": SCHEMA, "task": m["task"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "seed": m["seed"], "num_samples": m["num_samples"], "noise": m["noise"],
        "samples_dir": os.path.abspath(ctx.samples_dir), "recomputed_from": recomputed_from,
        "metrics": ctx.settings["metrics"],
        "settings": {k: ctx.settings[k] for k in ("sscd_preprocessing", "sscd_threshold", "l2_threshold", "floor",
                                                  "clip_model", "clip_pretrained")},
        "device": str(ctx.device), "weights": dict(ctx.extractors.weights), "training_sets": {}, "floor": {},
        "floor_notes": m["floor_notes"], "models": {}, "warnings": [], "errors": dict(errors),
    }
    if ctx.text_to_image:
        c = m["conditions"]
        results.update({"samples_per_prompt": c["samples_per_prompt"], "num_prompts": len(c["prompts"]),
                        "num_heldout_prompts": len(c["heldout_prompts"]),
                        "guidance_scale": runs[0]["guidance_scale"] if runs else None})
    for tid, ts in ctx.train_sets.items():
        results["training_sets"][tid] = {
            "dataset": ts.record.get("dataset"), "split": ts.record.get("split"), "num_images": len(ts),
            "sha256": ts.record["sha256"], "models": [r["name"] for r in runs if r["training_set"] == tid],
            "near_duplicates": {}}
        if ctx.text_to_image:
            results["training_sets"][tid]["num_audited_pairs"] = len(ctx.pairs)
    few = set()
    all_per = {}
    for run in runs + floors:
        samples = load_array(ctx.run_folder(run), ctx.num_samples(run), m["shard_size"])
        per = gather(ctx, run)
        all_per[run["name"]] = per
        nan = ~torch.isfinite(samples).flatten(1).all(1)
        if ctx.text_to_image and run["kind"] != "floor":
            c = m["conditions"]
            s = c["samples_per_prompt"]
            n_train = len(c["prompts"]) * s
            main, held = slice(0, n_train), slice(n_train, samples.shape[0])
        else:
            main, held = slice(0, samples.shape[0]), None
        entry = _subset_measures(ctx, run, per, samples, main)
        if run["kind"] == "floor":
            tid = run["training_set"]
            info = {k: m["heldout_sets"][tid][k] for k in ("dataset", "split", "how", "num_images", "sha256", "seed")}
            results["floor"][tid] = {**info, **{k: v for k, v in entry.items() if not k.startswith("_")}}
            if samples.shape[0] < M.FID_MIN_SAMPLES and entry.get("fid") is not None:
                few.add(samples.shape[0])
            continue
        model = {k: run[k] for k in ("path", "kind", "pipeline_class", "steps", "training_set")}
        if ctx.text_to_image:
            model["guidance_scale"] = run["guidance_scale"]
        model.update({"samples": run["slug"], "num_samples": samples.shape[0], "num_nan_samples": int(nan.sum()),
                      "nan_sample_indices": nan.nonzero().flatten().tolist()})
        if int(nan.sum()) == samples.shape[0]:
            results["warnings"].append(f"{run['name']}: all {samples.shape[0]} samples are NaN; its statistics are "
                                       "undefined.")
        elif int(nan.sum()):
            results["warnings"].append(f"{run['name']}: {int(nan.sum())} of {samples.shape[0]} samples are NaN; "
                                       "statistics use the others (counts under num_nan).")
        model.update({k: v for k, v in entry.items() if not k.startswith("_")})
        if "fd_pixel" in entry and entry["fd_pixel"] is None:
            results["errors"].setdefault("fd_pixel", "")
            results["errors"]["fd_pixel"] = "; ".join(x for x in (
                results["errors"]["fd_pixel"], f"{run['name']}: fewer than 2 finite samples "
                f"({samples.shape[0] - int(nan.sum())})") if x)
        if "fid" in entry:
            finite = samples.shape[0] - int(nan.sum())
            if entry["fid"] is None:
                results["errors"]["fid"] = "; ".join(x for x in (
                    results["errors"].get("fid", ""), f"{run['name']}: fewer than 2 finite samples ({finite})") if x)
            elif finite < M.FID_MIN_SAMPLES:
                few.add(finite)
        if ctx.text_to_image:
            c = m["conditions"]
            s = c["samples_per_prompt"]
            own, own_t = _own_measures(ctx, per, samples, main, c["owners"], ctx.pairs, s)
            model.update(own)
            model["prompts"] = _prompt_rows(ctx, c["prompts"], per, main, own_t, s)
            if c["heldout_prompts"]:
                h = {k: v for k, v in _subset_measures(ctx, run, per, samples, held).items()
                     if not k.startswith("_")}
                held_own, held_t = _own_measures(ctx, per, samples, held, c["heldout_owners"],
                                                 ctx.heldout["train0"], s)
                h.update(held_own)
                h["prompts"] = _prompt_rows(ctx, c["heldout_prompts"], per, held, held_t, s)
                model["heldout_prompts"] = h
            _most_copied_figure(ctx, run, samples[main], c, own_t, s)
        else:
            stage = read_json(run_stage_path(ctx, run))
            if stage["pairing"] is not None:
                model["pairing"] = stage["pairing"]
            results["warnings"] += stage["warnings"]
        results["models"][run["name"]] = model
    if few:
        results["warnings"].append(
            f"FID from {', '.join(map(str, sorted(few)))} images, fewer than {M.FID_MIN_SAMPLES:,} (the Inception "
            "feature dimension): the covariance is rank-deficient and FID biased upwards; compare it only within "
            "this report, never with published FIDs (50,000 samples).")
    if not ctx.text_to_image:
        _histograms(ctx, results, all_per, runs + floors)
        if "pairing" in ctx.settings["metrics"] and ctx.manifest["teacher_targets"] is None:
            results["errors"]["pairing"] = ("pairing needs a teacher with an ODE map (e.g. an EDMPipeline) and at "
                                            "least one student or one-step generator among the models.")
        lpips = {r["name"]: r["training_config"].get("lpips_sha256") for r in runs
                 if r["training_config"].get("loss") == "lpips"}
        if lpips:
            results["weights"]["lpips"] = {"role": "training loss of the students (from their training_config.json)",
                                           "sha256": lpips}
    _near_duplicates(ctx, results)
    return results


def _histograms(ctx, results, all_per, runs):
    from ..metrics import memorization_ratio
    from ..metrics.figures import plot_ratio_histograms, plot_similarity_histograms

    label = lambda r: f"held-out real ({r['training_set']}, floor)" if r["kind"] == "floor" else r["name"]  # noqa
    if "l2" in ctx.settings["metrics"]:
        ratios = {label(r): memorization_ratio(all_per[r["name"]]["l2_nn_distances"]) for r in runs}
        plot_ratio_histograms(ratios, threshold=M.L2_THRESHOLD,
                              path=os.path.join(ctx.figures_dir, "l2_ratio_histogram.png"))
    for p in ctx.extractors.sscd:
        sims = {label(r): all_per[r["name"]][f"sscd-{p}_similarity"] for r in runs}
        plot_similarity_histograms(sims, threshold=ctx.settings["sscd_threshold"],
                                   path=os.path.join(ctx.figures_dir, f"sscd_similarity_histogram_{p}.png"))


def _near_duplicates(ctx, results):
    from ..metrics import pixel_near_duplicates, sscd_near_duplicates
    from ..metrics.figures import plot_near_duplicates

    for tid, ts in ctx.train_sets.items():
        nd = results["training_sets"][tid]["near_duplicates"]
        if len(ts) > M.NEAR_DUPLICATES_MAX_IMAGES:
            results["training_sets"][tid]["near_duplicates_note"] = (
                f"not searched: {len(ts):,} images, more than {M.NEAR_DUPLICATES_MAX_IMAGES:,}")
            continue
        sources = [e["source"] for e in ts.record["entries"]]
        train = ts.images.float() / 255.0
        if "l2" in ctx.settings["metrics"] and len(ts) >= 3:
            dup = pixel_near_duplicates(train, threshold=M.L2_THRESHOLD, device=ctx.device)
            nd["l2"] = dup.to_dict(M.NUM_LISTED_DUPLICATES, sources)
            if dup.num_pairs:
                plot_near_duplicates(train, dup.pairs, dup.scores, num=8,
                                     path=os.path.join(ctx.figures_dir, f"near_duplicates_{tid}_l2.png"))
        for p in ctx.extractors.sscd:
            feats = ctx.references[tid, f"sscd-{p}"].features
            if feats.shape[0] < 2:
                continue
            dup = sscd_near_duplicates(feats, threshold=ctx.settings["sscd_threshold"])
            nd.setdefault("sscd", {})[p] = dup.to_dict(M.NUM_LISTED_DUPLICATES, sources)
            if dup.num_pairs:
                plot_near_duplicates(train, dup.pairs, dup.scores, num=8,
                                     path=os.path.join(ctx.figures_dir, f"near_duplicates_{tid}_sscd_{p}.png"))


def run_stage_path(ctx: MeasureContext, run) -> str:
    return os.path.join(ctx.measures_folder(run), "run.json")


def run_stage(ctx: MeasureContext, run) -> dict:
    """What a pixel model's row needs of all its samples at once, computed by one process for the whole run: its
    sample grid, its most memorized samples beside their nearest training images, and a student's pairing with the
    teacher (003 Def. 3.1: ΔE, δ(z), D(z), with their figures). Written to ``measures/<run>/run.json``."""
    from ..metrics import copying_diagnostics, memorization_ratio, pairing_inefficiency
    from ..metrics.figures import (plot_copying_diagnostics, plot_distance_heatmap, plot_memorized_grid,
                                   plot_pairing_pca)
    from ..training.utils import save_image_grid

    fig = lambda what: os.path.join(ctx.figures_dir, f"{what}_{run['slug']}.png")  # noqa: E731
    samples = load_array(ctx.run_folder(run), ctx.num_samples(run), ctx.manifest["shard_size"])
    save_image_grid(samples[:64], fig("samples"), nrow=8)
    per = gather(ctx, run)
    ts = ctx.train_sets[run["training_set"]]
    if "l2_nn_indices" in per:
        # Only the training images the figure can show, so that a million-image set is never made float.
        nn = per["l2_nn_indices"]
        shown = nn[nn >= 0].unique()
        local = torch.where(nn >= 0, torch.searchsorted(shown, nn.clamp_min(0)), nn)
        plot_memorized_grid(samples, ts.images[shown].float() / 255.0, local,
                            memorization_ratio(per["l2_nn_distances"]), num=8, most_memorized="lowest",
                            path=fig("memorized"))
    out = {"pairing": None, "warnings": []}
    entry = ctx.manifest["teacher_targets"]
    if "pairing" not in ctx.settings["metrics"] or entry is None or run["kind"] not in ("student", "generator"):
        return out
    folder = os.path.join(ctx.samples_dir, TEACHER_TARGETS)
    n, size = ctx.manifest["num_samples"], ctx.manifest["shard_size"]
    phi_k, phi_1 = load_array(folder, n, size, "phi_k"), load_array(folder, n, size, "phi_1")
    train = (ctx.train_sets[entry["training_set"]].images.float() / 255.0).flatten(1)
    finite_targets = torch.isfinite(phi_k).flatten(1).all(1) & torch.isfinite(phi_1).flatten(1).all(1)
    # The pairing is undefined with NaN outputs: it is measured over the noises where all three are finite.
    keep = finite_targets & torch.isfinite(samples).flatten(1).all(1)
    kept = int(keep.sum())
    pairing = {"teacher": entry["teacher"], "teacher_steps": entry["teacher_steps"], "num_noises": kept,
               "num_excluded_nonfinite": int(samples.shape[0] - kept)}
    if kept < 2:
        pairing.update({"delta_e": None, "e_dt": None, "e_ot": None, "fraction_fixed": None, "delta_mean": None,
                        "delta_fraction_negative": None, "delta_distance_correlation": None})
        out["warnings"].append(f"{run['name']}: pairing not measured, only {kept} noises give finite teacher and "
                               "student outputs.")
    else:
        t8, t1, s = phi_k[keep].flatten(1), phi_1[keep].flatten(1), samples[keep].flatten(1)
        res = pairing_inefficiency(t8, s)
        diag = copying_diagnostics(t8, t1, s, train)
        # 003 Fig. 5: copying (negative δ) concentrates where D(z) is large, a negative Pearson correlation.
        correlation = torch.corrcoef(torch.stack([diag.delta.double(), diag.mean_train_distance.double()]))[0, 1]
        pairing.update({**res.to_dict(), "delta_mean": float(diag.delta.mean()),
                        "delta_fraction_negative": float((diag.delta < 0).double().mean()),
                        "delta_distance_correlation": float(correlation)})
        plot_pairing_pca(t8, t1, s, path=fig("pairing_pca"))
        plot_distance_heatmap(t8, s, num=min(100, kept), path=fig("pairing_heatmap"))
        plot_copying_diagnostics(diag.delta, diag.mean_train_distance, path=fig("copying"))
    out["pairing"] = pairing
    return out


def run_stages(ctx: MeasureContext) -> None:
    """Every pixel model's run stage, the models split over the processes (model k on process k mod N); a stage
    already written is kept."""
    if ctx.text_to_image:
        return
    runs = ctx.manifest["runs"]
    for k in ctx.procs.mine(runs):
        run = runs[k]
        if not os.path.isfile(run_stage_path(ctx, run)):
            clean, _ = strict_json(run_stage(ctx, run))
            write_json(run_stage_path(ctx, run), clean)


def _most_copied_figure(ctx, run, generated, conditions, own_t, s):
    """The most-copied prompts (the closest own-image score over seeds): best seed beside its image."""
    from ..metrics.figures import plot_copied_prompts

    if own_t.get("sscd"):
        own, label, sign = next(iter(own_t["sscd"].values())), "SSCD", 1.0
    elif "l2" in own_t:
        own, label, sign = own_t["l2"], "L2 ratio", -1.0
    else:
        return
    prompts, owners = conditions["prompts"], conditions["owners"]
    own_images = ctx.pairs.images.float() / 255.0
    closeness = torch.nan_to_num(sign * own.double(), nan=-float("inf"))
    per_prompt = torch.stack([closeness[p * s:(p + 1) * s].max() for p in range(len(prompts))])
    order = torch.argsort(per_prompt, descending=True)[:8].tolist()
    rows_g, rows_t, scores = [], [], []
    for p in order:
        best = int(closeness[p * s:(p + 1) * s].argmax())
        rows_g.append(generated[p * s + best])
        rows_t.append(own_images[owners[p][0]])
        scores.append(float(own[p * s + best]))
    plot_copied_prompts(torch.stack(rows_g), torch.stack(rows_t), [prompts[p] for p in order], scores,
                        path=os.path.join(ctx.figures_dir, f"most_copied_{run['slug']}.png"), score_label=label)



__all__ = ["run_stage", "run_stages", "summarize"]

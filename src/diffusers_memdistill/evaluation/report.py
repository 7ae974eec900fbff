"""``report.md``: one renderer for every audit of the ``metrics.json`` schema (`evaluation.results`).

Pixel audits get the layout of 000 Table 1 (one row per model, a floor row per held-out set); text-to-image audits the
layout of 000 Table 3 (a model's training and held-out prompts, the floor); both then list warnings, near-duplicates,
what was not computed, the weights behind the numbers and the figures.
"""

from __future__ import annotations

import math
import os

from .measures import L2_THRESHOLD
from .models import slug

NUM_LISTED_PROMPTS = 10


def fmt(value, percent=False, digits=4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.2f}%" if percent else f"{value:.{digits}g}"


def _threshold(value: float) -> str:
    return "1/3" if value == L2_THRESHOLD else f"{value:g}"


def _mem_cell(stats) -> str:
    if not stats:
        return "–"
    return f"{fmt(stats.get('fraction_memorized'), True)} / {fmt(stats.get('p95'))}"


def _triple(stats) -> str:
    if not stats:
        return "–"
    return f"{fmt(stats.get('mean'))} / {fmt(stats.get('p95'))} / {fmt(stats.get('fraction_memorized'), True)}"


def _preprocessings(results) -> list:
    return results["settings"]["sscd_preprocessing"] if "sscd" in results["weights"] else []


def render_report(results: dict) -> str:
    """``report.md`` of an audit."""
    body = _text_to_image_tables(results) if results["task"] == "text-to-image" else _image_tables(results)
    return "\n".join(body + _details(results))


def _image_tables(results: dict) -> list:
    settings = results["settings"]
    preps = settings["sscd_preprocessing"] if "sscd" in results["metrics"] else []
    sscd_w = results["weights"].get("sscd")
    noise = results["noise"]
    samples_dir = results["samples_dir"]
    lines = [
        "# Memorization report",
        "",
        f"{results['num_samples']} samples per model, seed {noise['seed']}. Sample i draws its starting noise "
        "(shared by all models), the noise its sampler injects and its class label from three independent CPU "
        f"streams seeded from `numpy.random.SeedSequence([{noise['seed']}, i, stream])`, so the numbers depend "
        "neither on the batch size, nor on the device, nor on the number of processes. Every number below is "
        f"computed from the 8-bit samples in `{samples_dir}`; `memdistill evaluate --from_samples "
        f"{os.path.dirname(samples_dir)}` recomputes them.",
        "",
        f"Memorized (L2): ‖y − NN₁‖ / ‖y − NN₂‖ < {_threshold(settings['l2_threshold'])} over the model's exact "
        "training set (p95: 95th percentile of the ratio, lower is closer)."
        + (f" Memorized (SSCD): max cosine similarity > {settings['sscd_threshold']:g} (p95 of the similarity)"
           + (f"; backend {sscd_w['backend']}, preprocessing "
              + "; ".join(f"`{p}` ({d})" for p, d in sscd_w["preprocessings"].items()) if sscd_w else "")
           + "." if preps else ""),
        "",
    ]
    header = ["Model", "FID", "FD (pixels)", "Mem (L2) / p95"] + [f"SSCD `{p}` Mem / p95" for p in preps] \
        + ["NaN samples"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, m, nan_cell):
        cells = [label, fmt(m.get("fid")), fmt(m.get("fd_pixel")), _mem_cell(m.get("l2"))]
        cells += [_mem_cell(m.get("sscd", {}).get(p)) for p in preps]
        return "| " + " | ".join(cells + [nan_cell]) + " |"

    for name, m in results["models"].items():
        lines.append(row(name, m, str(m["num_nan_samples"])))
    for tid, f in results["floor"].items():
        lines.append(row(f"*floor: {f['num_images']} held-out real images of {f.get('dataset')} vs {tid}*", f, "–"))
    lines.append("")
    if results["floor"]:
        lines.append("The floor rows score real images of the same distribution that no model was trained on, in "
                     "the same way: what the criteria flag without any memorization at this resolution. A model's "
                     "memorized fraction means something only above its floor. Held-out images: "
                     + "; ".join(f"{tid}: {f['how']} (seed {f['seed']})" for tid, f in results["floor"].items()) + ".")
    for tid, note in results["floor_notes"].items():
        lines.append(f"No floor row for {tid}: {note}.")
    lines.append("")
    grouped = {n: m["l2"]["groups"] for n, m in results["models"].items() if m.get("l2", {}).get("groups")}
    if grouped:
        lines += ["## Localized memorization (L2 memorized / p95 ratio, by the group of the nearest image)", "",
                  "| Model | Repeated | Non-repeated | Overall |", "|---|---|---|---|"]
        for name, g in grouped.items():
            lines.append(f"| {name} | {_mem_cell(g.get('repeated'))} | {_mem_cell(g.get('non-repeated'))} | "
                         f"{_mem_cell(results['models'][name]['l2'])} |")
        lines.append("")
    paired = {n: m["pairing"] for n, m in results["models"].items() if "pairing" in m}
    if paired:
        lines += ["## Pairing with the teacher's 8-step ODE map (003 Def. 3.1)", "",
                  "| Student | ΔE = E_DT/E_OT − 1 | E_DT | E_OT | share of δ(z) < 0 | corr(δ, D) | noises |",
                  "|---|---|---|---|---|---|---|"]
        for name, p in paired.items():
            lines.append(f"| {name} | {fmt(p['delta_e'])} | {fmt(p['e_dt'])} | {fmt(p['e_ot'])} | "
                         f"{fmt(p['delta_fraction_negative'], True)} | {fmt(p.get('delta_distance_correlation'))} | "
                         f"{p['num_noises']} |")
        lines.append("")
    return lines


def _text_to_image_tables(results: dict) -> list:
    preps = _preprocessings(results) if "sscd" in results["metrics"] else []
    l2 = "l2" in results["metrics"]
    thr = results["settings"]["sscd_threshold"]
    s = results["samples_per_prompt"]
    measures = []
    if "clip" in results["metrics"]:
        measures.append(f"CLIP: raw cosine of open_clip {results['settings']['clip_model']} "
                        f"({results['settings']['clip_pretrained']}).")
    if "sscd" in results["metrics"]:
        measures.append("SSCD: similarity of each generation to its own training image (own) and to the nearest "
                        f"training image (nearest), mean / p95 / fraction above {thr:g}.")
    if l2:
        measures.append("L2 (pixels): own ρ = ‖y − own image‖ / ‖y − nearest other training image‖ and nearest "
                        "r = ‖y − NN₁‖ / ‖y − NN₂‖ over the training set, mean / p95 / fraction below 1/3 (lower is "
                        "closer to a copy).")
    training = next(iter(results["training_sets"].values()))
    lines = [
        "# Text-to-image memorization audit",
        "",
        f"{results['num_prompts']} prompts of the training set and {results['num_heldout_prompts']} held-out prompts, "
        f"{s} seeds each (seed {results['seed']}), guidance scale {results['guidance_scale']}; training set: "
        f"{training['num_images']} images of {training['dataset']} (sha256 `{training['sha256'][:16]}…`). "
        + " ".join(measures) + f" Every number is computed from the 8-bit generations in `{results['samples_dir']}`; "
        f"`memdistill evaluate --from_samples {os.path.dirname(results['samples_dir'])}` recomputes them.",
        "",
    ]
    header = ["Model", "prompts", "CLIP ↑"]
    for p in preps:
        header += [f"SSCD `{p}` own: mean / p95 / > {thr:g}", f"SSCD `{p}` nearest: mean / p95 / > {thr:g}"]
    if l2:
        header += ["L2 own ρ: mean / p95 / < 1/3", "L2 nearest r: mean / p95 / < 1/3"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(r, own=True):
        out = [fmt(r.get("clip", {}).get("mean"))]
        for p in preps:
            out += [_triple(r.get("sscd_own", {}).get(p)) if own else "–", _triple(r.get("sscd", {}).get(p))]
        if l2:
            out += [_triple(r.get("l2_own")) if own else "–", _triple(r.get("l2"))]
        return out

    for name, m in results["models"].items():
        lines.append("| " + " | ".join([name, "training"] + cells(m)) + " |")
        if "heldout_prompts" in m:
            lines.append("| " + " | ".join([name, "held-out"] + cells(m["heldout_prompts"])) + " |")
    for tid, floor in results["floor"].items():
        lines.append("| " + " | ".join([f"*floor: {floor['num_images']} held-out real images*", "–"]
                                       + cells(floor, own=False)) + " |")
        lines += ["", f"Held-out pairs: {floor['how']} of {floor['dataset']}. The floor row scores those real images "
                  "against the training set (CLIP: with their own captions); a model's SSCD and L2 numbers mean "
                  "copying only beyond it and beyond its own held-out-prompt row."]
    for tid, note in results["floor_notes"].items():
        lines += ["", f"No held-out prompts or floor row: {note}."]
    lines.append("")
    for name, m in results["models"].items():
        rows = m.get("prompts", [])
        sscd, l2_rows = bool(rows) and "own_max" in rows[0], bool(rows) and "l2_own_min" in rows[0]
        if not (sscd or l2_rows):
            continue
        if sscd:
            ranked = sorted(rows, key=lambda r: -(r["own_max"] if r["own_max"] is not None else -2))
            copied = sum(r["copied"] for r in rows)
            criterion = f"above {thr:g} (SSCD `{preps[0]}` to their own image)"
        else:
            ranked = sorted(rows, key=lambda r: r["l2_own_min"] if r["l2_own_min"] is not None else float("inf"))
            copied = sum(r["l2_copied"] for r in rows)
            criterion = "with an own-image L2 ratio below 1/3"
        header = ["prompt"] + (["own max", "own mean", "seeds > thr", "nearest max"] if sscd else []) \
            + (["L2 own ρ min", "seeds < 1/3", "L2 nearest r min"] if l2_rows else []) + ["CLIP"]
        lines += [f"## {name}: most-copied prompts", "",
                  f"{copied} of {len(rows)} prompts have a generation {criterion}. "
                  f"[Figure](figures/most_copied_{slug(name)}.png)", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in ranked[:NUM_LISTED_PROMPTS]:
            row = [r["prompt"].replace("|", "\\|")]
            if sscd:
                row += [fmt(r["own_max"]), fmt(r["own_mean"]), fmt(r["fraction_above"], True), fmt(r["nearest_max"])]
            if l2_rows:
                row += [fmt(r["l2_own_min"]), fmt(r["l2_fraction_copied"], True), fmt(r["l2_nearest_min"])]
            lines.append("| " + " | ".join(row + [fmt(r.get("clip_mean"))]) + " |")
        held = m.get("heldout_prompts", {}).get("prompts", [])
        if held and l2_rows:
            lines += ["", f"Held-out prompts with an own-image L2 ratio below 1/3: "
                      f"{sum(r['l2_copied'] for r in held)} of {len(held)}."]
        lines.append("")
    return lines


def _details(results: dict) -> list:
    lines = []
    if results["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in results["warnings"]] + [""]
    dup_lines = []
    for tid, t in results["training_sets"].items():
        found = [("L2 ratio", t["near_duplicates"]["l2"])] if "l2" in t["near_duplicates"] else []
        found += [(f"SSCD `{p}`", d) for p, d in t["near_duplicates"].get("sscd", {}).items()]
        if not found and "near_duplicates_note" not in t:
            continue
        dup_lines.append(f"**{tid}**: {t['num_images']} images of {t['dataset']} ({t.get('split')}), sha256 "
                         f"`{t['sha256']}`, used by {', '.join(t['models'])}.")
        if "near_duplicates_note" in t:
            dup_lines.append(f"- Near-duplicates {t['near_duplicates_note']}.")
        for label, d in found:
            crit = (f"ratio to the nearest other training image < {_threshold(d['threshold'])}" if d["metric"] == "l2"
                    else f"similarity to the most similar other training image > {d['threshold']:g}")
            dup_lines.append(f"- {label} ({crit}): {d['num_images_flagged']} of {d['num_images']} images, "
                             f"{d['num_pairs']} pairs" + (":" if d["pairs"] else "."))
            for p in d["pairs"]:
                dup_lines.append(f"  - #{p['i']} `{p.get('source_i', '')}` ≈ #{p['j']} `{p.get('source_j', '')}` "
                                 f"(score {fmt(p['score'])})")
    if dup_lines:
        lines += ["## Near-duplicates in the training sets", "",
                  "Training images whose nearest other training image is itself a copy by the criterion: a sample "
                  "copying one of them can match both.", ""] + dup_lines + [""]
    if results["errors"]:
        lines += ["## Not computed", ""] + [f"- **{k}**: {v}" for k, v in results["errors"].items()] + [""]
    if results.get("null_values"):
        lines += ["Numbers that are not finite are null in metrics.json, with their reason under `null_values` "
                  f"({len(results['null_values'])} of them).", ""]
    lines += ["## Weights behind the numbers", ""]
    weights = results["weights"]
    if not weights:
        lines.append("No metric of this report uses pretrained weights.")
    if "sscd" in weights:
        w = weights["sscd"]
        lines.append(f"- SSCD ({w['backend']}): `{w['weights_path']}`, sha256 `{w['sha256']}`; preprocessing "
                     + ", ".join(f"`{p}`" for p in w["preprocessings"]))
    if "inception" in weights:
        w = weights["inception"]
        lines.append(f"- FID Inception-v3 ({w['backend']}): `{w['weights_path']}`, sha256 `{w['sha256']}`")
    if "clip" in weights:
        w = weights["clip"]
        lines.append(f"- CLIP {w['model']} ({w['pretrained']}): sha256 `{w['sha256']}`")
    if "lpips" in weights:
        for name, sha in weights["lpips"]["sha256"].items():
            if isinstance(sha, dict):  # one hash per file (backbone, head)
                sha = ", ".join(f"{role} `{h}`" for role, h in sha.items())
            elif sha:
                sha = f"`{sha}`"
            sha = sha or "not recorded in its training_config.json"
            lines.append(f"- LPIPS (training loss of {name}): sha256 {sha}")
    if results["task"] == "image":
        lines += ["", "## Figures", ""]
        figures = ["l2_ratio_histogram.png"] if "l2" in results["metrics"] else []
        figures += [f"sscd_similarity_histogram_{p}.png" for p in _preprocessings(results)]
        lines += [f"![{f}](figures/{f})" for f in figures]
        for name, m in results["models"].items():
            s = slug(name)
            links = [f"[samples](figures/samples_{s}.png)"]
            if "l2" in m:
                links.append(f"[most memorized vs NN₁/NN₂](figures/memorized_{s}.png)")
            if m.get("pairing", {}).get("delta_e") is not None:
                links += [f"[pairing PCA](figures/pairing_pca_{s}.png)",
                          f"[distance heatmap](figures/pairing_heatmap_{s}.png)",
                          f"[δ(z) vs D(z)](figures/copying_{s}.png)"]
            lines.append(f"- {name}: " + ", ".join(links))
        for tid, t in results["training_sets"].items():
            nd = t["near_duplicates"]
            if nd.get("l2", {}).get("num_pairs"):
                lines.append(f"- {tid}: [near-duplicates (L2)](figures/near_duplicates_{tid}_l2.png)")
            for p, d in nd.get("sscd", {}).items():
                if d["num_pairs"]:
                    lines.append(f"- {tid}: [near-duplicates (SSCD `{p}`)](figures/near_duplicates_{tid}_sscd_{p}.png)")
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}.", ""]
    return lines


__all__ = ["fmt", "render_report"]

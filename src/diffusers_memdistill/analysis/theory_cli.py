"""``memdistill theory``: the random-feature analysis of one-step consistency distillation (000 §5, App. B.3, D.4).

Reproduces, for isotropic data, tanh features and one Euler step of the OU probability-flow ODE at a fixed time t:

- Fig. 2: the spectrum of the teacher Gram U (two bulks) and of the curvature M (an isotropic atom plus at most d
  structured eigenvalues); with ``--mc_samples > 0`` also the Monte-Carlo U and M of an actually trained teacher;
- Fig. 3: visibility, resolvent subtraction and signed response of every teacher mode (000 eqs. 5.9-5.10);
- Fig. 6: the GEN median of the inverse-weighted memorization leakage (000 eq. B.15) against the ridge, and λ*
  (000 eq. B.17);
- Figs. 9-10: signed responses and U spectra across ψ_n (and ψ_p).

Figures (PNG) and ``results.json`` go to ``--output_dir``. All maths lives in [`diffusers_memdistill.analysis.rfnn`].
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np

from . import rfnn

# Defaults of the full run and of --quick (the sizes of 000 were lost in extraction; see docs/theory.md).
FULL = dict(
    d=64,
    psi_p=32.0,
    psi_n=4.0,
    pfode_samples=20000,
    mc_samples=20000,
    noise_per_sample=32,
    num_ridges=33,
    sweep_psi_n="1,2,4,8,16",
    sweep_psi_p="8,16,32,64",
)
QUICK = dict(
    d=10,
    psi_p=8.0,
    psi_n=2.0,
    pfode_samples=2000,
    mc_samples=2000,
    noise_per_sample=16,
    num_ridges=13,
    sweep_psi_n="1,2,4",
    sweep_psi_p="4,8",
)
RESULTS_NAME = "results.json"
FIGURES = {
    "fig2": "fig2_spectra_U_M.png",
    "fig3": "fig3_mode_responses.png",
    "fig6": "fig6_leakage_vs_ridge.png",
    "fig9": "fig9_signed_responses.png",
    "fig10": "fig10_spectra_sweep.png",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="Folder for the figures and results.json.")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty --output_dir.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (seconds), for tests and smoke runs.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every random draw (W, data, Ω, noise).")
    parser.add_argument("--d", type=int, default=None, help=f"Input dimension (default {FULL['d']}).")
    parser.add_argument("--psi_p", type=float, default=None, help=f"p = ψ_p·d (default {FULL['psi_p']}).")
    parser.add_argument("--psi_n", type=float, default=None, help=f"n = ψ_n·d (default {FULL['psi_n']}).")
    parser.add_argument("--t", type=float, default=0.1, help="OU time of the teacher and of the CD step.")
    parser.add_argument("--h", type=float, default=0.01, help="Euler step of the teacher PF-ODE (from t to t − h).")
    parser.add_argument("--activation", default="tanh", choices=sorted(rfnn.ACTIVATIONS), help="Feature σ.")
    parser.add_argument("--epsilon", type=float, default=0.1, help="Leakage tolerance ε of eq. B.17.")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="Mem/Gen threshold on the eigenvalues of U; default: the widest log-gap (see rfnn.auto_threshold).",
    )
    parser.add_argument("--num_ridges", type=int, default=None, help="Ridge grid size (plus λ = 0).")
    parser.add_argument(
        "--pfode_samples", type=int, default=None, help="Draws used to estimate the PF-ODE constants q, r, c."
    )
    parser.add_argument(
        "--mc_samples",
        type=int,
        default=None,
        help="Draws for the Monte-Carlo curvature of a trained teacher at the base size; 0 skips it.",
    )
    parser.add_argument(
        "--noise_per_sample", type=int, default=None, help="Noise draws per training point in the Monte-Carlo U, V."
    )
    parser.add_argument("--no_figures", action="store_true", help="Write results.json only (no PNG figures).")
    parser.add_argument("--sweep_psi_n", default=None, help="Comma-separated ψ_n values at the base ψ_p (Figs. 9-10).")
    parser.add_argument("--sweep_psi_p", default=None, help="Comma-separated ψ_p values at the base ψ_n (Figs. 9-10).")


# ---------------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------------


def _parse_list(name: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}.") from err
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"--{name} must list positive numbers, got {text!r}.")
    return values


def resolve_settings(args) -> dict:
    """Merges the command line with the full or quick defaults and validates everything."""
    base = QUICK if args.quick else FULL
    s = {key: (getattr(args, key) if getattr(args, key) is not None else value) for key, value in base.items()}
    s.update(t=args.t, h=args.h, activation=args.activation, epsilon=args.epsilon, threshold=args.threshold)
    s["seed"] = args.seed
    s["figures"] = not getattr(args, "no_figures", False)
    if s["d"] < 1:
        raise ValueError(f"--d must be a positive integer, got {s['d']}.")
    for key in ("psi_p", "psi_n"):
        if not (s[key] > 0 and math.isfinite(s[key])):
            raise ValueError(f"--{key} must be positive, got {s[key]}.")
    for key in ("pfode_samples", "num_ridges", "noise_per_sample"):
        if s[key] < 1:
            raise ValueError(f"--{key} must be a positive integer, got {s[key]}.")
    if s["mc_samples"] < 0:
        raise ValueError(f"--mc_samples must be non-negative, got {s['mc_samples']}.")
    if not (s["t"] > 0 and math.isfinite(s["t"])):
        raise ValueError(f"--t must be positive, got {s['t']}.")
    if not (0 < s["h"] < s["t"]):
        raise ValueError(f"--h must lie in (0, t) so that the Euler step stays at positive time, got {s['h']}.")
    if not 0 < s["epsilon"] < 1:
        raise ValueError(f"--epsilon must lie in (0, 1), got {s['epsilon']}.")
    if s["threshold"] is not None and not s["threshold"] > 0:
        raise ValueError(f"--threshold must be positive, got {s['threshold']}.")
    s["sweep_psi_n"] = _parse_list("sweep_psi_n", s["sweep_psi_n"])
    s["sweep_psi_p"] = _parse_list("sweep_psi_p", s["sweep_psi_p"])
    for psi_p in [s["psi_p"], *s["sweep_psi_p"]]:
        for psi_n in [s["psi_n"], *s["sweep_psi_n"]]:
            _sizes(s["d"], psi_p, psi_n)  # raises on sizes below 1
    return s


def _sizes(d: int, psi_p: float, psi_n: float) -> tuple[int, int]:
    p, n = int(round(psi_p * d)), int(round(psi_n * d))
    if p < 2 or n < 1:
        raise ValueError(f"ψ_p = {psi_p}, ψ_n = {psi_n} with d = {d} give p = {p}, n = {n}; need p ≥ 2 and n ≥ 1.")
    return p, n


def _prepare_output_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output_dir {path!r} exists and is not a folder.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"--output_dir {path!r} is not empty; pass --overwrite to write into it anyway.")
    os.makedirs(path, exist_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------------------------


def _ridge_grid(eigenvalues: np.ndarray, num: int) -> np.ndarray:
    """λ = 0 plus a log grid from 1e-3·λ_min(U) to λ_max(U) (the scale of U, not an absolute number)."""
    lo, hi = max(eigenvalues.min(), 1e-300) * 1e-3, eigenvalues.max()
    return np.concatenate([[0.0], np.geomspace(lo, hi, num)])


def _response_stats(resp: rfnn.ModeResponses) -> dict:
    r, mem = resp.response, resp.mem
    gen = ~mem
    tol = 1e-9 * max(np.abs(r).max(), 1e-300)  # modes in ker G have r_k = 0 up to round-off
    return {
        "positive_tolerance": float(tol),
        "ridge": resp.ridge,
        "positive_allocation_gen": rfnn.positive_allocation(r, mem),
        "frac_gen_positive": float(np.mean(r[gen] > tol)) if gen.any() else None,
        "frac_gen_negative": float(np.mean(r[gen] < -tol)) if gen.any() else None,
        "frac_mem_positive": float(np.mean(r[mem] > tol)) if mem.any() else None,
        "frac_mem_zero": float(np.mean(np.abs(r[mem]) <= tol)) if mem.any() else None,
        "max_abs_response_mem": float(np.abs(r[mem]).max()) if mem.any() else None,
        "max_response_gen": float(r[gen].max()) if gen.any() else None,
        "median_visibility_mem": float(np.median(resp.visibility[mem])) if mem.any() else None,
        "median_visibility_gen": float(np.median(resp.visibility[gen])) if gen.any() else None,
    }


def analyze_config(d, psi_p, psi_n, settings, generator, with_curvature=False) -> dict:
    """Gaussian-equivalent U, its Mem/Gen split, leakage vs ridge, λ*, per-mode responses (and optionally M)."""
    p, n = _sizes(d, psi_p, psi_n)
    t, act = settings["t"], settings["activation"]
    consts = rfnn.teacher_constants(t, act)
    F = rfnn.random_features(d, p, generator)
    X = generator.standard_normal((n, d))
    U, V = rfnn.teacher_gram_ge(F, X, t, generator, act, consts)
    lam, vec = rfnn.eigh(U)
    threshold = settings["threshold"] or rfnn.auto_threshold(lam, max_generalization=n + d)
    mem = rfnn.spectral_split(lam, threshold)
    out = {
        "d": d,
        "p": p,
        "n": n,
        "psi_p": psi_p,
        "psi_n": psi_n,
        "U_summary": rfnn.two_bulk_summary(lam, threshold),
    }
    arrays = {"U_eigenvalues": lam, "mem": mem}
    if (~mem).any() and mem.any():
        ridges = _ridge_grid(lam, settings["num_ridges"])
        leak = rfnn.leakage(lam, vec, F, mem, ridges)
        med = rfnn.median_leakage(leak)
        lam_star = rfnn.select_ridge(ridges, med, settings["epsilon"])
        i_star = int(np.flatnonzero(ridges == lam_star)[0]) if lam_star is not None else None
        out["leakage"] = {
            "ridges": ridges.tolist(),
            "gen_median": med.tolist(),
            "gen_q25": np.nanquantile(leak, 0.25, axis=0).tolist(),
            "gen_q75": np.nanquantile(leak, 0.75, axis=0).tolist(),
            "epsilon": settings["epsilon"],
            "lambda_star": lam_star,
            "lambda_star_over_threshold": lam_star / threshold if lam_star is not None else None,
            "gen_median_at_0": float(med[0]),
            "gen_median_at_lambda_star": float(med[i_star]) if i_star is not None else None,
            "monotone_nonincreasing": bool(np.all(np.diff(med) <= 1e-12)),
        }
        ridge_resp = lam_star if lam_star is not None else float(ridges[-1])
    else:
        out["leakage"] = None
        ridge_resp = 0.0
    resp = rfnn.mode_responses(lam, vec, F, consts.mu1, threshold, ridge=ridge_resp)
    out["responses"] = _response_stats(resp)
    arrays["responses"] = resp
    if out["leakage"] is not None:
        arrays["leak_median"] = np.asarray(out["leakage"]["gen_median"])
    if with_curvature:
        out["curvature_ridge0"], _ = _curvature_ge(F, X, U, consts, settings, generator, 0.0)
        out["curvature"], arrays["M_eigenvalues"] = _curvature_ge(F, X, U, consts, settings, generator, ridge_resp)
    return {"summary": out, "arrays": arrays, "F": F, "X": X, "U": U, "constants": consts}


def _curvature_ge(F, X, U, consts, settings, generator, ridge):
    """
    M = (h²/p)(ν̄² I + κ̄² K_λ) with κ̄, ν̄² from PF-ODE constants sampled under the ridge-λ teacher
    (000 Theorem 5.3, B.3.2, B.11).
    """
    t, h, act = settings["t"], settings["h"], settings["activation"]
    p, d = F.shape
    V = math.sqrt(consts.delta_t) * consts.mu1 * F / math.sqrt(p)
    A = rfnn.teacher_top_layer(U, V, t, ridge=ridge)
    x = rfnn.sample_ou_marginal(X, t, settings["pfode_samples"], generator)
    pc = rfnn.pfode_constants(x, rfnn.pfode_velocity(x, A, F, act))
    coeffs = rfnn.increment_coefficients(pc.q, pc.r, pc.c, act)
    M = rfnn.cd_curvature_ge(F, coeffs, h, U=U, mu1=consts.mu1, ridge=ridge)
    eig_M = np.linalg.eigvalsh(M)
    atom, predicted = rfnn.curvature_atom(coeffs, h, F)
    s_cf = rfnn.pfode_second_moment(F, U, consts.mu1, ridge=ridge)
    s_cf_eig = np.linalg.eigvalsh(s_cf)
    info = {
        "ridge": float(ridge),
        "pfode": {"q": pc.q, "r": pc.r, "c": pc.c, "kappa": coeffs.kappa, "nu2": coeffs.nu2},
        "atom": atom,
        "atom_multiplicity_predicted": predicted,
        "atom_multiplicity_measured": rfnn.atom_multiplicity(eig_M, atom),
        "num_off_atom": int(p - rfnn.atom_multiplicity(eig_M, atom)),
        "M_min": float(eig_M.min()),
        "M_max": float(eig_M.max()),
        "M_num_below_atom": int(np.sum(eig_M < atom * (1 - 1e-6))),
        "closed_form_second_moment": {
            "rel_diff_to_sampled": float(
                np.linalg.norm(s_cf - pc.second_moment) / np.linalg.norm(pc.second_moment)
            ),
            "min_eigenvalue": float(s_cf_eig.min()),
            "max_eigenvalue": float(s_cf_eig.max()),
            "sampled_min_eigenvalue": float(np.linalg.eigvalsh(pc.second_moment).min()),
        },
    }
    return info, eig_M


def mc_check(d, psi_p, psi_n, settings, generator) -> tuple[dict, dict]:
    """
    A trained teacher (Monte-Carlo U, V from noisy training points) and its Monte-Carlo curvature, beside the
    Gaussian-equivalent curvatures built from the same U: with the sampled E[v vᵀ] (000 Lemma 5.1) and with the
    closed form (000 Theorem 5.3).
    """
    p, n = _sizes(d, psi_p, psi_n)
    t, h, act = settings["t"], settings["h"], settings["activation"]
    F = rfnn.random_features(d, p, generator)
    X = generator.standard_normal((n, d))
    consts = rfnn.teacher_constants(t, act)
    U_mc, V_mc = rfnn.teacher_gram_mc(F, X, t, generator, settings["noise_per_sample"], act)
    U_ge, _ = rfnn.teacher_gram_ge(F, X, t, generator, act, consts)
    A = rfnn.teacher_top_layer(U_mc, V_mc, t)
    x = rfnn.sample_ou_marginal(X, t, settings["mc_samples"], generator)
    v = rfnn.pfode_velocity(x, A, F, act)
    M_mc = rfnn.cd_curvature_mc(x, v, F, h, act)
    pc = rfnn.pfode_constants(x, v)
    coeffs = rfnn.increment_coefficients(pc.q, pc.r, pc.c, act)
    M_lemma = rfnn.cd_curvature_ge(F, coeffs, h, second_moment=pc.second_moment)
    M_thm = rfnn.cd_curvature_ge(F, coeffs, h, U=U_mc, mu1=consts.mu1)
    norm = np.linalg.norm(M_mc)
    Q, _ = np.linalg.qr(F, mode="complete")
    ker = Q[:, d:] if p > d else None
    atom = h**2 * coeffs.nu2 / p
    eig = {
        "U_mc": rfnn.eigh(U_mc)[0],
        "U_ge": rfnn.eigh(U_ge)[0],
        "M_mc": np.linalg.eigvalsh(M_mc),
        "M_lemma": np.linalg.eigvalsh(M_lemma),
    }
    info = {
        "d": d,
        "p": p,
        "n": n,
        "samples": settings["mc_samples"],
        "noise_per_sample": settings["noise_per_sample"],
        "rel_frobenius_lemma_vs_mc": float(np.linalg.norm(M_lemma - M_mc) / norm),
        "rel_frobenius_theorem_vs_mc": float(np.linalg.norm(M_thm - M_mc) / norm),
        "trace_mc": float(np.trace(M_mc)),
        "trace_lemma": float(np.trace(M_lemma)),
        "trace_theorem": float(np.trace(M_thm)),
        "atom_ge": atom,
        "mean_on_ker_G_mc": float(np.trace(ker.T @ M_mc @ ker) / ker.shape[1]) if ker is not None else None,
        "U_quantiles_mc": np.quantile(eig["U_mc"], [0.05, 0.5, 0.95, 1.0]).tolist(),
        "U_quantiles_ge": np.quantile(eig["U_ge"], [0.05, 0.5, 0.95, 1.0]).tolist(),
    }
    return info, eig


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def _log_bins(values: np.ndarray, num: int = 60) -> np.ndarray:
    pos = values[values > 0]
    lo, hi = pos.min(), pos.max()
    if hi <= lo * (1 + 1e-9):
        lo, hi = lo / 1.5, hi * 1.5
    return np.geomspace(lo / 1.05, hi * 1.05, num)


def _figures(out_dir, base, mc, mc_eig, sweeps_n, sweeps_p, settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr, summ = base["arrays"], base["summary"]
    lam, mem = arr["U_eigenvalues"], arr["mem"]
    thr = summ["U_summary"]["threshold"]
    title = f"d={summ['d']}, p={summ['p']}, n={summ['n']}, t={settings['t']}, h={settings['h']}"

    # Fig. 2: spectra of U and M.
    fig, axes = plt.subplots(1, 3 if mc_eig is not None else 2, figsize=(16 if mc_eig is not None else 11, 4))
    bins = _log_bins(lam)
    axes[0].hist(lam[mem], bins=bins, color="tab:gray", label=f"Mem ({mem.sum()})")
    axes[0].hist(lam[~mem], bins=bins, color="tab:blue", label=f"Gen ({(~mem).sum()})")
    if mc_eig is not None:
        axes[0].hist(mc_eig["U_mc"], bins=_log_bins(mc_eig["U_mc"]), histtype="step", color="k", label="Monte Carlo U")
    axes[0].axvline(thr, color="tab:red", ls="--", label="threshold")
    axes[0].set(xscale="log", yscale="log", xlabel="eigenvalue of U", ylabel="count", title="(a) teacher Gram U")
    axes[0].legend(fontsize=8)
    eig_M = arr["M_eigenvalues"]
    atom = summ["curvature"]["atom"]
    off = np.abs(eig_M - atom) > 1e-6 * abs(atom)
    span = np.abs(eig_M[off] - atom)
    lin = np.linspace(eig_M.min(), eig_M.max(), 80)
    axes[1].hist(eig_M, bins=lin, color="tab:purple", label="Gaussian equivalent M")
    mult = summ["curvature"]["atom_multiplicity_measured"]
    axes[1].axvline(atom, color="tab:red", ls=":", label=f"atom h²ν̄²/p (×{mult})")
    axes[1].set(yscale="log", xlabel="eigenvalue of M", ylabel="count", title="(b) CD curvature M")
    axes[1].legend(fontsize=8)
    if span.size:
        axes[1].text(0.98, 0.6, f"{off.sum()} eigenvalues off the atom", transform=axes[1].transAxes, ha="right")
    if mc_eig is not None:
        both = np.concatenate([mc_eig["M_mc"], mc_eig["M_lemma"]])
        mbins = _log_bins(both)
        axes[2].hist(mc_eig["M_mc"], bins=mbins, color="tab:gray", label="Monte Carlo M")
        axes[2].hist(
            mc_eig["M_lemma"], bins=mbins, histtype="step", color="tab:purple", lw=1.5, label="Lemma 5.1, sampled E[vvᵀ]"
        )
        axes[2].set(xscale="log", yscale="log", xlabel="eigenvalue of M", ylabel="count",
                    title=f"(c) trained teacher, ridge 0 (p={mc['p']}, n={mc['n']})")
        axes[2].legend(fontsize=8)
    fig.suptitle(title + f"; (b) ridge λ = {summ['curvature']['ridge']:.3g}")
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.85, wspace=0.25)
    fig.savefig(os.path.join(out_dir, FIGURES["fig2"]), dpi=110)
    plt.close(fig)

    # Fig. 3: per-mode visibility, subtraction, response.
    resp = arr["responses"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, values, name in zip(
        axes,
        [resp.visibility, resp.coupling * resp.subtraction, resp.response],
        ["(a) visibility a_k", "(b) subtraction (μ₁²/p)·b_k", "(c) signed response r_k"],
    ):
        ax.scatter(lam[mem], values[mem], s=4, c="tab:gray", label="Mem")
        ax.scatter(lam[~mem], values[~mem], s=8, c="tab:blue", label="Gen")
        ax.axvline(thr, color="tab:red", ls="--")
        ax.set(xscale="log", xlabel="eigenvalue λ_k of U", title=name)
        if "response" in name:
            ax.axhline(0, color="k", lw=0.5)
            ax.set_yscale("symlog", linthresh=1e-2)
        else:
            ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}, ridge λ = {resp.ridge:.3g}")
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.85, wspace=0.25)
    fig.savefig(os.path.join(out_dir, FIGURES["fig3"]), dpi=110)
    plt.close(fig)

    # Fig. 6: leakage vs ridge.
    fig, ax = plt.subplots(figsize=(6, 4))
    leak = summ["leakage"]
    if leak is not None:
        ridges = np.asarray(leak["ridges"])
        x = np.where(ridges > 0, ridges, ridges[1] / 10)
        ax.plot(x, leak["gen_median"], "o-", label="GEN median")
        ax.fill_between(x, leak["gen_q25"], leak["gen_q75"], alpha=0.3, label="GEN 25-75%")
        ax.axhline(leak["epsilon"], color="tab:red", ls="--", label=f"ε = {leak['epsilon']}")
        if leak["lambda_star"] is not None:
            ax.axvline(leak["lambda_star"], color="k", ls=":", label=f"λ* = {leak['lambda_star']:.3g}")
        ax.set(xscale="log", xlabel="ridge λ (λ = 0 drawn at the left edge)", ylabel="leakage L_j(λ) (eq. B.15)")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.9)
    fig.savefig(os.path.join(out_dir, FIGURES["fig6"]), dpi=110)
    plt.close(fig)

    # Figs. 9-10: sweeps.
    rows = [("ψ_n", sweeps_n), ("ψ_p", sweeps_p)]
    ncol = max(len(sweeps_n), len(sweeps_p))
    for key, kind in (("fig9", "response"), ("fig10", "spectrum")):
        fig, axes = plt.subplots(2, ncol, figsize=(3.2 * ncol, 6.4), squeeze=False)
        for r, (label, runs) in enumerate(rows):
            for c in range(ncol):
                ax = axes[r][c]
                if c >= len(runs):
                    ax.axis("off")
                    continue
                a, s = runs[c]["arrays"], runs[c]["summary"]
                lam_c, mem_c = a["U_eigenvalues"], a["mem"]
                th_c = s["U_summary"]["threshold"]
                if kind == "response":
                    rr = a["responses"].response
                    ax.scatter(lam_c[mem_c], rr[mem_c], s=3, c="tab:gray")
                    ax.scatter(lam_c[~mem_c], rr[~mem_c], s=6, c=np.where(rr[~mem_c] > 0, "tab:blue", "tab:orange"))
                    ax.axhline(0, color="k", lw=0.5)
                    ax.set_yscale("symlog", linthresh=1e-2)
                    frac = s["responses"]["frac_gen_positive"]
                    extra = f"\nGen r>0: {frac:.2f}" if frac is not None else ""
                else:
                    bins = _log_bins(lam_c)
                    ax.hist(lam_c[mem_c], bins=bins, color="tab:gray")
                    ax.hist(lam_c[~mem_c], bins=bins, color="tab:blue")
                    ax.set_yscale("log")
                    gap = s["U_summary"]["gap_ratio"]
                    extra = f"\ngap {gap:.3g}" if gap is not None else ""
                ax.axvline(th_c, color="tab:red", ls="--", lw=0.8)
                ax.set_xscale("log")
                ax.set_title(f"ψ_p={s['psi_p']:g}, ψ_n={s['psi_n']:g}{extra}", fontsize=8)
                ax.tick_params(labelsize=7)
        fig.suptitle(
            ("Signed response r_k vs λ_k (Gen: blue r>0, orange r<0; Mem: gray)" if kind == "response" else
             "Spectrum of U (Mem gray, Gen blue)") + f"; top: ψ_n sweep, bottom: ψ_p sweep; d={settings['d']}",
            fontsize=9,
        )
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.86, wspace=0.3, hspace=0.45)
        fig.savefig(os.path.join(out_dir, FIGURES[key]), dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def run(settings: dict, out_dir: str) -> dict:
    """Runs the whole analysis, writes the figures and results.json, and returns the results dictionary."""
    from tqdm.auto import tqdm

    start = time.time()
    rng = np.random.default_rng(settings["seed"])
    d = settings["d"]
    seeds = rng.integers(0, 2**63 - 1, size=3)
    configs = [("psi_n", settings["psi_p"], psi_n) for psi_n in settings["sweep_psi_n"]]
    configs += [("psi_p", psi_p, settings["psi_n"]) for psi_p in settings["sweep_psi_p"]]
    progress = tqdm(total=len(configs) + 1 + (settings["mc_samples"] > 0), desc="theory", unit="step")
    base = analyze_config(
        d, settings["psi_p"], settings["psi_n"], settings, np.random.default_rng(seeds[0]), with_curvature=True
    )
    progress.update(1)
    mc, mc_eig = None, None
    if settings["mc_samples"] > 0:
        mc, mc_eig = mc_check(d, settings["psi_p"], settings["psi_n"], settings, np.random.default_rng(seeds[1]))
        progress.update(1)
    sweep_rng = np.random.default_rng(seeds[2])
    sweeps_n, sweeps_p = [], []
    for kind, psi_p, psi_n in configs:
        res = analyze_config(d, psi_p, psi_n, settings, sweep_rng)
        (sweeps_n if kind == "psi_n" else sweeps_p).append(res)
        progress.update(1)
    progress.close()
    consts = base["constants"]
    results = {
        "settings": {k: v for k, v in settings.items()},
        "teacher_constants": {
            "t": consts.t,
            "delta_t": consts.delta_t,
            "mu1": consts.mu1,
            "c1": consts.c1,
            "s2": consts.s2,
            "v2": consts.v2,
            "mu_star2": consts.mu_star2,
        },
        "base": base["summary"],
        "mc_check": mc,
        "sweep_psi_n": [r["summary"] for r in sweeps_n],
        "sweep_psi_p": [r["summary"] for r in sweeps_p],
        "figures": dict(FIGURES) if settings["figures"] else {},
        "environment": {"numpy": np.__version__, "python": platform.python_version()},
    }
    if settings["figures"]:
        _figures(out_dir, base, mc, mc_eig, sweeps_n, sweeps_p, settings)
    results["elapsed_seconds"] = time.time() - start
    with open(os.path.join(out_dir, RESULTS_NAME), "w") as f:
        json.dump(results, f, indent=2)
    return results


def main(args) -> int:
    try:
        settings = resolve_settings(args)
        _prepare_output_dir(args.output_dir, args.overwrite)
    except (ValueError, FileExistsError) as err:
        print(f"memdistill theory: error: {err}")
        return 2
    results = run(settings, args.output_dir)
    base = results["base"]
    leak = base["leakage"] or {}
    curv = base["curvature"]
    print(
        f"U: {base['U_summary']['num_gen']} Gen / {base['U_summary']['num_mem']} Mem modes "
        f"(gap ratio {base['U_summary']['gap_ratio']}); M atom {curv['atom']:.4g} "
        f"x{curv['atom_multiplicity_measured']} (predicted x{curv['atom_multiplicity_predicted']}); "
        f"lambda* = {leak.get('lambda_star')}; GEN median leakage {leak.get('gen_median_at_0')} -> "
        f"{leak.get('gen_median_at_lambda_star')}; positive allocation to Gen "
        f"{base['responses']['positive_allocation_gen']:.4f}."
    )
    print(
        f"Wrote {RESULTS_NAME} and {len(results['figures'])} figures to {args.output_dir} "
        f"in {results['elapsed_seconds']:.1f} s."
    )
    return 0

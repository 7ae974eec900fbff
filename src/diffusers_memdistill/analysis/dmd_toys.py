"""``memdistill dmd-toys``: the low-dimensional copying study of 003 (§3.3, Figs. 2, 3 and 7).

For each toy distribution in the first two coordinates of R^4 (a 4x4 chessboard, two moons, a ring of 32 Gaussians),
it trains an MLP teacher (5 hidden layers of 384 units, 32-d Fourier time embedding; 003 App. D) with the EDM loss,
distils a one-step DMD student from it (generator and fake denoiser initialised from the teacher, 5 fake updates per
generator update; `losses.dmd`), and measures the pairing inefficiency ΔE of the student against the teacher's
8-step Heun map Φ_8 on N = 1000 shared noises (003 Def. 3.1; `metrics.pairing_inefficiency`). It writes 003's
figures (noise / Φ_8 / Φ_1 / G coloured by the noise, the 100x100 distance heatmap with the OT assignment, the PCA
triplets) and ``results.json`` to ``--output_dir``.

The networks are plain ``torch.nn`` MLPs behind the package's [`~models.denoiser.EDMDenoiser`] preconditioning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..losses.dmd import DMDLoss, teacher_ode_pairs
from ..losses.edm import EDMLoss
from ..metrics.pairing import pairing_inefficiency
from ..models.denoiser import EDMDenoiser
from ..training.dmd import check_update_ratio, is_generator_update

DATASETS = ("chessboard", "moons", "ring")
RESULTS_NAME = "results.json"
AMBIENT_DIM = 4

# The full run and --quick. 003 distils for 50k iterations at lr 2e-6 on a GPU; on CPU the run is shortened and the
# learning rates raised (see docs/results.md for the effect on ΔE).
FULL = dict(
    hidden=384,
    layers=5,
    teacher_steps=1500,
    teacher_lr=1e-3,
    distill_steps=1500,
    generator_lr=2e-5,
    fake_lr=1e-4,
    batch_size=256,
    num_samples=1000,
    warmup_steps=100,
)
QUICK = dict(
    hidden=32,
    layers=3,
    teacher_steps=100,
    teacher_lr=3e-3,
    distill_steps=40,
    generator_lr=1e-4,
    fake_lr=1e-3,
    batch_size=64,
    num_samples=100,
    warmup_steps=10,
)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def sample_toy(name: str, num: int, generator: torch.Generator | None = None, dim: int = AMBIENT_DIM) -> torch.Tensor:
    """``num`` draws of a toy distribution of 003 in R^dim, shape ``(num, dim)``, float32.

    - ``chessboard``: uniform on the 8 dark squares of a 4x4 board over [-2, 2]^2 (first two coordinates);
    - ``moons``: two interleaved half circles (radius 1, Gaussian jitter 0.05), centred and scaled by 1.5;
    - ``ring``: 32 isotropic Gaussians in R^dim with std 0.2, means on a circle of radius 2 in the first two
      coordinates (003 Fig. 7).
    """
    if dim < 2:
        raise ValueError(f"The toys live in the first two coordinates of R^dim; need dim >= 2, got {dim}.")
    out = torch.zeros(num, dim)
    if name == "chessboard":
        # Cell (i, j) of the 4x4 board is dark when i + j is even.
        cells = torch.randint(0, 8, (num,), generator=generator)
        row = cells // 2
        col = 2 * (cells % 2) + (row % 2)
        u = torch.rand(num, 2, generator=generator)
        out[:, 0] = -2 + col + u[:, 0]
        out[:, 1] = -2 + row + u[:, 1]
    elif name == "moons":
        upper = torch.rand(num, generator=generator) < 0.5
        angle = math.pi * torch.rand(num, generator=generator)
        x = torch.where(upper, angle.cos(), 1 - angle.cos())
        y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
        xy = torch.stack([x - 0.5, y - 0.25], 1) + 0.05 * torch.randn(num, 2, generator=generator)
        out[:, :2] = 1.5 * xy
    elif name == "ring":
        k = torch.randint(0, 32, (num,), generator=generator)
        angle = 2 * math.pi * k.float() / 32
        out = 0.2 * torch.randn(num, dim, generator=generator)
        out[:, 0] += 2 * angle.cos()
        out[:, 1] += 2 * angle.sin()
    else:
        raise ValueError(f"Unknown toy dataset {name!r}; choose from {DATASETS}.")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------------------


class ToyMLP(torch.nn.Module):
    r"""The MLP F of the toy denoisers (003 App. D): ``layers`` hidden layers of ``hidden`` SiLU units on the input
    concatenated with a ``time_dim``-d Fourier embedding of the timestep c_noise.

    ``forward(sample, timestep, class_labels=None)`` returns a one-element tuple, diffusers' ``return_dict=False``
    convention, so that [`EDMDenoiser`] wraps it like a UNet.
    """

    def __init__(self, dim: int = AMBIENT_DIM, hidden: int = 384, layers: int = 5, time_dim: int = 32,
                 fourier_scale: float = 4.0):
        super().__init__()
        if time_dim % 2:
            raise ValueError(f"time_dim must be even (sine and cosine pairs), got {time_dim}.")
        self.config = dict(dim=dim, hidden=hidden, layers=layers, time_dim=time_dim, fourier_scale=fourier_scale)
        # Fixed random frequencies (Gaussian Fourier features, Tancik et al. 2020).
        self.register_buffer("frequencies", torch.randn(time_dim // 2) * fourier_scale)
        widths = [dim + time_dim] + [hidden] * layers
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [torch.nn.Linear(a, b), torch.nn.SiLU()]
        blocks.append(torch.nn.Linear(widths[-1], dim))
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels=None):
        timestep = torch.as_tensor(timestep, device=sample.device, dtype=sample.dtype).reshape(-1)
        timestep = timestep.expand(sample.shape[0])
        phase = 2 * math.pi * timestep[:, None] * self.frequencies[None]
        embedding = torch.cat([phase.sin(), phase.cos()], 1)  # (B, time_dim)
        return (self.net(torch.cat([sample, embedding], 1)),)


def copy_network(net: ToyMLP) -> ToyMLP:
    clone = ToyMLP(**net.config)
    clone.load_state_dict(net.state_dict())
    return clone


# ---------------------------------------------------------------------------------------------------------------
# Teacher, student, study
# ---------------------------------------------------------------------------------------------------------------


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(1, warmup))


def train_teacher(name: str, settings: dict, sigma_data: float, generator: torch.Generator) -> ToyMLP:
    """An EDM teacher on fresh draws of the toy (EDM loss, Adam, cosine-decayed learning rate)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    net = ToyMLP(hidden=settings["hidden"], layers=settings["layers"])
    denoiser = EDMDenoiser(net, sigma_data)
    loss_fn = EDMLoss(sigma_data=sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=settings["teacher_lr"])
    steps = settings["teacher_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for _ in tqdm(range(steps), desc=f"teacher ({name})", leave=False, disable=None):
        batch = sample_toy(name, settings["batch_size"], generator)
        loss, _ = loss_fn(denoiser, batch, generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def distill_student(teacher: ToyMLP, settings: dict, sigma_data: float, generator: torch.Generator,
                    fake_updates_per_generator_update: int = 5) -> tuple[ToyMLP, dict]:
    """A one-step DMD student of ``teacher`` (003 §2.2): generator and fake denoiser initialised from the teacher;
    the fake denoiser is updated every iteration, the generator every ``fake_updates_per_generator_update``-th.

    Returns the generator network and a history of the mean losses.
    """
    check_update_ratio(fake_updates_per_generator_update)
    gen_net, fake_net = copy_network(teacher).train(), copy_network(teacher).train()
    gen_net.requires_grad_(True)
    fake_net.requires_grad_(True)
    real, fake, gen = (EDMDenoiser(n, sigma_data) for n in (teacher, fake_net, gen_net))
    loss_fn = DMDLoss(sigma_data=sigma_data)
    warm = settings["warmup_steps"]
    opt_g = torch.optim.AdamW(gen_net.parameters(), lr=settings["generator_lr"], weight_decay=0.01)
    opt_f = torch.optim.AdamW(fake_net.parameters(), lr=settings["fake_lr"], weight_decay=0.01)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: _warmup(s, warm // fake_updates_per_generator_update))
    sched_f = torch.optim.lr_scheduler.LambdaLR(opt_f, lambda s: _warmup(s, warm))
    history = {"generator_loss": [], "fake_loss": []}
    batch = settings["batch_size"]
    for step in tqdm(range(settings["distill_steps"]), desc="DMD student", leave=False, disable=None):
        # Fake denoiser update on detached generator samples, every iteration.
        z = torch.randn(batch, AMBIENT_DIM, generator=generator)
        with torch.no_grad():
            x0 = loss_fn.generate(gen, z, train=False)
        loss, _ = loss_fn.fake_loss(fake, x0, generator=generator)
        opt_f.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt_f.step()
        sched_f.step()
        history["fake_loss"].append(float(loss.detach().mean()))
        # Generator update after every ratio-th fake update (two time-scale rule, 003 App. D; the same rule as the
        # phases of training_scripts/distill_dmd.py).
        if is_generator_update(step, fake_updates_per_generator_update):
            z = torch.randn(batch, AMBIENT_DIM, generator=generator)
            loss, _ = loss_fn.generator_loss(gen, real, fake, z, generator=generator)  # D_fake runs without grad
            opt_g.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt_g.step()
            sched_g.step()
            history["generator_loss"].append(float(loss.detach().mean()))
    return gen_net.eval().requires_grad_(False), history


@torch.no_grad()
def pairing_study(teacher_denoiser, student, noise: torch.Tensor, sigma_max: float = 80.0) -> dict:
    """Φ_8, Φ_1 and the student on the same noises, and ΔE of the student against Φ_8 (003 Def. 3.1).

    Args:
        teacher_denoiser (`Callable`): the teacher D(x, sigma).
        student (`Callable`): z -> G(z) for z ~ N(0, I) (the generator's input is sigma_max z).
        noise (`torch.Tensor` of shape `(N, d)`): the shared noises.

    Returns:
        dict with ``phi_8``, ``phi_1``, ``student`` (tensors) and ``pairing`` (a `PairingResult`).
    """
    phi_8 = teacher_ode_pairs(teacher_denoiser, noise, num_steps=8, sigma_max=sigma_max)
    phi_1 = teacher_ode_pairs(teacher_denoiser, noise, num_steps=1, sigma_max=sigma_max)
    g = student(noise)
    return {"phi_8": phi_8, "phi_1": phi_1, "student": g, "pairing": pairing_inefficiency(phi_8, g)}


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds (a distribution-quality check)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ directions).sort(0).values, (b.double() @ directions).sort(0).values
    return float((pa - pb).square().mean().sqrt())


def plot_noise_and_maps(noise, phi_8, phi_1, student, *, title: str = "", path=None):
    """003 Figs. 2 and 7: noise z, Φ_8(z), Φ_1(z), G(z) in the first two coordinates, one colour per noise (its
    angle in the first two coordinates, so that a remapping shows as mixed colours)."""
    from ..metrics.figures import _finish, _new_figure

    colours = torch.atan2(noise[:, 1], noise[:, 0]).numpy()
    fig = _new_figure(16.0, 4.2)
    panels = [(noise, "noise z"), (phi_8, "teacher Φ_8(z)"), (phi_1, "teacher Φ_1(z)"), (student, "student G(z)")]
    for p, (x, label) in enumerate(panels):
        ax = fig.add_subplot(1, 4, p + 1)
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), c=colours, cmap="hsv", s=3)
        ax.set_title(label)
        ax.set_aspect("equal", adjustable="datalim")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def run_one(name: str, settings: dict, out_dir: str | None, seed: int) -> dict:
    """Teacher, student and pairing study on one toy; figures go to ``out_dir`` (none when `None`)."""
    start = time.time()
    generator = torch.Generator().manual_seed(seed)
    sigma_data = float(sample_toy(name, 100000, torch.Generator().manual_seed(seed + 1)).std())
    teacher = train_teacher(name, settings, sigma_data, generator)
    teacher_time = time.time() - start
    student, history = distill_student(teacher, settings, sigma_data, generator,
                                       settings.get("fake_updates_per_generator_update", 5))
    teacher_d, student_d = EDMDenoiser(teacher, sigma_data), EDMDenoiser(student, sigma_data)
    noise = torch.randn(settings["num_samples"], AMBIENT_DIM, generator=torch.Generator().manual_seed(seed + 2))
    study = pairing_study(teacher_d, lambda z: student_d(80.0 * z, 80.0), noise)
    data = sample_toy(name, settings["num_samples"], torch.Generator().manual_seed(seed + 3))
    result = {
        "dataset": name,
        "sigma_data": sigma_data,
        "pairing": study["pairing"].to_dict(),
        "teacher_1step_delta_e": pairing_inefficiency(study["phi_8"], study["phi_1"]).delta_e,
        "sliced_w2_to_data": {
            "teacher_phi_8": sliced_wasserstein(study["phi_8"], data),
            "teacher_phi_1": sliced_wasserstein(study["phi_1"], data),
            "student": sliced_wasserstein(study["student"], data),
        },
        "final_losses": {k: float(np.mean(v[-50:])) if v else None for k, v in history.items()},
        "seconds": {"teacher": teacher_time, "total": time.time() - start},
    }
    if out_dir is not None:
        from ..metrics.figures import plot_distance_heatmap, plot_pairing_pca

        files = {
            "maps": f"{name}_noise_phi8_phi1_student.png",
            "heatmap": f"{name}_distance_heatmap.png",
            "pca": f"{name}_pairing_pca.png",
        }
        plot_noise_and_maps(noise, study["phi_8"], study["phi_1"], study["student"],
                            title=f"{name}: ΔE = {study['pairing'].delta_e:.3g}",
                            path=os.path.join(out_dir, files["maps"]))
        plot_distance_heatmap(study["phi_8"], study["student"], num=min(100, noise.shape[0]),
                              path=os.path.join(out_dir, files["heatmap"]))
        plot_pairing_pca(study["phi_8"], study["phi_1"], study["student"], path=os.path.join(out_dir, files["pca"]))
        result["figures"] = files
    return result


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="Folder for the figures and results.json.")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty --output_dir.")
    parser.add_argument("--quick", action="store_true", help="Small networks and short runs (seconds), for tests.")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"Comma-separated subset of {DATASETS}.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every random draw.")
    parser.add_argument("--fake_updates_per_generator_update", type=int, default=5,
                        help="Two time-scale ratio: fake denoiser updates per generator update (003 uses 5).")
    for key, value in FULL.items():
        parser.add_argument(f"--{key}", type=type(value), default=None, help=f"Default {value} ({QUICK[key]} with --quick).")


def resolve_settings(args) -> dict:
    base = QUICK if args.quick else FULL
    s = {key: (getattr(args, key) if getattr(args, key) is not None else value) for key, value in base.items()}
    s["fake_updates_per_generator_update"] = args.fake_updates_per_generator_update
    s["datasets"] = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in s["datasets"] if d not in DATASETS]
    if unknown or not s["datasets"]:
        raise ValueError(f"--datasets must list some of {DATASETS}, got {args.datasets!r}.")
    if s["fake_updates_per_generator_update"] < 1:
        raise ValueError(f"--fake_updates_per_generator_update must be >= 1, got {s['fake_updates_per_generator_update']}.")
    for key in ("hidden", "layers", "teacher_steps", "batch_size"):
        if s[key] < 1:
            raise ValueError(f"--{key} must be a positive integer, got {s[key]}.")
    if s["distill_steps"] < s["fake_updates_per_generator_update"]:
        raise ValueError("--distill_steps must allow at least one generator update.")
    if s["num_samples"] < 2:
        raise ValueError(f"--num_samples must be at least 2, got {s['num_samples']}.")
    for key in ("teacher_lr", "generator_lr", "fake_lr"):
        if not (s[key] > 0 and math.isfinite(s[key])):
            raise ValueError(f"--{key} must be positive, got {s[key]}.")
    s["seed"] = args.seed
    return s


def run(settings: dict, out_dir: str) -> dict:
    start = time.time()
    results = {"settings": {k: v for k, v in settings.items()}, "paper_delta_e": {"chessboard": 8.55}, "datasets": {}}
    results["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads()}
    for i, name in enumerate(settings["datasets"]):
        results["datasets"][name] = run_one(name, settings, out_dir, settings["seed"] + 100 * i)
        results["elapsed_seconds"] = time.time() - start
        # Written after every toy, so that an interrupted run keeps the finished ones.
        with open(os.path.join(out_dir, RESULTS_NAME), "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(args) -> int:
    from .theory_cli import _prepare_output_dir

    try:
        settings = resolve_settings(args)
        _prepare_output_dir(args.output_dir, args.overwrite)
    except (ValueError, FileExistsError) as err:
        print(f"memdistill dmd-toys: error: {err}")
        return 2
    results = run(settings, args.output_dir)
    for name, r in results["datasets"].items():
        print(f"{name}: ΔE(student vs Φ_8) = {r['pairing']['delta_e']:.4g} (Φ_1 vs Φ_8: {r['teacher_1step_delta_e']:.4g}); "
              f"sliced W2 to data: teacher {r['sliced_w2_to_data']['teacher_phi_8']:.3f}, "
              f"student {r['sliced_w2_to_data']['student']:.3f}")
    print(f"Wrote {RESULTS_NAME} and figures to {args.output_dir} in {results['elapsed_seconds']:.1f} s.")
    return 0

"""Consistency distillation of EDM teachers (Song et al. 2023, "Consistency models"; 000 §3.2 and App. B.1).

The discrete CD objective on the Karras grid t_1 = eps < ... < t_N = sigma_max (CM eq. 7; SPEC §2):

    n ~ U{1, ..., N - 1},  x_{n+1} = x + t_{n+1} z,  x_hat_n = Phi(x_{n+1}, t_{n+1} -> t_n; teacher),
    loss = lambda(t_n) * d(f_theta(x_{n+1}, t_{n+1}), stopgrad f_theta-(x_hat_n, t_n)),

with Phi one teacher ODE step from `diffusers_memdistill.solvers` (Heun by default), f_theta the student, f_theta- the
target network (the mu-EMA of the student, kept by the training loop) and d one of the distances below. The
consistency-training schedules N(k), mu(k) of 000 eq. B.3-B.4 are given as pure functions.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..scalings import append_dims, edm_loss_weight, karras_sigmas
from ..solvers import heun_step
from ..utils.hashing import file_sha256

DISTANCES = ("l2", "pseudo_huber", "lpips")
WEIGHTINGS = ("uniform", "snr", "snr+1", "karras", "truncated-snr", "ict")
LPIPS_NETS = ("vgg", "alex")
LPIPS_RESOLUTION = 224
# torchvision file names of the LPIPS backbones (what `torch.hub` caches under <hub dir>/checkpoints).
_LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


class LPIPSUnavailableError(RuntimeError):
    """The LPIPS distance cannot be built (no `lpips` package, or its backbone weights cannot be loaded)."""


# ---------------------------------------------------------------- distances


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all pixels (CM's "l2" metric)."""
    return (a.float() - b.float()).square().flatten(1).mean(1)


def default_huber_c(sample_shape) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 * sqrt(d), d the number of values per sample (Song & Dhariwal 2023)."""
    return 0.00054 * math.sqrt(math.prod(sample_shape))


def pseudo_huber_distance(a: torch.Tensor, b: torch.Tensor, c: Optional[float] = None) -> torch.Tensor:
    """Per-sample pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c (iCT eq. 11); ``c=None`` uses `default_huber_c`.

    Computed as ||a - b||^2 / (sqrt(||a - b||^2 + c^2) + c), the same value without cancellation when ||a - b|| << c.
    """
    c = default_huber_c(a.shape[1:]) if c is None else c
    squared = (a.float() - b.float()).square().flatten(1).sum(1)
    return squared / ((squared + c**2).sqrt() + c)


class LPIPSDistance(torch.nn.Module):
    r"""LPIPS distance for images in [-1, 1] (Zhang et al. 2018), as used by CD (CM Sec. 6).

    Inputs smaller than 224 pixels are upsampled bilinearly to 224 x 224 (CM App. C); grayscale inputs are repeated
    to three channels. The network is frozen and kept in eval mode.

    Args:
        network (`torch.nn.Module`): a callable ``network(a, b) -> distances`` of shape (B, 1, 1, 1) or (B,) taking
            3-channel images in [-1, 1], e.g. `lpips.LPIPS`. Build the real one with [`build_lpips_distance`].
    """

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network.eval()
        self.network.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.network.eval()  # a metric network never leaves eval mode
        return self

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 3, H', W') with H', W' >= 224 (bilinear upsampling when smaller)."""
        x = x.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"LPIPS takes 1- or 3-channel images, got {x.shape[1]} channels.")
        if min(x.shape[-2:]) < LPIPS_RESOLUTION:
            x = F.interpolate(x, size=(LPIPS_RESOLUTION, LPIPS_RESOLUTION), mode="bilinear", align_corners=False)
        return x

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(a), self.preprocess(b)).reshape(a.shape[0])


def _default_lpips_factory(net: str) -> torch.nn.Module:
    import lpips  # imported here: the package is optional for the other distances

    return lpips.LPIPS(net=net, verbose=False)


def _lpips_weight_files(net: str) -> dict[str, str]:
    """The files `lpips.LPIPS(net=net)` reads: torchvision's ImageNet backbone (torch hub cache) and the lpips
    package's linear heads (``lpips/weights/v0.1/<net>.pth``)."""
    import lpips

    head = os.path.join(os.path.dirname(os.path.abspath(lpips.__file__)), "weights", "v0.1", f"{net}.pth")
    return {"backbone": os.path.join(torch.hub.get_dir(), "checkpoints", _LPIPS_BACKBONE_FILES[net]), "head": head}


def build_lpips_distance(net: str = "vgg", factory: Optional[Callable[[str], torch.nn.Module]] = None) -> LPIPSDistance:
    """Build the LPIPS distance, or raise [`LPIPSUnavailableError`] saying how to get its weights.

    `lpips.LPIPS` ships its linear heads but loads the ImageNet backbone (VGG-16 as in the CM code, or AlexNet)
    through torchvision, which downloads it on first use into the torch hub cache.

    The returned module records what it loaded: ``weights_paths`` and ``weights_sha256``, dicts with the keys
    ``"backbone"`` and ``"head"`` (empty when `factory` is given: the caller's network has no files of ours).

    Args:
        net (`str`, defaults to `"vgg"`): the backbone, `"vgg"` or `"alex"`.
        factory (`Callable[[str], torch.nn.Module]`, *optional*): builds the network from ``net``; defaults to
            ``lpips.LPIPS(net=net)``. Tests inject a small network here.

    Raises:
        [`LPIPSUnavailableError`]: the `lpips` package is missing or the backbone weights cannot be loaded.
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"Unknown LPIPS backbone {net!r}; choose one of {LPIPS_NETS}.")
    try:
        network = (factory or _default_lpips_factory)(net)
        files = _lpips_weight_files(net) if factory is None else {}
        hashes = {role: file_sha256(path) for role, path in files.items()}
    except Exception as exc:  # ImportError, URLError/OSError (no network), RuntimeError (corrupt file), ...
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", _LPIPS_BACKBONE_FILES[net])
        raise LPIPSUnavailableError(
            f"The LPIPS distance (backbone {net!r}) could not be built: {type(exc).__name__}: {exc}. "
            f"LPIPS needs the `lpips` package (pip install lpips) and torchvision's pretrained {net} weights, "
            f"which are downloaded on first use. Either run once with network access, or place the file "
            f"{_LPIPS_BACKBONE_FILES[net]} at {cache} (the torch hub cache; set TORCH_HOME to move it). "
            "Otherwise choose another distance: --loss l2 or --loss pseudo_huber."
        ) from exc
    distance = LPIPSDistance(network)
    distance.weights_paths, distance.weights_sha256 = files, hashes
    return distance


def resolve_distance(distance, huber_c: Optional[float] = None, lpips: Optional[torch.nn.Module] = None) -> Callable:
    """The per-sample distance ``d(a, b) -> (B,)`` named by ``distance``: `"l2"`, `"pseudo_huber"` (with ``huber_c``),
    `"lpips"` (the network ``lpips``, from [`build_lpips_distance`]) or a callable, returned as is."""
    if distance == "l2":
        return l2_distance
    if distance == "pseudo_huber":
        return lambda a, b: pseudo_huber_distance(a, b, huber_c)
    if distance == "lpips":
        if lpips is None:
            raise ValueError("distance='lpips' needs the LPIPS network: pass lpips=build_lpips_distance().")
        return lpips
    if callable(distance):
        return distance
    raise ValueError(f"Unknown distance {distance!r}; choose one of {DISTANCES} or pass a callable.")


# ---------------------------------------------------------------- weightings


def consistency_loss_weight(weighting: str, sigma, sigma_next, sigma_data: float = 0.5) -> torch.Tensor:
    """Weight lambda of the CD loss for a step from ``sigma`` = t_{n+1} down to ``sigma_next`` = t_n (float32).

    ``"uniform"`` (CM default): 1. ``"snr"``: 1 / t_n^2. ``"snr+1"``: 1 / t_n^2 + 1. ``"karras"``: EDM's
    lambda(t_n) = 1 / t_n^2 + 1 / sigma_data^2. ``"truncated-snr"``: max(1 / t_n^2, 1). ``"ict"``:
    1 / (t_{n+1} - t_n) (iCT Sec. 3.5).
    """
    sigma = torch.as_tensor(sigma).to(torch.float32)
    sigma_next = torch.as_tensor(sigma_next).to(torch.float32)
    snr = sigma_next**-2
    if weighting == "uniform":
        return torch.ones_like(sigma_next)
    if weighting == "snr":
        return snr
    if weighting == "snr+1":
        return snr + 1
    if weighting == "karras":
        return edm_loss_weight(sigma_next, sigma_data)
    if weighting == "truncated-snr":
        return snr.clamp(min=1.0)
    if weighting == "ict":
        return 1 / (sigma - sigma_next)
    raise ValueError(f"Unknown weighting {weighting!r}; choose one of {WEIGHTINGS}.")


# ---------------------------------------------------------------- the loss


class ConsistencyDistillationLoss:
    r"""Per-sample discrete consistency-distillation loss (CM Alg. 2; 000 eq. 3.7 with a Heun teacher step).

    The loss is returned unreduced, one value per sample: reduction belongs to the training loop. The teacher step
    and the target network run without gradients (the stop-gradient of CM eq. 8). When the student has dropout,
    the target network sees the same random state as the student (as in the CM code), which matters only if the
    caller keeps the target in train mode.

    Args:
        num_scales (`int`, defaults to 18): N, the number of Karras noise levels t_1 = sigma_min < ... < t_N.
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0), rho (`float`, defaults to 7.0):
            the Karras grid, which should be the teacher's.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data (for the ``"karras"`` weighting).
        distance (`str` or `Callable`, defaults to `"l2"`): `"l2"`, `"pseudo_huber"`, `"lpips"` (then pass
            ``lpips``), or a callable ``d(a, b) -> (B,)``.
        huber_c (`float`, *optional*): the pseudo-Huber constant; defaults to 0.00054 * sqrt(d).
        weighting (`str`, defaults to `"uniform"`): see [`consistency_loss_weight`].
        lpips (`torch.nn.Module`, *optional*): the LPIPS distance (from [`build_lpips_distance`]).
        solver (`Callable`, defaults to `solvers.heun_step`): the teacher step ``step(denoiser, x, sigma, sigma_next,
            **cond)``.
    """

    def __init__(
        self,
        num_scales: int = 18,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        distance="l2",
        huber_c: Optional[float] = None,
        weighting: str = "uniform",
        lpips: Optional[torch.nn.Module] = None,
        solver: Callable = heun_step,
    ):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown weighting {weighting!r}; choose one of {WEIGHTINGS}.")
        self.distance = resolve_distance(distance, huber_c, lpips)
        # Decreasing grid: sigmas[i] = t_{N-i}; a step goes from sigmas[i] = t_{n+1} to sigmas[i + 1] = t_n.
        self.sigmas = karras_sigmas(num_scales, sigma_min, sigma_max, rho, append_zero=False).to(torch.float32)
        self.num_scales, self.sigma_data, self.weighting, self.solver = num_scales, sigma_data, weighting, solver

    def __call__(
        self,
        student: Callable,
        target: Callable,
        teacher: Callable,
        images: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ):
        """Args: ``student`` and ``target`` consistency functions f(x, sigma, class_labels) (e.g.
        `ConsistencyDenoiser`), ``teacher`` a denoiser D(x, sigma, class_labels) (e.g. `EDMDenoiser`), ``images``
        clean data x of shape (B, C, H, W), ``class_labels`` passed to all three networks, ``generator`` the source
        of n and z.

        Returns: ``(loss, logs)``: the per-sample loss of shape (B,) and a dict with ``sigma`` = t_{n+1},
        ``sigma_next`` = t_n and the grid ``index`` i = N - n - 1 of t_{n+1}.
        """
        images = images.float()
        device = images.device
        # n ~ U{1..N-1}, as an index into the decreasing grid.
        index = torch.randint(0, self.num_scales - 1, (images.shape[0],), generator=generator, device=device)
        sigmas = self.sigmas.to(device)
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        noise = torch.randn(images.shape, generator=generator, device=device)
        x = images + append_dims(sigma, images.ndim) * noise  # x_{n+1} = x + t_{n+1} z
        with torch.no_grad():
            x_hat = self.solver(teacher, x, sigma, sigma_next, class_labels=class_labels)  # one teacher step to t_n
        # The target sees the student's dropout masks (same RNG state).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            online = student(x, sigma, class_labels=class_labels)
        with torch.no_grad():
            target_output = target(x_hat, sigma_next, class_labels=class_labels)
        weight = consistency_loss_weight(self.weighting, sigma, sigma_next, self.sigma_data)
        loss = weight * self.distance(online, target_output.detach())
        return loss, {"sigma": sigma, "sigma_next": sigma_next, "index": index}


# ---------------------------------------------------------------- consistency-training schedules


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """N(k) = ceil(sqrt(k / K * ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (000 eq. B.3; CM App. C)."""
    return math.ceil(math.sqrt(step / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_ema(step: int, total_steps: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> float:
    """mu(k) = exp(s0 * ln(mu0) / N(k)) (000 eq. B.4; CM App. C)."""
    return math.exp(s0 * math.log(mu0) / ct_num_scales(step, total_steps, s0, s1))

"""Preconditioned denoisers over a plain diffusers UNet; the wrappers hold no weights of their own.

They are shape-agnostic: ``x`` is any `(B, ...)` tensor the UNet takes, pixels or VAE latents with any number of
channels, and conditioning other than class labels (``encoder_hidden_states`` of a `UNet2DConditionModel`, say)
is passed through to the UNet as keyword arguments.
"""

import torch

from ..scalings import append_dims, consistency_scalings, edm_scalings, precondition_output


class EDMDenoiser:
    r"""EDM denoiser D(x; sigma) = c_skip * x + c_out * F(c_in * x; c_noise) around a diffusers UNet (EDM eq. 7).

    The UNet ``F`` is fed ``c_in * x`` and the timestep ``c_noise = ln(sigma) / 4``; class-conditional UNets get
    ``class_labels`` through their class embedding, and any other keyword argument of ``__call__`` reaches the UNet
    unchanged. The network runs in its own dtype; the preconditioning and the returned ``denoised`` are float32.

    Args:
        unet (`UNet2DModel` or `UNet2DConditionModel`): the network F (possibly wrapped by DDP / ``torch.compile``).
        sigma_data (`float`): standard deviation of the data (or of the latents, for latent models).
    """

    def __init__(self, unet, sigma_data: float = 0.5):
        self.unet = unet
        self.sigma_data = sigma_data

    def scalings(self, sigma: torch.Tensor):
        return edm_scalings(sigma, self.sigma_data)

    def network_output(self, x: torch.Tensor, c_in: torch.Tensor, c_noise: torch.Tensor, class_labels=None, **cond):
        """The network's output object for the input c_in * x at c_noise (``.sample`` is F; a network may return
        more, e.g. the discriminator logits of [`~models.fake_score.DMDFakeScore`])."""
        dtype = next(iter(_parameters(self.unet))).dtype
        if class_labels is not None:
            cond["class_labels"] = class_labels
        return self.unet((append_dims(c_in, x.ndim) * x).to(dtype), c_noise, **cond)

    def model_output(self, x: torch.Tensor, c_in: torch.Tensor, c_noise: torch.Tensor, class_labels=None, **cond):
        """The raw network output F(c_in * x; c_noise), float32."""
        out = self.network_output(x, c_in, c_noise, class_labels, **cond)
        return (out.sample if hasattr(out, "sample") else out[0]).float()

    def denoise(self, x: torch.Tensor, sigma, class_labels=None, **cond):
        """``(D(x; sigma), output)``: the denoised tensor and the network's whole output object."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        out = self.network_output(x, c_in, c_noise, class_labels, **cond)
        raw = (out.sample if hasattr(out, "sample") else out[0]).float()
        return precondition_output(x, raw, c_skip, c_out), out

    def __call__(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        """D(x; sigma) for ``x`` of shape `(B, ...)` and a scalar or per-sample `(B,)` ``sigma``."""
        return self.denoise(x, sigma, class_labels, **cond)[0]


class ConsistencyDenoiser(EDMDenoiser):
    r"""Consistency student f(x, sigma) = c_skip * x + c_out * F(c_in * x; c_noise) with the boundary scalings
    of CM App. C (000 eq. B.1-B.2), so that f(x, sigma_min) = x exactly; c_in and c_noise are EDM's, so a student
    initialised from an EDM teacher starts from the teacher's denoiser up to the boundary shift.
    """

    def __init__(self, unet, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(unet, sigma_data)
        self.sigma_min = sigma_min

    def scalings(self, sigma: torch.Tensor):
        _, _, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        c_skip, c_out = consistency_scalings(sigma, self.sigma_data, self.sigma_min)
        return c_skip, c_out, c_in, c_noise


def _parameters(module):
    inner = getattr(module, "module", module)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return inner.parameters()

"""Preconditioned denoisers over a plain diffusers ``UNet2DModel``; the wrappers hold no weights of their own."""

import torch

from ..scalings import append_dims, consistency_scalings, edm_scalings


class EDMDenoiser:
    r"""EDM denoiser D(x; sigma) = c_skip * x + c_out * F(c_in * x; c_noise) around a diffusers UNet (EDM eq. 7).

    The UNet ``F`` is fed ``c_in * x`` and the timestep ``c_noise = ln(sigma) / 4``; class-conditional UNets get
    ``class_labels`` through their class embedding. The network runs in its own dtype; the preconditioning and the
    returned ``denoised`` are float32.

    Args:
        unet (`UNet2DModel`): the network F (possibly wrapped by DDP / ``torch.compile``).
        sigma_data (`float`): standard deviation of the data.
    """

    def __init__(self, unet, sigma_data: float = 0.5):
        self.unet = unet
        self.sigma_data = sigma_data

    def scalings(self, sigma: torch.Tensor):
        return edm_scalings(sigma, self.sigma_data)

    def model_output(self, x: torch.Tensor, c_in: torch.Tensor, c_noise: torch.Tensor, class_labels=None):
        dtype = next(iter(_parameters(self.unet))).dtype
        out = self.unet((append_dims(c_in, x.ndim) * x).to(dtype), c_noise, class_labels=class_labels)
        return (out.sample if hasattr(out, "sample") else out[0]).float()

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        model_output = self.model_output(x, c_in, c_noise, class_labels)
        return append_dims(c_skip, x.ndim) * x.float() + append_dims(c_out, x.ndim) * model_output


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

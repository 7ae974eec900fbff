"""EDM denoising loss (Karras et al. 2022, Sec. 5 and Table 1)."""

import torch

from ..scalings import append_dims, edm_loss_weight


class EDMLoss:
    r"""Per-sample EDM loss lambda(sigma) * ||D(y + sigma n; sigma) - y||^2 with ln sigma ~ N(P_mean, P_std^2).

    The squared error is averaged over pixels (EDM sums; the mean only rescales the learning rate), and the loss is
    returned unreduced, one value per sample: reduction belongs to the training loop.

    Args:
        P_mean (`float`, defaults to -1.2), P_std (`float`, defaults to 1.2): the log-normal noise-level law.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def __call__(self, denoiser, images: torch.Tensor, class_labels=None, generator: torch.Generator = None):
        """Args: ``denoiser`` a callable D(x, sigma, class_labels); ``images`` clean data y of shape (B, C, H, W).

        Returns: ``(loss, logs)``: the per-sample loss of shape (B,) and a dict with the drawn ``sigma``.
        """
        images = images.float()
        batch = images.shape[0]
        ln_sigma = torch.randn(batch, generator=generator, device=images.device) * self.P_std + self.P_mean
        sigma = ln_sigma.exp()
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        denoised = denoiser(images + append_dims(sigma, images.ndim) * noise, sigma, class_labels=class_labels)
        weight = edm_loss_weight(sigma, self.sigma_data)
        loss = weight * (denoised - images).square().flatten(1).mean(1)
        return loss, {"sigma": sigma}

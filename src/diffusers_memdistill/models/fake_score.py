"""The fake score network of DMD2: a copy of the teacher's UNet, optionally with a small discriminator head.

DMD2 (Yin et al. 2024b, §4.3) trains a GAN classifier on the bottleneck features of the fake score network, so the
GAN costs no second network: the head reads the UNet's middle-block output at the same noisy input the fake
denoiser sees. The middle block's output is caught with a forward hook, because diffusers' `UNet2DModel` and
`UNet2DConditionModel` expose no features in their outputs; this keeps the stock UNet (and its saved config) intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class DMDFakeScoreOutput(BaseOutput):
    """Output of [`DMDFakeScore`].

    Args:
        sample (`torch.Tensor`): the UNet's output F(c_in x; c_noise).
        logits (`torch.Tensor` of shape `(B,)`, *optional*): the discriminator's logit per sample ("real" > 0);
            present when the network has a head and ``return_logits=True``.
    """

    sample: torch.Tensor
    logits: Optional[torch.Tensor] = None


class DiscriminatorHead(nn.Module):
    """A small classifier of bottleneck features: SiLU, 3x3 convolution, SiLU, spatial mean, linear -> one logit.

    Resolution-agnostic (the mean pools any feature map), so one head fits 8x8 digits and 64x64 latents alike.
    """

    def __init__(self, channels: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or channels
        self.conv = nn.Conv2d(channels, hidden, kernel_size=3, padding=1)
        self.linear = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.conv(nn.functional.silu(features))
        return self.linear(nn.functional.silu(h).mean(dim=(2, 3))).squeeze(1)


class DMDFakeScore(nn.Module):
    """The fake denoiser's network: a diffusers UNet and, for DMD2's GAN loss, a [`DiscriminatorHead`] on its
    middle-block features.

    It is called like the UNet (``net(sample, timestep, class_labels=..., return_logits=...)``), so the package's
    preconditioned denoisers ([`~models.denoiser.EDMDenoiser`]) wrap it unchanged.

    Args:
        unet (`UNet2DModel` or `UNet2DConditionModel`): the fake score UNet (initialised from the teacher).
        gan_head (`bool`, defaults to `False`): add the discriminator head.
    """

    def __init__(self, unet: nn.Module, gan_head: bool = False):
        super().__init__()
        self.unet = unet
        self.head = None
        if gan_head:
            mid = getattr(unet, "mid_block", None)
            if mid is None:
                raise ValueError(f"{type(unet).__name__} has no mid_block for the GAN head to read.")
            self.head = DiscriminatorHead(unet.config.block_out_channels[-1])
            self._features = None
            mid.register_forward_hook(self._keep_features)

    @property
    def config(self) -> dict:
        """The UNet's config and the head's presence (the training runner's fingerprint of this network)."""
        return {**{k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")},
                "gan_head": self.head is not None}

    def _keep_features(self, module, inputs, output):
        self._features = output[0] if isinstance(output, tuple) else output

    def forward(self, sample, timestep, class_labels=None, return_logits: bool = False, **cond) -> DMDFakeScoreOutput:
        if class_labels is not None:
            cond["class_labels"] = class_labels
        if return_logits and self.head is None:
            raise ValueError("This fake score network has no discriminator head (built with gan_head=False).")
        out = self.unet(sample, timestep, **cond)
        features, self._features = getattr(self, "_features", None), None  # hold no activations between calls
        logits = self.head(features).float() if return_logits else None
        return DMDFakeScoreOutput(sample=out.sample if hasattr(out, "sample") else out[0], logits=logits)

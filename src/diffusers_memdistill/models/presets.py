"""`UNet2DModel` configurations from tiny (CPU tests) to the DDPM++/NCSN++ scale of the papers."""

from diffusers import UNet2DModel

# name -> (block_out_channels, layers_per_block, attention at these block indices, norm groups, dropout)
UNET_PRESETS = {
    # ~0.17M parameters: unit tests.
    "tiny": ((16, 32), 1, (), 8, 0.0),
    # ~1.6M parameters: the digits demo and CPU experiments.
    "small": ((32, 64, 64), 2, (1,), 16, 0.0),
    # ~9M parameters: fast-memorizing CIFAR-10 subsets on one GPU.
    "base": ((64, 128, 128, 128), 2, (1,), 32, 0.0),
    # ~59M parameters: EDM's DDPM++ CIFAR-10 layout (256 channels at 32/16/8, 4 blocks, attention at 16x16).
    "ddpmpp": ((256, 256, 256), 4, (1,), 32, 0.13),
}


def build_unet(
    preset: str, resolution: int, in_channels: int, num_classes: int = 0, dropout: float = None
) -> UNet2DModel:
    """Build a `UNet2DModel` of a preset size for EDM preconditioning (positional embedding of c_noise).

    Raises:
        ValueError: unknown preset, or a resolution the UNet cannot take (it must be divisible by
            2^(number of resolution levels - 1) and at least that).
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"Unknown model preset {preset!r}; choose one of {sorted(UNET_PRESETS)}.")
    channels, layers, attention, groups, preset_dropout = UNET_PRESETS[preset]
    factor = 2 ** (len(channels) - 1)
    if resolution < factor or resolution % factor:
        raise ValueError(
            f"Resolution {resolution} cannot go through the {preset!r} UNet: it downsamples {len(channels) - 1} "
            f"times, so the resolution must be a multiple of {factor}."
        )
    down = tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(len(channels)))
    up = tuple("AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(len(channels))))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=groups,
        dropout=preset_dropout if dropout is None else dropout,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        num_class_embeds=num_classes or None,
        attention_head_dim=64 if channels[0] >= 64 else None,
    )

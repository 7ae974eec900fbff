"""Per-sample random streams of an audit.

Sample i of an audit with seed s draws from three independent random streams, each a CPU ``torch.Generator`` seeded
from ``numpy.random.SeedSequence([s, i, stream])``: stream 0 is the starting noise z_i (shared by every model, so that
pairings and side-by-side grids are meaningful), stream 1 the noise a sampler injects (multistep consistency sampling,
EDM churn), stream 2 the class label. Streams are drawn per sample on the CPU, so a sample depends neither on the batch
size, nor on the device, nor on which process or shard draws it.
"""

from __future__ import annotations

import numpy as np
import torch

# Random streams of sample i: numpy.random.SeedSequence([seed, i, stream]).
STREAM_STARTING_NOISE, STREAM_INJECTED_NOISE, STREAM_CLASS_LABEL = 0, 1, 2
STREAMS = (STREAM_STARTING_NOISE, STREAM_INJECTED_NOISE, STREAM_CLASS_LABEL)
NOISE_STREAMS = {
    str(STREAM_STARTING_NOISE): "starting noise z_i ~ N(0, I), shared by every model",
    str(STREAM_INJECTED_NOISE): "noise injected by the sampler (multistep consistency sampling, EDM churn)",
    str(STREAM_CLASS_LABEL): "class label of class-conditional models, shared by every model",
}
NOISE_SCHEME = (
    "sample i, stream s: torch.Generator() (CPU) seeded with SeedSequence([seed, i, s]).generate_state(1, uint64)[0] "
    ">> 1 (numpy); independent of batch size and device"
)


def check_seed(seed: int) -> int:
    """The seed as an int; a clear error for a negative one."""
    if int(seed) < 0:
        raise ValueError(f"The seed must be a non-negative integer, got {seed}.")
    return int(seed)


def stream_seeds(seed: int, indices, stream: int) -> torch.Tensor:
    r"""
    The seeds of one random stream for the given sample indices, derived with ``numpy.random.SeedSequence``.

    Args:
        seed (`int`): the audit's seed, ≥ 0.
        indices (iterable of `int`): sample indices i.
        stream (`int`): 0 starting noise, 1 injected noise, 2 class label.

    Returns:
        `torch.Tensor` of int64: ``SeedSequence([seed, i, stream]).generate_state(1, uint64)[0] >> 1`` per index (63
        bits, so that the seeds fit a signed int64 file and ``torch.Generator.manual_seed``).
    """
    seed = check_seed(seed)
    values = [
        int(np.random.SeedSequence([seed, int(i), int(stream)]).generate_state(1, np.uint64)[0] >> np.uint64(1))
        for i in indices
    ]
    return torch.tensor(values, dtype=torch.long)


def stream_generators(seed: int, indices, stream: int) -> list:
    """CPU ``torch.Generator`` objects seeded with [`stream_seeds`], one per sample index."""
    return [torch.Generator().manual_seed(int(s)) for s in stream_seeds(seed, indices, stream)]


def shared_noise(num_samples: int, shape: tuple, seed: int, first_index: int = 0) -> torch.Tensor:
    """Unit-variance starting noise of samples ``first_index ...``, each from its own stream-0 generator."""
    generators = stream_generators(seed, range(first_index, first_index + num_samples), STREAM_STARTING_NOISE)
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def shared_labels(num_samples: int, num_classes: int, seed: int, first_index: int = 0) -> torch.Tensor | None:
    """Uniform class labels of samples ``first_index ...``, each from its own stream-2 generator (None if
    unconditional)."""
    if not num_classes:
        return None
    generators = stream_generators(seed, range(first_index, first_index + num_samples), STREAM_CLASS_LABEL)
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in generators])


def noise_description(seed: int) -> dict:
    """How the audit's noise was drawn, for ``metrics.json``."""
    return {"seed": seed, "scheme": NOISE_SCHEME, "streams": dict(NOISE_STREAMS)}


__all__ = ["NOISE_SCHEME", "NOISE_STREAMS", "STREAMS", "STREAM_CLASS_LABEL", "STREAM_INJECTED_NOISE",
           "STREAM_STARTING_NOISE", "check_seed", "noise_description", "shared_labels", "shared_noise",
           "stream_generators", "stream_seeds"]

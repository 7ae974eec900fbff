"""Checkpoint selection at matched quality (000's comparison: memorization of models of equal sample quality).

The rule: among candidate checkpoints with a finite quality score (FID, or pixel FD where FID is unavailable), pick
the one whose score is closest to the target score, |score - target| smallest. Ties (equal distance) go to the
better score (the lower one when lower is better: a checkpoint of better quality tends to memorize more, so the tie
never favours the claim that the student memorizes less), then to the earlier candidate in the given order (the
earlier checkpoint of a run). With a ``tolerance``, a best candidate farther than it is refused rather than reported
as matched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

TIE_TOLERANCE = 1e-9  # relative to max(1, |target|)


@dataclass(frozen=True)
class MatchedCheckpoint:
    """The selected candidate: its ``checkpoint`` (whatever identifies it: a path, a step), its ``score``, its
    ``distance`` |score - target| and its ``index`` in the candidates."""

    checkpoint: object
    score: float
    distance: float
    index: int


def select_matched_checkpoint(
    candidates: Iterable,
    target: float,
    lower_is_better: bool = True,
    tolerance: Optional[float] = None,
) -> MatchedCheckpoint:
    """The candidate whose quality score is closest to ``target`` (see the module docstring for the rule).

    Args:
        candidates (`Iterable[(checkpoint, score)]`): pairs in run order; non-finite scores (a diverged or
            unmeasured checkpoint) are never chosen.
        target (`float`): the quality to match (e.g. the teacher's FID).
        lower_is_better (`bool`, defaults to `True`): the score's direction (FID, FD: lower is better), for ties.
        tolerance (`float`, *optional*): the largest accepted distance.

    Returns:
        [`MatchedCheckpoint`].

    Raises:
        ValueError: no candidate has a finite score, the target is not finite, or the closest candidate lies farther
            than ``tolerance``.
    """
    target = float(target)
    if not math.isfinite(target):
        raise ValueError(f"The target quality must be finite, got {target}.")
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
    finite = []
    for index, (checkpoint, score) in enumerate(candidates):
        score = float(score)
        if math.isfinite(score):
            finite.append((abs(score - target), score if lower_is_better else -score, index, checkpoint, score))
    if not finite:
        raise ValueError("No candidate checkpoint has a finite quality score.")
    # Distances equal up to rounding (|9.9 - 10| vs |10.1 - 10| in binary floating point) count as ties.
    closest = min(c[0] for c in finite)
    ties = [c for c in finite if c[0] <= closest + TIE_TOLERANCE * max(1.0, abs(target))]
    _, _, index, checkpoint, score = min(ties, key=lambda c: c[1:3])
    distance = abs(score - target)
    if tolerance is not None and distance > tolerance:
        raise ValueError(f"No checkpoint matches quality {target:g} within {tolerance:g}: the closest, {checkpoint!r}, "
                         f"scores {score:g}.")
    return MatchedCheckpoint(checkpoint=checkpoint, score=score, distance=distance, index=index)

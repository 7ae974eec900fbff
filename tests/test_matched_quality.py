"""The checkpoint selection rule for matched quality, on fixed tables of candidate scores."""

import math

import pytest

from diffusers_memdistill.analysis.matched_quality import MatchedCheckpoint, select_matched_checkpoint

# A student's checkpoints in run order with their FID; the teacher's FID is the target.
TABLE = [("checkpoint-1000", 48.2), ("checkpoint-2000", 31.7), ("checkpoint-3000", 23.9), ("checkpoint-4000", 21.1),
         ("checkpoint-5000", 22.4), ("checkpoint-6000", float("nan"))]


def test_the_closest_quality_is_selected():
    assert select_matched_checkpoint(TABLE, 22.68) == MatchedCheckpoint("checkpoint-5000", 22.4,
                                                                        pytest.approx(0.28), 4)
    assert select_matched_checkpoint(TABLE, 30.0).checkpoint == "checkpoint-2000"
    assert select_matched_checkpoint(TABLE, 10.0).checkpoint == "checkpoint-4000"  # below every score: the best
    assert select_matched_checkpoint(TABLE, 100.0).checkpoint == "checkpoint-1000"


def test_ties_go_to_the_better_score_then_to_the_earlier_checkpoint():
    # 9.9 and 10.1 are equally far from 10 (their float distances differ in the last bits).
    candidates = [("a", 10.1), ("b", 9.9), ("c", 10.1), ("d", 9.9)]
    assert select_matched_checkpoint(candidates, 10.0).checkpoint == "b"  # lower FID is better
    assert select_matched_checkpoint(candidates, 10.0, lower_is_better=False).checkpoint == "a"
    assert select_matched_checkpoint([("x", 5.0), ("y", 5.0)], 4.0).checkpoint == "x"


def test_tolerance_and_bad_tables():
    assert select_matched_checkpoint(TABLE, 22.68, tolerance=0.5).checkpoint == "checkpoint-5000"
    with pytest.raises(ValueError, match="No checkpoint matches quality 15 within 1: the closest, 'checkpoint-4000'"):
        select_matched_checkpoint(TABLE, 15.0, tolerance=1.0)
    with pytest.raises(ValueError, match="No candidate checkpoint has a finite quality score"):
        select_matched_checkpoint([("a", math.nan), ("b", math.inf)], 1.0)
    with pytest.raises(ValueError, match="target quality must be finite"):
        select_matched_checkpoint(TABLE, math.nan)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        select_matched_checkpoint(TABLE, 1.0, tolerance=-1.0)

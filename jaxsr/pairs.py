"""Preference-pair selection from judged candidates (paper §2.3, Meta-Rewarding ρ)."""

from __future__ import annotations

import math
import numbers

# Band edges are computed in floating point ((1-ρ)·max + ρ·min); a score that sits
# exactly on an edge must not fall out through rounding, so edges are widened by
# this fraction of the score range (far below any real score difference).
_EDGE_RTOL = 1e-9


def select_pair(scores, lengths, *, length_control: float = 0.0) -> tuple[int, int] | None:
    """Indices (chosen, rejected) of one prompt's candidates, or None to discard it.

    ``scores[i]`` is candidate i's mean judge score; None, NaN and ±inf mark a
    candidate without a valid score, which is never chosen nor rejected.
    ``lengths[i]`` is its length (e.g. in tokens), used only when ρ > 0.

    - None when fewer than two scores are valid, or all valid scores are equal
      (the paper discards ties).
    - ρ = ``length_control`` = 0: the paper's rule, a highest- vs a lowest-scoring
      candidate; among equal scores the first index wins, and lengths are ignored.
    - ρ in (0, 1] (Meta-Rewarding): chosen is the shortest candidate with score
      >= (1-ρ)·max + ρ·min, rejected the longest with score <= (1-ρ)·min + ρ·max.
      Equal lengths go to the higher score for chosen, the lower score for
      rejected, then to the first index. None unless chosen scores strictly above
      rejected (large ρ makes the bands overlap).
    """
    if len(scores) != len(lengths):
        raise ValueError(
            f"scores has {len(scores)} entries but lengths has {len(lengths)}; "
            "expected one length per candidate"
        )
    rho = length_control
    if not isinstance(rho, numbers.Real) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"length_control must be a number in [0, 1], got {rho!r}")

    valid: dict[int, float] = {}
    for i, s in enumerate(scores):
        if s is None:
            continue
        if not isinstance(s, numbers.Real):
            raise TypeError(f"scores[{i}] is {s!r}; expected a number, None or NaN")
        if math.isfinite(s):
            valid[i] = float(s)
    if len(valid) < 2:
        return None
    s_max, s_min = max(valid.values()), min(valid.values())
    if s_max == s_min:
        return None

    if rho == 0:
        # max()/min() return the first of equal items: first index among ties.
        chosen = max(valid, key=valid.__getitem__)
        rejected = min(valid, key=valid.__getitem__)
        return chosen, rejected

    length: dict[int, float] = {}
    for i in valid:
        if not isinstance(lengths[i], numbers.Real):
            raise TypeError(f"lengths[{i}] is {lengths[i]!r}; expected a number")
        # float() so that negating an unsigned numpy length cannot wrap around.
        length[i] = float(lengths[i])
    tol = _EDGE_RTOL * (s_max - s_min)
    chosen_floor = (1 - rho) * s_max + rho * s_min - tol
    rejected_ceil = (1 - rho) * s_min + rho * s_max + tol
    # Tuples sort by length, then score, then index: min() picks the tie-breaks.
    chosen = min(
        (i for i, s in valid.items() if s >= chosen_floor),
        key=lambda i: (length[i], -valid[i], i),
    )
    rejected = min(
        (i for i, s in valid.items() if s <= rejected_ceil),
        key=lambda i: (-length[i], valid[i], i),
    )
    if valid[chosen] <= valid[rejected]:
        return None
    return chosen, rejected

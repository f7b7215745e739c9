import math

import numpy as np
import pytest

from jaxsr.pairs import select_pair

NAN = math.nan

# ------------------------------------------------------------ ρ = 0 (paper)


def test_max_vs_min():
    assert select_pair([3.0, 4.5, 1.0, 2.0], [10, 20, 30, 40]) == (1, 2)


def test_ties_take_first_index_and_ignore_lengths():
    # Two 5s (indices 1, 2) and two 1s (3, 4): first of each, although index 2
    # is shorter and index 4 longer.
    assert select_pair([2.0, 5.0, 5.0, 1.0, 1.0], [1, 100, 1, 1, 100]) == (1, 3)


def test_all_equal_is_discarded():
    assert select_pair([4.0, 4.0, 4.0, 4.0], [1, 2, 3, 4]) is None


def test_equal_valid_scores_with_invalid_ones_is_discarded():
    assert select_pair([3.0, None, 3.0, NAN], [1, 2, 3, 4]) is None


@pytest.mark.parametrize("scores", [[], [4.0], [None, None], [NAN, NAN, NAN], [None, 4.0, NAN]])
def test_fewer_than_two_valid_is_discarded(scores):
    assert select_pair(scores, [7] * len(scores)) is None


def test_invalid_scores_never_selected():
    # None and NaN would sort anywhere if compared; they must be skipped.
    assert select_pair([None, 2.0, NAN, 3.0, math.inf, -math.inf], [1] * 6) == (3, 1)
    assert select_pair([NAN, 1.0, 5.0], [0, 9, 9]) == (2, 1)


def test_numpy_inputs():
    scores = np.array([2.0, NAN, 4.0, 1.0], dtype=np.float32)
    lengths = np.array([5, 6, 7, 8], dtype=np.int64)
    assert select_pair(scores, lengths) == (2, 3)
    assert select_pair((np.float64(1.5), None, np.float64(3.5)), (1, 2, 3)) == (2, 0)
    chosen, rejected = select_pair(scores, lengths)
    assert type(chosen) is int and type(rejected) is int


# -------------------------------------------------- ρ > 0 (length control)

# max 4, min 1. Index 4 is the shortest but has no score.
SCORES = [4.0, 3.5, 2.0, 1.0, None]
LENGTHS = [300, 120, 250, 200, 5]


def test_rho_zero_on_example():
    assert select_pair(SCORES, LENGTHS, length_control=0.0) == (0, 3)


def test_rho_quarter_hand_computed():
    # chosen band: s >= 0.75*4 + 0.25*1 = 3.25 -> {0: 4.0 (300), 1: 3.5 (120)} -> shortest 1
    # rejected band: s <= 0.75*1 + 0.25*4 = 1.75 -> {3: 1.0} -> 3
    assert select_pair(SCORES, LENGTHS, length_control=0.25) == (1, 3)


def test_rho_half_hand_computed():
    # chosen band: s >= 2.5 -> {0, 1} -> shortest 1 (120)
    # rejected band: s <= 2.5 -> {2: 2.0 (250), 3: 1.0 (200)} -> longest 2
    assert select_pair(SCORES, LENGTHS, length_control=0.5) == (1, 2)


def test_rho_one_shortest_vs_longest():
    # Both bands hold every valid candidate: shortest is 1 (3.5), longest 0 (4.0);
    # chosen would not score above rejected.
    assert select_pair(SCORES, LENGTHS, length_control=1.0) is None
    assert select_pair([4.0, 1.0, 2.0], [10, 30, 20], length_control=1.0) == (0, 1)


def test_overlapping_bands_same_candidate():
    # ρ=0.5, max 3, min 1: both bands include 2.0 (index 1), which is the shortest of
    # the chosen band {3.0, 2.0} and the longest of the rejected band {2.0, 1.0}.
    assert select_pair([3.0, 2.0, 1.0], [50, 10, 5], length_control=0.5) is None


def test_overlapping_bands_chosen_below_rejected():
    # ρ=0.9: chosen band s >= 0.1*3 + 0.9*1 = 1.2 -> {3.0 (50), 2.0 (10)} -> 1 (2.0);
    # rejected band s <= 0.1*1 + 0.9*3 = 2.8 -> {2.0 (10), 1.0 (100)} -> 2 (1.0).
    assert select_pair([3.0, 2.0, 1.0], [50, 10, 100], length_control=0.9) == (1, 2)
    # Same scores, rejected band's longest is now the 2.0 candidate.
    assert select_pair([3.0, 2.0, 1.0], [50, 10, 5], length_control=0.9) is None
    # Chosen band's shortest (1.0) sits below the rejected band's longest (2.0).
    assert select_pair([1.0, 3.0, 2.0], [10, 50, 100], length_control=1.0) is None


def test_band_edge_survives_float_rounding():
    # ρ=0.7, max 3, min 0: the chosen edge is exactly 0.3*3 = 0.9, but
    # (1 - 0.7)*3 evaluates to 0.9000000000000001 in floating point.
    assert (1 - 0.7) * 3.0 > 0.9
    # With the edge honoured, 0.9 (length 10) is the shortest in the chosen band.
    assert select_pair([3.0, 0.9, 0.0], [100, 10, 50], length_control=0.7) == (1, 2)


def test_equal_lengths_prefer_better_score_then_first_index():
    # ρ=0.5, band edges 2.5: chosen band {4.0, 3.5} both length 10 -> higher score 0;
    # rejected band {1.0, 1.5} both length 40 -> lower score 2.
    assert select_pair([3.5, 4.0, 1.0, 1.5], [10, 10, 40, 40], length_control=0.5) == (1, 2)
    assert select_pair([4.0, 3.5, 1.5, 1.0], [10, 10, 40, 40], length_control=0.5) == (0, 3)
    # Equal scores and lengths: first index.
    assert select_pair([4.0, 4.0, 1.0, 1.0], [10, 10, 40, 40], length_control=0.5) == (0, 2)


def test_invalid_scores_ignored_with_length_control():
    scores = [NAN, 4.0, None, 1.0, 3.0]
    lengths = [1, 200, 1, 50, 100]
    # ρ=0.5: chosen band s >= 2.5 -> {1 (200), 4 (100)} -> 4; rejected {3} -> 3.
    assert select_pair(scores, lengths, length_control=0.5) == (4, 3)


def test_unsigned_lengths_do_not_wrap():
    # Negating np.uint32(0) in a sort key would give 0, not -0 < -20.
    lengths = np.array([0, 10, 20], dtype=np.uint32)
    assert select_pair([3.0, 2.0, 1.0], lengths, length_control=1.0) == (0, 2)


def test_lengths_of_invalid_candidates_may_be_anything():
    assert select_pair([4.0, None, 1.0], [10, None, 20], length_control=0.5) == (0, 2)


# -------------------------------------------------------------- validation


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match=r"scores has 3 entries but lengths has 2"):
        select_pair([1.0, 2.0, 3.0], [1, 2])


@pytest.mark.parametrize("rho", [-0.1, 1.5, NAN, "0.5"])
def test_rho_out_of_range(rho):
    with pytest.raises(ValueError, match="length_control"):
        select_pair([1.0, 2.0], [1, 2], length_control=rho)


def test_non_numeric_score():
    with pytest.raises(TypeError, match=r"scores\[1\]"):
        select_pair([1.0, "4"], [1, 2])


def test_non_numeric_length_of_valid_candidate():
    with pytest.raises(TypeError, match=r"lengths\[1\]"):
        select_pair([1.0, 4.0], [1, None], length_control=0.5)

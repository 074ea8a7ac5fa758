"""The oracle itself: a hand-checked example, and proof that replay can fail."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import zspa_kernels
from fp64_oracle import Row, oracle_order, replay, replay_long_row


def _row(core_ratio, k=3):
    # Four 2-D tokens: 0 and 1 nearly parallel to the prompt, 2 orthogonal, 3 opposite.
    visual = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.05]])
    return Row(visual, np.array([1.0, 0.0]), None, 4, k, core_ratio, "mean")


def test_hand_checked_orders():
    assert oracle_order(_row(1.0)) == [0, 1, 2]          # top-3 relevance
    assert oracle_order(_row(0.34)) == [0, 3, 2]         # k_core = 1, then farthest points
    # seed: token 3 is most isolated (its nearest neighbour, token 2, has cos 0.05 < 0.11)
    assert oracle_order(_row(0.0)) == [3, 0, 2]


def test_replay_accepts_the_oracle_and_rejects_a_clear_mistake():
    row = _row(0.34)
    assert replay(row, [0, 3, 2], tol=1e-9) == 0
    with pytest.raises(AssertionError, match="step 1"):
        replay(row, [0, 1, 2], tol=1e-3)
    with pytest.raises(AssertionError, match="padding"):
        replay(row, [0, 3, 2, 1], tol=1e-3)  # k_b = 3 picks, so the fourth slot must be -1
    with pytest.raises(AssertionError, match="twice"):
        replay(row, [0, 3, 3], tol=1e-3)


def test_replay_enforces_lower_index_on_exact_ties():
    visual = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    row = Row(visual, np.array([1.0, 0.0]), None, 3, 2, 0.5, "mean")
    assert oracle_order(row) == [0, 1]
    with pytest.raises(AssertionError, match="lower index"):
        replay(row, [0, 2], tol=1e-3)


def test_replay_with_token_ties_still_enforces_lower_index_between_identical_tokens():
    # Tokens 1 and 2 are identical; token 3 differs from them but ties them exactly in fp64
    # (all three are orthogonal to the prompt and to token 0).
    visual = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    row = Row(visual, np.array([1.0, 0.0, 0.0]), None, 4, 2, 0.5, "mean")
    assert oracle_order(row) == [0, 1]
    assert replay(row, [0, 3], tol=1e-3) == 0  # a distinct token: a tie in score only
    with pytest.raises(AssertionError, match="lower index"):
        replay(row, [0, 3], tol=1e-3, exact_ties="scores")
    with pytest.raises(AssertionError, match="lower index"):
        replay(row, [0, 2], tol=1e-3)


def test_copies_of_two_picked_tokens_tie_in_either_order_but_non_finite_tokens_do_not():
    # Tokens 2 and 3 copy the picked tokens 0 and 1: both have redundancy exactly 1, a tie that
    # fp32 backends cannot promise to keep (cos(i, i) rounds to 1 +- 2^-24 by the vector), so
    # either order passes unless the inputs are declared exact. Non-finite tokens (4, 5) tie at
    # an infinite redundancy in every backend: the lower index first, in either mode.
    visual = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [np.nan, 0.0], [np.inf, 1.0]])
    row = Row(visual, np.array([1.0, 0.2]), None, 6, 6, 0.0, "mean")
    assert oracle_order(row)[:2] == [0, 1] and oracle_order(row)[2:] == [2, 3, 4, 5]
    assert replay(row, [0, 1, 3, 2, 4, 5], tol=1e-9) == 0
    with pytest.raises(AssertionError, match="lower index"):
        replay(row, [0, 1, 3, 2, 4, 5], tol=1e-9, exact_ties="scores")
    for mode in ("nonfinite", "tokens", "scores"):
        with pytest.raises(AssertionError, match="lower index"):
            replay(row, [0, 1, 2, 3, 5, 4], tol=1e-9, exact_ties=mode)
    # Where dot products depend on the rows' positions, even copies of one token may come in either order.
    assert replay(row, [2, 1, 0, 3, 4, 5], tol=1e-9, exact_ties="nonfinite") == 0
    with pytest.raises(AssertionError, match="lower index"):
        replay(row, [2, 1, 0, 3, 4, 5], tol=1e-9)


def test_a_pair_of_tolerances_holds_each_phase_to_its_own():
    """``(core, rest)``: a core pick off by more than the core's bound fails even where the bound of the seed
    and similarity steps would pass it (cpu: fp32 relevance, fp16 similarities), and those steps are held to
    the second bound, in both replays."""
    theta = math.acos(1 - 2e-4)  # relevance 1 - 2e-4
    near = np.array([math.cos(theta), math.sin(theta), 0.0])
    visual = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2e-4, 0.0, math.sqrt(1 - 4e-8)]])
    prompt = np.array([1.0, 0.0, 0.0])
    greedy = Row(visual, prompt, None, 3, 2, 0.5, "mean")  # core: token 0; then 1 (similarity 0) or 2 (2e-4)
    assert oracle_order(greedy) == [0, 1]
    assert replay(greedy, [0, 2], tol=(2e-5, 1e-3)) == 1
    assert replay_long_row(visual, prompt, 2, 0.5, [0, 2], (2e-5, 1e-3)) == 1
    for tol in (2e-5, (1e-3, 2e-5)):
        with pytest.raises(AssertionError, match="step 1"):
            replay(greedy, [0, 2], tol=tol)
        with pytest.raises(AssertionError, match="step 1"):
            replay_long_row(visual, prompt, 2, 0.5, [0, 2], tol)
    core = np.array([[1.0, 0.0, 0.0], near, [0.0, 0.0, 1.0]])
    assert replay(Row(core, prompt, None, 3, 2, 1.0, "mean"), [1, 0], tol=1e-3) == 1
    assert replay_long_row(core, prompt, 2, 1.0, [1, 0], (1e-3, 2e-5)) == 1
    for tol in ((2e-5, 1e-3), 2e-5):
        with pytest.raises(AssertionError, match="step 0"):
            replay(Row(core, prompt, None, 3, 2, 1.0, "mean"), [1, 0], tol=tol)
        with pytest.raises(AssertionError, match="step 0"):
            replay_long_row(core, prompt, 2, 1.0, [1, 0], tol)
    # No core: the most isolated seed is a similarity step, under the second bound. Token 1 is orthogonal to
    # both others; token 0's nearest neighbour (token 2) is at cosine 2e-4.
    seed = Row(visual, prompt, None, 3, 1, 0.0, "mean")
    assert oracle_order(seed) == [1] and seed.isolation(0) - seed.isolation(1) == 2e-4
    assert replay(seed, [0], tol=(2e-5, 1e-3)) == 1
    with pytest.raises(AssertionError, match="step 0"):
        replay(seed, [0], tol=(1e-3, 2e-5))


def _long_row(seed=0, n=3000, d=16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal(d)


def test_replay_long_row_agrees_with_the_brute_force_replay():
    """The vectorised replay returns what the step-by-step one does, on the exact order and on one split at a
    near-tie (the two best core candidates swapped: a gap of their relevance difference)."""
    V, P = _long_row(n=300)
    row = Row(V, P, None, 300, 60, 0.5, "mean")
    exact = oracle_order(row)
    assert replay_long_row(V, P, 60, 0.5, exact + [-1] * 4, 1e-12) == replay(row, exact + [-1] * 4, 1e-12) == 0
    swapped = [exact[1], exact[0]] + exact[2:]
    gap = row.relevance[exact[0]] - row.relevance[exact[1]]
    with pytest.raises(AssertionError, match="step 0"):
        replay_long_row(V, P, 60, 0.5, swapped, gap / 2)
    with pytest.raises(AssertionError, match="step 0"):
        replay(row, swapped, gap / 2)
    assert replay_long_row(V, P, 60, 0.5, swapped, gap * 2) == replay(row, swapped, gap * 2) == 1


def test_replay_long_row_checks_every_pick_after_a_split():
    """After a legitimate split at a near-tie, a wrong later pick still fails: the step it is at, not the
    split's. And a repeated, out-of-range or unpadded pick fails outright."""
    V, P = _long_row()
    V[1] = P * 3  # the most relevant token ...
    V[2] = V[1] + 1e-6 * V[2]  # ... and a near-copy of it: the core's first two picks, a near-tie
    order = zspa_kernels.select_tokens(torch.from_numpy(V)[None].float(), torch.from_numpy(P)[None].float(), 300,
                                       backend="reference", pick_order=True)[0].tolist()
    assert sorted(order[:2]) == [1, 2]
    split = order[1::-1] + order[2:]  # parts from the fp64 order at step 0, legitimately
    assert replay_long_row(V, P, 300, 0.5, split, 2e-5) >= 1
    wrong = split[:200] + [split[-1]] + split[200:-1]  # then step 200 takes the last pick: far from the farthest
    with pytest.raises(AssertionError, match="step 200"):
        replay_long_row(V, P, 300, 0.5, wrong, 2e-5)
    for bad, message in ((order[:-1] + [order[0]], "twice"), (order[:-1] + [len(V)], "outside"),
                         (order + [7], "padding")):
        with pytest.raises(AssertionError, match=message):
            replay_long_row(V, P, 300, 0.5, bad, 2e-5)

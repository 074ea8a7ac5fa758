"""``select_tokens`` on every available backend against the independent fp64 oracle."""
from __future__ import annotations

import pytest
import torch

import zspa_kernels
from helpers import (DTYPES, TOLERANCE, backends_here, copies_case, device_for, exact_tie_case, exact_ties,
                     one_feature_case, oracle_rows, random_case, random_case_count)
from fp64_oracle import Row, oracle_order, replay, replay_long_row


def _run(case, backend, pick_order):
    device = device_for(backend)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in case.args()]
    return zspa_kernels.select_tokens(*args, backend=backend, pick_order=pick_order).cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, seed", [(name, seed) for name in backends_here()
                                           for seed in range(random_case_count(name))])
def test_random_cases_replay_against_fp64(backend, dtype, seed):
    case = random_case(seed, dtype)
    order = _run(case, backend, pick_order=True)
    kept = _run(case, backend, pick_order=False)
    assert order.shape == kept.shape == (case.visual.shape[0], case.k) and order.dtype == torch.int64
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE[backend][dtype], exact_ties(backend))
        expected_kept = sorted(order[b, : row.k_b].tolist()) + [-1] * (case.k - row.k_b)
        assert kept[b].tolist() == expected_kept, case.describe()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("make_case", [exact_tie_case, one_feature_case], ids=["patterns", "one-feature"])
def test_exact_ties_go_to_lower_index(backend, dtype, seed, make_case):
    case = make_case(seed, dtype)
    order = _run(case, backend, pick_order=True)
    for b, row in oracle_rows(case):
        assert order[b].tolist() == oracle_order(row), case.describe()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# Seeds where a CPU BLAS product rounds copies apart: the reference's dot products (10, 14, and
# most others), the cpu backend's isolation seed before copies took their first copy's (31, 62, 93, 186).
@pytest.mark.parametrize("seed", [0, 3, 10, 14, 31, 62, 93, 186])
def test_copies_of_a_token_tie_to_the_lower_index(backend, dtype, seed):
    case = copies_case(seed, dtype)
    order = _run(case, backend, pick_order=True)
    for b, row in oracle_rows(case):
        replay(row, order[b].tolist(), TOLERANCE[backend][dtype], exact_ties(backend))


def test_rows_are_independent_of_their_batch(backend):
    case = random_case(7, torch.float32, max_n=40)
    case.lengths = torch.tensor([40, 3, 17, 1, 25])[: case.visual.shape[0]].clamp(max=case.visual.shape[1])
    batched = _run(case, backend, pick_order=True)
    for b in range(case.visual.shape[0]):
        alone = zspa_kernels.select_tokens(
            case.visual[b : b + 1].to(device_for(backend)), case.prompt[b : b + 1].to(device_for(backend)),
            case.k, case.core_ratio, case.lengths[b : b + 1].to(device_for(backend)),
            None if case.prompt_mask is None else case.prompt_mask[b : b + 1].to(device_for(backend)),
            case.relevance, backend=backend, pick_order=True).cpu()
        assert alone[0].tolist() == batched[b].tolist()


def test_budget_larger_than_row_keeps_every_token_and_pads(backend):
    visual = torch.randn(2, 5, 8)
    kept = _run_simple(visual, torch.randn(2, 8), 9, backend, lengths=torch.tensor([5, 2]))
    assert kept.tolist() == [[0, 1, 2, 3, 4, -1, -1, -1, -1], [0, 1, -1, -1, -1, -1, -1, -1, -1]]


def test_a_long_token_whose_squares_round_away_keeps_its_relevance(backend):
    """D = 16384. Token 0 is 0.8 followed by values whose squares are each just under half an fp32 ulp of
    0.64: a sum of squares that runs long in fp32 (one SIMD lane, or a library norm) loses each of them,
    its norm ends 2.4e-5 to 4.8e-5 low and its relevance to the prompt e_0 as much high. Token 1 is truly
    2.1e-5 more relevant (past spec.CORE_TOLERANCE, 2e-5): with core_ratio 1 and k = 1 each backend whose
    norms are its own sums keeps 1 (spec.CORE_TOLERANCE says why not cuda's, from its Gram's diagonal)."""
    import math

    from zspa_kernels.spec import CORE_TOLERANCE

    if backend == "cuda":
        pytest.skip("the cuda backend's norms are its cuBLAS Gram's diagonal: a K loop this package does not order")

    D = 16384
    tiny = math.sqrt(0.5 * 2.0**-24 * 0.999)
    x0 = torch.full((D,), tiny, dtype=torch.float64)
    x0[0] = 0.8
    relevance0 = 0.8 / x0.norm().item()
    c = relevance0 + 2.1e-5  # just past CORE_TOLERANCE: an 8- or a 16-lane fp32 norm (2.4e-5 off) fails
    x1 = torch.zeros(D, dtype=torch.float64)
    x1[0], x1[1] = c, math.sqrt(1 - c * c)
    visual = torch.stack([x0, x1]).float()[None]
    prompt = torch.zeros(1, D)
    prompt[0, 0] = 1.0
    exact = torch.nn.functional.cosine_similarity(visual[0].double(), prompt.double(), dim=-1)
    assert exact[1] - exact[0] > CORE_TOLERANCE  # the float32 inputs keep the gap
    assert _run_simple(visual, prompt, 1, backend, core_ratio=1.0, pick_order=True).tolist() == [[1]]


def test_a_long_relevance_dot_whose_terms_round_away_keeps_its_relevance(backend):
    """The companion of the test above, for the relevance sum instead of the norm: D = 16384, the
    prompt 0.707 on feature 0 and 0.0055 on every other, token 0 0.99999 on feature 0 and 5.4e-6 on
    every other. Its relevance is 0.707 plus 16383 products, each just under half an fp32 ulp of
    0.707: a dot that runs long in fp32 (one SIMD lane) loses each, and ends 3.1e-5 (16 lanes) or
    6.1e-5 (8) low, while both vectors' norms are benign (the token's tail holds 2.4e-7 of its
    squares). Token 1 is truly 2.1e-5 less relevant (past spec.CORE_TOLERANCE, 2e-5): with
    core_ratio 1 and k = 1 each backend keeps 0."""
    import math

    from zspa_kernels.spec import CORE_TOLERANCE

    D = 16384
    sigma = math.sqrt(0.5 / (D - 1))
    prompt = torch.full((1, D), sigma, dtype=torch.float64)
    prompt[0, 0] = math.sqrt(0.5)
    tau = 0.999 * 2.0**-25 / sigma  # a product tau * sigma just under half an ulp of 0.707
    x0 = torch.full((D,), tau, dtype=torch.float64)
    x0[0] = 1.0
    x0, prompt = x0.float(), prompt.float()  # the gap below is solved from what the op reads
    unit = prompt[0].double() / prompt[0].double().norm()
    relevance0 = (x0.double() @ unit / x0.double().norm()).item()
    # Token 1 = cos(a) e_0 + sin(a) w, w the unit vector on features 1..64 (a dot of 64 large
    # products, benign), its relevance solved to relevance0 - 2.1e-5 in the plane of e_0 and w.
    along_e0, along_w = unit[0].item(), unit[1:65].sum().item() / 8
    angle = math.atan2(along_w, along_e0) + math.acos((relevance0 - 2.1e-5) / math.hypot(along_e0, along_w))
    x1 = torch.zeros(D, dtype=torch.float64)
    x1[0], x1[1:65] = math.cos(angle), math.sin(angle) / 8
    visual = torch.stack([x0, x1.float()])[None]
    exact = torch.nn.functional.cosine_similarity(visual[0].double(), prompt.double(), dim=-1)
    assert CORE_TOLERANCE < exact[0] - exact[1] < 2.2e-5  # the float32 inputs keep the gap
    assert _run_simple(visual, prompt, 1, backend, core_ratio=1.0, pick_order=True).tolist() == [[0]]


def test_core_ratio_one_is_top_k_relevance(backend):
    g = torch.Generator().manual_seed(3)
    visual, prompt = torch.randn(1, 50, 16, generator=g), torch.randn(1, 16, generator=g)
    order = _run_simple(visual, prompt, 10, backend, core_ratio=1.0, pick_order=True)
    cos = torch.nn.functional.cosine_similarity(visual[0].double(), prompt.double(), dim=-1)
    # Check the VALUES chosen: ties cannot fail this falsely.
    assert torch.allclose(cos[order[0]], cos.sort(descending=True).values[:10], atol=1e-5)


def test_nonfinite_tokens_are_picked_last(backend):
    visual = torch.randn(1, 6, 4)
    visual[0, 1, 2] = float("nan")
    visual[0, 4, 0] = float("-inf")
    order = _run_simple(visual, torch.randn(1, 4), 6, backend, pick_order=True)
    assert order[0, -2:].tolist() == [1, 4]


def test_masked_out_prompt_rows_are_ignored_whatever_they_hold(backend):
    g = torch.Generator().manual_seed(5)
    visual, prompt = torch.randn(1, 30, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    mask = torch.tensor([[True, False, True, False]])
    poisoned = prompt.clone()
    poisoned[0, 1] = float("nan")
    poisoned[0, 3] = float("inf")
    device = device_for(backend)
    for relevance in ("mean", "max"):
        runs = [zspa_kernels.select_tokens(visual.to(device), p.to(device), 6, 1.0, prompt_mask=mask.to(device),
                                           relevance=relevance, backend=backend, pick_order=True).cpu()
                for p in (prompt, poisoned)]
        assert runs[0].tolist() == runs[1].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [1e-30, 1e20, 1e30, 3e38])
def test_finite_tokens_of_any_magnitude_are_normalised_without_overflow(backend, dtype, magnitude):
    g = torch.Generator().manual_seed(3)
    visual = torch.randn(2, 30, 16, generator=g)
    visual[:, ::3] = visual[:, ::3] / visual[:, ::3].abs().amax(-1, keepdim=True) * magnitude
    prompt = torch.randn(2, 16, generator=g)
    prompt = prompt / prompt.abs().amax(-1, keepdim=True) * magnitude  # finite too: randn * 3e38 is not
    assert visual.to(dtype).isfinite().all() and prompt.to(dtype).isfinite().all()
    for alpha in (0.0, 0.5):
        order = _run_simple(visual.to(dtype), prompt.to(dtype), 12, backend, core_ratio=alpha, pick_order=True)
        for b in range(2):
            row = Row(visual[b].to(dtype).float().numpy(), prompt[b].to(dtype).float().numpy(), None, 30, 12, alpha,
                      "mean")
            replay(row, order[b].tolist(), TOLERANCE[backend][dtype], exact_ties(backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_finite_prompt_rows_whose_sum_overflows_pool_to_their_mean(backend, dtype, masked):
    """relevance="mean" of six prompt rows at float32's limit (spec.pool_shift): features 0-3 hold
    3e38 in every row, so their fp32 sums overflow; the pooled prompt is their finite mean, not a
    non-finite vector that acts as zero (which kept the lowest indices). Masked: a NaN row and a
    row of -3e38 masked out, which must leak into neither sum."""
    g = torch.Generator().manual_seed(5)
    visual = torch.randn(2, 30, 16, generator=g)
    prompt = torch.randn(2, 6, 16, generator=g)
    prompt = prompt / prompt.abs().amax(-1, keepdim=True) * 3e38
    prompt[:, :, :4] = 3e38
    mask = torch.ones(2, 6, dtype=torch.bool)
    if masked:
        prompt[0, 2], mask[0, 2] = float("nan"), False
        prompt[1, 4], mask[1, 4] = -3e38, False
    prompt = prompt.to(dtype)
    with torch.no_grad():
        plain = torch.where(mask.unsqueeze(-1), prompt.float(), 0.0).sum(1)
    assert not plain[:, :4].isfinite().any() and prompt[mask].isfinite().all()
    device = device_for(backend)
    for alpha in (1.0, 0.5):
        order = zspa_kernels.select_tokens(visual.to(dtype).to(device), prompt.to(device), 10, alpha,
                                           prompt_mask=mask.to(device) if masked else None, backend=backend,
                                           pick_order=True).cpu()
        for b in range(2):
            row = Row(visual[b].to(dtype).float().numpy(), prompt[b].float().numpy(), mask[b].numpy(), 30, 10,
                      alpha, "mean")
            replay(row, order[b].tolist(), TOLERANCE[backend][dtype], exact_ties(backend))
            assert order[b, :5].tolist() != list(range(5))  # not the zero prompt's core


@pytest.mark.parametrize("seed", [72, 76, 81, 126, 128, 133])
def test_tiny_norm_fp16_tokens_keep_exact_ties(backend, seed):
    """fp16 tokens of norm < 1e-6 are small multiples of 2**-24: their dot products are exact,
    and so are the fp64 ties between distinct tokens; dividing each element by 1e-6 rounded
    them apart (these seeds), dividing the dot product keeps them (lower index wins)."""
    g = torch.Generator().manual_seed(seed)
    D = [2, 3, 4][seed % 3]
    patterns = torch.randint(-4, 5, (6, D), generator=g).float() * 2.0**-24
    visual = patterns[torch.randint(0, 6, (1, 16), generator=g)].half()
    assert float(visual.float().norm(dim=-1).max()) < 1e-6
    prompt, alpha = patterns[:1].half(), [0.0, 0.5][seed % 2]
    order = _run_simple(visual, prompt, 7, backend, core_ratio=alpha, pick_order=True)
    row = Row(visual[0].float().numpy(), prompt[0].float().numpy(), None, 16, 7, alpha, "mean")
    if backend == "cpu":  # its greedy steps read fp16 unit vectors: exact only to its stated tolerance
        replay(row, order[0].tolist(), TOLERANCE[backend][torch.float16], exact_ties="tokens")
    else:
        assert order[0].tolist() == oracle_order(row)


def _run_simple(visual, prompt, k, backend, core_ratio=0.5, lengths=None, pick_order=False):
    device = device_for(backend)
    return zspa_kernels.select_tokens(
        visual.to(device), prompt.to(device), k, core_ratio,
        None if lengths is None else lengths.to(device), backend=backend, pick_order=pick_order).cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="video-size rows on a GPU")
@pytest.mark.parametrize("gram_budget", ["", "0"], ids=["gram", "stream"])
def test_video_size_rows_replay_against_fp64_on_every_gpu_backend(monkeypatch, gram_budget):
    """N=16384 (SPEC's video shape, D cut to 64): 819 greedy steps after an 819-token core, on
    every GPU backend (triton's gram and, forced by ZSPA_GRAM_BUDGET=0, streaming paths) and the
    reference on the same device, every pick of each replayed against fp64 (vectorised): a split at a
    near-tie leaves the picks after it held to the rule, not unchecked."""
    monkeypatch.setenv("ZSPA_GRAM_BUDGET", gram_budget)
    g = torch.Generator(device="cuda").manual_seed(16384)
    visual = torch.randn(1, 16384, 64, device="cuda", generator=g).to(torch.bfloat16)
    prompt = torch.randn(1, 64, device="cuda", generator=g).to(torch.bfloat16)
    V, P = visual[0].double().cpu().numpy(), prompt[0].double().cpu().numpy()
    for backend in ["reference"] + [b for b in ("triton", "cuda") if b in backends_here()]:
        got = zspa_kernels.select_tokens(visual, prompt, 1638, backend=backend, pick_order=True)[0].tolist()
        replay_long_row(V, P, 1638, 0.5, got, TOLERANCE[backend][torch.bfloat16])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 48 * 2**30,
                    reason="a 16 GiB output on a GPU")
@pytest.mark.parametrize("pick_order", [False, True], ids=["ascending", "pick-order"])
def test_the_largest_budget_pads_every_slot_on_every_gpu_backend(pick_order):
    """k = MAX_K (2^31 - 1) on a 5-token row: 16 GiB of output, every slot past the five kept
    tokens -1. The block the output will reuse is filled with 7 first, so a padding loop whose
    trip count wraps in int32 (Triton's cdiv(k - k_b, 1024) did) leaves 7s that this sees."""
    from zspa_kernels.spec import MAX_K
    g = torch.Generator(device="cuda").manual_seed(31)
    visual = torch.randn(1, 5, 16, device="cuda", generator=g)
    prompt = torch.randn(1, 16, device="cuda", generator=g)
    want = oracle_order(Row(visual[0].double().cpu().numpy(), prompt[0].double().cpu().numpy(), None, 5, MAX_K, 0.5,
                            "mean"))
    for backend in [b for b in ("triton", "cuda") if b in backends_here()]:
        stale = torch.full((1, MAX_K), 7, dtype=torch.int64, device="cuda")
        del stale  # the caching allocator hands this block to the op's output
        out = zspa_kernels.select_tokens(visual, prompt, MAX_K, backend=backend, pick_order=pick_order)
        head = out[0, :5].tolist()
        assert head == (want if pick_order else sorted(want)), backend
        assert bool((out[0, 5:] == -1).all()), f"{backend}: slots past the kept tokens are not all -1"
        del out
        torch.cuda.empty_cache()

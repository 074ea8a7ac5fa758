"""The ``cuda`` backend on a GPU, beyond the shared suite: graphs, compile, chunking, layouts.

Correctness against the fp64 oracle is the shared suite (``test_select_tokens.py``,
which runs every backend listed in ``helpers.TOLERANCE``); these tests cover what
is specific to ``csrc/``. All of them need a GPU and compile the extension on first use.
"""
from __future__ import annotations

import pytest
import torch

import zspa_kernels
from zspa_kernels.spec import GRAM_BUDGET_ENV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(B, N, D, T=5, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    visual = torch.randn(B, N, D, device="cuda", generator=g).to(dtype)
    prompt = torch.randn(B, T, D, device="cuda", generator=g).to(dtype)
    return visual, prompt


def _select(visual, prompt, k, **kw):
    return zspa_kernels.select_tokens(visual, prompt, k, backend="cuda", pick_order=True, **kw)


def test_cuda_graph_replay_matches_eager():
    visual, prompt = _inputs(2, 576, 256)
    lengths = torch.tensor([576, 400], device="cuda")
    _select(visual, prompt, 64, lengths=lengths)  # build, load and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _select(visual, prompt, 64, lengths=lengths)
    fresh_visual, fresh_prompt = _inputs(2, 576, 256, seed=1)
    visual.copy_(fresh_visual)
    prompt.copy_(fresh_prompt)
    graph.replay()
    assert torch.equal(captured, _select(fresh_visual, fresh_prompt, 64, lengths=lengths))


def test_torch_compile_fullgraph_matches_eager():
    visual, prompt = _inputs(2, 100, 64)

    def pick(v, p):
        return torch.ops.zspa.select_tokens(v, p, 16, 0.25, None, None, "max", "cuda", False)

    assert torch.equal(torch.compile(pick, fullgraph=True)(visual, prompt), pick(visual, prompt))


def test_layout_does_not_change_the_result():
    visual, prompt = _inputs(3, 77, 48, dtype=torch.float16)
    strided = visual.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    assert not strided.is_contiguous()
    assert torch.equal(_select(strided, prompt, 20), _select(visual, prompt, 20))


def test_gram_chunks_keep_rows_independent(monkeypatch):
    # A budget of one N = 16384 row's Gram (1 GiB) puts one row per chunk, so B = 2 runs two
    # launches (the default 4 GiB would hold both).
    monkeypatch.setenv(GRAM_BUDGET_ENV, str(4 * 16384**2))
    visual, prompt = _inputs(2, 16384, 32, dtype=torch.float32)
    lengths = torch.tensor([16384, 9000], device="cuda")
    batched = _select(visual, prompt, 12, lengths=lengths)
    for b in range(2):
        alone = _select(visual[b : b + 1], prompt[b : b + 1], 12, lengths=lengths[b : b + 1])
        assert torch.equal(alone[0], batched[b])


def test_wide_rows_replay_against_fp64():
    # Wider than the shared suite's random cases: over 1024 tokens (two per thread), D >> 32,
    # and the isolation seed (alpha = 0) over hundreds of tokens.
    from fp64_oracle import Row, replay
    from helpers import TOLERANCE

    for n_tokens, alpha in ((1100, 0.5), (600, 0.0)):
        visual, prompt = _inputs(1, n_tokens, 96, T=7)
        mask = torch.tensor([[True, False, True, True, False, True, True]], device="cuda")
        order = _select(visual, prompt, 40, core_ratio=alpha, prompt_mask=mask).cpu()
        row = Row(visual[0].float().cpu().numpy(), prompt[0].float().cpu().numpy(), mask[0].cpu().numpy(),
                  n_tokens, 40, alpha, "mean")
        replay(row, order[0].tolist(), TOLERANCE["cuda"][torch.bfloat16])


_SHARED_MEMORY_EDGE = """
import json, sys, torch, zspa_kernels
g = torch.Generator(device="cuda").manual_seed(3)
orders = []
for n in map(int, sys.argv[1:]):
    visual = torch.randn(1, n, 16, device="cuda", generator=g).bfloat16()
    prompt = torch.randn(1, 16, device="cuda", generator=g).bfloat16()
    order = zspa_kernels.select_tokens(visual, prompt, 24, backend="cuda", pick_order=True)
    orders.append([visual[0].float().tolist(), prompt[0].float().tolist(), order[0].tolist()])
print(json.dumps(orders))
"""


def test_rows_whose_shared_memory_crosses_48_kib_launch():
    """12 bytes a token plus the kernel's static arrays: from N = 4043 on, the sum passes the
    48 KiB that a kernel gets without opting in, though the dynamic part alone reaches 48 KiB only
    at N = 4096 (the first GPU run failed to launch at N = 4096). A fresh process, since the
    opt-in is process-wide and an earlier, wider call would hide the bug."""
    import json
    import subprocess
    import sys

    from fp64_oracle import Row, replay
    from helpers import TOLERANCE

    sizes = (4042, 4043, 4096)
    done = subprocess.run([sys.executable, "-c", _SHARED_MEMORY_EDGE, *map(str, sizes)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for n, (visual, prompt, order) in zip(sizes, json.loads(done.stdout)):
        replay(Row(visual, prompt, None, n, 24, 0.5, "mean"), order, TOLERANCE["cuda"][torch.bfloat16])


def test_the_longest_row_auto_sends_to_cuda_runs_and_one_token_more_is_refused():
    """``spec.cuda_backend_takes`` restates the launcher's shared-memory check for ``auto``
    (csrc/select_tokens.cu computes the kernel's static arrays from its attributes; the spec
    states them as 640 bytes): on this GPU, the longest row it admits runs, and the launcher
    refuses one token more."""
    from zspa_kernels.dispatch import shared_memory_optin
    from zspa_kernels.spec import CUDA_GREEDY_BYTES_PER_TOKEN, CUDA_GREEDY_STATIC_BYTES, cuda_backend_takes

    optin = shared_memory_optin(torch.device("cuda", torch.cuda.current_device()))
    n = (optin - CUDA_GREEDY_STATIC_BYTES) // CUDA_GREEDY_BYTES_PER_TOKEN
    assert cuda_backend_takes(1, n, optin) and not cuda_backend_takes(1, n + 1, optin)
    visual, prompt = _inputs(1, n, 32, dtype=torch.float32)
    assert (_select(visual, prompt, 4) >= 0).all()
    visual, prompt = _inputs(1, n + 1, 32, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=f"visual: N={n + 1} tokens need"):
        _select(visual, prompt, 4)


def test_graph_of_long_rows_replays_after_a_call_with_shorter_ones():
    """The long-row kernel's shared-memory opt-in is the device's most, set once: the launcher
    set it to each call's own size before, so a graph captured at N = 8192 replayed after an eager
    call at N = 4100 would launch above the limit that call left in force."""
    long_visual, long_prompt = _inputs(1, 8192, 32, dtype=torch.float32)
    expected = _select(long_visual, long_prompt, 40)  # built, loaded and warmed up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _select(long_visual, long_prompt, 40)
    short_visual, short_prompt = _inputs(1, 4100, 32, dtype=torch.float32, seed=1)
    _select(short_visual, short_prompt, 40)
    captured.fill_(-2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)


def _cluster_gpu():
    return torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.parametrize("n_tokens", [239, 576, 577, 900])  # 2, 6, 7 (4-byte copies) and 15 CTAs (non-portable)
def test_cluster_kernel_picks_what_the_block_kernel_picks(monkeypatch, n_tokens):
    """greedy_cluster.cuh against greedy_select.cuh on the same call: identical outputs (the same
    Gram entries in the same expression), over clusters of 2 to 15 CTAs, lengths, both relevances,
    an empty core (the isolation seed) and the ascending output; one row replayed against fp64."""
    if not _cluster_gpu():
        pytest.skip("thread-block clusters need sm_90")
    from fp64_oracle import Row, replay
    from helpers import TOLERANCE

    visual, prompt = _inputs(3, n_tokens, 96, T=4, seed=n_tokens)
    lengths = torch.tensor([n_tokens, n_tokens // 2 + 1, 17], device="cuda")
    for alpha, relevance, pick_order in ((0.5, "mean", True), (0.0, "max", True), (0.25, "mean", False)):
        outputs = {}
        for path in ("block", "cluster"):
            monkeypatch.setenv("ZSPA_CUDA_GREEDY", path)
            try:
                outputs[path] = zspa_kernels.select_tokens(visual, prompt, 48, core_ratio=alpha, lengths=lengths,
                                                           relevance=relevance, backend="cuda", pick_order=pick_order)
            except RuntimeError as exc:  # a GPU whose GPCs cannot hold the cluster (auto then takes the block kernel)
                if "driver runs no cluster" not in str(exc):
                    raise
                pytest.skip(str(exc).splitlines()[0])
        assert torch.equal(outputs["cluster"], outputs["block"]), (alpha, relevance, pick_order)
    row = Row(visual[0].float().cpu().numpy(), prompt[0].float().cpu().numpy(), None, n_tokens, 48, 0.0, "max")
    monkeypatch.setenv("ZSPA_CUDA_GREEDY", "cluster")
    order = zspa_kernels.select_tokens(visual[:1], prompt[:1], 48, core_ratio=0.0, relevance="max", backend="cuda",
                                       pick_order=True)
    replay(row, order[0].cpu().tolist(), TOLERANCE["cuda"][torch.bfloat16])


def test_cluster_kernel_refuses_rows_no_cluster_holds(monkeypatch):
    if not _cluster_gpu():
        pytest.skip("thread-block clusters need sm_90")
    visual, prompt = _inputs(1, 1500, 32)
    monkeypatch.setenv("ZSPA_CUDA_GREEDY", "cluster")
    with pytest.raises(RuntimeError, match="ZSPA_CUDA_GREEDY=cluster: no cluster of this GPU holds the Gram of N=1500"):
        _select(visual, prompt, 16)
    monkeypatch.setenv("ZSPA_CUDA_GREEDY", "auto")
    assert _select(visual, prompt, 16).shape == (1, 16)  # auto: the block kernel


@pytest.mark.parametrize("gram", ["split", "splitk"])
@pytest.mark.parametrize("greedy", ["block", "cluster"])
def test_split_gram_replays_against_fp64(monkeypatch, greedy, gram):
    """The Gram as top rows and bottom-right block (ZSPA_CUDA_GRAM=split; auto splits only large
    launches), or a row at a time summed over four slices of D (splitk, forced only), on both
    greedy kernels: odd and even N, lengths, the isolation seed, against fp64. Not bit for bit
    against the whole Gram: other GEMMs sum its entries."""
    if greedy == "cluster" and not _cluster_gpu():
        pytest.skip("thread-block clusters need sm_90")
    from fp64_oracle import Row, replay
    from helpers import TOLERANCE

    monkeypatch.setenv("ZSPA_CUDA_GRAM", gram)
    monkeypatch.setenv("ZSPA_CUDA_GREEDY", greedy)
    for n_tokens, alpha in ((577, 0.5), (576, 0.0), (300, 0.25)):
        visual, prompt = _inputs(2, n_tokens, 64, T=3, seed=n_tokens)
        lengths = torch.tensor([n_tokens, n_tokens - 37], device="cuda")
        order = _select(visual, prompt, 60, core_ratio=alpha, lengths=lengths).cpu()
        for b in range(2):
            row = Row(visual[b].float().cpu().numpy(), prompt[b].float().cpu().numpy(), None, int(lengths[b]), 60,
                      alpha, "mean")
            replay(row, order[b].tolist(), TOLERANCE["cuda"][torch.bfloat16])


@pytest.mark.parametrize("greedy,gram", [("auto", "auto"), ("block", "full"), ("block", "split"), ("cluster", "full"),
                                         ("cluster", "split"), ("block", "splitk")])
def test_copies_across_the_gram_split_tie_to_the_lower_index(monkeypatch, greedy, gram):
    """LLaVA-1.5's shape at B=8 (where "auto" splits the Gram on sm_90: rows·N²·D >= 2^33), every
    token i < 288 copied to i + 288, so each pair straddles the split row h = 288: the copies'
    Gram entries then come from two GEMMs (the top rows, the bottom-right block) that cuBLAS may
    run with different kernels, and must still be equal bit for bit for the pair to tie to the
    lower index (fp64_oracle.replay's "tokens" ties): no upper copy is picked while its lower copy
    is free. An empty core (the isolation seed, then every pick a tie between copies) and a
    quarter core, whose picks are also replayed against fp64 (vectorised; replay's walk takes
    seconds a row at this size), on both greedy kernels, whole and split Grams."""
    if greedy == "cluster" and not _cluster_gpu():
        pytest.skip("thread-block clusters need sm_90")
    from fp64_oracle import replay_long_row
    from helpers import TOLERANCE

    monkeypatch.setenv("ZSPA_CUDA_GREEDY", greedy)
    monkeypatch.setenv("ZSPA_CUDA_GRAM", gram)
    base, prompt = _inputs(8, 288, 4096, T=3, seed=288)
    scale = torch.rand(8, 288, 1, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) + 0.1
    base = (base.float() * scale).to(torch.bfloat16)
    visual = torch.cat([base, base], 1)
    for alpha in (0.0, 0.25):
        order = _select(visual, prompt, 64, core_ratio=alpha).cpu()
        for b in range(8):
            picked = set()
            for j in order[b].tolist():
                assert j < 288 or j - 288 in picked, f"core_ratio {alpha}, row {b}: picked {j} before its copy {j - 288}"
                picked.add(j)
            if alpha:
                replay_long_row(visual[b].float().cpu().numpy(), prompt[b].double().mean(0).cpu().numpy(), 64, alpha,
                                order[b].tolist(), TOLERANCE["cuda"][torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("greedy,gram", [("block", "full"), ("block", "split"), ("cluster", "full"),
                                         ("cluster", "split"), ("block", "splitk"), ("cluster", "splitk")])
def test_tokens_outside_the_raw_band_replay_against_fp64(monkeypatch, dtype, greedy, gram):
    """The GEMMs read the tokens as given (gram_repair.cuh): tokens whose largest |x| is outside
    [2^-33, 2^48) (1e-30, 1e-12, 1e15, 1e30, two copies of one) have their Gram rows and columns,
    and their "max" dots, rewritten by the token pass; in-band tokens of 1e-9 to 1e9 beside them.
    Both relevances, both greedy kernels, whole and split Grams, against fp64; with the split,
    a Gram chunk a row, so that the second row's token pass works at the chunk's offsets (splitk
    makes a chunk a row by itself)."""
    if greedy == "cluster" and not _cluster_gpu():
        pytest.skip("thread-block clusters need sm_90")
    from fp64_oracle import Row, replay
    from helpers import TOLERANCE, banded_tokens

    N, D = 300, 64
    monkeypatch.setenv("ZSPA_CUDA_GREEDY", greedy)
    monkeypatch.setenv("ZSPA_CUDA_GRAM", gram)
    if gram == "split":
        monkeypatch.setenv("ZSPA_GRAM_BUDGET", str(N * N * 4))
    g = torch.Generator().manual_seed(11)
    visual = banded_tokens(g, 2, N, D)
    prompt = torch.randn(2, 3, D, generator=g)
    visual, prompt = visual.to(dtype), prompt.to(dtype)
    assert visual.isfinite().all()
    for alpha, relevance in ((0.5, "mean"), (0.0, "max"), (0.25, "max")):
        order = _select(visual.cuda(), prompt.cuda(), 40, core_ratio=alpha, relevance=relevance).cpu()
        for b in range(2):
            row = Row(visual[b].float().numpy(), prompt[b].float().numpy(), None, N, 40, alpha, relevance)
            replay(row, order[b].tolist(), TOLERANCE["cuda"][dtype])

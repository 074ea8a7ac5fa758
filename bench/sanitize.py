"""The cases ``bench/run_gpu.sh`` runs under compute-sanitizer (memcheck, racecheck, synccheck,
initcheck: the launchers allocate scratch with ``torch.empty`` and no kernel may read an element
before some launch of the call wrote it).

    compute-sanitizer --tool memcheck python -m bench.sanitize --backend triton

Small shapes that still take every path of the fused backends: several Gram tiles and
selection chunks, the streaming path (``ZSPA_GRAM_BUDGET=0``), batch groups, the isolation
seed (core ratio 0), lengths, prompt masks, per-token prompts pooled for ``mean``, ``max``
relevance, both output forms, fp32, fp16 and bf16, Gram tiles in and outside the raw band;
for ``cuda`` also a row whose state needs more than 48 KB of shared memory, both greedy
kernels (``ZSPA_CUDA_GREEDY``: on sm_90 ``auto`` takes the cluster kernel for every row of up
to ~950 tokens, so the small cases are forced onto the block kernel too), clusters of 6, 7
(4-byte copies) and 15 CTAs, a radix-selected core, the split Gram (``ZSPA_CUDA_GRAM``) on
both kernels, the Gram summed over slices of D, and tokens outside the raw band, whose Gram
entries the token pass rewrites. Each result is checked for what any valid selection satisfies
(indices in the row, no repeats, ``-1`` only after the row's budget), so a launch that silently
wrote nothing fails here too;
agreement with the fp64 oracle is the test suite's job. ``--greedy block`` runs every cuda case
on the block kernel: racecheck's verdict on the other kernels alone, since the cluster kernel's
chain polls shared memory that other CTAs store into (ordered by a step tag, not a barrier),
which racecheck may report as hazards. Run without a sanitizer it is a
quick smoke test of the same launches; ``bench/test_sanitize.py`` runs the cases through the
CPU backends in CI, so the cases and the check are known good before a GPU sees them.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

import zspa_kernels  # noqa: F401  (registers the op)
from zspa_kernels import benchmark as hb
from zspa_kernels.spec import CUDA_GRAM_ENV, CUDA_GREEDY_ENV, GRAM_BUDGET_ENV


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    N: int
    D: int
    k: int
    core_ratio: float = 0.5
    dtype: torch.dtype = torch.bfloat16
    T: int = 0                # 0: a pooled (B, D) prompt
    masked: bool = False
    lengths: bool = False
    relevance: str = "mean"
    pick_order: bool = True
    gram_budget: str = ""     # ZSPA_GRAM_BUDGET for this case ("" = default)
    greedy: str = ""          # ZSPA_CUDA_GREEDY for this case ("" = auto)
    gram: str = ""            # ZSPA_CUDA_GRAM for this case ("" = auto)
    outside: bool = False     # some tokens at 1e30 and 1e-30: outside the raw band (spec.RAW_EXP_MIN/MAX)


CASES = (
    Case(1, 200, 96, 40),                                            # several tiles and chunks
    Case(3, 131, 40, 17, core_ratio=0.0, lengths=True),             # isolation seed, ragged rows
    Case(2, 150, 64, 30, T=5, masked=True, relevance="max"),         # per-token prompt on tensor cores
    Case(2, 97, 33, 20, dtype=torch.float32, pick_order=False),      # fp32 (IEEE dots), ascending output
    Case(2, 120, 48, 24, dtype=torch.float16, T=3, lengths=True),
    Case(3, 160, 64, 32, gram_budget="0"),                           # streaming path
    Case(4, 96, 32, 16, gram_budget=str(4 * 96 * 96)),               # one row per launch group
    Case(2, 150, 64, 30, T=21, masked=True, outside=True),  # a masked per-token prompt pooled in 16-byte
                                                            # batches (Triton: its own launch); scaled tiles
    Case(2, 97, 33, 20, dtype=torch.float32, T=9, masked=True),      # the same pooled one feature at a time
)
CUDA_CASES = (
    Case(1, 1500, 32, 50),                      # 1024 threads, some own two tokens; a radix-selected core
    Case(2, 1100, 24, 120, lengths=True, gram="split"),  # the split Gram on the block kernel
    Case(1, 4096, 16, 24),                      # 48 KiB of dynamic shared state plus the static arrays
    Case(1, 4500, 16, 24, core_ratio=0.25),     # 54 KB of shared state: the opt-in limit
    Case(3, 131, 40, 17, core_ratio=0.0, lengths=True, greedy="block"),   # the block kernel on small rows
    Case(2, 97, 33, 20, dtype=torch.float32, pick_order=False, greedy="block"),
    Case(2, 576, 32, 48),                                                  # clusters of 6 CTAs
    Case(2, 577, 24, 40, core_ratio=0.0, lengths=True, pick_order=False),  # 7 CTAs, 4-byte copies
    Case(2, 576, 32, 48, gram="split"),                                    # the split Gram, 16-byte copies
    Case(2, 300, 64, 40, lengths=True, gram="splitk"),                     # a row at a time, summed over D slices
    Case(1, 900, 16, 40, T=3, relevance="max"),                           # 15 CTAs (non-portable size)
    Case(2, 576, 32, 48, gram="split", outside=True),          # the token pass's repair, split Gram, clusters
    Case(2, 150, 64, 30, T=5, masked=True, relevance="max", outside=True, greedy="block"),  # "max" dots repaired
    Case(2, 97, 33, 20, dtype=torch.float32, lengths=True, outside=True),  # fp32, odd D
)


def make(case: Case, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(case.B, case.N, case.D, generator=g) * torch.rand(case.B, case.N, 1, generator=g).add(0.1)
    if case.outside:
        visual[:, ::5] *= 1e30
        visual[:, 3::7] *= 1e-30
    prompt = torch.randn(case.B, case.D, generator=g) if case.T == 0 else torch.randn(case.B, case.T, case.D,
                                                                                      generator=g)
    mask = None
    if case.masked:
        mask = torch.rand(case.B, case.T, generator=g) < 0.6
        mask[:, 0] = True
    lengths = torch.randint(1, case.N + 1, (case.B,), generator=g) if case.lengths else None
    return (visual.to(device, case.dtype), prompt.to(device, case.dtype),
            None if lengths is None else lengths.to(device), None if mask is None else mask.to(device))


def check(case: Case, out: torch.Tensor, lengths) -> None:
    """Raise unless ``out`` is a valid selection of every row."""
    assert out.shape == (case.B, case.k) and out.dtype == torch.int64, (tuple(out.shape), out.dtype)
    for b, row in enumerate(out.cpu().tolist()):
        n = case.N if lengths is None else int(lengths[b])
        k_b = min(case.k, n)
        picked = row[:k_b]
        assert all(0 <= i < n for i in picked) and len(set(picked)) == k_b, f"row {b}: {picked}"
        assert row[k_b:] == [-1] * (case.k - k_b), f"row {b}: padding {row[k_b:]}"
        if not case.pick_order:
            assert picked == sorted(picked), f"row {b}: not ascending"


def run(backend: str, device: torch.device, cases=None, progress=print, greedy: str = "") -> int:
    """Run and check every case (``CASES``, plus ``CUDA_CASES`` for ``cuda``); the count run.
    ``greedy`` (``ZSPA_CUDA_GREEDY``) overrides every case's: ``block`` keeps the cluster kernel out."""
    if cases is None:
        cases = CASES + (CUDA_CASES if backend == "cuda" else ())
    for seed, case in enumerate(cases):
        paths = {GRAM_BUDGET_ENV: case.gram_budget, CUDA_GREEDY_ENV: greedy or case.greedy, CUDA_GRAM_ENV: case.gram}
        with hb.env_vars(paths):
            visual, prompt, lengths, mask = make(case, device, seed)
            out = torch.ops.zspa.select_tokens(visual, prompt, case.k, case.core_ratio, lengths, mask,
                                               case.relevance, backend, case.pick_order)
        check(case, out, None if lengths is None else lengths.cpu())
        progress(f"{backend}: {case} ok")
    return len(cases)


def cublas_control(device: torch.device, progress=print) -> None:
    """initcheck's control for the cuda backend, whose Gram and "max" dots are cuBLAS outputs:
    the same fp32-accumulating bmm, read back by a PyTorch reduction and nothing of ours. If
    initcheck reports uninitialised reads here, it does not see this cuBLAS's writes (Hopper
    kernels may store through the tensor memory accelerator), and its reports on our kernels'
    reads of a Gram are the same false positive; if it reports none here, they are real."""
    for case in CASES + CUDA_CASES:
        visual = make(case, device, 0)[0]
        gram = torch.bmm(visual, visual.mT, out_dtype=torch.float32) if visual.dtype != torch.float32 \
            else torch.bmm(visual, visual.mT)
        total = float(gram.sum())  # every element, the diagonal our kernels read first among them
        progress(f"cublas control: Gram of {tuple(visual.shape)} {visual.dtype} read back ({total:.3g})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("triton", "cuda"), required=True)
    parser.add_argument("--cublas-control", action="store_true",
                        help="only the cuBLAS Gram read back by PyTorch (initcheck's control for cuda)")
    parser.add_argument("--greedy", choices=("block",), default="",
                        help="every cuda case on the block kernel: racecheck's verdict on all of our kernels but "
                             "the cluster one, whose chain polls shared memory that other CTAs store into")
    args = parser.parse_args(argv)
    if args.cublas_control:
        cublas_control(hb.require_cuda("bench.sanitize"), progress=lambda line: print(line, flush=True))
        return 0
    count = run(args.backend, hb.require_cuda("bench.sanitize"), progress=lambda line: print(line, flush=True),
                greedy=args.greedy)
    kernel = " (greedy: the block kernel)" if args.greedy else ""
    print(f"bench.sanitize: {count} cases on {args.backend}{kernel}, every selection valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

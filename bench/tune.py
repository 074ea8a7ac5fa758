"""Triton plan variants and the cuda greedy kernels at the LLaVA-1.5 shapes, timed side by side.

    python -m bench.tune --out tune.json       # on a GPU; bench/run_gpu.sh runs it right after its checks

The Gram tiles' feature chunk and pipeline depth (``block_d``, ``num_stages_tile``: the K step
of every tile's dot and how many steps' copies are in flight) set the bytes a tile has in flight,
which bound its K loop; the tile edge sets how many SMs hold a tile and how much of each operand
load is reused (bench/GPU-NOTES.md). ``block_rows`` and
``block_d_stats`` shape the statistics launch: tokens a CTA and the chunk each of its dependent
load steps takes. Each variant is
``dataclasses.replace`` of the default plan, timed with CUDA events, and checked against the
default's picks: a different chunk sums each dot in another order, so picks may differ only
where two candidates tie to within fp32 rounding (reported, never silently accepted).

The cuda backend's two greedy kernels (``ZSPA_CUDA_GREEDY``: ``block``, greedy_select.cuh, one
CTA a row reading Gram rows from L2; ``cluster``, greedy_cluster.cuh, the Gram on chip over a
thread-block cluster) and what ``auto`` chooses, at B = 1, 32 and 64: the two kernels read the
same Gram entries in the same expression, so their picks must be identical; B = 64 tests the
launcher's rule that many rows favour one CTA a row. Then the Gram whole or split
(``ZSPA_CUDA_GRAM``: ``full``, ``split``, and at B = 1 ``splitk``, the whole Gram summed over
four slices of D), whose picks may differ from the whole Gram's only at near-ties (other GEMMs
sum its entries); auto splits at B = 32 on the cluster
kernel, not at B = 1, nor on the block kernel (B = 64, video; at video size the cluster kernel
does not apply: its failure is recorded), where forced splits show what the rule leaves out.

Then what a per-token prompt (the hooks' form) costs over a pooled one, on both backends, and
what the cuda backend's repair of tokens outside its raw band costs (none, one in 64, all
of them) at LLaVA-1.5 B=1. Last, the cuBLAS Gram GEMMs alone (bf16 in, fp32 out, as the cuda
launcher calls them): the whole Gram, the split the launcher uses (top rows and bottom-right
block, 3/4 of the work), and a staircase of four row blocks each against the columns from its
own start on (10/16 of the work, in four GEMMs whose row counts tile worse): whether more steps
would pay at B = 32 and 64, before any kernel reads a staircase. At B = 1 also the whole Gram
split along D into 2, 4 or 8 slices (one batched GEMM, then the sum of the partial Grams):
whether more CTAs with shorter K loops beat cuBLAS's own choice for the latency-bound GEMM
that is the largest part of the B = 1 call (bench/GPU-NOTES.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from zspa_kernels import benchmark as hb
from zspa_kernels.dispatch import available_backends
from zspa_kernels.spec import CUDA_GRAM_ENV, CUDA_GREEDY_ENV, cuda_greedy

SHAPES = ("llava-1.5", "llava-1.5-b32")
KEEP = 64
# The statistics launch (since the first H200 run, 2026-11-30): the default takes 8 tokens a CTA
# in 512-wide chunks (72 CTAs, 16 chunk steps at LLaVA-1.5, pipelined 3 deep); the plan of that
# run (32 tokens, 128 wide: 18 CTAs, 64 steps) is timed beside it.
# The Gram tiles' K loop (default since 2026-11-30: 64-wide chunks, 5 stages, 64 KB of copies in
# flight; plan.py says why): run 1's 32-wide chunks with 3 stages, and 128-wide with 3 (the same
# bytes in flight as the default in half the steps, at 244-252 registers). Tile edges (sm_90, as
# a launch specialises them, Triton 3.6: python -m zspa_kernels.triton.aot, no spills): 128,
# twice the operand reuse of 64 (247 registers, 160 KB of shared memory), fewer and denser tiles
# for the Gram-bound batch, at the price of a partial last tile at N = 576; 32 (warp-level MMA,
# 64 registers): at B = 1 the 45 upper 64-wide tiles each pull 1 MiB of operands from L2 into one
# SM, on 45 of 132 SMs; 171 upper 32-wide tiles pull half that each, on every SM, for twice the
# L2 traffic in all. Last, run 1's statistics plan. Each variant compiles anew on the GPU (a few
# seconds): the list is kept to what decides a default, within the stage's minute.
VARIANTS = ({}, {"block_d": 32, "num_stages_tile": 3}, {"block_d": 128, "num_stages_tile": 3},
            {"block_tile": 128}, {"block_tile": 32}, {"block_rows": 32, "block_d_stats": 128})
CUDA_SHAPES = SHAPES + ("llava-1.5-b64", "video")


def run(device: torch.device, shapes=None, progress=print) -> list[dict]:
    """One record per shape and variant (``shapes``: ``benchmark.Shape`` objects, default the
    LLaVA-1.5 ones)."""
    from zspa_kernels.triton import launch_plan, select_tokens_triton

    if shapes is None:
        shapes = [s for s in hb.SPEC_SHAPES if s.label in SHAPES]
    records = []
    for shape in shapes:
        label = shape.label
        visual, prompt = hb.make_inputs(shape, torch.bfloat16, device)
        default = launch_plan(shape.B, shape.N, shape.D, torch.bfloat16, KEEP, hb.CORE_RATIO, False)
        expected = None
        for overrides in VARIANTS:
            plan = dataclasses.replace(default, **overrides)
            if "block_tile" in overrides:  # the tile grid follows the tile
                plan = dataclasses.replace(plan, tiles=-(-shape.N // plan.block_tile))

            def call(plan=plan):
                return select_tokens_triton(visual, prompt, KEEP, hb.CORE_RATIO, None, None, "mean", True, plan=plan)

            record = {"shape": label, "B": shape.B, "N": shape.N, "D": shape.D, "k": KEEP,
                      "variant": overrides or "default"}
            try:  # a variant Triton cannot compile here (OutOfResources: a TritonError) leaves the others timed
                order = call()
                hb.synchronize(device)
                record["median_us"] = hb.median_us(call, device)
            except Exception as exc:
                record["error"] = hb.first_line(exc)
                records.append(record)
                progress(f"{label:<15}{json.dumps(record['variant']):<20} failed: {record['error']}")
                continue
            if not overrides:  # the default plan: what every variant's picks are compared with
                expected = order
            same = ""
            if expected is not None:  # none where the default itself failed
                record["rows_with_default_picks"] = int((order == expected).all(1).sum())
                same = f"   picks as default in {record['rows_with_default_picks']}/{shape.B} rows"
            records.append(record)
            progress(f"{label:<15}{json.dumps(record['variant']):<20}{record['median_us']:>10.1f} µs{same}")
    return records


def _shape(label: str) -> hb.Shape:
    if label == "llava-1.5-b64":
        return hb.Shape(label, 64, 576, 4096)
    return next(s for s in hb.SPEC_SHAPES if s.label == label)


def run_cuda_paths(device: torch.device, progress=print) -> list[dict]:
    """One record per shape and cuda path (``ZSPA_CUDA_GREEDY``, ``ZSPA_CUDA_GRAM``; the other
    one ``auto``); picks compared with the first's (block greedy kernel). Where the environment
    already says ``ZSPA_CUDA_GREEDY=block`` (bench/run_gpu.sh, when bench/smoke.py found the
    cluster kernel failing): the block kernel only, with the whole and the split Gram."""
    if "cuda" not in hb.backends_here(device):
        progress("cuda paths: the cuda backend is not available here")
        return []
    op = torch.ops.zspa.select_tokens
    if cuda_greedy() == "block":
        progress("cuda paths: the block kernel only (ZSPA_CUDA_GREEDY=block)")
        variants = [{CUDA_GREEDY_ENV: "block"}, {CUDA_GREEDY_ENV: "block", CUDA_GRAM_ENV: "split"}]
    else:
        variants = [{CUDA_GREEDY_ENV: "block"}, {CUDA_GREEDY_ENV: "cluster"}, {CUDA_GREEDY_ENV: "auto"},
                    {CUDA_GRAM_ENV: "full"}, {CUDA_GRAM_ENV: "split"}, {CUDA_GRAM_ENV: "splitk"}]
    records = []
    for label in CUDA_SHAPES:
        shape = _shape(label)
        visual, prompt = hb.make_inputs(shape, torch.bfloat16, device)
        expected = None
        for variant in variants:
            if variant.get(CUDA_GRAM_ENV) == "splitk" and shape.B > 1:
                continue  # a row at a time: meant for one image, where one GEMM leaves most SMs idle
            record = {"shape": label, "B": shape.B, "N": shape.N, "D": shape.D, "k": KEEP,
                      "variant": {name.removeprefix("ZSPA_CUDA_").lower(): value for name, value in variant.items()}}

            def call():
                return op(visual, prompt, KEEP, hb.CORE_RATIO, None, None, "mean", "cuda", True)

            with hb.env_vars({CUDA_GREEDY_ENV: "auto", CUDA_GRAM_ENV: "auto", **variant}):
                try:  # synchronised inside: a kernel's fault surfaces at the next sync, and belongs here
                    order = call()
                    hb.synchronize(device)
                    record["median_us"] = hb.median_us(call, device)
                except RuntimeError as exc:  # recorded, so that one failing path leaves the others timed
                    record["error"] = hb.first_line(exc)
                    records.append(record)
                    progress(f"{label:<15}{json.dumps(record['variant']):<28} failed: {record['error']}")
                    continue
            expected = order if expected is None else expected
            record["rows_with_default_picks"] = int((order == expected).all(1).sum())
            records.append(record)
            progress(f"{label:<15}{json.dumps(record['variant']):<28}{record['median_us']:>10.1f} µs"
                     f"   picks as block in {record['rows_with_default_picks']}/{shape.B} rows")
    return records


# "mean" with the prompt as one pooled vector (what the microbenchmarks pass) or as the text's
# tokens with a mask (what the transformers hooks pass): 32 tokens, a chat prompt, and 256.
PROMPT_ROWS = (None, 32, 256)


def run_prompt_forms(device: torch.device, shape=None, progress=print) -> list[dict]:
    """One record per backend and prompt form at LLaVA-1.5 B=1 (``shape`` overrides it): what a
    per-token prompt costs over a pooled one. Triton pools it in a launch of its own
    (``token_stats.pool_prompt``), cuda in ``prompt_stats``; before 2026-11-30 every Triton
    statistics CTA pooled all ``T`` rows itself, ⌈T/8⌉ L2 round trips a feature chunk."""
    shape = shape or _shape("llava-1.5")
    visual, pooled = hb.make_inputs(shape, torch.bfloat16, device)
    g = torch.Generator().manual_seed(3)
    op = torch.ops.zspa.select_tokens
    records = []
    # On a GPU what the run times (ZSPA_BENCH_SKIP honoured); on a CPU (the tests) the interpreter too.
    here = hb.backends_here(device) if device.type == "cuda" else available_backends(device)
    for backend in [b for b in ("triton", "cuda") if b in here]:
        for rows in PROMPT_ROWS:
            if rows is None:
                prompt, mask = pooled, None
            else:
                prompt = torch.randn(shape.B, rows, shape.D, generator=g).to(torch.bfloat16).to(device)
                mask = (torch.arange(rows) < rows - 3).expand(shape.B, rows).to(device)  # padded text

            def call(prompt=prompt, mask=mask, backend=backend):
                return op(visual, prompt, KEEP, hb.CORE_RATIO, None, mask, "mean", backend, True)

            record = {"shape": shape.label, "B": shape.B, "N": shape.N, "D": shape.D, "k": KEEP, "backend": backend,
                      "prompt_rows": rows or "pooled", "median_us": hb.median_us(call, device)}
            records.append(record)
            progress(f"{shape.label:<15}{backend:<8}prompt {str(record['prompt_rows']):<8}"
                     f"{record['median_us']:>10.1f} µs")
    return records


# Tokens outside the cuda backend's raw band (csrc/gram_repair.cuh: largest |x| in [2^-33, 2^48)
# stays unscaled): none, one in 64, all of them (x 1e15), at LLaVA-1.5 B=1: what the repair costs.
OUTSIDE_FRACTIONS = {"none": 0, "1/64": 64, "all": 1}


def run_outside_band(device: torch.device, progress=print) -> list[dict]:
    """One record per fraction of tokens outside the raw band (cuda backend, auto paths)."""
    if "cuda" not in hb.backends_here(device):
        return []
    shape = _shape("llava-1.5")
    base, prompt = hb.make_inputs(shape, torch.bfloat16, device)
    op = torch.ops.zspa.select_tokens
    records = []
    for label, every in OUTSIDE_FRACTIONS.items():
        visual = base.clone()
        if every:
            visual[:, ::every] *= 1e15

        def call(visual=visual):
            return op(visual, prompt, KEEP, hb.CORE_RATIO, None, None, "mean", "cuda", True)

        record = {"shape": shape.label, "B": shape.B, "N": shape.N, "D": shape.D, "k": KEEP,
                  "outside_band": label, "median_us": hb.median_us(call, device)}
        records.append(record)
        progress(f"{shape.label:<15}outside the raw band: {label:<6}{record['median_us']:>10.1f} µs")
    return records


GRAM_FORMS = {"whole": 1, "split": 2, "staircase4": 4}  # row blocks of the Gram's upper part
GRAM_SHAPES = ("llava-1.5", "llava-1.5-b32", "llava-1.5-b64")
GRAM_SPLIT_K = (2, 4, 8)  # B = 1 only: D cut into this many slices, one batched GEMM, then their sum


def run_gram_forms(device: torch.device, shapes=None, progress=print) -> list[dict]:
    """One record per shape and Gram form: the GEMMs' CUDA-event median and their share of the
    whole Gram's multiply-adds."""
    if shapes is None:
        shapes = [_shape(label) for label in GRAM_SHAPES]
    records = []
    for shape in shapes:
        visual, _ = hb.make_inputs(shape, torch.bfloat16, device)
        for form, steps in GRAM_FORMS.items():
            blocks = hb.gram_blocks(shape.N, steps)

            def call(blocks=blocks):
                return hb.gram_gemms(visual, blocks)

            share = sum((stop - start) * (shape.N - start) for start, stop in blocks) / shape.N ** 2
            record = {"shape": shape.label, "B": shape.B, "N": shape.N, "D": shape.D, "gram_form": form,
                      "gemms": len(blocks), "work_share": round(share, 4), "median_us": hb.median_us(call, device)}
            records.append(record)
            progress(f"{shape.label:<15}Gram {form:<12}{len(blocks)} GEMM(s), {share:6.1%} of the work"
                     f"{record['median_us']:>10.1f} µs")
        for slices in GRAM_SPLIT_K if shape.B == 1 else ():
            form = f"splitk{slices}"
            record = {"shape": shape.label, "B": shape.B, "N": shape.N, "D": shape.D, "gram_form": form,
                      "gemms": 1, "work_share": 1.0,
                      "median_us": hb.median_us(lambda slices=slices: hb.sliced_gram(visual, slices), device)}
            records.append(record)
            progress(f"{shape.label:<15}Gram {form:<12}1 batched GEMM of {slices} D-slices + their sum"
                     f"{record['median_us']:>10.1f} µs")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the records as JSON here")
    args = parser.parse_args(argv)
    device = hb.require_cuda("bench.tune")
    progress = lambda line: print(line, flush=True)  # noqa: E731
    records = []
    # Saved after every section: run_gpu.sh gives tune a minute, and a cut must keep what finished.
    # A section that fails (a kernel trapped, say, which also leaves this process's CUDA context
    # unusable) is reported and the next one tried: the records of the others are kept.
    failed = 0
    for section in (run_cuda_paths, run, run_prompt_forms, run_outside_band, run_gram_forms):  # last: cut first
        try:
            records += section(device, progress=progress)
        except Exception as exc:  # RuntimeError, and Triton's compile errors (OutOfResources...: TritonError)
            failed += 1
            progress(f"bench.tune: {section.__name__} failed: {hb.first_line(exc)}")
        if args.out:
            hb.save_records(args.out, device, records)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

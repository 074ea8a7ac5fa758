"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU.

``python -m zspa_kernels.triton.aot [--arch 90]`` runs the backend's own entry point
(:func:`.select.select_tokens_triton`) on meta tensors of every variant below, captures
each kernel launch instead of running it, and compiles it down to a cubin (Triton's
bundled ``ptxas``) with the specialisation that launch would get on a GPU: Triton's own
argument binder decides, as at run time, which integers become constants (a unit stride)
and which pointers and integers are known multiples of 16. It prints each kernel's
registers and spill bytes (``ptxas -v``), shared memory, and what its loops became:
``cp_async`` counts the asynchronous copies in the PTX (a software-pipelined load loop
has them; a loop of plain loads waits for each one), ``wgmma`` the Hopper tensor-core
instructions and ``mma_sync`` the warp-level ones (tiles under 64 rows). This is what the
CPU interpreter cannot check: that the kernels type-check and lower for real hardware,
that the block sizes of :func:`.plan.launch_plan` do not spill, and that a dot loop is
pipelined. ``--json`` prints one JSON record per kernel.

Without the runtime's specialisation (every stride a 32-bit unknown, as before
2026-11-30) no load can be vectorised, so no loop is pipelined and the register counts
are those of a kernel that never runs.

Needs real compilation, so ``TRITON_INTERPRET`` must be unset (or 0).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

try:  # the launch binder of Triton's JIT (3.6 and 3.8 alike); not a public API
    from triton.runtime.jit import create_function_from_signature
except ImportError as exc:  # pragma: no cover - depends on the installed Triton
    raise ImportError(f"zspa_kernels.triton.aot compiles kernels through Triton's own launch binder "
                      f"(triton.runtime.jit.create_function_from_signature), which triton {triton.__version__} "
                      f"does not have") from exc

from ..spec import triton_interpreter
from .gram_select import _gram_select_kernel
from .plan import launch_plan
from .select import select_tokens_triton
from .token_stats import _pool_prompt_kernel, _token_stats_kernel

TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
KERNELS = {"pool_prompt": _pool_prompt_kernel, "token_stats": _token_stats_kernel, "gram_select": _gram_select_kernel}
PROMPT_ROWS = 24  # a prompt's tokens: neither 1 nor a multiple of 16, so no shape-only constant

# (B, N, D, dtype, k, alpha, lengths, relevance, pick_order): the SPEC §7 shapes on both paths;
# the "max" variants also take a prompt mask, so every constexpr branch is compiled once.
VARIANTS = (
    (1, 576, 4096, torch.bfloat16, 64, 0.5, False, "mean", False),
    (32, 576, 4096, torch.float16, 64, 0.0, True, "max", True),
    (1, 16384, 3584, torch.bfloat16, 1638, 0.5, False, "mean", False),
    (8, 16384, 3584, torch.float32, 1638, 0.0, True, "max", True),
)


@contextlib.contextmanager
def captured_launches():
    """Within: ``kernel[grid](...)`` of this backend's kernels records ``(name, kernel, args,
    kwargs)`` in the yielded list and launches nothing (an instance attribute shadows
    ``JITFunction.run``, which ``kernel[grid]`` calls)."""
    calls = []

    def recorder(name, kernel):
        def run(*args, grid, warmup, **kwargs):
            calls.append((name, kernel, args, kwargs))
        return run

    for name, kernel in KERNELS.items():
        kernel.run = recorder(name, kernel)
    try:
        yield calls
    finally:
        for kernel in KERNELS.values():
            del kernel.run


def variant_launches(B, N, D, dtype, k, alpha, has_lengths, relevance, pick_order, arch=90):
    """The launches of one call of the backend on meta tensors of this variant's shapes, with
    the plan a GPU of compute capability ``arch`` (e.g. 90) gets."""
    meta = dict(device="meta")
    visual = torch.empty(B, N, D, dtype=dtype, **meta)
    prompt = torch.empty(B, PROMPT_ROWS, D, dtype=dtype, **meta)
    lengths = torch.empty(B, dtype=torch.int64, **meta) if has_lengths else None
    mask = torch.empty(B, PROMPT_ROWS, dtype=torch.bool, **meta) if relevance == "max" else None
    plan = launch_plan(B, N, D, dtype, k, alpha, has_lengths, relevance, async_copies=arch >= 80)
    with captured_launches() as calls:
        select_tokens_triton(visual, prompt, k, alpha, lengths, mask, relevance, pick_order, plan=plan)
    return calls


def compile_launch(kernel, args, kwargs, target):
    """``kernel`` compiled for ``target`` as a launch with these arguments would compile it."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself assembles ``arch`` with: the one that matches the PTX version it
    emitted. Triton 3.9 takes its newer bundled ptxas (CUDA 13.x, PTX 9.x) from sm_90 on, where
    3.6-3.8 took it from sm_100; the older one rejects 3.9's sm_90 PTX ("Unsupported .version").
    Triton 3.5 (the oldest this module runs on: its kernels have ``_pack_args``) has one ptxas
    below sm_100 and asks for no architecture."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        return get_ptxas(arch).path
    except TypeError:  # Triton 3.5: get_ptxas()
        return get_ptxas().path


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes as ptxas reports them (``-v``) for this PTX."""
    tool = _ptxas(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([tool, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", src,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas -v gave no resource report:\n{text}")
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))


def compile_variant(B, N, D, dtype, k, alpha, has_lengths, relevance, pick_order, arch=90):
    """Compile every launch of one call; one record per launch (a kernel compiled once per call
    shape: batch groups of one call share their specialisation)."""
    target = GPUTarget("cuda", arch, 32)
    records, seen = [], set()
    for name, kernel, args, kwargs in variant_launches(B, N, D, dtype, k, alpha, has_lengths, relevance, pick_order,
                                                       arch):
        compiled = compile_launch(kernel, args, kwargs, target)
        if compiled.hash in seen:
            continue
        seen.add(compiled.hash)
        ptx = compiled.asm["ptx"]
        records.append(dict(kernel=name, arch=f"sm_{arch}", shape=[B, N, D], dtype=TYPE_NAMES[dtype],
                            relevance=relevance, num_warps=compiled.metadata.num_warps,
                            num_stages=compiled.metadata.num_stages, shared_bytes=compiled.metadata.shared,
                            cp_async=len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
                            wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                            mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)),
                            **_ptxas_report(ptx, arch)))
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The targets this project compiles for (another one may abort inside LLVM, not in Python).
    parser.add_argument("--arch", type=int, default=90, choices=(75, 80, 90, 100),
                        help="compute capability: 90 for H100/H200 (default), 80 A100, 75 T4, 100 B200")
    parser.add_argument("--json", action="store_true", help="one JSON record per kernel")
    parser.add_argument("--variant", type=int, action="append",
                        help=f"index into VARIANTS, 0 to {len(VARIANTS) - 1} (default: all)")
    args = parser.parse_args(argv)
    if triton_interpreter():
        parser.error("TRITON_INTERPRET=1 replaces compilation by the interpreter: unset it")
    for index in args.variant or ():
        if not 0 <= index < len(VARIANTS):
            parser.error(f"--variant: expected an index in [0, {len(VARIANTS) - 1}], got {index}")
    for index in args.variant or range(len(VARIANTS)):
        for record in compile_variant(*VARIANTS[index], arch=args.arch):
            print(json.dumps(record) if args.json else
                  " ".join(f"{key}={value}" for key, value in record.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

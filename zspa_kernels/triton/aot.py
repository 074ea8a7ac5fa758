"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU.

``python -m zspa_kernels.triton.aot [--arch 90]`` builds both launches of every plan
variant below down to a cubin (Triton's bundled ``ptxas``) and prints each kernel's
registers and spill bytes (``ptxas -v``) and shared memory. This is what the CPU
interpreter cannot check: that the kernels type-check and lower for real hardware, and
that the block sizes of :func:`.plan.launch_plan` do not spill. ``--json`` prints one JSON record per kernel.

Needs real compilation, so ``TRITON_INTERPRET`` must be unset (or 0).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..spec import triton_interpreter
from .gram_select import FP_FUSION, _gram_select_kernel
from .plan import launch_plan
from .token_stats import _token_stats_kernel

TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# (B, N, D, dtype, k, alpha, lengths, relevance, pick_order): the SPEC §7 shapes on both paths;
# the "max" variants also take a prompt mask, so every constexpr branch is compiled once.
VARIANTS = (
    (1, 576, 4096, torch.bfloat16, 64, 0.5, False, "mean", False),
    (32, 576, 4096, torch.float16, 64, 0.0, True, "max", True),
    (1, 16384, 3584, torch.bfloat16, 1638, 0.5, False, "mean", False),
    (8, 16384, 3584, torch.float32, 1638, 0.0, True, "max", True),
)


def _signature(fn, pointer_types, constexprs, scalar_types=None):
    scalar_types = scalar_types or {}
    return {name: "constexpr" if name in constexprs else pointer_types.get(name, scalar_types.get(name, "i32"))
            for name in fn.arg_names}


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes as ptxas reports them (``-v``) for this PTX."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([tool, f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}", "-v", src,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas -v gave no resource report:\n{text}")
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))


def compile_variant(B, N, D, dtype, k, alpha, has_lengths, relevance, pick_order, arch=90):
    """Compile both kernels of one call's plan; one record per kernel."""
    plan = launch_plan(B, N, D, dtype, k, alpha, has_lengths, relevance)
    t = TYPE_NAMES[dtype]
    target = GPUTarget("cuda", arch, 32)
    stats_consts = dict(MAX_RELEVANCE=relevance == "max", HAS_MASK=relevance == "max", HAS_LENGTHS=has_lengths,
                        DOT_PRECISION=plan.dot_precision, DOT_UPCAST=False, SCALE_OPERANDS=plan.scale_operands,
                        BLOCK_R=plan.block_rows,
                        BLOCK_T=plan.block_prompt, BLOCK_D=plan.block_d_stats)
    stats_ptrs = dict(visual_ptr=f"*{t}", prompt_ptr=f"*{t}", mask_ptr="*u8", lengths_ptr="*i64",
                      norm_ptr="*fp32", scale_ptr="*fp32", finite_ptr="*i8", key_ptr="*i64", counter_ptr="*i32")
    select_consts = dict(STORE_GRAM=plan.path == "gram", NEED_ISO=plan.need_isolation, PICK_ORDER=pick_order,
                         HAS_LENGTHS=has_lengths, DOT_PRECISION=plan.dot_precision, DOT_UPCAST=False,
                         SCALE_OPERANDS=plan.scale_operands,
                         BLOCK_G=plan.block_tile, BLOCK_D=plan.block_d, BLOCK_S=plan.block_select,
                         CORE_BLOCK=plan.core_block)
    select_ptrs = dict(visual_ptr=f"*{t}", lengths_ptr="*i64", norm_ptr="*fp32", scale_ptr="*fp32", finite_ptr="*i8",
                       key_ptr="*i64",
                       counter_ptr="*i32", gram_ptr="*fp32", iso_ptr="*fp32", rank_ptr="*i32", state_ptr="*fp32",
                       order_ptr="*i64", out_ptr="*i64")
    records = []
    for name, fn, ptrs, consts, options in (
        ("token_stats", _token_stats_kernel, stats_ptrs, stats_consts, dict(num_warps=plan.num_warps_stats)),
        ("gram_select", _gram_select_kernel, select_ptrs, select_consts,
         dict(num_warps=plan.num_warps_tile, enable_fp_fusion=FP_FUSION)),
    ):
        source = ASTSource(fn, _signature(fn, ptrs, consts, dict.fromkeys(("alpha_hi", "alpha_mid", "alpha_lo"), "fp32")), consts)
        kernel = triton.compile(source, target=target, options=options)
        records.append(dict(kernel=name, arch=f"sm_{arch}", shape=[B, N, D], dtype=t, path=plan.path,
                            relevance=relevance, num_warps=options["num_warps"], shared_bytes=kernel.metadata.shared,
                            **_ptxas_report(kernel.asm["ptx"], arch)))
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--json", action="store_true", help="one JSON record per kernel")
    parser.add_argument("--variant", type=int, action="append", help="index into VARIANTS (default: all)")
    args = parser.parse_args(argv)
    if triton_interpreter():
        parser.error("TRITON_INTERPRET=1 replaces compilation by the interpreter: unset it")
    for index in args.variant or range(len(VARIANTS)):
        for record in compile_variant(*VARIANTS[index], arch=args.arch):
            print(json.dumps(record) if args.json else
                  " ".join(f"{key}={value}" for key, value in record.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

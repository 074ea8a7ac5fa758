"""The ``zspa`` console command."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return "not installed"


def cmd_info(_args: argparse.Namespace) -> int:
    import torch

    import zspa_kernels
    from zspa_kernels import builder
    from zspa_kernels.dispatch import auto_table, available_backends, env_backend_problem, resolve_backend

    print(f"zspa-kernels  {zspa_kernels.__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton        {_version('triton')}")
    print(f"transformers  {_version('transformers')}")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        cap = torch.cuda.get_device_capability()
        print(f"device        {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        device = torch.device("cpu")
        print("device        cpu (no CUDA device visible)")
    available = available_backends(device)
    triton_ok = "triton" in available
    print("backends:")
    print("  reference   available")
    print(f"  cpu         {builder.status(builder.CPU_EXTENSION)}{'' if 'cpu' in available else '; runs on CPU tensors only'}")
    print(f"  triton      {'available' if triton_ok else 'needs triton and a CUDA device (or TRITON_INTERPRET=1)'}")
    print(f"  cuda        {builder.status(builder.CUDA_EXTENSION)}{'' if 'cuda' in available else '; runs on CUDA devices only'}")
    if problem := env_backend_problem(device):  # a bad ZSPA_BACKEND: the very setting this command is asked about
        print(f"  auto        -> refused: {problem}")
    else:
        print(f"  auto        -> {resolve_backend('auto', device)} on {device.type}")
    table = auto_table()
    print(f"  auto table  {'none: triton on every CUDA shape' if table is None else 'per shape on CUDA, measured by ' + table['source']}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    import torch

    from zspa_kernels import builder

    try:
        if args.cmake_args:
            print(" ".join(builder.cmake_args()))  # unquoted: meant for $(zspa build --cmake-args)
            return 0
        path = builder.build(builder.CUDA_EXTENSION, force=args.force)
        torch.ops.load_library(str(path))
    except (builder.CudaToolkitMissing, builder.BuildFailed, OSError) as exc:
        print(f"zspa build: cannot build the CUDA extension: {exc}", file=sys.stderr)
        return 1
    if not torch._C._dispatch_has_kernel_for_dispatch_key("zspa::select_tokens_cuda", "CUDA"):
        print(f"zspa build: {path} loaded but registered no CUDA kernel for zspa::select_tokens_cuda",
              file=sys.stderr)
        return 1
    print(f"zspa build: zspa::select_tokens_cuda ready ({path})")
    return 0


def _env_backend_problem() -> str | None:
    import torch

    from zspa_kernels.dispatch import env_backend_problem

    return env_backend_problem(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def cmd_demo(args: argparse.Namespace) -> int:
    from zspa_kernels.arguments import checkpoint_problem, out_problem
    from zspa_kernels.spec import as_keep

    try:
        if args.model is not None and (problem := checkpoint_problem(args.model)):
            raise ValueError(f"model: {problem}")
        as_keep(args.keep)
        if problem := out_problem(args.out):
            raise ValueError(f"out: {problem}")
    except ValueError as exc:
        print(f"zspa demo: --{exc}", file=sys.stderr)
        return 2
    if problem := _env_backend_problem():
        print(f"zspa demo: {problem}", file=sys.stderr)
        return 2
    from zspa_kernels.demo import run

    return run(args.out, model_path=args.model, keep=args.keep, size=args.size)


def cmd_fidelity(args: argparse.Namespace) -> int:
    from zspa_kernels.fidelity.command import run

    return run(args.out, model_path=args.model, data=args.data, question=args.question, keeps=args.keep,
               core_ratios=args.core_ratio, new_tokens=args.new_tokens, batch_size=args.batch_size,
               backend=args.backend)


def cmd_bench(args: argparse.Namespace) -> int:
    from zspa_kernels.arguments import parse_keep
    from zspa_kernels.benchmark import SPEC_SHAPES

    labels = [s.label for s in SPEC_SHAPES]
    try:
        keep = parse_keep(args.keep)
        if args.shape not in labels:
            raise ValueError(f"shape: expected one of {', '.join(labels)}, got {args.shape!r}")
    except ValueError as exc:
        print(f"zspa bench: --{exc}", file=sys.stderr)
        return 2
    if problem := _env_backend_problem():
        print(f"zspa bench: {problem}", file=sys.stderr)
        return 2
    from zspa_kernels.benchmark import quick

    return quick(args.shape, keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zspa", description="ZSPAPrune visual-token pruning kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and available backends").set_defaults(func=cmd_info)
    build = sub.add_parser("build", help="compile the CUDA extension ahead of first use")
    build.add_argument("--force", action="store_true", help="recompile even if the cache is up to date")
    build.add_argument("--cmake-args", action="store_true",
                       help="print the -D options for a CMake build of csrc/ instead")
    build.set_defaults(func=cmd_build)
    demo = sub.add_parser("demo", help="prune a VLM on a sample photo (default: a random-weight LLaVA "
                          "architecture, no downloads)")
    demo.add_argument("--out", default="zspa-demo", help="output folder")
    demo.add_argument("--model", default=None,
                      help="a local checkpoint folder of any supported family instead (AutoModelForImageTextToText "
                           "+ AutoProcessor; prompted with its chat template, else LLaVA-1.5's prompt)")
    demo.add_argument("--keep", type=int, default=64, help="visual tokens kept of each image")
    demo.add_argument("--size", choices=("3b", "tiny"), default="3b",
                      help="3b: CLIP ViT-L/14-336 + a Llama-3.2-3B-sized LM (real proportions, about a minute "
                           "on 2 CPU cores); tiny: a toy of the same architecture (seconds, for tests)")
    demo.set_defaults(func=cmd_demo)
    fidelity = sub.add_parser("fidelity", help="measure what pruning changes on a model and data; "
                              "recommend keep and core ratio")
    fidelity.add_argument("--model", default=None,
                          help="a local checkpoint folder (any supported family); default: a small "
                               "random-weight LLaVA (no download, numbers meaningless for quality)")
    fidelity.add_argument("--data", default=None,
                          help='a JSON-lines file of {"image": PATH, "question": TEXT}, or a folder of '
                               "images (with --question); default: scikit-image photos")
    fidelity.add_argument("--question", default=None, help="the question asked of every image of a folder")
    fidelity.add_argument("--keep", default="32,64,128",
                          help="visual tokens kept per image: counts or fractions, comma-separated")
    fidelity.add_argument("--core-ratio", default="0,0.25,0.5,0.75,1", help="core ratios, comma-separated")
    fidelity.add_argument("--new-tokens", type=int, default=16, help="length of the greedy answers compared")
    fidelity.add_argument("--batch-size", type=int, default=4, help="samples per batch")
    fidelity.add_argument("--backend", default="auto", help="select_tokens backend")
    fidelity.add_argument("--out", default="zspa-fidelity",
                          help="output folder; a run found there is resumed")
    fidelity.set_defaults(func=cmd_fidelity)
    bench = sub.add_parser("bench", help="time select_tokens and the baselines on this device")
    bench.add_argument("--shape", default="llava-1.5",
                       help="a SPEC shape: llava-1.5, llava-1.5-b32, llava-next, qwen2.5-vl-hr or video")
    bench.add_argument("--keep", default="64", help="tokens kept (an int) or a share (e.g. 0.1)")
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

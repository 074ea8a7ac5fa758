"""Backend choice for ``zspa::select_tokens``.

Precedence: an explicit ``backend=`` keyword, else the ``ZSPA_BACKEND`` environment
variable (empty means unset), else the ``auto`` rule below. Every backend returns the
pick order (or the ascending kept indices when ``pick_order`` is false) as a
``(B, k)`` int64 tensor padded with ``-1``.

``auto`` rule: CPU tensors use ``cpu`` (the ``csrc/cpu`` kernels: the first call compiles them,
saying so in one line, and runs ``reference`` with one warning where they cannot be built;
``bench/results`` times them beside the baselines). CUDA tensors use ``triton``, except where
the measured table ``auto_cuda.json`` (beside this file; ``python -m bench.report --auto-table``
writes it from a GPU run's microbenchmarks, and it names that run) says ``cuda`` for the
measured case nearest the call's ``(B, N, k)`` (log scale): there ``cuda`` won by more than
the table's margin. ``cuda`` is chosen only where its extension is already built or loaded
(checked once per process), so ``auto`` never compiles in the hot path, and only for shapes
it takes (:func:`.spec.cuda_backend_takes`: a long video row past its shared memory goes to
``triton``, whatever the nearest case says). The committed table
comes from the H200 run of 2026-11-30 (its ``source``; ``zspa info`` prints it); without a
table CUDA tensors always use ``triton``. Tensors on any other device (MPS, XPU, ...) use ``reference``,
the one backend written in device-generic PyTorch.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib
from typing import Callable, Optional

import torch

from .spec import BACKEND_ENV, BACKENDS, backend_from_env, cuda_backend_takes, release, triton_interpreter


AUTO_TABLE = pathlib.Path(__file__).with_name("auto_cuda.json")


def resolve_backend(backend: str, device: torch.device, shape: Optional[tuple[int, int, int]] = None) -> str:
    """The backend that will run for ``backend`` on tensors living on ``device``; ``shape`` is
    the call's ``(B, N, k)``, which ``auto`` on CUDA looks up in the measured table."""
    # Where the choice came from, for the errors below: the keyword, or the environment under backend="auto".
    name = "backend"
    if backend == "auto":
        backend = backend_from_env()
        if backend != "auto":
            name = f"{BACKEND_ENV}={backend} (backend='auto')"
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type != "cuda":
            return "reference"
        if shape is None or auto_cuda_backend(*shape) == "triton":
            return "triton"
        return "cuda" if cuda_backend_takes(shape[0], shape[1], shared_memory_optin(device)) else "triton"
    if backend == "triton" and device.type != "cuda":
        if not triton_interpreter():
            raise ValueError(f"{name}: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}")
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"{name}: 'triton' on {device.type} tensors: {problem}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"{name}: 'cuda' needs CUDA tensors, got {device.type}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{name}: 'cpu' needs CPU tensors, got {device.type}")
    return backend


def env_backend_problem(device: torch.device) -> Optional[str]:
    """Why ``ZSPA_BACKEND`` would make ``auto`` refuse ``device`` (a name it does not know, a backend that
    device cannot run), or None: the commands that run the op ask here, to say so up front, not in a traceback."""
    try:
        resolve_backend("auto", device)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return None


def available_backends(device: torch.device) -> list[str]:
    """The backends that can run on ``device`` in this process (the one answer to that
    question: tests, benchmarks and ``zspa info`` all ask here). Triton counts on a CPU only
    under its interpreter, and only where that interpreter can run (:func:`interpreter_problem`);
    ``cuda`` counts wherever CUDA does (it falls back to Triton, with a warning, when no toolkit
    can build it)."""
    names = []
    for name in BACKENDS:
        if name == "triton" and (importlib.util.find_spec("triton") is None
                                 or (device.type != "cuda" and (not triton_interpreter() or interpreter_problem()))):
            continue
        if name == "cuda" and device.type != "cuda":
            continue
        if name == "cpu" and device.type != "cpu":
            continue
        names.append(name)
    return names


@functools.lru_cache(maxsize=None)
def auto_table() -> Optional[dict]:
    """The committed table (``AUTO_TABLE``): ``source`` (the GPU run it comes from), ``device``,
    ``margin`` and ``cases``, each ``{"B", "N", "k", "backend"}`` (plus the timings); None if absent."""
    if not AUTO_TABLE.is_file():
        return None
    table = json.loads(AUTO_TABLE.read_text())
    cases = table.get("cases") or []
    if not table.get("source") or not cases or any(
            not {"B", "N", "k", "backend"} <= set(c) or c["backend"] not in ("triton", "cuda") for c in cases):
        raise ValueError(f"{AUTO_TABLE.name}: expected 'source' and 'cases' of B, N, k and backend "
                         "('triton' or 'cuda'), as bench/report.py --auto-table writes it")
    return table


@functools.lru_cache(maxsize=None)
def _cuda_extension_ready() -> bool:
    """The cuda extension is loaded or built for this GPU (never builds; asked once per process)."""
    from . import builder

    ext = builder.CUDA_EXTENSION
    try:
        return (builder.is_loaded(ext) or builder.prebuilt_library(ext) is not None
                or builder.built_library(ext, ext.targets()) is not None)
    except Exception:  # noqa: BLE001 - no toolkit, no sources, odd arch list: not ready
        return False


@functools.lru_cache(maxsize=None)
def shared_memory_optin(device: torch.device) -> int:
    """Bytes of shared memory a block may opt in to on ``device`` (48 KiB, what every CUDA GPU
    gives without opting in, where this torch does not report it)."""
    properties = torch.cuda.get_device_properties(device)
    return getattr(properties, "shared_memory_per_block_optin", 48 * 1024)


@functools.lru_cache(maxsize=4096)
def auto_cuda_backend(B: int, N: int, k: int) -> str:
    """``auto`` on CUDA for a call of shape ``(B, N, k)``: the backend of the nearest measured
    case (log distance), ``cuda`` only where its extension is ready; ``triton`` without a table."""
    table = auto_table()
    if table is None:
        return "triton"

    def distance(case) -> float:
        return sum(math.log2(max(x, 1) / max(case[key], 1)) ** 2 for key, x in (("B", B), ("N", N), ("k", k)))

    nearest = min(table["cases"], key=distance)
    return "cuda" if nearest["backend"] == "cuda" and _cuda_extension_ready() else "triton"


@functools.lru_cache(maxsize=None)  # installed versions do not change under a running process
def interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run the kernels here, or None (found by running the
    Triton suite under each release):

    * before 3.4 (torch 2.4-2.7 bring 3.0-3.3) it cannot invert a boolean tensor (``~`` asks its
      builder for ``get_int1_ty``, which it lacks); compiled for a GPU, the same kernels build;
    * before 3.7 it turns a scalar kernel argument into a one-element array and reads it with
      ``int()`` (``range(0, T, BLOCK)``), which NumPy 2.4 made an error; 3.7 squeezes it first."""
    triton, numpy = release("triton"), release("numpy")
    if triton < (3, 4):
        return (f"the Triton interpreter (TRITON_INTERPRET=1) of triton {triton[0]}.{triton[1]} cannot run these "
                "kernels (no boolean inversion; it needs triton>=3.4); on GPUs this does not matter")
    if triton < (3, 7) and numpy >= (2, 4):
        return (f"the Triton interpreter (TRITON_INTERPRET=1) of triton {triton[0]}.{triton[1]} cannot run under "
                f"NumPy {numpy[0]}.{numpy[1]} (it needs triton>=3.7, or numpy<2.4); on GPUs this does not matter")
    return None


def backend_impl(name: str) -> Callable[..., torch.Tensor]:
    """Import a backend on first use, so that importing the package stays light. ``cuda``
    without a CUDA toolkit to build its extension falls back to ``triton``."""
    if name == "reference":
        from .reference import select_tokens_reference_op

        return select_tokens_reference_op
    if name == "cpu":
        from .cpu import select_tokens_cpu

        return select_tokens_cpu
    if name == "triton":
        from .triton import select_tokens_triton

        return select_tokens_triton
    from .cuda_ext import extension_available, select_tokens_cuda

    if not extension_available():  # no toolkit: warned once, Triton runs instead
        return backend_impl("triton")
    return select_tokens_cuda

"""Why an extension cannot be built."""


class CudaToolkitMissing(RuntimeError):
    """No usable nvcc/CUDA toolkit (or torch is a CPU-only build): a CUDA extension cannot be built."""


class BuildFailed(RuntimeError):
    """The tools are there but compiling the sources failed (or they are missing)."""

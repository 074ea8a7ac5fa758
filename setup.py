import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extension() -> dict:
    """With ZSPA_BUILD_EXT=1, compile csrc/ at install time (torch and nvcc must be importable
    and on hand: ``pip install --no-build-isolation``). Otherwise nothing is compiled here: the
    csrc/ sources ship inside the package and the first use (or ``zspa build``) compiles them."""
    if os.environ.get("ZSPA_BUILD_EXT", "0") != "1":
        return {}
    sys.path.insert(0, HERE)
    from torch.utils import cpp_extension

    from zspa_kernels.builder import CUDA_EXTENSION as CUDA, find_cuda_home, gencode_flags
    from zspa_kernels.builder.toolkit import library_headers

    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise SystemExit("ZSPA_BUILD_EXT=1: no CUDA toolkit found (set CUDA_HOME)")
    cpp_extension.CUDA_HOME = str(cuda_home)  # torch's guess can be a wrapper nvcc's folder (this process only)
    ext = cpp_extension.CUDAExtension(
        name=f"zspa_kernels._{CUDA.name}",
        sources=[os.path.relpath(path, HERE) for path in CUDA.source_files()],
        include_dirs=[str(CUDA.source_dir()), *library_headers(cuda_home)],
        extra_compile_args={"cxx": list(CUDA.cflags), "nvcc": [*CUDA.cuda_cflags, *gencode_flags(CUDA.targets())]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="zspa-kernels",
    version="0.1.0",
    description="Fused GPU kernels for ZSPAPrune prompt-aware visual-token pruning",
    # csrc/ is installed as zspa_kernels/csrc so that installed copies can compile on demand.
    packages=find_packages(include=["zspa_kernels", "zspa_kernels.*"]) + ["zspa_kernels.csrc"],
    package_dir={"zspa_kernels.csrc": "csrc"},
    package_data={"zspa_kernels.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp", "sources.txt", "cpu/*.cpp", "cpu/sources.txt"],
                  "zspa_kernels": ["auto_cuda.json"]},  # the measured auto table, once a GPU run wrote it
    python_requires=">=3.10",
    # ninja: the C++ kernels (csrc/cpu, what auto runs on CPU tensors; csrc/ for CUDA) build on first use.
    install_requires=["torch>=2.4", "numpy", "ninja"],
    extras_require={
        # torchvision, num2words: transformers' video processors, SmolVLM's processor (test_real_processors).
        # pytest-xdist: the README's test command runs the model tests on every core.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "transformers", "torchvision", "num2words", "peft", "accelerate",
                 "optimum-quanto", "hqq", "scikit-image", "matplotlib", "tqdm"],
        "hf": ["transformers"],
        "demo": ["transformers", "scikit-image", "matplotlib", "tqdm"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["zspa=zspa_kernels.cli:main"]},
    **cuda_extension(),
)

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

    from zspa_kernels import cuda_build

    cuda_home = cuda_build.find_cuda_home()
    if cuda_home is None:
        raise SystemExit("ZSPA_BUILD_EXT=1: no CUDA toolkit found (set CUDA_HOME)")
    cpp_extension.CUDA_HOME = str(cuda_home)  # torch's guess can be a wrapper nvcc's folder
    ext = cpp_extension.CUDAExtension(
        name=f"zspa_kernels._{cuda_build.EXTENSION_NAME}",
        sources=[os.path.relpath(path, HERE) for path in cuda_build.source_files()],
        include_dirs=[str(cuda_build.source_dir()), *cuda_build.nvidia_wheel_include_dirs()],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", *cuda_build.gencode_flags(cuda_build.arch_list())],
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="zspa-kernels",
    version="0.1.0",
    description="Fused GPU kernels for ZSPAPrune prompt-aware visual-token pruning",
    # csrc/ is installed as zspa_kernels/csrc so that installed copies can compile on demand.
    packages=find_packages(include=["zspa_kernels", "zspa_kernels.*"]) + ["zspa_kernels.csrc"],
    package_dir={"zspa_kernels.csrc": "csrc"},
    package_data={"zspa_kernels.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp", "sources.txt", "cpu/*.cpp"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "transformers", "scikit-image", "matplotlib", "ninja"],
        "hf": ["transformers"],
        "demo": ["transformers", "scikit-image", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "cuda": ["ninja"],
    },
    entry_points={"console_scripts": ["zspa=zspa_kernels.cli:main"]},
    **cuda_extension(),
)

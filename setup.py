from setuptools import find_packages, setup

setup(
    name="zspa-kernels",
    version="0.1.0",
    description="Fused GPU kernels for ZSPAPrune prompt-aware visual-token pruning",
    packages=find_packages(include=["zspa_kernels", "zspa_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "transformers", "scikit-image", "matplotlib"],
        "hf": ["transformers"],
        "demo": ["transformers", "scikit-image", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["zspa=zspa_kernels.cli:main"]},
)

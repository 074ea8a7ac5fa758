"""zspa-kernels: fused GPU kernels for ZSPAPrune visual-token pruning.

``import zspa_kernels`` registers ``torch.ops.zspa.select_tokens``.
"""
from . import op as _op  # noqa: F401  (registers the custom op)
from .api import select_tokens

__version__ = "0.1.0"
__all__ = ["select_tokens", "__version__"]

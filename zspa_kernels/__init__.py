"""zspa-kernels: fused GPU kernels for ZSPAPrune visual-token pruning.

``import zspa_kernels`` registers ``torch.ops.zspa.select_tokens``.
"""
from . import op as _op  # noqa: F401  (registers the custom op)
from .api import select_tokens
from .version import __version__

__all__ = ["select_tokens", "prune", "__version__"]


def __getattr__(name):
    # The transformers integration loads on first use: importing the package stays light.
    if name == "prune":
        from .integrations.transformers import prune

        return prune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

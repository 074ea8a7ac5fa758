"""Integrations of the ``zspa::select_tokens`` op into model libraries.

``transformers``: :func:`zspa_kernels.prune` installs forward hooks on a Hugging Face VLM.
"""

"""earlyexit: adaptive-depth (early-exit) inference for Hugging Face causal language models."""

from earlyexit.errors import EarlyExitError

__version__ = "0.1.0"

__all__ = ["EarlyExitError", "__version__"]

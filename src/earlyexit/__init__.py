"""earlyexit: adaptive-depth (early-exit) inference for Hugging Face causal language models.

The runtime is `earlyexit.api` (`EarlyExit`); its main names are importable from here too,
loaded on first use so that `import earlyexit` stays light (no torch).
"""

from typing import TYPE_CHECKING, Any

from earlyexit.errors import EarlyExitError

if TYPE_CHECKING:
    from earlyexit.api import Classification, EarlyExit, Generation, StreamChunk

__version__ = "0.1.0"

__all__ = [
    "Classification",
    "EarlyExit",
    "EarlyExitError",
    "Generation",
    "StreamChunk",
    "__version__",
]
_API = ("Classification", "EarlyExit", "Generation", "StreamChunk")  # from earlyexit.api


def __getattr__(name: str) -> Any:
    if name in _API:
        from earlyexit import api

        return getattr(api, name)
    raise AttributeError(f"module 'earlyexit' has no attribute {name!r}")

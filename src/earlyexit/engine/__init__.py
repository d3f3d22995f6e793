"""The layer-by-layer engine: run any span of decoder layers over any tokens, read out anywhere."""

from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.engine import LayerEngine

__all__ = ["LayerEngine", "LayerKVCache"]

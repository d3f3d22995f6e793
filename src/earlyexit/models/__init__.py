"""Model registry, fetching from the package registry, and loading."""

from earlyexit.models.load import LoadedModel, load_embedder, load_model
from earlyexit.models.registry import REGISTRY, ModelSpec, get_spec

__all__ = ["REGISTRY", "LoadedModel", "ModelSpec", "get_spec", "load_embedder", "load_model"]

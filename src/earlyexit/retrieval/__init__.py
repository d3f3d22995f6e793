"""Retrieval for RAEE: sentence embeddings and the exit database searched with FAISS."""

from earlyexit.retrieval.database import ExitDatabase, build_database
from earlyexit.retrieval.embedders import make_embedder

__all__ = ["ExitDatabase", "build_database", "make_embedder"]

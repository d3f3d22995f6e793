"""The OpenAI-compatible HTTP server (`earlyexit serve`): translation over `earlyexit.api`."""

from earlyexit.server.app import create_app, serve

__all__ = ["create_app", "serve"]

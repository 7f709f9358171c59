"""`gptoss-jax serve`: the OpenAI-compatible server (app), the engine thread (loop), request parsing
(protocol), reply building (present) and Prometheus metrics."""

from .app import ServerConfig, create_app
from .run import serve

__all__ = ["ServerConfig", "create_app", "serve"]

"""A resident attribution server (FastAPI + uvicorn) and its HTTP client.

The client is imported eagerly (httpx only); the server side loads FastAPI on first use.
"""

from attribindex.serve._client import Client

__all__ = ["Client", "ServerLimits", "create_app", "serve"]


def __getattr__(name: str):
    if name in ("ServerLimits", "create_app"):
        from attribindex.serve import _app

        return getattr(_app, name)
    if name == "serve":
        from attribindex.serve._run import serve

        return serve
    raise AttributeError(f"module 'attribindex.serve' has no attribute {name!r}")

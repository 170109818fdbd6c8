"""Starting the server: load the index and model once, then serve until SIGINT / SIGTERM."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from attribindex.query import AttributionIndex
from attribindex.serve._app import ServerLimits, create_app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_server(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token: str | None = None,
    model: str | None = None,
    device: str = "auto",
    limits: ServerLimits | None = None,
    search: str | None = None,
    milvus_token: str | None = None,
):
    """The uvicorn server `serve` runs, ready to run: the index and its model loaded once, the app made, what it
    serves announced on stderr. `serve` runs it in the foreground; a test may run it from a thread.

    Example:
        >>> create_server("demo-index", port=8000).run()  # doctest: +SKIP
    """
    import uvicorn

    index = AttributionIndex.open(index_dir, model=model, device=device, search=search, milvus_token=milvus_token)
    app = create_app(index, limits or ServerLimits(), token)
    where = f"http://{host}:{port}"
    print(
        f"serving {index_dir} ({index.index_id} v{index.version}, {index.rows:,} rows; {index.search_description}) "
        f"on {where}: "
        f"the explorer at {where}/, the API description at {where}/docs",
        file=sys.stderr,
        flush=True,
    )
    if not is_loopback(host) and token is None:
        print(f"warning: {host} is reachable from other machines and no --token is set.", file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    return uvicorn.Server(config)


def serve(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token: str | None = None,
    model: str | None = None,
    device: str = "auto",
    limits: ServerLimits | None = None,
    search: str | None = None,
    milvus_token: str | None = None,
) -> None:
    """Serve `index_dir` over HTTP until interrupted; in-flight requests finish on SIGTERM, new ones are refused.
    With `search`, candidates come from that Milvus collection (see `AttributionIndex.open`).

    Example:
        >>> serve("demo-index", port=8000, token="s3cret")  # doctest: +SKIP
    """
    server = create_server(
        index_dir,
        host,
        port,
        token=token,
        model=model,
        device=device,
        limits=limits,
        search=search,
        milvus_token=milvus_token,
    )
    server.run()

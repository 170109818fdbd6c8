"""Where a collection lives, how to log in, and Milvus's errors turned into one-line messages with the fix.

A target is written as a URI:
- ``milvus://HOST:PORT/COLLECTION`` — a Milvus server over gRPC (``milvus+https://`` for TLS, e.g. Zilliz Cloud);
- ``PATH.db`` or ``PATH.db#COLLECTION`` — a Milvus Lite database file, run in-process (collection ``attribindex``
  unless named).

Credentials never go in the URI (it is printed and logged): a token (``user:password`` or an API key) comes from
`--milvus-token` or ``MILVUS_TOKEN``, or a user and password from ``MILVUS_USER`` / ``MILVUS_PASSWORD``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from attribindex.errors import AttribIndexError

DEFAULT_COLLECTION = "attribindex"
CONNECT_TIMEOUT_S = 10.0
_COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")  # Milvus's rule for collection names
_SCHEMES = {"milvus": "http", "milvus+http": "http", "milvus+https": "https"}


@dataclass(frozen=True)
class MilvusTarget:
    """A parsed collection URI: the address pymilvus connects to and the collection's name.

    Example:
        >>> MilvusTarget.parse("milvus://10.0.0.5:19530/wiki_v2")
        MilvusTarget(uri='milvus://10.0.0.5:19530/wiki_v2', address='http://10.0.0.5:19530', collection='wiki_v2')
        >>> MilvusTarget.parse("attributions.db").collection
        'attribindex'
    """

    uri: str  # as the user wrote it
    address: str  # what MilvusClient takes: http(s)://host:port, or the path of a Milvus Lite file
    collection: str

    @property
    def local(self) -> bool:
        """True for a Milvus Lite file (run in this process), False for a server."""
        return not self.address.startswith(("http://", "https://"))

    @classmethod
    def parse(cls, uri: str) -> MilvusTarget:
        uri = str(uri)
        fix = (
            "Write milvus://HOST:PORT/COLLECTION for a Milvus server, or PATH.db (PATH.db#COLLECTION) for a Milvus Lite "
            "file."
        )
        path, _, fragment = uri.partition("#")
        if path.endswith(".db"):
            folder = Path(path).expanduser().resolve().parent
            if not folder.is_dir():
                raise AttribIndexError(
                    f"{uri}: the folder {folder} does not exist. Create it first, or {fix[0].lower()}{fix[1:]}"
                )
            return cls(uri, str(folder / Path(path).name), _collection_name(fragment or DEFAULT_COLLECTION, uri))
        parts = urlsplit(uri)
        if parts.scheme not in _SCHEMES or not parts.hostname:
            raise AttribIndexError(f"{uri!r} is not a Milvus collection URI. {fix}")
        if parts.username or parts.password:
            raise AttribIndexError(
                f"{uri}: credentials do not belong in the URI (it is printed and logged). Pass --milvus-token "
                f"user:password, or set MILVUS_TOKEN (or MILVUS_USER and MILVUS_PASSWORD)."
            )
        try:
            port = parts.port or 19530
        except ValueError:
            raise AttribIndexError(f"{uri}: the port is not a number. {fix}") from None
        name = parts.path.strip("/")
        if not name:
            raise AttribIndexError(f"{uri} names no collection. {fix}")
        return cls(uri, f"{_SCHEMES[parts.scheme]}://{parts.hostname}:{port}", _collection_name(name, uri))


def _collection_name(name: str, uri: str) -> str:
    if not _COLLECTION_NAME.match(name):
        raise AttribIndexError(
            f"{uri}: {name!r} is not a valid Milvus collection name. Use letters, digits and underscores, starting "
            f"with a letter or underscore."
        )
    return name


def credentials(token: str | None = None) -> dict[str, str]:
    """The login arguments for MilvusClient: `token`, else MILVUS_TOKEN, else MILVUS_USER / MILVUS_PASSWORD."""
    token = token or os.environ.get("MILVUS_TOKEN")
    if token:
        return {"token": token}
    user, password = os.environ.get("MILVUS_USER"), os.environ.get("MILVUS_PASSWORD")
    return {"user": user, "password": password or ""} if user else {}


def import_pymilvus():
    """pymilvus, or a message naming the extra that installs it."""
    try:
        import pymilvus
    except ImportError:
        raise AttribIndexError(
            "searching through Milvus needs pymilvus: pip install 'attribindex[milvus]' (a server), or "
            "'attribindex[milvus-lite]' (local .db files; CPU machines only, it brings faiss-cpu)."
        ) from None
    return pymilvus


def connect(target: MilvusTarget, token: str | None = None):
    """A MilvusClient for `target`, its failures turned into one-line messages."""
    pymilvus = import_pymilvus()
    if target.local:
        try:
            import milvus_lite  # noqa: F401  (pymilvus opens .db files through it)
        except ImportError:
            raise AttribIndexError(
                f"{target.uri} is a Milvus Lite file, which needs milvus-lite: pip install 'attribindex[milvus-lite]'. "
                f"On a machine with faiss-gpu, run a Milvus server instead (milvus-lite brings faiss-cpu)."
            ) from None
    # pymilvus and Milvus Lite log every failure with its traceback; it reaches the user once, as our message
    for name in ("pymilvus", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with milvus_errors(target):
        client = pymilvus.MilvusClient(uri=target.address, timeout=CONNECT_TIMEOUT_S, **credentials(token))
        client.list_collections()  # a server without authentication checks the login here, not at connect
    return client


def disconnect(client, target: MilvusTarget) -> None:
    """Close `client`; for a Milvus Lite file, also stop this process's Lite engine, which holds the file's lock
    (one process at a time may open a .db file)."""
    client.close()
    if target.local:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(target.address)


def _message(error: Exception) -> str:
    details = getattr(error, "details", None)
    text = getattr(error, "message", None) or (details() if callable(details) else None) or str(error)
    return " ".join(str(text).split())


@contextlib.contextmanager
def milvus_errors(target: MilvusTarget) -> Iterator[None]:
    """Turn a pymilvus or gRPC failure into an AttribIndexError that names the target and the fix."""
    pymilvus = import_pymilvus()
    import grpc

    try:
        yield
    except (pymilvus.MilvusException, grpc.RpcError) as error:
        raise AttribIndexError(f"{target.uri}: {describe_failure(error)}") from None


def describe_failure(error: Exception) -> str:
    """One line for a Milvus failure: what went wrong and what to do."""
    text = _message(error)
    chain = [error]  # pymilvus wraps a refused login in "Fail connecting …": the gRPC status is further down
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
        chain.append(cause)
    refused = [e for e in chain if callable(getattr(e, "code", None)) and "UNAUTHENTICATED" in str(e.code())]
    if refused or "auth" in text.lower():
        return (
            f"the server refused the login ({_message(refused[0]) if refused else text}). Pass the right "
            f"--milvus-token user:password (or API key), or set MILVUS_TOKEN."
        )
    if "Fail connecting" in text or "unavailable" in text.lower():
        return f"no Milvus server answers there ({text}). Start the server, or fix the host and port."
    if "not exist" in text and "dir" in text:
        return f"{text}. Create the folder first."
    if "Open local milvus failed" in text:
        return (
            "the Milvus Lite file could not be opened; another process probably has it open (Milvus Lite allows one "
            "at a time). Close that process, or serve the file with `milvus-lite server --data-dir DIR` and use "
            "milvus://HOST:PORT/COLLECTION."
        )
    return f"Milvus failed: {text}."

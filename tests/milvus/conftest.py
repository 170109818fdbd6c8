"""A real Milvus Lite server on a loopback port (the gRPC server `milvus-lite server` runs), optionally behind a
login check: Milvus Lite has no authentication of its own, so the check answers a wrong token as an
authentication-enabled Milvus does (gRPC UNAUTHENTICATED, "auth check failure, …")."""

from __future__ import annotations

import base64
from concurrent import futures

import pytest

LOGIN = "root:Milvus"


def _login_check(expected: str):
    import grpc

    class LoginCheck(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            given = dict(details.invocation_metadata).get("authorization", "")
            if given == base64.b64encode(expected.encode()).decode():
                return continuation(details)

            def refuse(request, context):
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "auth check failure, please check username and password are correct",
                )

            return grpc.unary_unary_rpc_method_handler(refuse)

    return LoginCheck()


def start_lite_server(data_dir, login: str | None = None):
    """(server, db, port) of a Milvus Lite gRPC server on 127.0.0.1 over `data_dir`."""
    import grpc
    from milvus_lite.adapter.grpc.servicer import MilvusServicer
    from milvus_lite.db import MilvusLite
    from pymilvus.grpc_gen import milvus_pb2_grpc

    db = MilvusLite(str(data_dir))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[_login_check(login)] if login else [])
    milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(db), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, db, port


@pytest.fixture(scope="module")
def lite_server(tmp_path_factory):
    """milvus://127.0.0.1:PORT of a Milvus Lite server for the module (append /COLLECTION)."""
    pytest.importorskip("milvus_lite", reason="Milvus Lite runs on CPU machines only (the milvus-lite extra)")
    server, db, port = start_lite_server(tmp_path_factory.mktemp("milvus-server"))
    yield f"milvus://127.0.0.1:{port}"
    server.stop(grace=1)
    db.close()


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """milvus://127.0.0.1:PORT of a Milvus Lite server that lets in LOGIN only."""
    pytest.importorskip("milvus_lite", reason="Milvus Lite runs on CPU machines only (the milvus-lite extra)")
    server, db, port = start_lite_server(tmp_path_factory.mktemp("milvus-guarded"), login=LOGIN)
    yield f"milvus://127.0.0.1:{port}"
    server.stop(grace=1)
    db.close()

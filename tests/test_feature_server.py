"""The gRPC feature server: rows arrive byte-identical, a missing or wrong token is refused, out-of-range ids are
refused with the id named, it binds 127.0.0.1 unless told otherwise, and a RemoteStore composes with caches."""

import json
import os

import grpc
import numpy as np
import psutil
import pytest
from plait.storage.cache import CachedStore
from plait.storage.feature_server import SERVICE, RemoteStore, serve
from plait.storage.store import ArrayStore, RowStore

TOKEN = "s3cret-token"


@pytest.fixture
def served():
    rows = np.random.default_rng(0).integers(0, 256, size=(1000, 24), dtype=np.uint8).view(np.float32)
    store = ArrayStore(rows.reshape(1000, 2, 3))
    server, port = serve(store, TOKEN)
    yield store, port
    server.stop(grace=None)


def raw_call(port, method, payload, metadata=()):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return channel.unary_unary(f"/{SERVICE}/{method}")(payload, timeout=10, metadata=metadata)


def test_rows_arrive_byte_identical(served):
    store, port = served
    with RemoteStore(f"127.0.0.1:{port}", TOKEN) as remote:
        assert isinstance(remote, RowStore)
        assert (remote.num_rows, remote.row_shape, remote.dtype) == (1000, (2, 3), np.dtype(np.float32))
        ids = np.array([999, 0, 5, 5, 512])
        rows = remote.read(ids)
        assert rows.shape == (5, 2, 3) and rows.tobytes() == store.array[ids].tobytes()
        assert remote.read(np.zeros(0, dtype=np.int64)).shape == (0, 2, 3)
        info = json.loads(raw_call(port, "Info", b"", [("authorization", f"Bearer {TOKEN}")]))
        assert info["num_rows"] == 1000 and info["row_shape"] == [2, 3] and info["dtype"] == "<f4"
        assert remote.server_stats()["rows_read"] == 5


def test_batches_larger_than_a_message_are_chunked():
    rows = np.arange(20_000 * 128, dtype=np.float32).reshape(20_000, 128)  # 10 MB
    server, port = serve(ArrayStore(rows), TOKEN, max_message_bytes=4 << 20)
    try:
        with RemoteStore(f"127.0.0.1:{port}", TOKEN, chunk_bytes=1 << 20) as remote:
            ids = np.random.default_rng(1).permutation(20_000)
            assert np.array_equal(remote.read(ids), rows[ids])
            assert remote.stats()["remote_calls"] == 10  # 2,048 rows of 512 B per 1 MiB chunk
        # A client that asks for more than the server's limit in one call is told how much it may ask.
        with pytest.raises(grpc.RpcError) as e:
            raw_call(port, "Read", np.arange(10_000, dtype="<i8").tobytes(), [("authorization", f"Bearer {TOKEN}")])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 8192 rows" in e.value.details()
    finally:
        server.stop(grace=None)


def test_missing_or_wrong_token_is_refused(served):
    _, port = served
    ids = np.array([1, 2], dtype="<i8").tobytes()
    for metadata in [(), [("authorization", "Bearer wrong")], [("authorization", TOKEN)]]:
        for method in ("Read", "Info", "Stats"):
            with pytest.raises(grpc.RpcError) as e:
                raw_call(port, method, ids, metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "('authorization', 'Bearer <token>')" in e.value.details()
    with pytest.raises(PermissionError, match="wrong token"):
        RemoteStore(f"127.0.0.1:{port}", "wrong")
    with pytest.raises(ValueError, match="a token is required"):
        serve(ArrayStore(np.zeros((2, 2))), "")


def test_out_of_range_ids_are_refused_naming_the_id(served):
    _, port = served
    auth = [("authorization", f"Bearer {TOKEN}")]
    for bad in (1000, -1):
        with pytest.raises(grpc.RpcError) as e:
            raw_call(port, "Read", np.array([3, bad], dtype="<i8").tobytes(), auth)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"row id {bad} out of range [0, 1000)" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        raw_call(port, "Read", b"\x01\x02\x03", auth)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "int64" in e.value.details()


def test_binds_loopback_by_default(served):
    _, port = served
    listening = [c.laddr for c in psutil.Process(os.getpid()).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(addr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for addr in listening)


def test_a_wrong_address_fails_fast_naming_it():
    with pytest.raises(ConnectionError, match=r"feature server 127.0.0.1:1 Info: UNAVAILABLE"):
        RemoteStore("127.0.0.1:1", TOKEN, timeout=10)


def test_a_host_cache_over_a_remote_store_asks_the_server_only_for_misses(served):
    store, port = served
    with RemoteStore(f"127.0.0.1:{port}", TOKEN) as remote:
        cache = CachedStore(remote, "sieve", capacity_rows=10)
        ids = np.array([1, 2, 3, 1, 2, 3])
        for _ in range(3):
            assert cache.read(ids).tobytes() == store.array[ids].tobytes()
        s = cache.stats()
        # The first read misses all 6 rows asked (3 distinct, fetched in one call); the next two hit all 12.
        assert (s["host_hits"], s["host_misses"], s["rows_read"], s["remote_calls"]) == (12, 6, 3, 1)
        assert store.rows_read == 3

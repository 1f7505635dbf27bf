"""Serve a row store's rows to other nodes over gRPC, and read them back as a RowStore.

    server, port = serve(store, token)                 # binds 127.0.0.1 unless host= says otherwise
    remote = RemoteStore(f"10.0.0.5:{port}", token)    # a RowStore: wrap it in a cache like any other
    rows = remote.read(ids)
    server.stop(grace=None)

No protobuf code generation: the service `plait.FeatureStore` has raw-bytes methods. `Read` takes the ids
as little-endian int64 bytes and answers the rows' raw bytes (C order, the store's dtype); `Info` and
`Stats` answer JSON. Nothing is pickled. Every call carries the metadata `authorization: Bearer <token>`,
compared in constant time; a missing or wrong token is refused with UNAUTHENTICATED, ids out of range
with INVALID_ARGUMENT naming the id and num_rows. The channel is plaintext unless credentials are given
(grpc.ssl_server_credentials / grpc.ssl_channel_credentials): keep it on a trusted network.

Large batches: a reply is at most `max_message_bytes` (64 MiB by default); `RemoteStore` splits a read
into chunks of `chunk_bytes` of rows and keeps up to four chunks in flight.
"""

from __future__ import annotations

import hmac
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from .store import check_ids

SERVICE = "plait.FeatureStore"
FORMAT = "plait-feature-server-v1"
MAX_MESSAGE_BYTES = 64 << 20
HOW_TO_AUTH = "pass call metadata ('authorization', 'Bearer <token>'), as RemoteStore(address, token) does"


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    limit = max_message_bytes + (1 << 20)  # room for framing
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


class _Handlers:
    """The server's methods over one store; reads are serialised (caches are not thread-safe)."""

    def __init__(self, store, token: str, max_message_bytes: int):
        self.store = store
        self.expected = f"Bearer {token}".encode()
        self.max_message_bytes = int(max_message_bytes)
        self.dtype = np.dtype(store.dtype)
        self.row_bytes = int(np.prod(store.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.lock = threading.Lock()

    def _authorize(self, context) -> None:
        given = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if not given:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"no token given: {HOW_TO_AUTH}")
        value = given[0].encode() if isinstance(given[0], str) else bytes(given[0])
        if not hmac.compare_digest(value, self.expected):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"wrong token: {HOW_TO_AUTH} with the server's token")

    def info(self, request: bytes, context) -> bytes:
        self._authorize(context)
        store = self.store
        return json.dumps({
            "format": FORMAT, "num_rows": int(store.num_rows), "row_shape": list(store.row_shape),
            "dtype": self.dtype.str, "max_message_bytes": self.max_message_bytes,
        }).encode()

    def stats(self, request: bytes, context) -> bytes:
        self._authorize(context)
        with self.lock:
            return json.dumps(self.store.stats()).encode()

    def read(self, request: bytes, context) -> bytes:
        self._authorize(context)
        if len(request) % 8:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the request is {len(request)} bytes, not a whole number of little-endian int64 ids")
        ids = np.frombuffer(request, dtype="<i8")
        if ids.size * self.row_bytes > self.max_message_bytes:
            most = max(1, self.max_message_bytes // max(self.row_bytes, 1))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{ids.size} rows of {self.row_bytes} bytes exceed the {self.max_message_bytes}-byte reply "
                          f"limit; ask at most {most} rows per call (RemoteStore chunks for you)")
        try:
            ids = check_ids(ids, int(self.store.num_rows), "feature server Read")
        except IndexError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            with self.lock:
                rows = self.store.read(ids)
        except Exception as e:  # a corrupt file, a failed disk: say so to the caller
            context.abort(grpc.StatusCode.INTERNAL, f"reading {ids.size} rows failed: {type(e).__name__}: {e}")
        if hasattr(rows, "cpu"):  # a DeviceCache answers torch tensors
            rows = rows.cpu().numpy()
        return np.ascontiguousarray(rows, dtype=self.dtype).tobytes()


def serve(store, token: str, host: str = "127.0.0.1", port: int = 0, *, threads: int = 4,
          max_message_bytes: int = MAX_MESSAGE_BYTES, credentials=None) -> tuple[grpc.Server, int]:
    """Start serving `store`'s rows on host:port (port 0: a free one). Returns the started server and its port."""
    if not token:
        raise ValueError("serve: a token is required (e.g. secrets.token_urlsafe(32)); clients pass it to RemoteStore")
    if np.dtype(store.dtype).hasobject:
        raise TypeError(f"serve: rows of dtype {store.dtype} hold Python objects; only fixed-width rows are served")
    h = _Handlers(store, token, max_message_bytes)
    methods = {
        "Read": grpc.unary_unary_rpc_method_handler(h.read),
        "Info": grpc.unary_unary_rpc_method_handler(h.info),
        "Stats": grpc.unary_unary_rpc_method_handler(h.stats),
    }
    server = grpc.server(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="plait-feature-server"),
                         handlers=[grpc.method_handlers_generic_handler(SERVICE, methods)],
                         options=_options(max_message_bytes))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"feature server could not bind {address}: {e}; pick another host or port") from e
    if not bound:
        raise OSError(f"feature server could not bind {address} (in use or not a local address); pick another")
    server.start()
    return server, int(bound)


class RemoteStore:
    """A RowStore whose rows come from a feature server at `address` ("host:port")."""

    def __init__(self, address: str, token: str, *, timeout: float = 60.0, chunk_bytes: int = 16 << 20,
                 credentials=None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.address = address
        self.timeout = float(timeout)
        opts = _options(max_message_bytes)
        self._channel = (grpc.secure_channel(address, credentials, options=opts) if credentials
                         else grpc.insecure_channel(address, options=opts))
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._calls = {m: self._channel.unary_unary(f"/{SERVICE}/{m}") for m in ("Read", "Info", "Stats")}
        info = json.loads(self._call("Info", b""))
        if info.get("format") != FORMAT:
            raise ValueError(f"{address} speaks {info.get('format')!r}, not {FORMAT!r}; is it a Plait feature server?")
        self.num_rows = int(info["num_rows"])
        self.row_shape = tuple(info["row_shape"])
        self.dtype = np.dtype(info["dtype"])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        limit = min(int(chunk_bytes), int(info["max_message_bytes"]), max_message_bytes)
        self.chunk_rows = max(1, limit // max(self.row_bytes, 1))
        self.rows_read = self.bytes_received = self.calls = 0

    def _error(self, e: grpc.RpcError, method: str) -> Exception:
        code, detail = e.code(), e.details()
        where = f"feature server {self.address} {method}"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return PermissionError(f"{where}: {detail}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(f"{where}: {detail}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ConnectionError(f"{where}: {code.name}: {detail}; is the server running and the address right?")
        return RuntimeError(f"{where}: {code.name}: {detail}")

    def _call(self, method: str, payload: bytes) -> bytes:
        try:
            return self._calls[method](payload, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e, method) from None

    def read(self, ids) -> np.ndarray:
        ids = check_ids(ids, self.num_rows, f"RemoteStore({self.address}).read")
        out = np.empty((ids.size, *self.row_shape), dtype=self.dtype)
        flat = out.reshape(-1).view(np.uint8) if out.size else None
        starts = range(0, ids.size, self.chunk_rows)
        for group in (list(starts)[i : i + 4] for i in range(0, len(starts), 4)):  # four chunks in flight
            futures = [(s, self._calls["Read"].future(ids[s : s + self.chunk_rows].astype("<i8").tobytes(),
                                                      timeout=self.timeout, metadata=self._metadata))
                       for s in group]
            for s, fut in futures:
                try:
                    reply = fut.result()
                except grpc.RpcError as e:
                    raise self._error(e, "Read") from None
                n = min(self.chunk_rows, ids.size - s)
                if len(reply) != n * self.row_bytes:
                    raise RuntimeError(f"feature server {self.address} sent {len(reply)} bytes for {n} rows of "
                                       f"{self.row_bytes} bytes; server and client disagree on the row format")
                flat[s * self.row_bytes : (s + n) * self.row_bytes] = np.frombuffer(reply, dtype=np.uint8)
                self.bytes_received += len(reply)
                self.calls += 1
        self.rows_read += ids.size
        return out

    def server_stats(self) -> dict:
        """The served store's own stats (its cache hit rates, bytes read from its disk)."""
        return json.loads(self._call("Stats", b""))

    def stats(self) -> dict[str, int]:
        return {"rows_read": self.rows_read, "bytes_read": 0, "remote_bytes_received": self.bytes_received,
                "remote_calls": self.calls}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""A fault-injecting HTTP/1.1 proxy for tests, in front of an S3 endpoint (moto's server, a Ceph RGW).

Requests are forwarded byte for byte, headers included: S3 signatures cover the Host header and
others, so nothing is rewritten (the client signs the proxy's host:port, and the upstream checks the
signature against the Host it receives, which is that same one). Or a request is failed on purpose,
decided before anything of it is forwarded:

- `reset`: the client's connection is closed with a TCP RST (SO_LINGER 0);
- `slowdown`: S3's `503 SlowDown` with its XML error body, answered by the proxy itself;
- `stall`: the request is held `stall_seconds` before it is forwarded; a client that gives up
  meanwhile closes its connection, and the request is then never forwarded.

Which requests (`FaultPlan`): a seeded random `fraction` of them, or every one inside a time `window`
("the endpoint is down"), in both cases optionally only some methods or request targets. Counters
(`requests`, `forwarded`, `faults`) and a log of every request let a test assert its faults happened.
"""

from __future__ import annotations

import math
import random
import re
import select
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple
from urllib.parse import unquote, urlsplit

FAULT_KINDS = ("reset", "slowdown", "stall")
# The longest message head accepted: S3 requests' heads are a few KB.
MAX_HEAD_BYTES = 64 * 1024
# How long the proxy waits for an upstream `100 Continue` before it sends a request body anyway
# (what curl and botocore do as clients).
CONTINUE_WAIT_SECONDS = 1.0
RELAY_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class FaultPlan:
    """Which requests fail, and how. A request is eligible when its method is in `methods` (None: any)
    and `target_pattern` (None: any) matches its decoded target (`/bucket/key?query`). Inside `window`
    (time.monotonic() bounds) every eligible request fails; otherwise a seeded random `fraction` does.
    The kind of each fault is drawn from `kinds`."""

    fraction: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    methods: frozenset[str] | None = None
    target_pattern: str | None = None
    window: tuple[float, float] | None = None
    stall_seconds: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be within [0, 1], got {self.fraction}")
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if not self.kinds or unknown:
            raise ValueError(f"kinds must be some of {FAULT_KINDS}, got {self.kinds}")


NO_FAULTS = FaultPlan()


class RequestRecord(NamedTuple):
    method: str
    target: str  # decoded path and query
    fault: str | None  # the fault injected, None when forwarded


class ProtocolError(Exception):
    """A message the proxy cannot frame: the connection is dropped."""


class _Head(NamedTuple):
    raw: bytes
    start_line: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name]
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> list[str]:
        return [token.strip().lower() for token in (self.header(name) or "").split(",") if token.strip()]


def _read_head(reader: BinaryIO, *, request: bool) -> _Head | None:
    """One message head, raw bytes kept; None when the peer closed cleanly before a new message."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = reader.readline(MAX_HEAD_BYTES + 1)
        if not line:
            if not lines:
                return None
            raise ProtocolError("connection closed inside a message head")
        if request and not lines and line in (b"\r\n", b"\n"):
            continue  # empty lines before a request line are to be ignored (RFC 9112, 2.2)
        size += len(line)
        if size > MAX_HEAD_BYTES or not line.endswith(b"\n"):
            raise ProtocolError("message head too long")
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    text = [line.decode("latin-1").rstrip("\r\n") for line in lines[:-1]]
    headers = []
    for line in text[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return _Head(b"".join(lines), text[0], headers)


def _read_exactly(reader: BinaryIO, count: int) -> bytes:
    data = reader.read(count)
    if len(data) != count:
        raise ProtocolError("connection closed inside a message body")
    return data


def _chunked_body(reader: BinaryIO):
    """The raw bytes of a chunked body, piece by piece, as received: chunk-size lines (extensions such
    as aws-chunked's `;chunk-signature=` kept), data, the last chunk and the trailer section."""
    while True:
        line = reader.readline(MAX_HEAD_BYTES + 1)
        if not line.endswith(b"\n"):
            raise ProtocolError("bad chunk-size line")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProtocolError(f"bad chunk-size line {line[:80]!r}") from None
        yield line
        if size == 0:
            while True:  # trailer fields (aws-chunked's checksums), up to the empty line
                trailer = reader.readline(MAX_HEAD_BYTES + 1)
                if not trailer.endswith(b"\n"):
                    raise ProtocolError("connection closed inside a trailer section")
                yield trailer
                if trailer in (b"\r\n", b"\n"):
                    return
        while size > 0:
            piece = _read_exactly(reader, min(size, RELAY_CHUNK_BYTES))
            size -= len(piece)
            yield piece
        yield _read_exactly(reader, 2)  # the CRLF after the data


def _sized_body(reader: BinaryIO, length: int):
    while length > 0:
        piece = _read_exactly(reader, min(length, RELAY_CHUNK_BYTES))
        length -= len(piece)
        yield piece


def _content_length(head: _Head) -> int | None:
    values = {value.strip() for value in (head.header("content-length") or "").split(",") if value.strip()}
    if not values:
        return None
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise ProtocolError(f"bad Content-Length {head.header('content-length')!r}")
    return int(values.pop())


def _request_body(reader: BinaryIO, head: _Head):
    """A request's body framing (RFC 9112, 6.3): chunked, Content-Length, or none."""
    codings = head.tokens("transfer-encoding")
    if codings:
        if codings[-1] != "chunked":
            raise ProtocolError("a request's transfer coding must end in chunked")
        return _chunked_body(reader)
    return _sized_body(reader, _content_length(head) or 0)


def _until_closed(reader: BinaryIO):
    while piece := reader.read1(RELAY_CHUNK_BYTES):
        yield piece


def _response_body(reader: BinaryIO, head: _Head, method: str, status: int):
    """A response's body framing: none after HEAD and for 1xx, 204 and 304; then chunked,
    Content-Length, or up to the close of the connection. Returns (pieces, ends_with_close)."""
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return iter(()), False
    codings = head.tokens("transfer-encoding")
    if codings:
        return (_chunked_body(reader), False) if codings[-1] == "chunked" else (_until_closed(reader), True)
    length = _content_length(head)
    return (_sized_body(reader, length), False) if length is not None else (_until_closed(reader), True)


def _status(head: _Head) -> int:
    parts = head.start_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {head.start_line[:80]!r}")
    return int(parts[1])


def _wants_close(head: _Head) -> bool:
    version = head.start_line.split(" ")[0 if head.start_line.startswith("HTTP/") else -1]
    connection = head.tokens("connection")
    return "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)


def slowdown_response(target: str, request_id: str, with_body: bool, close: bool) -> bytes:
    """S3's answer to too many requests: 503 with the S3 XML error body (none after HEAD)."""
    resource = target.split("?", 1)[0].replace("&", "&amp;").replace("<", "&lt;")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
        f"<Message>Please reduce your request rate.</Message><Resource>{resource}</Resource>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()
    head = (
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nx-amz-request-id: {request_id}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode()
    return head + (body if with_body else b"")


def _close_gracefully(client: socket.socket) -> None:
    """End the answer with a FIN, then drain what the client still sends for a moment: closing with
    unread bytes would send an RST, which the client might see before the answer."""
    try:
        client.shutdown(socket.SHUT_WR)
        client.settimeout(1.0)
        while client.recv(RELAY_CHUNK_BYTES):
            pass
    except OSError:
        pass


class _Upstream:
    """One keep-alive connection to the upstream per client connection, opened when needed."""

    def __init__(self, address: tuple[str, int], proxy: "FaultProxy"):
        self.address = address
        self.proxy = proxy
        self.socket: socket.socket | None = None
        self.reader: BinaryIO | None = None
        self.used = False  # whether a response came over this connection already

    def connect(self) -> None:
        self.close()
        self.socket = socket.create_connection(self.address, timeout=60)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.proxy._track(self.socket)
        self.reader = self.socket.makefile("rb")
        self.used = False

    def close(self) -> None:
        if self.socket is not None:
            self.proxy._untrack(self.socket)
            try:
                self.reader.close()
                self.socket.close()
            except OSError:
                pass
        self.socket = self.reader = None


class FaultProxy:
    """The proxy: `with FaultProxy(upstream_url) as proxy:` (or start/stop), point the client at
    `proxy.url`, set `proxy.plan` (or call `fail`, `endpoint_down`, `heal`)."""

    def __init__(self, upstream_url: str, plan: FaultPlan = NO_FAULTS):
        parsed = urlsplit(upstream_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http://host:port URL, got {upstream_url!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self._lock = threading.Lock()
        self._plan = plan
        self._random = random.Random(plan.seed)
        self.requests = 0
        self.forwarded = 0
        self.faults: Counter[str] = Counter()
        self.log: list[RequestRecord] = []
        self._listener: socket.socket | None = None
        self._url = ""
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()

    # --- what the tests use ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    @plan.setter
    def plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan
            self._random = random.Random(plan.seed)

    def fail(self, fraction: float, **options) -> None:
        """A seeded random `fraction` of the (eligible) requests fails from now on."""
        self.plan = FaultPlan(fraction=fraction, **options)

    def endpoint_down(self, seconds: float = math.inf, **options) -> None:
        """Every (eligible) request fails for the next `seconds`; by default answered 503 SlowDown."""
        options.setdefault("kinds", ("slowdown",))
        now = time.monotonic()
        self.plan = FaultPlan(window=(now, now + seconds), **options)

    def heal(self) -> None:
        self.plan = NO_FAULTS

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.forwarded = 0
            self.faults.clear()
            self.log.clear()

    def records(self, method: str | None = None, pattern: str | None = None) -> list[RequestRecord]:
        """The logged requests, optionally only of one method and with targets matching `pattern`."""
        with self._lock:
            log = list(self.log)
        return [record for record in log if (method is None or record.method == method)
                and (pattern is None or re.search(pattern, record.target))]  # fmt: skip

    def start(self) -> "FaultProxy":
        self._listener = socket.create_server(("127.0.0.1", 0))
        host, port = self._listener.getsockname()
        self._url = f"http://{host}:{port}"
        accept = threading.Thread(target=self._accept, name="fault-proxy-accept", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            sockets = list(self._open)
        for each in sockets:  # wakes the handlers blocked in recv
            try:
                each.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exception) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------------------

    def _track(self, each: socket.socket) -> None:
        with self._lock:
            self._open.add(each)

    def _untrack(self, each: socket.socket) -> None:
        with self._lock:
            self._open.discard(each)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: stop
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(client)
            handler = threading.Thread(target=self._serve, args=(client,), name="fault-proxy-client", daemon=True)
            with self._lock:
                self._threads = [thread for thread in self._threads if thread.is_alive()]
                self._threads.append(handler)
            handler.start()

    def _decide(self, method: str, target: str) -> tuple[str | None, FaultPlan, int]:
        """The fault for this request (or None), the plan it was decided under, and its number."""
        with self._lock:
            self.requests += 1
            number, plan = self.requests, self._plan
            eligible = (plan.methods is None or method in plan.methods) and (
                plan.target_pattern is None or re.search(plan.target_pattern, target) is not None
            )
            fault = None
            if eligible:
                if plan.window is not None:
                    if plan.window[0] <= time.monotonic() < plan.window[1]:
                        fault = self._random.choice(plan.kinds)
                elif plan.fraction and self._random.random() < plan.fraction:
                    fault = self._random.choice(plan.kinds)
            if fault:
                self.faults[fault] += 1
            else:
                self.forwarded += 1
            self.log.append(RequestRecord(method, target, fault))
        return fault, plan, number

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        upstream = _Upstream(self.upstream, self)
        try:
            while not self._stopping.is_set():
                head = _read_head(reader, request=True)
                if head is None:
                    return
                if not self._handle(client, reader, head, upstream):
                    return
        except (OSError, ProtocolError):
            return  # a peer went away or sent something unframeable: drop this connection
        finally:
            upstream.close()
            self._untrack(client)
            try:
                reader.close()
                client.close()
            except OSError:
                pass

    def _handle(self, client: socket.socket, reader: BinaryIO, head: _Head, upstream: _Upstream) -> bool:
        """One request; returns whether the client connection stays open."""
        parts = head.start_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ProtocolError(f"bad request line {head.start_line[:80]!r}")
        method, target = parts[0], unquote(parts[1])
        expects_continue = "100-continue" in head.tokens("expect")
        fault, plan, number = self._decide(method, target)
        if fault == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False  # closing now sends the RST
        if fault == "slowdown":
            # A client waiting for 100 Continue sends no body, or sends it after its own wait: the
            # body's fate is unknown, so the connection closes after the answer.
            if not expects_continue:
                for _ in _request_body(reader, head):
                    pass
            client.sendall(slowdown_response(target, f"fault-proxy-{number}", method != "HEAD", expects_continue))
            if expects_continue:
                _close_gracefully(client)
                return False
            return not _wants_close(head)
        if fault == "stall" and not self._hold(client, plan.stall_seconds):
            return False  # the client gave up (or the proxy stops): never forwarded
        if expects_continue:
            return self._forward_expecting_continue(client, reader, head, method, upstream)
        request = head.raw + b"".join(_request_body(reader, head))
        return self._forward(client, request, head, method, upstream)

    def _hold(self, client: socket.socket, seconds: float) -> bool:
        """Wait `seconds`, or until the client closes its connection; whether it is still there."""
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            readable, _, _ = select.select([client], [], [], min(remaining, 0.1))
            if readable:
                try:
                    if not client.recv(1, socket.MSG_PEEK):
                        return False
                except OSError:
                    return False
                time.sleep(min(max(remaining, 0), 0.1))  # body bytes waiting: not a close
        return False

    def _forward(self, client: socket.socket, request: bytes, head: _Head, method: str, upstream: _Upstream) -> bool:
        """Send a whole buffered request upstream and relay the response. A keep-alive connection
        the upstream closed while idle fails before any response byte: then once more on a new one."""
        for attempt in (1, 2):
            if upstream.socket is None:
                upstream.connect()
            reused = upstream.used
            try:
                upstream.socket.sendall(request)
                response = _read_head(upstream.reader, request=False)
            except OSError:
                response = None
            if response is not None:
                break
            upstream.close()
            if not reused or attempt == 2:
                return False  # nothing came back: the client sees its connection close
        return self._relay_response(client, response, head, method, upstream)

    def _forward_expecting_continue(self, client, reader, head: _Head, method: str, upstream: _Upstream) -> bool:
        """`Expect: 100-continue`: the head goes first, the upstream's interim answer goes back, and
        only then the body; a final answer instead of 100 ends the exchange (and the connection)."""
        if upstream.socket is None or upstream.used:
            upstream.connect()  # a fresh connection: this request cannot be resent
        upstream.socket.sendall(head.raw)
        readable, _, _ = select.select([upstream.socket], [], [], CONTINUE_WAIT_SECONDS)
        if readable:
            response = _read_head(upstream.reader, request=False)
            if response is None:
                return False
            if _status(response) != 100:
                self._relay_response(client, response, head, method, upstream)
                return False
            client.sendall(response.raw)
        for piece in _request_body(reader, head):
            upstream.socket.sendall(piece)
        response = _read_head(upstream.reader, request=False)
        if response is None:
            return False
        return self._relay_response(client, response, head, method, upstream)

    def _relay_response(self, client, response: _Head, request: _Head, method: str, upstream: _Upstream) -> bool:
        while True:
            status = _status(response)
            if not 100 <= status < 200 or status == 101:
                break
            client.sendall(response.raw)  # interim answers (a late 100 Continue) pass through
            response = _read_head(upstream.reader, request=False)
            if response is None:
                return False
        if status == 101:
            raise ProtocolError("protocol upgrades are not proxied")
        client.sendall(response.raw)
        pieces, ends_with_close = _response_body(upstream.reader, response, method, status)
        for piece in pieces:
            client.sendall(piece)
        upstream.used = True
        if ends_with_close or _wants_close(response):
            upstream.close()
            return False
        return not _wants_close(request)

"""A real local S3 endpoint for tests, and a fault-injecting HTTP proxy to put in front of it.

Nothing here patches anything in-process: ``MotoServer`` runs moto's server mode (the ``moto_server`` console
script of this interpreter's environment) as a subprocess, and ``FaultProxy`` is a small threaded HTTP/1.1 reverse
proxy on 127.0.0.1. Code under test reaches either one over real HTTP through boto3/botocore, so retries, connection
pooling, ranged reads and multipart uploads all take their real paths.

The module imports only the standard library (boto3 only inside ``s3_client``), so importing it is cheap.
"""

from __future__ import annotations

import atexit
import collections
import http.client
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

REGION = "us-east-1"

# Variables that would point a client at a real account or change its behaviour behind a test's back; the session
# fixture removes them while the local server is in use.
AWS_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
)

ERROR_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "ServiceUnavailable": "Service is unable to handle request.",
    "InternalError": "We encountered an internal error. Please try again.",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_environ(endpoint: str) -> dict[str, str]:
    """The environment a boto3 client (in this process or a child) needs to use ``endpoint`` and nothing else.

    The config and credentials files are pointed at ``os.devnull`` so a developer's ``~/.aws`` cannot leak in.
    """
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def s3_client(endpoint: str | None = None, max_attempts: int | None = None, mode: str = "standard") -> Any:
    """A boto3 S3 client; ``endpoint=None`` means ``AWS_ENDPOINT_URL`` from the environment."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": mode, "max_attempts": max_attempts}) if max_attempts is not None else None
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, config=config)


def _moto_binary() -> str:
    beside = Path(sys.executable).with_name("moto_server")
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if found is None:
        raise RuntimeError(f"moto_server not found next to {sys.executable} nor on PATH: install 'moto[server]'")
    return found


def _die_with_parent_hook() -> Any:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies (even by SIGKILL), or None.

    Only from the main thread: the kernel ties the signal to the thread that forked, not to the process.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child must not import after fork
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


class _PortTaken(RuntimeError):
    pass


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` in a subprocess; ready when the constructor returns.

    Its output goes to a temporary file (a pipe would fill up and stall it); ``output()`` reads it back. The server
    goes away with ``stop()``, at interpreter exit, and (on Linux) when this process dies in any other way.
    """

    def __init__(self, timeout: float = 20.0, tries: int = 3) -> None:
        for attempt in range(tries):
            self._start(free_port())
            try:
                self._wait_ready(timeout)
                return
            except _PortTaken:  # another process bound the port between free_port() and moto's bind
                self.stop()
                if attempt == tries - 1:
                    raise
            except BaseException:
                self.stop()
                raise

    def _start(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile()
        cmd = [_moto_binary(), "-H", "127.0.0.1", "-p", str(port)]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent_hook(),
        )
        atexit.register(self.stop)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                output = self.output()
                error = _PortTaken if "Address already in use" in output else RuntimeError
                raise error(f"moto_server exited with {self._proc.returncode}:\n{output}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(
            f"moto_server did not accept connections on port {self.port} in {timeout}s:\n{self.output()}"
        )

    def output(self) -> str:
        """Everything the server has written to stdout/stderr so far."""
        if self._log.closed:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- fault-injecting reverse proxy -----------------------------------------------------------------------------------

# Hop-by-hop headers are not forwarded. ``Expect`` is answered by the proxy itself (it sends the ``100 Continue``);
# SigV4 never signs it. ``Transfer-Encoding`` of a request is kept: a chunked body is forwarded byte for byte.
_HOP_REQUEST = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade", "expect"}
)
# Responses are read whole from upstream and re-framed with a Content-Length, so their Transfer-Encoding goes too.
_HOP_RESPONSE = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "trailer", "upgrade"})


class ProxyRecord(NamedTuple):
    """One request as the proxy saw it: its headers exactly as the client sent them, and the fault it got (if any)."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    fault: str | None
    client_port: int  # the client's end of the connection: requests sharing it came over one keep-alive connection


class _Fault(NamedTuple):
    kind: str  # "error" (answer with an S3 error, do not forward) or "drop" (forward, cut the body in half)
    status: int = 503
    code: str = "SlowDown"


def error_xml(code: str, message: str | None = None) -> bytes:
    """An S3-style XML error document."""
    if message is None:
        message = ERROR_MESSAGES.get(code, f"Injected {code} fault.")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message><RequestId>FAULTPROXY</RequestId></Error>"
    ).encode()


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's also does a reverse DNS lookup: not needed here
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on every client still connected (idle keep-alive connections included)."""
        with self._open_lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients hanging up are not news
            super().handle_error(request, client_address)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries a Content-Length
    timeout = 120  # an idle keep-alive connection's thread ends after this
    server: _ProxyServer

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def _handle(self) -> None:
        body = self._read_body()  # always drained, so the connection stays in step even when the answer is a fault
        fault = self.server.proxy._decide(self.command, self.path, self.headers.items(), self.client_address[1])
        if fault is not None and fault.kind == "error":
            self._send_error(fault.status, fault.code)
            return
        try:
            status, reason, headers, payload = self._forward(body)
        except OSError as exc:
            self._send_error(502, "BadGateway", f"fault proxy: upstream failed: {exc!r}")
            return
        self._send(status, reason, headers, payload, truncate=fault is not None)

    # request side

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_raw()
        length = int(self.headers.get("Content-Length") or 0)
        return self._read_exact(length)

    def _read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            raise ConnectionError(f"client sent {len(data)} of {n} body bytes")
        return data

    def _read_chunked_raw(self) -> bytes:
        """The chunked body with its framing (sizes, extensions, trailers) untouched, for upstream to decode."""
        parts = []
        while True:
            line = self.rfile.readline(65537)
            if not line.endswith(b"\n"):
                raise ConnectionError("client hung up inside a chunked body")
            parts.append(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            parts.append(self._read_exact(size + 2))  # the data and its CRLF
        while True:  # trailer fields, then the empty line
            line = self.rfile.readline(65537)
            parts.append(line)
            if line in (b"\r\n", b"\n", b""):
                return b"".join(parts)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        host, port = self.server.proxy.upstream
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            # skip_host: the client's own Host header goes through (SigV4 signed it); no header is added or changed.
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_REQUEST:
                    conn.putheader(name, value)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.getheaders(), resp.read()
        finally:
            conn.close()

    # response side

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes, truncate: bool) -> None:
        self.send_response_only(status, reason)
        has_length = False
        for name, value in headers:
            lname = name.lower()
            if lname not in _HOP_RESPONSE:
                has_length |= lname == "content-length"
                self.send_header(name, value)
        if not has_length and self.command != "HEAD" and status not in (204, 304):
            self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if truncate:  # the headers promise the whole body; send half of it and hang up
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif self.command != "HEAD":
            self.wfile.write(payload)

    def _send_error(self, status: int, code: str, message: str | None = None) -> None:
        body = b"" if self.command == "HEAD" else error_xml(code, message)
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "FAULTPROXY")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` whose faults are switched on and off at runtime.

    Faults (checked in this order; all thread-safe):

    - ``throttle_forever()``: every request is answered 503 SlowDown (not forwarded);
    - ``storm(n, status, code)``: the next ``n`` requests are answered ``status`` with an S3 XML error ``code``;
    - ``storm_every(k)``: every k-th request (counted from the call) is answered 503 SlowDown;
    - ``drop(n)``: the next ``n`` GETs with a ``Range`` header are forwarded, but the client gets the headers and half
      the body, then the connection closes;
    - ``clear()`` ends them all (counters are kept).

    ``requests`` counts every request seen, ``injected`` every fault injected, ``history`` holds a ``ProxyRecord`` per
    request (the most recent 10,000).
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"FaultProxy forwards to plain http://host:port endpoints, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self._lock = threading.Lock()
        self._requests = 0
        self._injected = 0
        self.history: collections.deque[ProxyRecord] = collections.deque(maxlen=10_000)
        self.clear()
        self._server = _ProxyServer(self)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    # fault switches

    def storm(self, n: int, status: int = 503, code: str = "SlowDown") -> None:
        with self._lock:
            self._storm_left, self._storm_status, self._storm_code = n, status, code

    def storm_every(self, k: int, status: int = 503, code: str = "SlowDown") -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        with self._lock:
            self._every, self._every_seen, self._every_fault = k, 0, _Fault("error", status, code)

    def throttle_forever(self) -> None:
        with self._lock:
            self._forever = True

    def drop(self, n: int) -> None:
        with self._lock:
            self._drop_left = n

    def clear(self) -> None:
        with self._lock:
            self._forever = False
            self._storm_left, self._storm_status, self._storm_code = 0, 503, "SlowDown"
            self._every, self._every_seen, self._every_fault = 0, 0, _Fault("error")
            self._drop_left = 0

    # counters

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def injected(self) -> int:
        with self._lock:
            return self._injected

    def _decide(self, method: str, path: str, headers: list[tuple[str, str]], client_port: int) -> _Fault | None:
        """Count the request and pick its fault, under the lock so concurrent requests never share one."""
        with self._lock:
            self._requests += 1
            if self._every:
                self._every_seen += 1
            fault = None
            if self._forever:
                fault = _Fault("error")
            elif self._storm_left > 0:
                self._storm_left -= 1
                fault = _Fault("error", self._storm_status, self._storm_code)
            elif self._every and self._every_seen % self._every == 0:
                fault = self._every_fault
            elif self._drop_left > 0 and method == "GET" and any(k.lower() == "range" for k, _ in headers):
                self._drop_left -= 1
                fault = _Fault("drop")
            self._injected += fault is not None
            kind = None if fault is None else fault.kind
            self.history.append(ProxyRecord(method, path, tuple(headers), kind, client_port))
            return fault

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A small threaded HTTP server that the stand-ins share, with faults a test can inject."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, parse_qsl, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    query_pairs: list[tuple[str, str]] = field(default_factory=list)  # repeats kept, in order
    received: float = field(default_factory=time.time)  # when it arrived, for timelines

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))

    def json(self):
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int
    body: bytes | str | dict | list = b""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        if isinstance(self.body, (dict, list)):
            return json.dumps(self.body).encode()
        return self.body.encode() if isinstance(self.body, str) else self.body


@dataclass
class Fault:
    """Answer the next `times` matching requests with `response` (or never answer, if hang)."""

    match: Callable[[Request], bool]
    response: Response | None = None
    times: int = 1
    hang: bool = False
    delay: float = 0.0
    trickle: float = 0.0  # seconds between the bytes of the answer, status line included
    cut: int | None = None  # send only this many bytes of the body, then close the connection
    drop: bool = False  # close the connection without a word


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: 64 new connections at once would have their SYNs
    # dropped and retried a second later. Real servers queue hundreds (nginx: 511).
    request_queue_size = 511

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.keep_requests = True  # a benchmark turns this off and reads `counts`
        self.counts: Counter[str] = Counter()  # requests per kind(request)
        self.latency = 0.0
        # As simple servers and some proxies do: answer HTTP/1.0 and close the connection after
        # every answer, so that each request needs a new connection.
        self.http10 = False
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> FakeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()

    def inject(
        self,
        match: Callable[[Request], bool] | str = "",
        status: int = 500,
        body: bytes | str | dict | list = b"",
        content_type: str = "application/json; charset=utf-8",
        times: int = 1,
        hang: bool = False,
        delay: float = 0.0,
        trickle: float = 0.0,
        cut: int | None = None,
        drop: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Make matching requests (a predicate, or a substring of the path) fail.

        trickle or cut without a body apply to the normal answer; so does a delay with status 200
        and no body (a slow answer, not a wrong one)."""
        predicate = match if callable(match) else (lambda r, s=match: s in r.path)
        slow = delay and status == 200 and not body
        normal = hang or drop or slow or ((trickle or cut is not None) and not body)
        response = None if normal else Response(status, body, content_type, dict(headers or {}))
        self.faults.append(Fault(predicate, response, times, hang, delay, trickle, cut, drop))

    def count(self, predicate: Callable[[Request], bool] | str = "") -> int:
        test = predicate if callable(predicate) else (lambda r, s=predicate: s in r.path)
        return sum(1 for r in self.requests if test(r))

    def kind(self, request: Request) -> str:
        """What a benchmark counts a request as; the stand-ins name their endpoints."""
        return request.path

    def take_fault(self, request: Request) -> Fault | None:
        with self._lock:
            self.counts[self.kind(request)] += 1
            if self.keep_requests:
                self.requests.append(request)
            for fault in self.faults:
                if fault.times > 0 and fault.match(request):
                    fault.times -= 1
                    return fault
        return None

    def handle_request_of(self, request: Request) -> Response:  # pragma: no cover - abstract
        raise NotImplementedError


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeServer

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            method=self.command,
            path=parts.path,
            query={k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
            query_pairs=parse_qsl(parts.query, keep_blank_values=True),
        )
        if self.server.latency:
            time.sleep(self.server.latency)
        fault = self.server.take_fault(request)
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and fault.hang:
            self.server.stopping.wait(120)
            self.close_connection = True
            return
        if fault and fault.drop:
            self.close_connection = True
            return
        response = fault.response if fault else self.server.handle_request_of(request)
        if fault and response is None:  # trickle or cut the normal answer
            response = self.server.handle_request_of(request)
        payload = response.payload()
        # Status line, headers and body in one write: split writes meet Nagle's algorithm and
        # delayed ACKs, and every answer would take 40 ms more than the injected latency.
        version = "HTTP/1.0" if self.server.http10 else "HTTP/1.1"
        head = [f"{version} {response.status} {self.responses.get(response.status, ('',))[0]}"]
        head += [f"Content-Type: {response.content_type}", f"Content-Length: {len(payload)}"]
        if self.server.http10:
            head.append("Connection: close")
            self.close_connection = True
        head += [f"{name}: {value}" for name, value in response.headers.items()]
        answer = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
        if fault and fault.cut is not None:  # Content-Length promises more than comes
            answer = answer[: len(answer) - len(payload) + fault.cut]
            self.close_connection = True
        try:
            if fault and fault.trickle:
                self.trickle(answer, fault.trickle)
            else:
                self.wfile.write(answer)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout, a kill)
            self.close_connection = True

    def trickle(self, answer: bytes, pause: float) -> None:
        """One byte at a time: every read the client makes succeeds, and the answer never ends."""
        for n in range(len(answer)):
            if self.server.stopping.wait(pause):
                break
            self.wfile.write(answer[n : n + 1])
            self.wfile.flush()
        self.close_connection = True

    do_GET = do_POST = do_PATCH = do_DELETE = _serve

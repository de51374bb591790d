"""A monitoring service's ping endpoint as healthchecks.io serves it: /<uuid>/start, /<uuid>/fail,
/<uuid>/<exit status>, any method, the body kept as the ping's log; "OK" for a known check,
404 "not found" for another."""

from __future__ import annotations

from .base import FakeServer, Request, Response


class FakeHealthchecks(FakeServer):
    def __init__(self, uuid: str):
        super().__init__()
        self.uuid = uuid
        self.pings: list[tuple[str, str]] = []  # (what: start, fail or a status; body)

    def ping_url(self) -> str:
        return f"{self.url}/ping/{self.uuid}"

    def handle_request_of(self, request: Request) -> Response:
        parts = request.path.strip("/").split("/")
        if len(parts) < 2 or parts[:2] != ["ping", self.uuid]:
            return Response(404, "not found", "text/plain; charset=utf-8")
        what = parts[2] if len(parts) > 2 else "0"
        self.pings.append((what, request.body.decode(errors="replace")))
        return Response(200, "OK", "text/plain; charset=utf-8")

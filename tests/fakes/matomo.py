"""Matomo's Reporting API as ../shared/reference/matomo.md records it: API.getBulkRequest with
VisitsSummary.get sub-requests, error slots, [] for empty days, 401 for a bad token, HTML pages."""

from __future__ import annotations

import datetime as dt
from typing import Callable
from urllib.parse import parse_qsl

from .base import FakeServer, Request, Response

HTML_PAGE = "<!DOCTYPE html><html><head><title>Sign in - Matomo</title></head><body>Sign in</body></html>"


def visits_summary(visits: int) -> dict:
    """The VisitsSummary.get object for one site and day."""
    return {
        "nb_uniq_visitors": visits,
        "nb_users": 0,
        "nb_visits": visits,
        "nb_actions": 3 * visits,
        "nb_visits_converted": 0,
        "bounce_count": visits // 2,
        "sum_visit_length": 60 * visits,
        "max_actions": 7 if visits else 0,
        "bounce_rate": f"{50 if visits else 0}%",
        "nb_actions_per_visit": 3 if visits else 0,
        "avg_time_on_site": 60 if visits else 0,
    }


class FakeMatomo(FakeServer):
    def __init__(self, token: str):
        super().__init__()
        self.token = token
        self.site_ids: set[int] = set()
        self.visits: dict[tuple[int, str], int] = {}
        self.error_slots: dict[int, str] = {}  # Matomo site id -> message of its error slot
        # Instead of `site_ids` and `visits`, a benchmark may generate visits (None: unknown site).
        self.visits_fn: Callable[[int, str], int | None] | None = None

    def kind(self, request: Request) -> str:
        return "bulk"

    def visits_on(self, site: int, day: str) -> int:
        if self.visits_fn:
            return self.visits_fn(site, day) or 0
        return self.visits.get((site, day), 0)

    def knows(self, site: int) -> bool:
        return self.visits_fn(site, "") is not None if self.visits_fn else site in self.site_ids

    def handle_request_of(self, request: Request) -> Response:
        if request.path not in ("/index.php", "/") or request.query.get("module") != "API":
            return Response(200, HTML_PAGE, "text/html; charset=utf-8")
        token = request.form.get("token_auth") or request.query.get("token_auth")
        if token != self.token:
            return Response(
                401,
                {
                    "result": "error",
                    "message": "Unable to authenticate with the provided token. It is either invalid or expired.",
                },
            )
        if request.query.get("method") != "API.getBulkRequest":
            return Response(200, {"result": "error", "message": "Only API.getBulkRequest is played here"})
        form = request.form
        slots = []
        n = 0
        while f"urls[{n}]" in form:
            sub = dict(parse_qsl(form[f"urls[{n}]"]))
            if sub.get("method"):
                slots.append(self.answer(sub))
            n += 1
        return Response(200, slots)

    def answer(self, sub: dict[str, str]):
        if sub["method"] != "VisitsSummary.get" or sub.get("period") != "day":
            return {"result": "error", "message": f"The method '{sub['method']}' is not played here"}
        site = int(sub["idSite"])
        if site in self.error_slots:
            return {"result": "error", "message": self.error_slots[site]}
        if not self.knows(site):
            return {
                "result": "error",
                "message": f"An unexpected website was found in the request: website id was set to '{site}' .",
            }
        dates = sub["date"].split(",")
        if len(dates) == 1:
            return visits_summary(self.visits_on(site, dates[0]))
        start, end = (dt.date.fromisoformat(d) for d in dates)
        answer = {}
        while start <= end:
            day = start.isoformat()
            visits = self.visits_on(site, day)
            answer[day] = visits_summary(visits) if visits else []
            start += dt.timedelta(days=1)
        return answer

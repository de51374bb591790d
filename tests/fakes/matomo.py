"""Matomo's Reporting API as ../shared/reference/matomo.md records it: API.getBulkRequest with
VisitsSummary.get sub-requests, error slots, [] for empty days, 401 for a bad token, HTML pages;
and its unkind parts: sub-requests run one after another (a cost per site-day), a PHP error in
one sub-request turns the whole answer into an HTML 500 page, PHP's max_input_vars silently drops
POST variables, and a day the archiver has not processed answers like a day without visits."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import threading
import time
from typing import Callable
from urllib.parse import parse_qsl

from .base import FakeServer, Request, Response

# General_ExceptionPrivilegeAtLeastOneWebsite, as lang/en.json and lang/de.json word it
NO_VIEW_ACCESS = {
    "en": "You can't access this resource as it requires 'view' access for at least one website.",
    "de": "Sie haben keinen Zugang zu dieser Ressource, weil sie 'view' Zugriff für mindestens eine Webseite benötigt.",
}
HTML_PAGE = "<!DOCTYPE html><html><head><title>Sign in - Matomo</title></head><body>Sign in</body></html>"
# What core/FrontController.php sends when a PHP \Error escapes any sub-request of a bulk request.
FATAL_PAGE = (
    "<!DOCTYPE html><html><head><title>Matomo &rsaquo; Error</title></head><body>"
    "<h1>An error occurred</h1><p>TypeError: Piwik\\Archive::build(): Argument #1 ($idSites) "
    "must be of type array</p></body></html>"
)


GATEWAY_TIMEOUT_PAGE = (
    "<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway Time-out</h1>"
    "</center><hr><center>nginx</center></body></html>"
)
BAD_GATEWAY_PAGE = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
    "</center><hr><center>nginx</center></body></html>"
)
# Matomo's BadRequestException for API_bulk_request_limit; a client must not rely on its words.
BULK_LIMIT_MESSAGE = "The number of requests in this bulk request exceeds the allowed limit."
MYSQL_DOWN_MESSAGE = "SQLSTATE[HY000] [2002] Connection refused"
# PHP's fatal error when one site's report needs more than memory_limit: Matomo's shutdown handler
# turns it into its error page, HTTP 500, for the whole bulk request, whatever else it asked.
MEMORY_EXHAUSTED_PAGE = FATAL_PAGE.replace(
    "TypeError: Piwik\\Archive::build(): Argument #1 ($idSites) must be of type array",
    "Allowed memory size of 134217728 bytes exhausted (tried to allocate 20480 bytes)",
)


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
        # The token user's language: Matomo translates its access errors into it (lang/*.json)
        self.language = "en"
        self.visits: dict[tuple[int, str], int] = {}
        self.error_slots: dict[int, str] = {}  # Matomo site id -> message of its error slot
        self.fatal_sites: set[int] = set()  # a request that names one of these answers `fatal_page`
        self.fatal_page = FATAL_PAGE
        self.not_archived: set[str] = set()  # days core:archive has not processed: they look empty
        self.site_day_cost = 0.0  # seconds per site-day: sub-requests run one after another
        # Seconds per visit a Live sub-request lists: Matomo builds each one's details (every
        # VisitorDetails plugin) before showColumns drops them (plugins/Live/API.php,
        # addFilterToCleanVisitors), as dear as a day's archive read.
        self.visit_cost = 0.0
        self.visits_listed = 0  # the visits its Live answers listed: the work visit_cost charges for
        self.max_input_vars: int | None = None  # PHP's limit on POST variables (default 1000)
        # Instead of `site_ids` and `visits`, a benchmark may generate visits (None: unknown site).
        self.visits_fn: Callable[[int, str], int | None] | None = None
        # A whole-install failure (MySQL down, php-fpm restarting behind a proxy): every request,
        # whatever it asks, gets `answer` for `seconds` from the next request on (None: all night).
        # With `version_answers`, API.getMatomoVersion still answers (it needs no database).
        self._outage: tuple[float | None, Response] | None = None
        self.version_answers = False
        self._outage_until: float | None = None
        # Matomo 5.8's API_bulk_request_limit: more sub-requests answer one JSON error, HTTP 400.
        self.bulk_request_limit: int | None = None
        # A proxy in front (nginx: proxy_read_timeout) gives up on a request after this many seconds
        # with its own 504 page, while PHP goes on working on it to the end.
        self.proxy_timeout: float | None = None
        self.site_days_worked = 0  # the server's work: site-days computed, abandoned ones included
        # PHP-FPM's pool (pm.max_children): requests beyond it wait for a worker.
        self.php: threading.Semaphore | contextlib.nullcontext = contextlib.nullcontext()
        self.bodies: list[tuple] = []  # the (site, date) of each bulk request's sub-requests, in order
        # Each site's creation (SitesManager's ts_created, UTC); before it every day answers empty.
        self.created: dict[int, str] = {}
        # The visitor log (Live API) switched off in the general settings: its sub-requests fail.
        self.visitor_log_off = False
        # enable_processing_unique_visitors_day = 0 in config.ini.php: answers lack nb_uniq_visitors
        # (plugins/VisitsSummary/API.php asks for it only where SettingsPiwik says it is counted).
        self.unique_visitors_off = False
        # A benchmark's harness may serve every VisitsSummary object whole, whatever showColumns
        # asks (the cost of decoding then does not depend on what the job asks for).
        self.full_answers = False

    def php_workers(self, workers: int | None) -> None:
        self.php = threading.Semaphore(workers) if workers else contextlib.nullcontext()

    def kind(self, request: Request) -> str:
        """'bulk' for a request of VisitsSummary reports; 'raw log' (Live), 'sites' (SitesManager),
        or the method's name for the others."""
        body = request.body.decode(errors="replace")
        if "VisitsSummary.get" in body:
            return "bulk"
        if "Live.getLastVisitsDetails" in body:
            return "raw log"
        if "SitesManager." in body:
            return "sites"
        return request.query.get("method", "other")

    def report_requests(self) -> list[Request]:
        """The requests that asked for VisitsSummary reports (the work the tests measure)."""
        return [request for request in self.requests if self.kind(request) == "bulk"]

    def visits_on(self, site: int, day: str) -> int:
        if self.visits_fn:
            return self.visits_fn(site, day) or 0
        return self.visits.get((site, day), 0)

    def knows(self, site: int) -> bool:
        return self.visits_fn(site, "") is not None if self.visits_fn else site in self.site_ids

    def outage(self, seconds: float | None, answer: Response, version_answers: bool = False) -> None:
        self._outage, self._outage_until = (seconds, answer), None
        self.version_answers = version_answers

    def in_outage(self) -> Response | None:
        if self._outage is None:
            return None
        seconds, answer = self._outage
        now = time.monotonic()
        if self._outage_until is None:
            self._outage_until = now + seconds if seconds is not None else float("inf")
        return answer if now < self._outage_until else None

    def handle_request_of(self, request: Request) -> Response:
        down = self.in_outage()
        if down and not (self.version_answers and request.query.get("method") == "API.getMatomoVersion"):
            return down
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
        if request.query.get("method") == "API.getMatomoVersion":
            if (
                not self.site_ids and not self.visits_fn
            ):  # Piwik::checkUserHasSomeViewAccess(): a NoAccessException
                return Response(401, {"result": "error", "message": NO_VIEW_ACCESS[self.language]})
            return Response(200, {"value": "5.4.0"})
        if request.query.get("method") == "SitesManager.getSitesIdWithAtLeastViewAccess":
            return Response(200, sorted(self.site_ids))  # read from the database's access tables
        if request.query.get("method") != "API.getBulkRequest":
            return Response(200, {"result": "error", "message": "Only API.getBulkRequest is played here"})
        form = dict(parse_qsl(request.body.decode(), keep_blank_values=True)[: self.max_input_vars])
        subs = []
        n = 0
        while f"urls[{n}]" in form:
            sub = dict(parse_qsl(form[f"urls[{n}]"]))
            if sub.get("method"):
                subs.append(sub)
            n += 1
        reports = tuple(
            (int(sub.get("idSite", 0)), sub.get("date", ""))
            for sub in subs
            if sub["method"] == "VisitsSummary.get"
        )
        if reports:
            self.bodies.append(reports)
        if self.bulk_request_limit is not None and len(subs) > self.bulk_request_limit:
            self.counts["over limit"] += 1
            return Response(400, {"result": "error", "message": BULK_LIMIT_MESSAGE})
        if any(int(sub.get("idSite", 0)) in self.fatal_sites for sub in subs):
            return Response(500, self.fatal_page, "text/html; charset=utf-8")
        site_days = sum(len(days_of(sub["date"])) for sub in subs if sub.get("method") == "VisitsSummary.get")
        self.site_days_worked += site_days
        answers = [self.answer(sub) for sub in subs]
        listed = sum(
            len(slot)
            for sub, slot in zip(subs, answers)
            if sub["method"] == "Live.getLastVisitsDetails" and isinstance(slot, list)
        )
        self.visits_listed += listed
        work = self.site_day_cost * site_days + self.visit_cost * listed
        if self.proxy_timeout is not None and work > self.proxy_timeout:
            time.sleep(self.proxy_timeout)  # PHP goes on; the proxy answers
            return Response(504, GATEWAY_TIMEOUT_PAGE, "text/html")
        if work:
            with self.php:  # a request waits for a free PHP worker, then works
                time.sleep(work)
        return Response(200, answers)

    def answer(self, sub: dict[str, str]):
        site = int(sub.get("idSite", 0))
        if site in self.error_slots:
            return {"result": "error", "message": self.error_slots[site]}
        if not self.knows(site):
            return {
                "result": "error",
                "message": f"An unexpected website was found in the request: website id was set to '{site}' .",
            }
        if sub["method"] == "SitesManager.getSiteFromId":
            return self.site_row(site)
        if sub["method"] == "Live.getLastVisitsDetails":
            return self.last_visits(site, sub)
        if sub["method"] != "VisitsSummary.get" or sub.get("period") != "day":
            return {"result": "error", "message": f"The method '{sub['method']}' is not played here"}
        columns = tuple(c for c in sub.get("showColumns", "").split(",") if c and not self.full_answers)
        if self.unique_visitors_off:
            columns = tuple(
                c for c in columns or visits_summary(0) if c not in ("nb_uniq_visitors", "nb_users")
            )
        days = days_of(sub["date"])
        visits = {day: 0 if day in self.not_archived else self.visits_on(site, day) for day in days}
        if "," not in sub["date"]:
            return summary_of(visits[days[0]], columns)
        return {day: summary_of(n, columns) if n else [] for day, n in visits.items()}

    def site_row(self, site: int) -> dict:
        """SitesManager.getSiteFromId: the site's row, every value a string as Matomo's DB gives it."""
        return {
            "idsite": str(site),
            "name": f"Site {site}",
            "main_url": f"https://site{site}.example.net",
            "ts_created": self.created.get(site, "2020-01-01 00:00:00"),
            "ecommerce": "0",
            "sitesearch": "1",
            "timezone": "UTC",
            "currency": "USD",
            "exclude_unknown_urls": "0",
            "excluded_ips": "",
            "excluded_parameters": "",
            "group": "",
            "type": "website",
            "keep_url_fragment": "0",
            "creator_login": "admin",
        }

    def last_visits(self, site: int, sub: dict[str, str]) -> list | dict:
        """Live.getLastVisitsDetails: the raw log's visits of the period, newest first, whatever
        the archiver has processed; [] for none; an error when the visitor log is off."""
        if self.visitor_log_off:
            return {
                "result": "error",
                "message": "Visits log is deactivated globally. A user with super user access can "
                "re-enable this in the General Settings.",
            }
        period, date = sub.get("period"), sub.get("date", "")
        if period not in ("day", "range") or (period == "range") != ("," in date):
            return {
                "result": "error",
                "message": f"The period '{period}' is not played here with date {date}",
            }
        limit = int(sub.get("filter_limit", 100))
        shown = [c for c in sub.get("showColumns", "").split(",") if c]  # the API's ColumnDelete
        visits = []
        for day in reversed(days_of(date)):
            for n in range(self.visits_on(site, day)):
                if len(visits) == limit:
                    return visits
                visit = {
                    "idSite": str(site),
                    "idVisit": str(n + 1),
                    "serverDate": day,
                    "visitorType": "new",
                    "actionDetails": [] if sub.get("doNotFetchActions") else [{"type": "action"}],
                }
                visits.append({k: v for k, v in visit.items() if k in shown} if shown else visit)
        return visits


def days_of(date: str) -> list[str]:
    """The days of a `date` parameter: one day, or 'start,end'."""
    if "," not in date:
        return [date]
    start, end = (dt.date.fromisoformat(d) for d in date.split(","))
    return [(start + dt.timedelta(n)).isoformat() for n in range((end - start).days + 1)]


@functools.lru_cache(maxsize=4096)
def summary_of(visits: int, columns: tuple[str, ...]) -> dict:
    """The object for one site and day, trimmed to showColumns' metrics; one shared object per
    answer (only serialized), so that a benchmark's year of 10,000 sites does not build 3.65
    million of them on the cores the aggregator runs on."""
    summary = visits_summary(visits)
    return {k: v for k, v in summary.items() if k in columns} if columns else summary

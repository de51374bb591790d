#!/usr/bin/env python3
"""Nightly analytics aggregator.

For every deployed site in Supabase, fetch one day's (or a range of days') Matomo
visits and Google Search Console clicks/impressions, and upsert one row per
(date, site_id) into `daily_analytics`. A value that could not be fetched never
replaces a stored one.

    python aggregator.py                        # the day before yesterday
    python aggregator.py --date 2026-11-20      # one day
    python aggregator.py --from 2026-10-01 --to 2026-10-31   # a backfill

Exit status: 0 all fetched and stored; 1 nothing could be done (configuration,
Supabase); 2 usage error; 3 finished, but some values are missing (see the log).
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import logging
import os
import re
import stat
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import quote, quote_plus, urlencode, urlsplit

import google_auth_httplib2
import httplib2
import httpx
import requests
from dotenv import load_dotenv
from google.auth.exceptions import RefreshError
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from postgrest.exceptions import APIError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from supabase import Client, ClientOptions, create_client

log = logging.getLogger("aggregator")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

# Search Console publishes a day's data after about two days.
DEFAULT_LAG_DAYS = 2
# Search Console keeps about 16 months (~486 days). Older days answer "no rows", which must
# not be stored as 0 over numbers fetched back then: stay a little inside the limit.
GSC_RETENTION_DAYS = 480
GSC_SCOPE = "https://www.googleapis.com/auth/webmasters.readonly"
MIGRATION = "supabase/migrations/20261125000000_analytics.sql"
T = TypeVar("T")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """The configuration is missing or malformed; the message says what to set."""


REQUIRED = (
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "MATOMO_URL",
    "MATOMO_TOKEN_AUTH",
    "GOOGLE_CLIENT_ID",
    "GOOGLE_CLIENT_SECRET",
)
URL_VARIABLES = ("SUPABASE_URL", "MATOMO_URL", "GOOGLE_TOKEN_URI", "GSC_API_ENDPOINT")
TUNING_DEFAULTS = {
    "HTTP_TIMEOUT": 60,  # seconds, for every single network call
    "HTTP_RETRIES": 3,  # retries of a transient failure (5xx, 429, connection)
    "MATOMO_BULK_SIZE": 100,  # VisitsSummary.get sub-requests per bulk request
    "UPSERT_CHUNK_SIZE": 500,  # rows per upsert request
    "GSC_ACCOUNT_WORKERS": 4,  # Search Console accounts fetched at once
    "RUN_DEADLINE": 7200,  # seconds after which no new fetch starts
}


@dataclass(frozen=True)
class Config:
    supabase_url: str
    supabase_key: str
    matomo_url: str
    matomo_token: str
    google_client_id: str
    google_client_secret: str
    google_token_uri: str = "https://oauth2.googleapis.com/token"
    gsc_api_endpoint: str = "https://searchconsole.googleapis.com/"
    http_timeout: int = 60
    http_retries: int = 3
    matomo_bulk_size: int = 100
    upsert_chunk_size: int = 500
    gsc_account_workers: int = 4
    run_deadline: int = 7200

    def secrets(self) -> tuple[str, ...]:
        return (self.supabase_key, self.matomo_token, self.google_client_secret)


@dataclass(frozen=True)
class Deadline:
    """The moment after which no new fetch starts, so that a hung service cannot hold the
    run (and tomorrow's) forever; what was fetched by then is still stored."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def passed(self) -> bool:
        return time.monotonic() >= self.at


def default_env_file() -> Path:
    return Path(__file__).resolve().parent / ".env"


def load_config(env_file: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read .env (variables already in the environment win) and validate everything at once."""
    if env_file.exists():
        warn_if_readable_by_others(env_file)
        load_dotenv(env_file, override=False)
    env = {k: v.strip() for k, v in environ.items()}
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise ConfigError(
            f"Missing configuration: {', '.join(missing)}. "
            f"Set them in {env_file} (see .env.example) or in the environment."
        )
    problems = [
        f"{name} must be an http(s) URL, got {env[name]!r}"
        for name in URL_VARIABLES
        if env.get(name) and not is_http_url(env[name])
    ]
    tuning = {}
    for name, default in TUNING_DEFAULTS.items():
        raw = env.get(name) or str(default)
        least = 0 if name == "HTTP_RETRIES" else 1
        if not raw.isdigit() or int(raw) < least:
            problems.append(f"{name} must be a whole number of at least {least}, got {raw!r}")
        else:
            tuning[name.lower()] = int(raw)
    if problems:
        raise ConfigError("Bad configuration: " + "; ".join(problems) + ".")
    optional = {
        key: env[name]
        for key, name in (
            ("google_token_uri", "GOOGLE_TOKEN_URI"),
            ("gsc_api_endpoint", "GSC_API_ENDPOINT"),
        )
        if env.get(name)
    }
    return Config(
        supabase_url=env["SUPABASE_URL"],
        supabase_key=env["SUPABASE_SERVICE_ROLE_KEY"],
        matomo_url=env["MATOMO_URL"],
        matomo_token=env["MATOMO_TOKEN_AUTH"],
        google_client_id=env["GOOGLE_CLIENT_ID"],
        google_client_secret=env["GOOGLE_CLIENT_SECRET"],
        **optional,
        **tuning,
    )


def is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def warn_if_readable_by_others(env_file: Path) -> None:
    if env_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; run: chmod 600 %s", env_file, env_file)


# ---------------------------------------------------------------------------
# Logging: one filter keeps every secret out of every line
# ---------------------------------------------------------------------------


class SecretFilter(logging.Filter):
    """Replaces every known secret (and its URL-encoded forms) in a record before it is written.

    It sits on the handler, so it also covers the records of urllib3, httpx, httplib2 and
    google-auth, which log URLs, headers and bodies at DEBUG.
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, *values: str | None) -> None:
        for value in values:
            if value and len(value) >= 4:
                self._secrets |= {value, quote(value, safe=""), quote_plus(value)}

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "[redacted]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def setup_logging(level: str) -> SecretFilter:
    secret_filter = SecretFilter()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(secret_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if level != "DEBUG":
        # These log one INFO line per request: thousands of lines a night.
        for noisy in ("httpx", "googleapiclient.discovery", "google_auth_httplib2"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return secret_filter


# ---------------------------------------------------------------------------
# Dates
# ---------------------------------------------------------------------------


class UsageError(Exception):
    """Bad command-line input; the message says what is accepted."""


def parse_day(text: str) -> dt.date:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise UsageError(f"{text!r} is not a date: use YYYY-MM-DD, e.g. 2026-11-20")
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a real calendar date: use YYYY-MM-DD") from None


def days_between(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=n) for n in range((end - start).days + 1)]


def target_days(args: argparse.Namespace, today: dt.date) -> list[dt.date]:
    """The inclusive list of days to aggregate, validated."""
    default = today - dt.timedelta(days=DEFAULT_LAG_DAYS)
    if args.date and (args.start or args.end):
        raise UsageError("use either --date or --from/--to, not both")
    if args.end and not args.start:
        raise UsageError("--to needs --from, e.g. --from 2026-10-01 --to 2026-10-31")
    start = parse_day(args.date or args.start) if (args.date or args.start) else default
    end = parse_day(args.end) if args.end else (start if args.date else default)
    if args.start and not args.end:
        end = max(default, start)
    if start > end:
        raise UsageError(f"the range ends ({end}) before it starts ({start})")
    if end > today:
        raise UsageError(f"{end} is in the future: the latest day accepted is today ({today})")
    if start < gsc_oldest_day(today):
        log.warning(
            "%s is older than Search Console keeps (about 16 months): GSC is fetched only from %s on; "
            "Matomo for every day",
            start,
            gsc_oldest_day(today),
        )
    return days_between(start, end)


def gsc_oldest_day(today: dt.date) -> dt.date:
    return today - dt.timedelta(days=GSC_RETENTION_DAYS)


# ---------------------------------------------------------------------------
# Supabase: reading the fleet, and the shared retry for its writes
# ---------------------------------------------------------------------------


class SupabaseError(Exception):
    """Supabase could not be read; nothing can be done this run."""


@dataclass(frozen=True)
class Site:
    id: Any
    domain: str | None
    matomo_site_id: Any
    gsc_account_id: Any


# A Supabase project silently caps every answer (1,000 rows by default).
PAGE_SIZE = 1000


def supabase_client(cfg: Config) -> Client:
    options = ClientOptions(
        postgrest_client_timeout=cfg.http_timeout,
        auto_refresh_token=False,
        persist_session=False,
    )
    return create_client(cfg.supabase_url, cfg.supabase_key, options)


def fetch_all(client: Client, table: str, columns: str, **equals: str) -> list[dict]:
    """Every row of a table, page by page.

    Paging stops at an empty page, not a short one: a project whose max-rows is below
    PAGE_SIZE answers short pages all the way through.
    """
    rows: list[dict] = []
    while True:
        query = client.table(table).select(columns)
        for column, value in equals.items():
            query = query.eq(column, value)
        try:
            page = query.order("id").range(len(rows), len(rows) + PAGE_SIZE - 1).execute().data
        except (APIError, httpx.HTTPError) as error:
            raise SupabaseError(describe_supabase_error(error, f"reading {table}")) from None
        if not page:
            return rows
        rows.extend(page)


def deployed_sites(client: Client) -> list[Site]:
    rows = fetch_all(
        client,
        "sites",
        "id,domain,matomo_site_id,gsc_account_id",
        status_deployment="deployed",
    )
    return [Site(r["id"], r["domain"], r["matomo_site_id"], r["gsc_account_id"]) for r in rows]


def refresh_tokens_by_account(client: Client) -> dict[Any, str]:
    rows = fetch_all(client, "gsc_accounts", "id,oauth_refresh_token")
    return {row["id"]: row["oauth_refresh_token"] for row in rows}


SCHEMA_ERRORS = {"42P10", "PGRST204", "PGRST205", "42P01", "42703"}


def describe_supabase_error(error: Exception, doing: str) -> str:
    """One line naming what failed and what to do about it."""
    if isinstance(error, httpx.TimeoutException):
        return f"Supabase did not answer in time while {doing} (HTTP_TIMEOUT)"
    if isinstance(error, httpx.HTTPError):
        return f"cannot reach Supabase while {doing}: {error}; check SUPABASE_URL"
    assert isinstance(error, APIError)
    code, message = str(error.code or ""), error.message or "no message"
    if code in ("401", "403", "PGRST301", "PGRST302") or "api key" in message.lower():
        fix = "use the service_role key (Project Settings > API) as SUPABASE_SERVICE_ROLE_KEY"
    elif code in SCHEMA_ERRORS:
        fix = f"the tables do not match what the aggregator expects: apply {MIGRATION}"
    elif code.startswith("5"):
        fix = "Supabase is having trouble; the next run will fill the gap"
    else:
        fix = "see the Supabase logs"
    return f"Supabase error while {doing}: {message} (code {code}): {fix}"


def is_transient(error: Exception) -> bool:
    if isinstance(error, httpx.TransportError):
        return True
    return isinstance(error, APIError) and str(error.code or "") in ("500", "502", "503", "504")


def with_retries(call: Callable[[], T], attempts: int, delay: float = 1.0) -> T:
    """Run call(), retrying transient Supabase failures with exponential backoff.

    postgrest-py retries only GET requests; an upsert is idempotent, so it is safe to retry.
    """
    for attempt in range(attempts):
        try:
            return call()
        except (APIError, httpx.HTTPError) as error:
            if attempt + 1 == attempts or not is_transient(error):
                raise
            log.info("Supabase: transient error (%s), retrying", describe_supabase_error(error, "writing"))
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# Matomo
# ---------------------------------------------------------------------------


class MatomoError(Exception):
    """A whole Matomo bulk request failed."""


class MatomoConfigError(MatomoError):
    """The token or the URL is wrong: every request would fail the same way."""


@dataclass(frozen=True)
class MatomoClient:
    session: requests.Session
    endpoint: str
    token: str
    timeout: int
    retries: int
    bulk_size: int
    deadline: Deadline


def matomo_client(cfg: Config, deadline: Deadline) -> MatomoClient:
    # Reports are read-only, so a POST is as safe to retry as a GET.
    retry = Retry(
        total=cfg.http_retries,
        backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,
        raise_on_status=False,
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    base = cfg.matomo_url.rstrip("/")
    endpoint = base if base.endswith("index.php") else base + "/index.php"
    return MatomoClient(
        session,
        endpoint,
        cfg.matomo_token,
        cfg.http_timeout,
        cfg.http_retries,
        cfg.matomo_bulk_size,
        deadline,
    )


def matomo_date_param(days: list[dt.date]) -> str:
    return days[0].isoformat() if len(days) == 1 else f"{days[0]},{days[-1]}"


def post_bulk_request(matomo: MatomoClient, sub_queries: list[str]) -> list:
    """One API.getBulkRequest; returns its answer slots, one per sub-query."""
    # module and method stay in the query string so that an auth failure answers JSON;
    # the token goes in the body: Matomo 5 "secure only" tokens are refused in URLs.
    body = {"token_auth": matomo.token}
    body.update({f"urls[{n}]": query for n, query in enumerate(sub_queries)})
    try:
        response = matomo.session.post(
            matomo.endpoint,
            params={"module": "API", "method": "API.getBulkRequest", "format": "json"},
            data=body,
            timeout=matomo.timeout,
        )
    except requests.RequestException as error:
        raise MatomoError(f"Matomo request failed: {error}") from None
    status = response.status_code
    if status >= 500:
        raise MatomoError(f"Matomo answered HTTP {status} (retried {matomo.retries} times)")
    try:
        answer = response.json()
    except ValueError:
        if "html" in response.headers.get("Content-Type", ""):
            raise MatomoConfigError(
                f"Matomo answered HTTP {status} with an HTML page, not JSON: MATOMO_URL is "
                f"probably wrong (it must be the base URL of the Matomo install, where index.php is)"
            ) from None
        raise MatomoError(f"Matomo answered HTTP {status} with malformed JSON") from None
    if isinstance(answer, dict) and answer.get("result") == "error":
        message = html.unescape(str(answer.get("message", "")))
        if status == 401 and "authenticate" in message:
            raise MatomoConfigError(
                f"Matomo rejected MATOMO_TOKEN_AUTH ({message}): create a new token "
                "(Administration > Personal > Security) with view access to every site"
            )
        raise MatomoError(f"Matomo error (HTTP {status}): {message}")
    if status != 200 or not isinstance(answer, list):
        raise MatomoError(f"Matomo answered HTTP {status} with an unexpected body")
    if len(answer) != len(sub_queries):
        raise MatomoError(f"Matomo answered {len(answer)} results for {len(sub_queries)} queries")
    return answer


def visits_by_day(slot: Any, days: list[dt.date]) -> dict[dt.date, int]:
    """Visits per day from one VisitsSummary.get answer; raises ValueError for an error slot."""
    if isinstance(slot, dict) and slot.get("result") == "error":
        raise ValueError(slot.get("message", "error"))
    if len(days) == 1:
        slot = {days[0].isoformat(): slot}
    if not isinstance(slot, dict):
        raise ValueError(f"unexpected answer {str(slot)[:80]!r}")
    visits = {}
    for day in days:
        value = slot.get(day.isoformat())
        # An empty day is [] (or an object of zeros), never a missing key.
        if value == []:
            visits[day] = 0
        elif isinstance(value, dict) and isinstance(value.get("nb_visits"), int):
            visits[day] = value["nb_visits"]
        else:
            raise ValueError(f"no visits for {day} in the answer")
    return visits


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def get_matomo_data(
    matomo: MatomoClient, site_ids: Iterable[int], days: list[dt.date]
) -> dict[int, dict[dt.date, int]]:
    """{matomo site id: {day: visits}} for every site Matomo answered for.

    A site that is missing from the result has no value: it must not be stored as 0.
    """
    ids = sorted(set(site_ids))
    date = matomo_date_param(days)
    result: dict[int, dict[dt.date, int]] = {}
    for n, chunk in enumerate(chunks(ids, matomo.bulk_size)):
        if matomo.deadline.passed():
            log.warning(
                "RUN_DEADLINE reached: no Matomo values for %d sites", len(ids) - n * matomo.bulk_size
            )
            break
        queries = [
            urlencode({"method": "VisitsSummary.get", "idSite": i, "date": date, "period": "day"})
            for i in chunk
        ]
        try:
            slots = post_bulk_request(matomo, queries)
        except MatomoConfigError as error:
            log.error("%s", error)
            return result
        except MatomoError as error:
            log.warning("%s; no Matomo values for %d sites (ids %s)", error, len(chunk), id_list(chunk))
            continue
        for site_id, slot in zip(chunk, slots):
            try:
                result[site_id] = visits_by_day(slot, days)
            except ValueError as error:
                log.warning("Matomo site id %s: %s", site_id, error)
    return result


def id_list(ids: list, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# ---------------------------------------------------------------------------
# Google Search Console
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GscMetrics:
    clicks: int
    impressions: int
    ctr: float | None
    position: float | None


NO_SEARCH_TRAFFIC = GscMetrics(0, 0, None, None)


def get_google_client(cfg: Config, refresh_token: str) -> Any:
    """A Search Console service for one account; building it makes no network call."""
    credentials = Credentials(
        token=None,
        refresh_token=refresh_token,
        client_id=cfg.google_client_id,
        client_secret=cfg.google_client_secret,
        token_uri=cfg.google_token_uri,
        scopes=[GSC_SCOPE],
    )
    # Our own Http carries the timeout; the token refresh goes through it as well.
    http = google_auth_httplib2.AuthorizedHttp(credentials, http=httplib2.Http(timeout=cfg.http_timeout))
    return build(
        "searchconsole",
        "v1",
        http=http,
        client_options={"api_endpoint": cfg.gsc_api_endpoint},
        cache_discovery=False,
        static_discovery=True,
    )


def verified_properties(site_list_answer: dict) -> dict[str, str]:
    """{lower-cased property: property} for the properties whose data the account may read."""
    return {
        entry["siteUrl"].lower(): entry["siteUrl"]
        for entry in site_list_answer.get("siteEntry", [])
        if entry.get("permissionLevel") != "siteUnverifiedUser"
    }


def normalised_domain(raw: Any) -> str | None:
    """'https://WWW.Example.com/' -> 'example.com'; None when it is not a bare domain."""
    if not isinstance(raw, str):
        return None
    text = raw.strip().lower()
    text = re.sub(r"^[a-z][a-z0-9+.-]*://", "", text).rstrip("/").rstrip(".")
    text = text[4:] if text.startswith("www.") else text
    label = r"(?!-)[\w-]{1,63}(?<!-)"
    return text if re.fullmatch(rf"{label}(\.{label})+", text) else None


def property_for_domain(domain: str, properties: Mapping[str, str]) -> str | None:
    """The account's property for a domain: a domain property first, then URL prefixes."""
    for candidate in (
        f"sc-domain:{domain}",
        f"https://{domain}/",
        f"https://www.{domain}/",
        f"http://{domain}/",
        f"http://www.{domain}/",
    ):
        if candidate in properties:
            return properties[candidate]
    return None


def metrics_by_day(answer: Any, days: list[dt.date]) -> dict[dt.date, GscMetrics]:
    """Per-day metrics of a searchanalytics.query answer grouped by date.

    Search Console omits days without data (and omits `rows` entirely when nothing at all),
    so a day inside a successful answer that has no row had no search traffic.
    """
    if not isinstance(answer, dict):
        raise ValueError(f"unexpected answer {str(answer)[:80]!r}")
    metrics = dict.fromkeys(days, NO_SEARCH_TRAFFIC)
    for row in answer.get("rows", []):
        day = dt.date.fromisoformat(row["keys"][0])
        if day in metrics:
            metrics[day] = GscMetrics(
                round(row["clicks"]), round(row["impressions"]), row["ctr"], row["position"]
            )
    return metrics


def get_gsc_data(
    gsc_client: Any,
    site_urls: Mapping[Any, str],
    days: list[dt.date],
    retries: int = 3,
    deadline: Deadline | None = None,
) -> dict[Any, dict[dt.date, GscMetrics]]:
    """{site id: {day: metrics}} for each site whose property answered; one query per site."""
    # One query covers the whole range: it can hold 25,000 rows, far beyond GSC's 16 months.
    body = {
        "startDate": days[0].isoformat(),
        "endDate": days[-1].isoformat(),
        "dimensions": ["date"],
        "type": "web",
        "rowLimit": 25000,
    }
    result = {}
    for n, (site_id, site_url) in enumerate(site_urls.items()):
        if deadline and deadline.passed():
            log.warning("RUN_DEADLINE reached: %d Search Console properties not queried", len(site_urls) - n)
            break
        try:
            answer = (
                gsc_client.searchanalytics().query(siteUrl=site_url, body=body).execute(num_retries=retries)
            )
            result[site_id] = metrics_by_day(answer, days)
        except HttpError as error:
            log.warning("GSC %s: HTTP %s: %s", site_url, error.status_code, http_error_reason(error))
        except (ValueError, KeyError, TypeError, OSError, httplib2.HttpLib2Error) as error:
            log.warning("GSC %s: %s", site_url, error)
    return result


def http_error_reason(error: HttpError) -> str:
    reason = error._get_reason() if hasattr(error, "_get_reason") else str(error)
    if error.status_code == 403:
        return f"{reason} (grant this account access to the property in Search Console)"
    return reason


def gsc_data_for_account(
    cfg: Config,
    account_id: Any,
    refresh_token: str,
    sites: list[Site],
    days: list[dt.date],
    deadline: Deadline,
) -> dict[Any, dict[dt.date, GscMetrics]]:
    """Search Console metrics for one account's sites; a failure here costs only these sites."""
    if deadline.passed():
        log.warning("RUN_DEADLINE reached: GSC account %s not queried (%d sites)", account_id, len(sites))
        return {}
    try:
        client = get_google_client(cfg, refresh_token)
        listing = client.sites().list().execute(num_retries=cfg.http_retries)
    except RefreshError as error:
        fix = (
            "the refresh token has expired or been revoked: re-authorize this account "
            "and store the new refresh token in gsc_accounts"
            if "invalid_grant" in str(error)
            else "the Google token endpoint failed; the next run will retry"
        )
        log.warning(
            "GSC account %s: %s (%s); no GSC data for its %d sites", account_id, fix, error, len(sites)
        )
        return {}
    except HttpError as error:
        log.warning(
            "GSC account %s: cannot list properties: HTTP %s: %s; no GSC data for its %d sites",
            account_id,
            error.status_code,
            http_error_reason(error),
            len(sites),
        )
        return {}
    except Exception as error:  # noqa: BLE001 - one account must never sink the run
        log.warning("GSC account %s: %s; no GSC data for its %d sites", account_id, error, len(sites))
        return {}
    if not isinstance(listing, dict):
        log.warning("GSC account %s: unexpected answer to sites.list; check GSC_API_ENDPOINT", account_id)
        return {}
    properties = verified_properties(listing)
    site_urls = {}
    for site in sites:
        domain = normalised_domain(site.domain)
        site_url = property_for_domain(domain, properties) if domain else None
        if domain is None:
            log.warning(
                "Site %s: domain %r is not a bare domain like example.com; GSC skipped", site.id, site.domain
            )
        elif site_url is None:
            log.warning(
                "Site %s: account %s has no verified Search Console property for %s "
                "(looked for sc-domain:%s and https/http URL prefixes)",
                site.id,
                account_id,
                domain,
                domain,
            )
        else:
            site_urls[site.id] = site_url
    return get_gsc_data(client, site_urls, days, cfg.http_retries, deadline)


def gsc_data_for_fleet(
    cfg: Config,
    sites: list[Site],
    refresh_tokens: Mapping[Any, str],
    days: list[dt.date],
    deadline: Deadline,
) -> dict[Any, dict[dt.date, GscMetrics]]:
    """Search Console metrics for every site with an account; accounts run in parallel.

    Each account has its own Http object and is handled by one thread, as httplib2 requires.
    """
    by_account = sites_by_account(sites)
    for account_id in by_account.keys() - refresh_tokens.keys():
        for site in by_account[account_id]:
            log.warning(
                "Site %s: gsc_account_id %s matches no row of gsc_accounts; GSC skipped", site.id, account_id
            )
    runnable = [a for a in by_account if a in refresh_tokens]
    result: dict[Any, dict[dt.date, GscMetrics]] = {}
    with ThreadPoolExecutor(max_workers=cfg.gsc_account_workers) as pool:
        futures = [
            pool.submit(gsc_data_for_account, cfg, a, refresh_tokens[a], by_account[a], days, deadline)
            for a in runnable
        ]
        for future in futures:
            result.update(future.result())
    return result


# ---------------------------------------------------------------------------
# Shaping rows (pure)
# ---------------------------------------------------------------------------


def sites_by_account(sites: Iterable[Site]) -> dict[Any, list[Site]]:
    grouped: dict[Any, list[Site]] = defaultdict(list)
    for site in sites:
        if site.gsc_account_id is not None:
            grouped[site.gsc_account_id].append(site)
    return dict(grouped)


def matomo_id(site: Site) -> int | None:
    """The site's Matomo id as a positive int, or None when it is missing or malformed."""
    value = site.matomo_site_id
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def analytics_rows(
    sites: Iterable[Site],
    days: list[dt.date],
    visits: Mapping[Any, Mapping[dt.date, int]],
    gsc: Mapping[Any, Mapping[dt.date, GscMetrics]],
) -> list[dict]:
    """One row per site and day that has at least one fetched value.

    A column is present only when its source answered for that site and day: a missing key
    is what keeps a stored value from being overwritten.
    """
    rows = []
    for site in sites:
        site_visits = visits.get(site.id, {})
        site_gsc = gsc.get(site.id, {})
        for day in days:
            row: dict[str, Any] = {"date": day.isoformat(), "site_id": site.id}
            if day in site_visits:
                row["matomo_visits"] = site_visits[day]
            if day in site_gsc:
                m = site_gsc[day]
                row.update(
                    gsc_clicks=m.clicks,
                    gsc_impressions=m.impressions,
                    gsc_ctr=m.ctr,
                    gsc_position=m.position,
                )
            if len(row) > 2:
                rows.append(row)
    return rows


def rows_by_columns(rows: Iterable[dict]) -> dict[tuple[str, ...], list[dict]]:
    """Rows grouped by the exact set of columns they carry.

    PostgREST writes every column of a bulk upsert's key union into every row (NULL where a
    row lacks it), so each upsert request must hold rows of one shape only.
    """
    groups: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(sorted(row))].append(row)
    return dict(groups)


# ---------------------------------------------------------------------------
# Storing
# ---------------------------------------------------------------------------


def store_rows(client: Client, rows: list[dict], cfg: Config) -> tuple[int, int]:
    """Upsert rows in chunks of one shape; returns (stored, not stored)."""
    stored = not_stored = 0
    pending = [
        chunk for group in rows_by_columns(rows).values() for chunk in chunks(group, cfg.upsert_chunk_size)
    ]
    for n, chunk in enumerate(pending):
        request = client.table("daily_analytics").upsert(
            chunk, on_conflict="date,site_id", returning="minimal"
        )
        try:
            with_retries(request.execute, cfg.http_retries + 1)
            stored += len(chunk)
        except (APIError, httpx.HTTPError) as error:
            log.error("%s; %d records not stored", describe_supabase_error(error, "storing rows"), len(chunk))
            not_stored += len(chunk)
            if isinstance(error, APIError) and str(error.code) in SCHEMA_ERRORS | {"401", "PGRST301"}:
                rest = sum(len(c) for c in pending[n + 1 :])
                if rest:
                    log.error("Not trying the other %d records: every request would fail the same way", rest)
                return stored, not_stored + rest
    return stored, not_stored


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    sites: int
    matomo_wanted: int
    matomo_fetched: int
    gsc_wanted: int
    gsc_fetched: int
    stored: int
    not_stored: int

    def summary(self) -> str:
        return (
            f"Processed {self.sites} sites. Fetched Matomo data for {self.matomo_fetched}. "
            f"Fetched GSC data for {self.gsc_fetched}. Stored {self.stored} records."
        )

    def exit_status(self) -> int:
        if self.not_stored and not self.stored:
            return EXIT_FAILED
        complete = (
            self.matomo_fetched == self.matomo_wanted
            and self.gsc_fetched == self.gsc_wanted
            and not self.not_stored
        )
        return EXIT_OK if complete else EXIT_PARTIAL


def matomo_data_for_fleet(
    cfg: Config, sites: list[Site], days: list[dt.date], deadline: Deadline
) -> dict[Any, dict[dt.date, int]]:
    """{site id: {day: visits}} for every site with a usable Matomo id."""
    ids = {}
    for site in sites:
        if site.matomo_site_id is None:
            continue
        if matomo_id(site) is None:
            log.warning(
                "Site %s: matomo_site_id %r is not a positive number; Matomo skipped",
                site.id,
                site.matomo_site_id,
            )
        else:
            ids[site.id] = matomo_id(site)
    if not ids:
        return {}
    by_matomo_id = get_matomo_data(matomo_client(cfg, deadline), ids.values(), days)
    return {site_id: by_matomo_id[m] for site_id, m in ids.items() if m in by_matomo_id}


def run(cfg: Config, days: list[dt.date], today: dt.date, secret_filter: SecretFilter) -> Outcome:
    deadline = Deadline.after(cfg.run_deadline)
    client = supabase_client(cfg)
    sites = deployed_sites(client)
    refresh_tokens = refresh_tokens_by_account(client)
    secret_filter.add(*refresh_tokens.values())
    log.info("Aggregating %s to %s for %d deployed sites", days[0], days[-1], len(sites))

    visits = matomo_data_for_fleet(cfg, sites, days, deadline)
    gsc_days = [day for day in days if day >= gsc_oldest_day(today)]
    gsc = gsc_data_for_fleet(cfg, sites, refresh_tokens, gsc_days, deadline) if gsc_days else {}
    stored, not_stored = store_rows(client, analytics_rows(sites, days, visits, gsc), cfg)
    return Outcome(
        sites=len(sites),
        matomo_wanted=sum(1 for s in sites if s.matomo_site_id is not None),
        matomo_fetched=len(visits),
        gsc_wanted=sum(1 for s in sites if s.gsc_account_id is not None) if gsc_days else 0,
        gsc_fetched=len(gsc),
        stored=stored,
        not_stored=not_stored,
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        allow_abbrev=False,
        description="Store yesterday's Matomo and Search Console numbers for every deployed site.",
        epilog="Exit status: 0 ok, 1 nothing could be done, 2 usage error, 3 some values missing.",
    )
    parser.add_argument("--date", help="one day, e.g. 2026-11-20 (default: today minus 2 days)")
    parser.add_argument("--from", dest="start", help="first day of a backfill, e.g. 2026-10-01")
    parser.add_argument(
        "--to", dest="end", help="last day of a backfill, e.g. 2026-10-31 (default: today minus 2)"
    )
    parser.add_argument(
        "--env-file", type=Path, help="read configuration from this file instead of .env beside the script"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log, e.g. --log-level DEBUG (default INFO)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.env_file and not args.env_file.is_file():
            raise UsageError(f"--env-file {args.env_file}: no such file")
        secret_filter = setup_logging(args.log_level)
        today = dt.date.today()
        days = target_days(args, today)
    except UsageError as error:
        print(f"aggregator.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = load_config(args.env_file or default_env_file())
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_FAILED
    secret_filter.add(*cfg.secrets())
    try:
        outcome = run(cfg, days, today, secret_filter)
    except SupabaseError as error:
        log.error("%s", error)
        log.info("%s", Outcome(0, 0, 0, 0, 0, 0, 0).summary())
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("Interrupted; re-run the same dates to complete them")
        return 130
    except Exception:  # noqa: BLE001 - a bug: log it (redacted) instead of a raw traceback
        log.exception("Unexpected error; please report it with this log")
        return EXIT_FAILED
    log.info("%s", outcome.summary())
    if outcome.not_stored:
        log.error("%d records were not stored; re-run the same dates to store them", outcome.not_stored)
    return outcome.exit_status()


if __name__ == "__main__":
    sys.exit(main())

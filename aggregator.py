#!/usr/bin/env python3
"""Nightly analytics aggregator.

For every deployed site in Supabase, fetch Matomo visits and Google Search Console
clicks/impressions, and upsert one row per (date, site_id) into `daily_analytics`.
A value that could not be fetched never replaces a stored one.

    python aggregator.py                        # nightly: the 3 days ending today minus 2
    python aggregator.py --date 2026-11-20      # one day
    python aggregator.py --from 2026-10-01 --to 2026-10-31   # a backfill

Exit status: 0 all fetched and stored; 1 nothing could be done (configuration,
Supabase); 2 usage error; 3 finished, but some values are missing that a later run fetches
by itself; 4 a person must fix something (named in the last line).

Contents, in the order the file reads; each section gives the next what it names
(network: whether its functions talk to a service):

  (top)              ExitStatus; MATOMO_METRICS, the numbers of Matomo's answer   no network
                     that are stored
  Configuration      Config from .env and the environment, checked at once      no network
  Logging            the one secret filter on every line; progress; warnings     no network
                     grouped per cause
  Small tools        Deadline, the wall clock on every socket, Once, Reason      no network
                     (why a person must act, as a value), chunks
  Dates              the days a run asks for                                      no network
  Supabase           the class Supabase: the deployed sites, the accounts, the    network
                     holes, the schema check (SCHEMA), the retry every call
                     shares; store_chunk
  Matomo             MatomoClient: its requests, the failure ladder (less per     network
                     request, halves, an install that is down), zeros confirmed
                     in the raw log; beside it the queries and the answers' parsing
  Search Console     SearchConsole: each account connected, its properties;      network
                     one query per site, streamed within each account's quota
                     (GscRound); beside it the answers' parsing and its Reasons
  Shaping rows       rows from answers; the heal plan (pure functions)             no network
  Storing            chunks of rows to store_analytics, where the table's rules   network
                     live (a source that gave nothing, final values, zeros)
  The run            run(): the fleet, a flow of units through both sources to    network
                     the upserts, then the holes of earlier nights through the
                     same flow; Outcome
  What a run leaves  the dry-run table, the aggregator_runs row                   network
  check, status, accounts, authorize: the other commands                          network
  The command line   Command (one handler per command), the process, main()       no network

Process-wide effects, all installed by take_over_the_process() at the start of main(): the
singletons (secret_filter, problems, site_warnings, progress) emptied; gc.freeze() and fewer
full collections (gc.set_threshold); the root log handlers; socket.socket and
SSLContext.sslsocket_class replaced by the wall-clock sockets; OAUTHLIB_RELAX_TOKEN_SCOPE in the
environment (for authorize); for `run`, the SIGINT and SIGTERM handlers. Nothing else changes
the process (.env's values go to Config, not to os.environ), so main(argv) can run twice in one
process.

Where a change goes (docs/development.md says more):

  a Matomo metric     a line in MATOMO_METRICS; a migration adding its column (and its SCHEMA
                      entry); its column in store_analytics' three lists; the views; tests in
                      test_matomo (stored), test_reading (views), test_nightly (dry run)
  a Search Console    a field of GscMetrics (its column is gsc_<field>: GSC_COLUMNS) read in
  metric              metrics_by_day(); the same migration, store_analytics and view steps;
                      test_search_console
  a rule of the table store_analytics in a new migration (create or replace); never a copy in
                      Python; tests through a run (test_supabase, test_matomo, ...)
  a source            a section beside Matomo's; SOURCES; its columns and final flag in
                      STORED_COLUMNS, FINAL_FLAG, analytics_rows() and Upserts.joined(); Unit
                      and Flow (one more answer a unit waits for); a migration and
                      store_analytics; its SourceCount in Outcome; test_<source>.py
  a command           a handler and a Command in COMMANDS; its options in add_other_options();
                      test_commands
  a fault             classified once where it enters (MatomoError's kind, supabase_error_kind,
                      the Google error reasons); what a person must do made there; a stand-in
                      that misbehaves so, a test, a row of docs/faults.md
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import difflib
import enum
import functools
import gc
import html
import itertools
import json
import logging
import math
import operator
import os
import queue
import re
import shlex
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar, Union
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit

# On Python 3.9 and 3.10 Google's libraries print a six-line FutureWarning on import, every
# night, into the cron log; the README states which Pythons are supported.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"google(\.|$)")

try:
    import google_auth_httplib2  # noqa: E402 - after the filter above
    import httplib2  # noqa: E402
    import httpx  # noqa: E402
    import requests  # noqa: E402
    from dotenv import dotenv_values  # noqa: E402
    from google.auth.exceptions import RefreshError  # noqa: E402
    from google.oauth2.credentials import Credentials  # noqa: E402
    from googleapiclient.discovery import build  # noqa: E402
    from googleapiclient.errors import HttpError  # noqa: E402
    from postgrest.exceptions import APIError  # noqa: E402
    from postgrest.types import CountMethod, ReturnMethod  # noqa: E402
    from requests.adapters import HTTPAdapter  # noqa: E402
    from supabase import Client, ClientOptions, create_client  # noqa: E402
    from urllib3.util.retry import Retry  # noqa: E402
except ImportError as missing:  # started by a Python without the dependencies (outside the venv)
    if __name__ != "__main__":
        raise
    venv = Path(__file__).resolve().parent / ".venv" / "bin" / "python"
    sys.exit(
        f"aggregator.py: error: {missing.name or missing} is not installed for {sys.executable}: run "
        + (
            f"{venv} {sys.argv[0]}"
            if venv.exists()
            else f"{sys.executable} -m pip install -r requirements.txt"
        )
        + " (the README's first command sets up .venv)"
    )

__version__ = "1.1.0"

log = logging.getLogger("aggregator")


class ExitStatus(enum.IntEnum):
    """What a run tells cron and monitoring (README: "Exit statuses")."""

    OK = 0  # all fetched and stored
    FAILED = 1  # nothing could be done: the configuration, Supabase
    USAGE = 2  # the command line is wrong
    PARTIAL = 3  # finished, but some values are missing that a later run fetches by itself
    PERSON = 4  # a person must fix something, named in the last line
    INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT
    TERMINATED = 143  # SIGTERM (a stopping system, `kill`): 128 + SIGTERM
    OUTPUT_CLOSED = 141  # stdout's reader went away (`| head`): 128 + SIGPIPE, as a shell's tools


# Search Console publishes a day's data after about two days, and keeps revising the last
# few: the nightly run refreshes a short window that ends two days ago.
DEFAULT_LAG_DAYS = 2
DEFAULT_LOOKBACK_DAYS = 3
# Search Console keeps about 16 months (~486 days). Older days answer "no rows", which must
# not be stored as 0 over numbers fetched back then: stay a little inside the limit.
GSC_RETENTION_DAYS = 480
GSC_SCOPE = "https://www.googleapis.com/auth/webmasters.readonly"
# What to apply when the tables are not what this version expects: each file adds to the last.
MIGRATION = "every file of supabase/migrations/, in order (supabase db push)"
T = TypeVar("T")
SiteId = int  # sites.id, a bigint
AccountId = int  # gsc_accounts.id, a bigint


class MatomoMetric(NamedTuple):
    column: str  # in daily_analytics
    field: str  # in VisitsSummary.get's answer


# The numbers of Matomo's answer that are stored, the day's visits first: adding one is a line
# here and a column in a migration (store_analytics keeps it with matomo_final; docs/development.md).
# A field absent from an answer (an install may not count unique visitors) is stored as NULL.
MATOMO_METRICS = (
    MatomoMetric("matomo_visits", "nb_visits"),
    MatomoMetric("matomo_unique_visitors", "nb_uniq_visitors"),
    MatomoMetric("matomo_actions", "nb_actions"),
    MatomoMetric("matomo_bounces", "bounce_count"),
    MatomoMetric("matomo_visit_seconds", "sum_visit_length"),
)
NO_VISIT = tuple(0 for _ in MATOMO_METRICS)  # an empty day: [] in the answer
MATOMO_COLUMNS = tuple(m.column for m in MATOMO_METRICS)
MATOMO_FIELDS = tuple(m.field for m in MATOMO_METRICS)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """The configuration is missing or malformed; the message says what to set."""


URL = {"url": True}  # a setting that must be an http(s) URL


def number(default: int, at_least: int = 1, at_most: int | None = None, why: str = "") -> Any:
    """A whole-number setting and its limits (`why` says where an upper limit comes from)."""
    return field(default=default, metadata={"at_least": at_least, "at_most": at_most, "why": why})


# PHP drops POST variables past max_input_vars (default 1,000): token_auth and the urls[N].
MATOMO_MOST_SUB_REQUESTS = 900


@dataclass(frozen=True)
class Config:
    """Every setting; each field is read from the environment variable of its upper-cased name."""

    supabase_url: str = field(metadata=URL)
    supabase_service_role_key: str
    # Required by the commands that use them (Command.needs); the Google client only by
    # accounts that hold a refresh token (a service account needs none).
    matomo_url: str = field(default="", metadata=URL)
    matomo_token_auth: str = ""
    google_client_id: str = ""
    google_client_secret: str = ""
    google_token_uri: str = field(default="https://oauth2.googleapis.com/token", metadata=URL)
    # The sites.status_deployment value of the sites to aggregate (an existing sites table may
    # call them 'live' or 'active').
    deployed_status: str = "deployed"
    gsc_api_endpoint: str = field(default="https://searchconsole.googleapis.com/", metadata=URL)
    # Tuning. The concurrency defaults were chosen with bench/bench.py (docs/performance.md).
    http_timeout: int = number(60)  # seconds, for every single network call
    http_retries: int = number(3, at_least=0)  # retries of a transient failure
    run_deadline: int = number(7200)  # seconds after which no new fetch starts
    matomo_bulk_size: int = number(  # sites per bulk request
        100, at_most=MATOMO_MOST_SUB_REQUESTS, why="PHP's max_input_vars"
    )
    matomo_workers: int = number(3)  # bulk requests in flight
    gsc_workers: int = number(64)  # Search Console queries in flight, all accounts together
    gsc_account_workers: int = number(16)  # ... and per account
    gsc_qpm: int = number(1200)  # queries per minute per account: Search Console's per-user quota
    # ... and per Cloud project: every account authorised through one OAuth client shares it.
    gsc_project_qpm: int = number(40000)
    # An account over its quota, or whose queries Search Console fails (OUTAGE_FAILURES in a row),
    # pauses this long, doubling up to five times (the load quota takes about 15 minutes to
    # clear), within RUN_DEADLINE.
    gsc_quota_pause: int = number(60)
    upsert_chunk_size: int = number(1000)  # rows per upsert request (about 150 KB of JSON)
    upsert_workers: int = number(6)  # upsert requests in flight
    # Under cron, a progress line this often (seconds), so that a long run does not look stuck.
    progress_every: int = number(60, at_least=0)
    # A monitoring check's ping URL (healthchecks.io, Cronitor): pinged with /start, then with the
    # exit status (/0 is success), so that a night that fails, or never ends, is heard of.
    healthcheck_url: str = field(default="", metadata=URL)
    # Healing: besides its window, the nightly run fills the holes of the last HEAL_DAYS days
    # (and a new site's history), at most this much per night (0: that source is not healed).
    heal_days: int = number(30)
    heal_matomo_site_days: int = number(50000, at_least=0)  # site-days asked from Matomo
    heal_gsc_queries: int = number(2000, at_least=0)  # Search Console queries (one per site)
    # A new site's history goes back to its creation in Matomo and to the oldest day Search
    # Console keeps (about 16 months); a number of days here goes back no further (0: no limit).
    history_days: int = number(0, at_least=0)
    # A Matomo 0 is final once the raw log shows no visit that day; where the visitor log is off,
    # once the day is this many days old (the archiver has long caught up by then).
    matomo_settle_days: int = number(7)

    def secrets(self) -> tuple[str, ...]:
        # A ping URL lets anyone report on the check: it is kept out of the log like a key, and
        # its path too (urllib3 logs the path of each request without the host).
        url = self.healthcheck_url.rstrip("/")
        ping_url = (
            (url, urlsplit(url).path) if url and len(urlsplit(url).path) >= 16 else (url,) if url else ()
        )
        return (self.supabase_service_role_key, self.matomo_token_auth, self.google_client_secret, *ping_url)

    @staticmethod
    def default_env_file() -> Path:
        """.env beside the script; for the installed command (whose script lives among the packages),
        .env in the directory it runs in."""
        beside = Path(__file__).resolve().parent / ".env"
        return (
            beside
            if beside.exists() or (beside.parent / "requirements.txt").exists()
            else Path.cwd() / ".env"
        )

    @classmethod
    def load(cls, env_file: Path, required: Iterable[str] = ("MATOMO_URL", "MATOMO_TOKEN_AUTH")) -> Config:
        """Read .env (variables already in the environment win) and validate everything at once;
        `required` names what the command needs besides the Supabase pair. The environment itself
        is left as it was: .env's values go to Config only."""
        env = {name: value.strip() for name, value in {**cls.settings_in(env_file), **os.environ}.items()}
        needed = [f.name.upper() for f in fields(cls) if f.default is MISSING] + list(required)
        if env.get("GOOGLE_CLIENT_ID") or env.get("GOOGLE_CLIENT_SECRET"):
            needed += ["GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET"]  # half a client is a mistake
        missing = list(dict.fromkeys(name for name in needed if not env.get(name)))
        if missing:
            raise ConfigError(
                f"Missing configuration: {', '.join(missing)}. "
                f"Set them in {env_file} (see .env.example) or in the environment."
            )
        return cls(**cls.values_of(env, set(os.environ), env_file))

    @staticmethod
    def settings_in(env_file: Path) -> dict[str, str]:
        """The settings .env holds (none if there is no .env); a warning for a name that is not one."""
        if not env_file.exists():
            return {}
        Config.warn_if_readable_by_others(env_file)
        try:
            found = dotenv_values(env_file, encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{env_file} is not UTF-8 text: save it as UTF-8 and run again") from None
        except OSError as error:
            raise ConfigError(
                f"cannot read {env_file} ({error.strerror}): check its owner and mode"
            ) from None
        Config.warn_of_unknown_settings(env_file, found)
        return {name: value for name, value in found.items() if value is not None}

    @staticmethod
    def values_of(env: Mapping[str, str], exported: set[str], env_file: Path) -> dict[str, Any]:
        """Each setting given, checked; a ConfigError naming every problem at once."""
        # No message echoes a value: a key pasted into the wrong variable would be printed.
        values: dict[str, Any] = {}
        errors: list[str] = []
        for f in fields(Config):
            name, raw, rule = f.name.upper(), env.get(f.name.upper()), f.metadata
            if not raw:
                continue
            if "at_least" in rule and not (re.fullmatch(r"[0-9]{1,9}", raw) and int(raw) >= rule["at_least"]):
                errors.append(f"{name} must be a whole number of at least {rule['at_least']}")
            elif rule.get("at_most") and int(raw) > rule["at_most"]:
                errors.append(f"{name} must be at most {rule['at_most']} ({rule['why']})")
            elif PLACEHOLDER.search(raw):
                where = (
                    "the environment (it wins over .env): unset it or export"
                    if name in exported
                    else f"{env_file}: put"
                )
                errors.append(f"{name} still holds the placeholder of .env.example in {where} your own value")
            elif rule.get("url") and not is_http_url(raw):
                errors.append(f"{name} must be an http(s) URL, like https://example.com/")
            else:
                values[f.name] = int(raw) if "at_least" in rule else raw
        if errors:
            raise ConfigError("Bad configuration: " + "; ".join(errors) + ".")
        return values

    @staticmethod
    def warn_of_unknown_settings(env_file: Path, names: Iterable[str]) -> None:
        """A typo (GSC_QMP for GSC_QPM) would otherwise leave the default in force without a word."""
        known = [f.name.upper() for f in fields(Config)]
        prefixes = tuple({name.split("_")[0] + "_" for name in known})  # SUPABASE_, GSC_, HEAL_, ...
        for name in names:
            alias = SETTING_ALIASES.get(name.upper())
            guess = [alias] if alias else difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.75)
            if name not in known and (guess or name.upper().startswith(prefixes)):
                hint = f"did you mean {guess[0]}? " if guess else ""
                log.warning(
                    "%s in %s is not a setting of aggregator.py (%sit is ignored)", name, env_file, hint
                )

    @staticmethod
    def warn_if_readable_by_others(env_file: Path) -> None:
        if env_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by other users; run: chmod 600 %s", env_file, env_file)


# What .env.example holds where the operator's own values go.
PLACEHOLDER = re.compile(r"replace-with-|your-project-ref|your-check-uuid|//matomo\.example\.com")


# Names other tools use for our settings: a closest spelling would point elsewhere (SUPABASE_KEY
# is closest to SUPABASE_URL).
SETTING_ALIASES = {
    "SUPABASE_KEY": "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_SERVICE_KEY": "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_ANON_KEY": "SUPABASE_SERVICE_ROLE_KEY",
    "MATOMO_TOKEN": "MATOMO_TOKEN_AUTH",
    "MATOMO_API_TOKEN": "MATOMO_TOKEN_AUTH",
}


def is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


# ---------------------------------------------------------------------------
# Logging: one filter keeps every secret out of every line
# ---------------------------------------------------------------------------


# A secret not known in advance, e.g. the refresh token that requests-oauthlib logs at DEBUG
# when `authorize` receives it: the value of any field with one of these names.
SECRET_FIELD = re.compile(
    r"""((?:refresh_token|access_token|client_secret|token_auth|apikey|private_key)["']?\s*[:=]\s*["']?)[^"'&\s,}]+"""
)


class SecretFilter(logging.Filter):
    """Replaces every known secret (and its URL-encoded forms) in a record before it is written.

    It sits on the handler, so it also covers the records of urllib3, httpx, httplib2 and
    google-auth, which log URLs, headers and bodies at DEBUG.
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def forget(self) -> None:
        self._secrets = set()

    def add(self, *values: str | None) -> None:
        for value in values:
            if value and len(value) >= 4:
                self._secrets |= {value, quote(value, safe=""), quote_plus(value)}

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "[redacted]")
        return SECRET_FIELD.sub(r"\1[redacted]", text)

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


class ProblemLog(logging.Handler):
    """Keeps the run's own warnings and errors (redacted) for --json and for check.

    Only this script's records: a library's "Retrying..." is how a problem is handled, not one.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == log.name:
            self.lines.append(record.getMessage())


class Progress:
    """How far a run is, shown while it goes: on a terminal one line that keeps being rewritten
    (the log handler clears it before a record and draws it again after, so that log lines are
    never glued onto it); under cron a log line every PROGRESS_EVERY seconds, so that a long run
    does not look stuck. Fetches count as they finish."""

    def __init__(self) -> None:
        self.lock, self.stopped = threading.RLock(), threading.Event()
        self.on_terminal, self.started, self.drawn_at = False, 0.0, 0.0
        self.forget()

    def forget(self) -> None:
        self.text, self.stored = "", 0
        self.counts: dict[str, int] = {}
        self.wanted: dict[str, int] = {}

    @contextlib.contextmanager
    def shown(self, every: float, outcome: Any) -> Iterator[None]:
        self.on_terminal, self.started, self.stored = sys.stderr.isatty(), time.monotonic(), 0
        self.wanted = {source: count.wanted for source, count in outcome.sources().items()}
        self.counts = dict.fromkeys(self.wanted, 0)
        self.stopped.clear()
        if not self.on_terminal:
            threading.Thread(target=self.log_every, args=(every,), daemon=True).start()
        try:
            yield
        finally:
            self.stopped.set()
            with self.lock:
                self.stored = outcome.stored
                if self.on_terminal:
                    self.draw(final=True)
                    sys.stderr.write("\n")
                self.text = ""

    def fetched(self, source: str, sites: int) -> None:
        with self.lock:
            self.counts[source] = self.counts.get(source, 0) + sites
            if self.on_terminal and time.monotonic() - self.drawn_at > 0.1:
                self.draw()

    def log_every(self, seconds: float) -> None:
        while not self.stopped.wait(seconds):
            log.info("Progress: %s", self.line())

    def draw(self, final: bool = False) -> None:
        with self.lock:
            self.text, self.drawn_at = self.line(final), time.monotonic()
            sys.stderr.write(f"\r\x1b[K{self.text}")
            sys.stderr.flush()

    def line(self, final: bool = False) -> str:
        done, wanted = sum(self.counts.values()), sum(self.wanted.values())
        text = (
            f"Matomo {self.counts.get('matomo', 0)}/{self.wanted.get('matomo', 0)} and GSC "
            f"{self.counts.get('gsc', 0)}/{self.wanted.get('gsc', 0)} sites {'fetched' if final else 'done'}, stored {self.stored} records"
        )
        if final or not done or done >= wanted:
            return text
        left = (time.monotonic() - self.started) / done * (wanted - done)
        return text + (f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left")


progress = Progress()


class LogFormat(logging.Formatter):
    """Timestamps with milliseconds and the UTC offset: a log read on another machine, or across
    a daylight-saving change, says when each line happened."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        moment = dt.datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(sep=" ", timespec="milliseconds")


class LogLines(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        with progress.lock:
            if progress.text:
                self.stream.write("\r\x1b[K")
            super().emit(record)
            if progress.text:
                self.stream.write(progress.text)
                self.flush()


class SiteWarnings:
    """Warnings that many sites can meet for one cause (an unarchived day over 306 sites): one
    WARNING per cause at the end of the run with the count and the first few sites, each other
    site at DEBUG; --json lists them all."""

    SHOWN = 5

    def __init__(self) -> None:
        self.by_cause: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def add(self, cause: str, site: str, detail: str = "") -> None:
        with self.lock:
            self.by_cause.setdefault(cause, []).append(f"{site} [{detail}]" if detail else site)

    def flush(self, say_nothing: bool = False) -> dict[str, list[str]]:
        """Says each cause once; returns {cause: every site} of what it said."""
        with self.lock:
            said, self.by_cause = self.by_cause, {}
        for cause, sites in ({} if say_nothing else said).items():
            more = len(sites) - self.SHOWN
            shown = ", ".join(sites[: self.SHOWN]) + (f" and {more} more" if more > 0 else "")
            log.warning("%s: %s", shown, cause)
            for site in sites[self.SHOWN :]:
                log.debug("%s: %s", site, cause)
        return said


# The run's secrets and problems: one of each per process, like `log`.
secret_filter, problems, site_warnings = SecretFilter(), ProblemLog(), SiteWarnings()


def redacted(value: T) -> T:
    """`value` with every known secret replaced, however deep in lists and dicts. What leaves the
    process other than by the log (stdout, --json, a row written to Supabase) passes here, as
    every log record passes the filter."""
    if isinstance(value, str):
        return secret_filter.redact(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {redacted(k): redacted(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(v) for v in value)  # type: ignore[return-value]
    return value


class OutputClosed(Exception):
    """stdout's reader has gone (`--dry-run | head`): nothing more is printed, and the run stops."""


def say(*lines: str) -> None:
    """Prints lines on stdout, through the secret filter: the one door to stdout."""
    try:
        print(redacted("\n".join(lines)), flush=True)
    except BrokenPipeError:  # later lines, and the flush at exit, go nowhere instead of failing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputClosed from None


def setup_logging(level: str, log_file: Path | None = None, quiet_problems: bool = False) -> None:
    """The log on stderr at `level`; with `log_file`, also appended there at INFO (or `level`, if
    lower): under cron, stderr (mailed) can then say only what needs a person. With
    `quiet_problems`, this script's warnings and errors stay off stderr (a command that prints
    them as its own lines)."""
    handler = LogLines(sys.stderr)
    if quiet_problems:
        handler.addFilter(lambda r: r.name != log.name or r.levelno < logging.WARNING)
    handlers: list[logging.Handler] = [handler, problems]
    file_level = min(logging.getLevelName(level), logging.INFO)
    if log_file:
        try:
            handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        except OSError as error:
            raise UsageError(
                f"--log-file {log_file}: {error.strerror}: give a file this user may write"
            ) from None
        handlers[-1].setLevel(file_level)
    for each in handlers:
        each.addFilter(secret_filter)
        if each is not problems:
            each.setFormatter(LogFormat("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = handlers
    # The log shows `level`; the --json summary keeps every warning whatever `level` is.
    handler.setLevel(level)
    root.setLevel(
        min(logging.getLevelName(level), logging.WARNING, file_level if log_file else logging.WARNING)
    )
    if level != "DEBUG":
        # These log one INFO line per request: thousands of lines a night.
        for noisy in ("httpx", "googleapiclient.discovery", "google_auth_httplib2"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------
# Small tools: the deadline, a wall clock on every exchange, chunks
# ---------------------------------------------------------------------------


class Deadline:
    """The moment after which no new fetch starts, so that a hung service cannot hold the
    run (and tomorrow's) forever; what was fetched by then is still stored. Ctrl-C and
    SIGTERM bring that moment forward (stop)."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.why = "RUN_DEADLINE reached"
        self._stopped = threading.Event()

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def passed(self) -> bool:
        return self._stopped.is_set() or time.monotonic() >= self.at

    def stop(self, why: str) -> None:
        self.why = why
        self._stopped.set()

    def wait(self, seconds: float) -> None:
        """Waits `seconds`, or less if the run is stopped meanwhile."""
        self._stopped.wait(max(0.0, seconds))


class WallClockSocket(socket.socket):
    """A socket on which no request-and-answer lasts longer than `limit` seconds in all.

    Every HTTP library bounds each read (HTTP_TIMEOUT), and a server that sends one byte per
    read resets that bound forever. Here the first send after an answer starts the clock, and
    every later read of that answer gets only the time left. One class covers requests,
    httplib2 and httpx alike, for http and (through WallClockSSLSocket) https.
    """

    limit: float | None = None

    def send(self, *args: Any, **kwargs: Any) -> int:
        self._start_exchange()
        return super().send(*args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._start_exchange()
        return super().sendall(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        with self._time_left():
            return super().recv(*args, **kwargs)

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        with self._time_left():
            return super().recv_into(*args, **kwargs)

    def _start_exchange(self) -> None:
        if self.limit and getattr(self, "_answering", True):
            self._answer_by = time.monotonic() + self.limit
            self._answering = False

    @contextlib.contextmanager
    def _time_left(self) -> Iterator[None]:
        self._answering = True
        answer_by = getattr(self, "_answer_by", None)
        per_read = self.gettimeout()
        if answer_by is None or per_read == 0:  # not an exchange of ours, or non-blocking
            yield
            return
        left = answer_by - time.monotonic()
        if left <= 0:
            raise socket.timeout(f"no complete answer within {self.limit:.0f} s (HTTP_TIMEOUT)")
        self.settimeout(left if per_read is None else min(per_read, left))
        try:
            yield
        finally:
            self.settimeout(per_read)


class WallClockSSLSocket(WallClockSocket, ssl.SSLSocket):  # type: ignore[misc]
    pass


def bound_every_exchange() -> None:
    """From now on, every socket this process opens is a WallClockSocket (its `limit` is set
    once HTTP_TIMEOUT is known; until then none)."""
    WallClockSocket.limit = None
    socket.socket = WallClockSocket  # type: ignore[misc]
    ssl.SSLContext.sslsocket_class = WallClockSSLSocket


class Once:
    """Says yes to the first caller only: one log line for a failure that every thread meets;
    `why` keeps what the first one said."""

    def __init__(self) -> None:
        self.happened = False
        self.why = ""
        self._lock = threading.Lock()

    def first(self, why: str = "") -> bool:
        with self._lock:
            first, self.happened = not self.happened, True
            if first:
                self.why = why
            return first


class Reason(str):
    """Why an account or a site's source cannot be used, decided where the fault is met: the
    sentence a person reads (the str itself: what, then the fix, then what the service said),
    the fix alone (stored in site_sources.fix: status prints it), whether a person must act
    (else the next nights retry by themselves), and whether every account of its OAuth client or
    Cloud project meets it alike (one setting to fix, said once). Exit statuses, needs_a_person
    and the fix printed come from these values, never from words."""

    what: str
    fix: str
    said: str
    person: bool
    shared: bool

    def __new__(
        cls, what: str, fix: str = "", person: bool = True, shared: bool = False, said: str = ""
    ) -> Reason:
        text = f"{what}: {fix}" if fix else what
        reason = super().__new__(cls, f"{text} ({said})" if said else text)
        reason.what, reason.fix, reason.said, reason.person, reason.shared = what, fix, said, person, shared
        return reason

    def about(self, whom: str) -> Reason:
        """The same reason, said of `whom` (an account, a service account)."""
        return Reason(f"{whom}: {self.what}", self.fix, self.person, self.shared, self.said)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def id_list(ids: list, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# ---------------------------------------------------------------------------
# Dates
# ---------------------------------------------------------------------------


class UsageError(Exception):
    """Bad command-line input; the message says what is accepted."""


def parse_day(text: str) -> dt.date:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise UsageError(f"{text!r} is not a date: use YYYY-MM-DD, e.g. 2026-11-20")
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a real calendar date: use YYYY-MM-DD") from None
    if day < OLDEST_DAY:
        raise UsageError(
            f"{text} is before {OLDEST_DAY.year}: neither Matomo nor Search Console has data that old"
        )
    return day


# Matomo (then Piwik) and Search Console were born after it; the migration's functions agree.
OLDEST_DAY = dt.date(2005, 1, 1)


def days_between(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=n) for n in range((end - start).days + 1)]


def target_days(
    today: dt.date,
    date: str | None = None,
    start: str | None = None,
    end: str | None = None,
    lookback: int | None = None,
) -> list[dt.date]:
    """The inclusive list of days to aggregate, validated."""
    latest = today - dt.timedelta(days=DEFAULT_LAG_DAYS)
    for option, value in (("--date", date), ("--from", start), ("--to", end)):
        if value is not None and not value.strip():
            raise UsageError(f"{option} is empty (an empty shell variable?): give a day as YYYY-MM-DD")
    if date and (start or end):
        raise UsageError("use either --date or --from/--to, not both")
    if end and not start:
        raise UsageError("--to needs --from, e.g. --from 2026-10-01 --to 2026-10-31")
    if lookback is not None and (date or start):
        raise UsageError("--lookback is for the nightly run; with --date or --from, name the days instead")
    if lookback is not None and not 1 <= lookback <= 90:
        raise UsageError(f"--lookback takes 1 to 90 days, got {lookback}")
    if date:
        first = last = parse_day(date)
    elif start:
        first = parse_day(start)
        last = parse_day(end) if end else max(latest, first)
    else:
        last = latest
        first = latest - dt.timedelta(days=(lookback or DEFAULT_LOOKBACK_DAYS) - 1)
    if first > last:
        raise UsageError(f"the range ends ({last}) before it starts ({first})")
    if last >= today:
        raise UsageError(
            f"{last} is {'in the future' if last > today else 'today, which is not over'}: "
            f"the latest day accepted is yesterday ({today - dt.timedelta(days=1)})"
        )
    if first < gsc_oldest_day(today):
        log.warning(
            "%s is older than Search Console keeps (about 16 months): GSC is fetched only from %s on; "
            "Matomo for every day",
            first,
            gsc_oldest_day(today),
        )
    return days_between(first, last)


def gsc_oldest_day(today: dt.date) -> dt.date:
    return today - dt.timedelta(days=GSC_RETENTION_DAYS)


def gsc_expiring_before(today: dt.date) -> dt.date:
    """Days before this one pass Search Console's retention within 30 days: healed first, and said."""
    return gsc_oldest_day(today) + dt.timedelta(days=30)


# ---------------------------------------------------------------------------
# Supabase: reading the fleet, and the shared retry for its writes
# ---------------------------------------------------------------------------


class SupabaseError(Exception):
    """Supabase could not be read; nothing can be done this run (or that part of it). `person`:
    no later run gets past it by itself."""

    def __init__(self, message: str, person: bool = False) -> None:
        super().__init__(message)
        self.person = person


@dataclass(frozen=True)
class Site:
    id: SiteId
    domain: str | None
    matomo_site_id: Any  # as stored; matomo_id() says whether it is usable
    gsc_account_id: AccountId | None

    @property
    def label(self) -> str:
        return site_label(self.id, self.domain)


def site_label(site_id: SiteId, domain: str | None) -> str:
    """How a site is named in every log line and message: 'Site 8 (shop.example.com)'."""
    return f"Site {site_id} ({domain})" if domain else f"Site {site_id}"


# A Supabase project silently caps every answer (1,000 rows by default).
PAGE_SIZE = 1000


# One client per run: building one costs start-up time that every read would pay again.


@dataclass(frozen=True)
class Supabase:
    """The run's Supabase: the client, how many times a call that fails transiently is made (the
    one retry policy: execute, rpc), and every read and write the job makes there: the deployed
    sites and the accounts, what earlier runs learnt of the sites' sources, the holes, the
    schema check, the chunks of rows to store_analytics, the accounts' rows for authorize."""

    client: Client
    attempts: int
    deployed: str = "deployed"  # DEPLOYED_STATUS
    # The run's (run() gives it): once it has passed, no retry, and no write waits for Supabase to
    # answer again.
    deadline: Deadline = field(default_factory=lambda: Deadline(math.inf))
    refused: dict[str, set[SiteId]] = field(default_factory=dict)  # a run's: sites whose rows failed alike

    @classmethod
    @functools.cache
    def of(cls, cfg: Config) -> Supabase:
        """The run's Supabase, from the configuration."""
        # One HTTP client for every part of supabase-py: each would otherwise build its own, loading
        # the certificate bundle again (25 ms of CPU each), and the PostgREST part, built on first
        # use, would be built once per thread that reads first. Its settings are those supabase-py
        # gives its own.
        http = httpx.Client(timeout=cfg.http_timeout, follow_redirects=True, http2=True)
        options = ClientOptions(httpx_client=http, auto_refresh_token=False, persist_session=False)
        # postgrest-py 2.2x+ retries GETs by itself (1, 2, 4 s) under our execute(): one policy,
        # ours, covers reads and writes alike (older releases have neither the option nor the retry).
        if hasattr(options, "postgrest_client_retry"):
            options.postgrest_client_retry = False
        client = create_client(cfg.supabase_url, cfg.supabase_service_role_key, options)
        client.postgrest  # noqa: B018 - built now, before the threads that read in parallel
        return cls(client, cfg.http_retries + 1, cfg.deployed_status)

    def table(self, name: str) -> Any:
        return self.client.table(name)

    def execute(self, request: Any) -> Any:
        """A postgrest-py request's answer, transient failures retried with backoff (0.5, 1, 2 s)
        until the run's deadline (an upsert is idempotent, so it is safe to retry)."""
        for attempt in range(self.attempts):
            try:
                return request.execute()
            except (APIError, httpx.HTTPError) as error:
                if (
                    attempt + 1 == self.attempts
                    or self.deadline.passed()
                    or supabase_error_kind(error) != "transient"
                ):
                    raise
                log.info(
                    "Supabase: transient error (%s), retrying", describe_supabase_error(error, "talking")
                )
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def stop_writing(self, hopeless: Once, said: str, person: bool = True) -> None:
        """No further write is tried (`hopeless` is the run's), said once: a fault every write
        meets alike until a person acts, after which no fetch starts either (nothing of it could
        be stored), or a Supabase that does not answer once the deadline has passed."""
        if hopeless.first(Reason(said, person=person)):
            log.error("%s; no further upsert is tried", said)
            if person:
                self.deadline.stop("Supabase refuses every write")

    def rpc(self, name: str, arguments: Mapping[str, Any]) -> Any:
        """A migration's function's answer (POST /rest/v1/rpc/NAME), retried alike."""
        return self.execute(self.client.rpc(name, dict(arguments))).data

    def fetch_all(self, table: str, columns: str, narrow: Callable[[Any], Any] = lambda q: q) -> list[dict]:
        """Every row of a table that `narrow` (filters on a query) keeps, page by page, each page
        after the last id read (keyset paging: a row deleted meanwhile shifts no other row into an
        earlier page). Paging stops once the total PostgREST counts (Prefer: count=exact) is read,
        or at an empty page, never at a short one: a project whose max-rows is below PAGE_SIZE
        answers short pages all the way through. `columns` must hold id."""
        rows: list[dict] = []
        while True:
            # The count spares the empty page that would otherwise end every read: a round trip.
            query = narrow(self.table(table).select(columns, count=CountMethod.exact)).order("id")
            if rows:
                query = query.gt("id", rows[-1]["id"])
            try:
                answer = self.execute(query.range(0, PAGE_SIZE - 1))
            except (APIError, httpx.HTTPError) as error:
                raise SupabaseError(describe_supabase_error(error, f"reading {table}")) from None
            page = rows_of(answer.data, table)
            rows.extend(page)
            if not page or (answer.count is not None and len(page) >= answer.count):
                return rows

    def no_sites(self) -> str:
        return NO_SITES.replace("'deployed'", repr(self.deployed))

    def deployed_sites(self) -> list[Site]:
        rows = self.fetch_all(
            "sites",
            "id,domain,matomo_site_id,gsc_account_id",
            lambda query: query.eq("status_deployment", self.deployed),
        )
        return [Site(r["id"], r["domain"], r["matomo_site_id"], r["gsc_account_id"]) for r in rows]

    def account_keys(self) -> dict[AccountId, AccountKey]:
        """{account id: its refresh token or service-account key} for every gsc_accounts row."""
        rows = self.fetch_all("gsc_accounts", "id,oauth_refresh_token,service_account_key")
        return {row["id"]: credential_of(row) for row in rows}

    def store_learned_sources(self, rows: list[dict]) -> None:
        for chunk in chunks(rows, PAGE_SIZE):
            request = self.table("site_sources").upsert(
                chunk, on_conflict="site_id,source", returning=ReturnMethod.minimal
            )
            self.execute(request)

    def call_function(self, name: str, arguments: Mapping[str, Any], kind: type) -> Any:
        """A migration's SQL function's JSON answer, of the type expected."""
        try:
            answer = self.rpc(name, arguments)
        except (APIError, httpx.HTTPError) as error:
            person = supabase_error_kind(error) in (*UNTIL_A_PERSON_ACTS, "too big")  # a read: no halves
            raise SupabaseError(describe_supabase_error(error, f"calling {name}"), person) from None
        if not isinstance(answer, kind):
            raise SupabaseError(
                f"{name} did not answer a JSON {kind.__name__}: SUPABASE_URL must be the project's API URL"
            )
        return answer

    def learned_sources(self) -> dict[tuple[SiteId, str], dict]:
        """{(site id, source): its site_sources row}: what earlier runs learnt of each site's sources."""
        found = self.call_function("site_sources_known", {}, list)
        columns = ("site_id", "source", "source_key", "available_from", "unavailable", "fix")
        rows = [
            dict(zip(columns, row)) for row in found if isinstance(row, list) and len(row) == len(columns)
        ]
        return {(row["site_id"], row["source"]): row for row in rows}

    def holes(self, coverage: Coverage) -> list[Hole]:
        """Every hole of the deployed sites, as the database computes them (analytics_holes; before
        migration 20261206000200 it does not say which are provisional: they heal in date order)."""
        found = self.call_function("analytics_holes", coverage.arguments(), list)
        if not all(isinstance(hole, dict) for hole in found):
            raise SupabaseError("analytics_holes answered something else than holes: apply " + MIGRATION)
        return [
            Hole(
                hole["site_id"],
                hole["source"],
                dt.date.fromisoformat(hole["from"]),
                dt.date.fromisoformat(hole["to"]),
                hole.get("provisional") is True,
            )
            for hole in found
        ]

    def missing_schema(self) -> str | None:
        """None when every table, column, view and function a run uses is there (one request);
        else one line naming what is missing and the migration to apply."""
        wanted = [
            (migration, name, asked)
            for migration, listed in SCHEMA.items()
            for name, asked in schema_objects(listed).items()
        ]
        objects = [each for _, _, asked in wanted for each in asked]
        try:
            answer = self.rpc("schema_missing", {"p_objects": objects})
        except (APIError, httpx.HTTPError) as error:
            if supabase_error_kind(error) != "schema":
                raise SupabaseError(describe_supabase_error(error, "reading the schema")) from None
            answer = ["schema_missing()"]  # the check itself is missing: the newest migration is
        if not isinstance(answer, list):
            raise SupabaseError(
                "schema_missing did not answer a JSON list: SUPABASE_URL must be the project's API URL"
            )
        missing = set(answer)
        if not missing:
            return None
        # a missing table is named, not each of its columns
        names = dict.fromkeys(
            name if name in missing else each
            for _, name, asked in wanted
            for each in asked
            if each in missing
        )
        first = min(migration for migration, _, asked in wanted if missing & set(asked))
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        return (
            f"the database lacks {', '.join(list(names)[:5])}{more}: apply every file of supabase/migrations/ "
            f"from {first} on, in order (supabase db push)"
        )

    def store_chunk(
        self,
        chunk: list[tuple],
        hopeless: Once,
        accept_zeros: bool,
        dry_run: bool = False,
        failed_with: str = "",
    ) -> Merged:
        """Merges rows with what is stored, through the migration's store_analytics (where every rule
        of the table lives). A chunk the database refuses is halved down to the rows to blame, each
        costing only its site (a site refused once is not sent again with that code); once sites of
        REFUSED_SITES have been refused alike, every row would be (two bad sites are not an outage).
        `hopeless` is the run's: once a fault every chunk would meet is found, said once, no further
        chunk is tried."""
        refused = self.refused.setdefault(failed_with, set()) if failed_with else set()
        if hopeless.happened or (refused and {row[1] for row in chunk} <= refused):
            return Merged(failed=len(chunk))
        arguments = dict(
            p_columns=STORED_COLUMNS, p_rows=chunk, p_accept_zeros=accept_zeros, p_dry_run=dry_run
        )
        try:
            answer = self.rpc("store_analytics", arguments)
        except (APIError, httpx.HTTPError) as error:
            kind, code = supabase_error_kind(error), str(getattr(error, "code", "") or "")
            if kind == "other" and len(chunk) == 1:  # a row of its own: its site's others not sent
                self.refused.setdefault(code, set()).add(chunk[0][1])
                many = code not in ROW_ERRORS and len(self.refused[code]) >= REFUSED_SITES
                kind = "everywhere" if many else kind
            if kind in ("too big", "other") and len(chunk) > 1:
                # Too much work for the statement timeout, or rows that sink the chunk (a site
                # deleted during the run: 23503): halves are stored, or find the rows.
                half = len(chunk) // 2
                first = self.store_chunk(chunk[:half], hopeless, accept_zeros, dry_run, code)
                return first + self.store_chunk(chunk[half:], hopeless, accept_zeros, dry_run, code)
            said = describe_supabase_error(error, "storing rows")
            late = kind == "transient" and self.deadline.passed()  # no wait for it to answer again
            if kind in UNTIL_A_PERSON_ACTS or late:
                self.stop_writing(hopeless, f"{self.deadline.why}: {said}" if late else said, not late)
                return Merged(failed=len(chunk))
            what = f"site {chunk[0][1]}, {chunk[0][0]}" if len(chunk) == 1 else f"{len(chunk)} records"
            log.error("%s; %s not stored", said, what)
            return Merged(failed=len(chunk))
        if not (isinstance(answer, dict) and isinstance(answer.get("stored"), int)):
            said = (
                "store_analytics did not answer its JSON object: SUPABASE_URL must be the project's API URL"
            )
            self.stop_writing(hopeless, said)
            return Merged(failed=len(chunk))
        return Merged(answer["stored"], answer["kept"], answer["rows"] or [])

    def conflict_key_exists(self) -> bool:
        """Whether rows can be stored on (date, site_id), found without writing anything: a dry run
        of store_analytics with a row no site can own. Postgres resolves ON CONFLICT before it reads
        a row: a missing key fails at once (42P10), a present one lets the row reach the foreign key."""
        probe = {"date": "1970-01-01", "site_id": -1, "matomo_visits": 0, "matomo_final": True}
        arguments = {"p_columns": list(probe), "p_rows": [list(probe.values())], "p_dry_run": True}
        try:
            self.client.rpc("store_analytics", arguments).execute()
        except APIError as error:
            if supabase_error_kind(error) == "schema":
                log.error("%s", describe_supabase_error(error, "checking daily_analytics"))
                return False
            return True  # the row itself was refused (no site -1): the key is there
        log.error(
            "Supabase accepted a row for site -1: daily_analytics has no foreign key to sites; apply %s",
            MIGRATION,
        )
        return False

    def last_account_states(self) -> dict[str, str]:
        """{account id: its state in the newest recorded run that used it, with that run's date}."""
        query = (
            self.table("aggregator_runs")
            .select("finished_at,summary")
            .order("finished_at", desc=True)
            .limit(RUNS_LOOKED_AT)
        )
        try:
            runs = rows_of(self.execute(query).data, "aggregator_runs")
        except (APIError, httpx.HTTPError) as error:
            raise SupabaseError(describe_supabase_error(error, "reading aggregator_runs")) from None
        states: dict[str, str] = {}
        for recorded_run in runs:
            accounts = (recorded_run.get("summary") or {}).get("gsc", {}).get("accounts", {})
            when = str(recorded_run["finished_at"])[:16].replace("T", " ")
            for account_id, state in accounts.items():
                states.setdefault(account_id, f"{state} ({when})")
        return states

    def account_exists(self, account_id: str) -> bool:
        """Whether --account names a gsc_accounts row; said before the browser round trip, not after."""
        if not re.fullmatch(r"[0-9]{1,18}", account_id):
            log.error(
                "--account %s: an account id is a number; `%s accounts` lists them", account_id, program()
            )
            return False
        try:
            found = self.execute(self.table("gsc_accounts").select("id").eq("id", account_id)).data
        except (APIError, httpx.HTTPError) as error:
            log.error("%s", describe_supabase_error(error, "reading gsc_accounts"))
            return False
        if not found:
            log.error("There is no gsc_accounts row with id %s: omit --account to add a new one", account_id)
        return bool(found)

    def store_refresh_token(self, account_id: str | None, refresh_token: str, email: str | None) -> int:
        row = {"oauth_refresh_token": refresh_token, **({"label": email} if email else {})}
        done = self.stored_account_row(account_id, row, "service_account_key")
        if done is None:
            return ExitStatus.FAILED
        who = f" (Google account {email}, now its label)" if email else ""
        say(
            f"Stored the refresh token in gsc_accounts row {done}{who}. Point sites at it with gsc_account_id."
        )
        return ExitStatus.OK

    def stored_account_row(self, account_id: str | None, row: dict, other_credential: str) -> Any:
        """The id of the gsc_accounts row that now holds `row` (a new one without account_id), or None
        after an error. Replacing a credential clears the other kind: a row holds exactly one."""
        table = self.table("gsc_accounts")
        try:
            if account_id:
                update = table.update({**row, other_credential: None}).eq("id", account_id)
                done = self.execute(update).data
            else:
                done = table.insert(row).execute().data
        except (APIError, httpx.HTTPError) as error:
            log.error("%s", describe_supabase_error(error, "storing the credential in gsc_accounts"))
            return None
        if not done:
            log.error("gsc_accounts row %s is gone: run authorize again without --account", account_id)
            return None
        return done[0]["id"]

    def row_of_service_account(self, email: str) -> str | None:
        """The id of the gsc_accounts row that already holds a key of this service account, if any."""
        rows = self.fetch_all("gsc_accounts", "id,email:service_account_key->>client_email")
        return next((str(row["id"]) for row in rows if row.get("email") == email), None)


# What an empty answer most likely means: row level security hides every row from any key but
# the service role's, and the anon and publishable keys look alike in .env.
NO_SITES = (
    "Supabase returned no deployed site. If the sites table has rows with status_deployment 'deployed' "
    "(DEPLOYED_STATUS), "
    "SUPABASE_SERVICE_ROLE_KEY is probably the anon or publishable key, to which row level security shows "
    "no row: use the service_role key (Project Settings > API)"
)


NO_ACCOUNTS = (
    "Supabase returned no gsc_accounts row although sites name accounts: SUPABASE_SERVICE_ROLE_KEY is "
    "probably not the service_role key (row level security hides gsc_accounts from other keys)"
)


def rows_of(data: Any, table: str) -> list[dict]:
    """The answer's rows; anything but a JSON array of objects means it was not PostgREST."""
    # postgrest-py hands over a 200 that is not JSON (a login page, a proxy) as a string.
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return data
    raise SupabaseError(
        f"reading {table} did not answer a JSON array of rows ({type(data).__name__} instead): SUPABASE_URL "
        "must be the project's API URL, like https://your-project-ref.supabase.co"
    )


# An account's credential: a refresh token (str) or a service account's JSON key (dict).
AccountKey = Union[str, dict]


def credential_of(row: dict) -> AccountKey:
    """A gsc_accounts row's credential, recognised by its content: a service-account key file's
    text pasted into either column (a JSON string in the jsonb column) is a key, and a private
    key is never taken for a refresh token, which would send it to the token endpoint."""
    value = row["service_account_key"] or row["oauth_refresh_token"]
    if not isinstance(value, str) or not (value.lstrip().startswith("{") or "PRIVATE KEY" in value):
        return value
    try:
        key = json.loads(value)
    except ValueError:
        key = None
    return key if isinstance(key, dict) else {"private_key": value}  # unusable, and said so


def secrets_of(keys: Iterable[AccountKey]) -> list[str]:
    """What the secret filter must learn from these credentials: a refresh token whole; of a
    service-account key its private key (also JSON-escaped, and line by line: a log may show it
    either way) and the key's id."""
    secrets: list[str] = []
    for key in keys:
        if isinstance(key, str):
            secrets.append(key)
        elif isinstance(key, dict):
            pem = str(key.get("private_key", ""))
            lines = [line for line in pem.splitlines() if len(line) >= 16 and "PRIVATE KEY" not in line]
            secrets += [pem, json.dumps(pem)[1:-1], *lines, str(key.get("private_key_id", ""))]
    return secrets


@dataclass(frozen=True)
class Hole:
    """A run of days for which a site has no final value from a source."""

    site_id: SiteId
    source: str
    first: dt.date
    last: dt.date
    provisional: bool = False  # a stored value of it is not final yet: healed ahead of the others

    @property
    def size(self) -> int:
        return (self.last - self.first).days + 1


@dataclass(frozen=True)
class Coverage:
    """The days the deployed sites want (migration: analytics_wanted): the heal window, the
    newest day, and how far back history goes."""

    window_from: dt.date
    to: dt.date
    gsc_from: dt.date
    history_from: dt.date | None
    site: SiteId | None = None
    deployed: str = "deployed"  # DEPLOYED_STATUS

    @classmethod
    def of(cls, cfg: Config, today: dt.date, window_end: dt.date, site: SiteId | None = None) -> Coverage:
        """The coverage a nightly run whose window starts on `window_end` heals."""
        history = today - dt.timedelta(days=cfg.history_days) if cfg.history_days else None
        return cls(
            window_end - dt.timedelta(days=cfg.heal_days),
            window_end - dt.timedelta(days=1),
            gsc_oldest_day(today),
            history,
            site,
            cfg.deployed_status,
        )

    def arguments(self) -> dict[str, Any]:
        return {
            "p_window_from": self.window_from.isoformat(),
            "p_to": self.to.isoformat(),
            "p_gsc_from": self.gsc_from.isoformat(),
            "p_history_from": self.history_from.isoformat() if self.history_from else None,
            "p_site": self.site,
            "p_deployed": self.deployed,
        }


# What a run uses of each migration: tables with the columns it reads or writes, views, and
# functions(); checked in one request before the first fetch (missing_schema).
SCHEMA = {
    "20261125000000_analytics.sql": "sites(id,domain,status_deployment,matomo_site_id,gsc_account_id) "
    "gsc_accounts(id,label,oauth_refresh_token) "
    "daily_analytics(date,site_id,matomo_visits,gsc_clicks,gsc_impressions,gsc_ctr,gsc_position,updated_at)",
    "20261125000100_aggregator_runs.sql": "aggregator_runs(started_at,finished_at,date_from,date_to,sites,"
    "matomo_fetched,gsc_fetched,records_stored,records_not_stored,exit_status,summary)",
    "20261125000200_gsc_final.sql": "daily_analytics(gsc_final)",
    "20261125000300_service_accounts.sql": "gsc_accounts(service_account_key)",
    "20261201000000_coverage.sql": "daily_analytics(matomo_final) "
    "site_sources(site_id,source,source_key,available_from,history_from,unavailable,checked_at) "
    "site_sources_known() analytics_holes() analytics_coverage() analytics_attention()",
    "20261201000100_views.sql": "aggregator_runs(kind,arguments) analytics_daily analytics_weekly analytics_monthly",
    "20261206000000_matomo_metrics.sql": f"daily_analytics({','.join(MATOMO_COLUMNS[1:])})",
    "20261206000100_store_analytics.sql": "schema_missing()",
    "20261206000300_fixes.sql": "site_sources(fix)",
    "20261207000000_rows_as_arrays.sql": "store_analytics()(p_columns)",
}


def schema_objects(listed: str) -> dict[str, list[str]]:
    """{name: what schema_missing is asked for it}: 'sites(id,domain)' is a table and the columns
    the run uses ('sites', 'sites.id', ...), 'f()' a function ('f()(arg)' and an argument it
    takes: 'f()', 'f().arg'), a bare name a table or view."""
    found = {}
    for name, columns in re.findall(r"(\w+(?:\(\))?)(?:\(([^)]+)\))?", listed):
        found[name] = [name] + ([f"{name}.{column}" for column in columns.split(",")] if columns else [])
    return found


SCHEMA_ERRORS = {"42P10", "PGRST202", "PGRST204", "PGRST205", "42P01", "42703", "42804", "42883"}
KEY_ERRORS = {"401", "403", "42501", "PGRST301", "PGRST302", "PGRST303"}
# PostgREST's own transient errors come as JSON with these codes (src/library/PostgREST/Error.hs):
# no database connection, schema cache not loaded, pool timeout, Postgres shutting down,
# serialization failure, deadlock; plus SQLSTATE classes 08 (connection) and 53 (resources).
TRANSIENT_ERRORS = {"PGRST000", "PGRST001", "PGRST002", "PGRST003", "57P01", "40001", "40P01"}
# Errors one row can cause (its site deleted during the run, a value out of range, a row twice).
ROW_ERRORS = {"23502", "23503", "23505", "23514", "21000", "22003", "22007", "22P02"}
# Rows of this many sites refused alike (one code, not a row's own kind) mean every row would be.
REFUSED_SITES = 3
# supabase_error_kind's kinds that every request meets alike until a person acts.
UNTIL_A_PERSON_ACTS = ("key", "schema", "everywhere")
# Errors every write meets alike until someone acts: one request shows the fault.
EVERYWHERE_ERRORS = {
    "25006": "the Supabase project is in read-only mode, which it enters when its disk reaches 95% of the "
    "plan's quota: free disk space or upgrade the plan (Project Settings > Usage), then re-run these dates",
}


def supabase_error_kind(error: Exception) -> str:
    """'transient' (worth a bounded retry), 'key', 'schema', 'everywhere' (every request would fail
    alike), 'too big' (the statement timeout: send less) or 'other'."""
    if isinstance(error, httpx.TransportError):
        return "transient"
    if not isinstance(error, APIError):
        return "other"
    code, message = str(error.code or ""), str(error.message or "")
    if code in KEY_ERRORS or "api key" in message.lower():
        return "key"
    if code in SCHEMA_ERRORS:
        return "schema"
    if code in EVERYWHERE_ERRORS:
        return "everywhere"
    if code == "57014":  # the statement timeout: the same request would time out again
        return "too big"
    # A numeric code is the HTTP status of a non-JSON answer (a proxy's 5xx, Cloudflare's 52x, a
    # proxy's 408 or 429, which ask to try again); no code at all is Supabase's gateway speaking.
    if (
        code in TRANSIENT_ERRORS
        or code[:2] in ("08", "53")
        or code in ("408", "429", "")
        or code.startswith("5")
    ):
        return "transient"
    return "other"


def describe_supabase_error(error: Exception, doing: str) -> str:
    """One line naming what failed and what to do about it."""
    if isinstance(error, httpx.TimeoutException):
        return f"Supabase did not answer in time while {doing} (HTTP_TIMEOUT)"
    if isinstance(error, httpx.HTTPError):
        return f"cannot reach Supabase while {doing}: {error}; check SUPABASE_URL"
    assert isinstance(error, APIError)
    code, message = str(error.code or "none"), error.message or "no message"
    fix = {
        "key": "use the service_role key (Project Settings > API) as SUPABASE_SERVICE_ROLE_KEY",
        "schema": f"the tables do not match what the aggregator expects: apply {MIGRATION}",
        "transient": "Supabase is having trouble (retried); re-run the same dates once it is back",
        "too big": "the database's statement timeout cancelled it, even for one row where it was a write: "
        "raise the API's (SQL editor: alter role service_role set statement_timeout = '60s'; "
        "notify pgrst, 'reload config')",
    }.get(supabase_error_kind(error), "see the Supabase logs")
    if code in EVERYWHERE_ERRORS:
        fix = EVERYWHERE_ERRORS[code]
    elif code.startswith("P0"):
        fix = "a trigger or function in the database raised it for every row: see Database > Triggers in Supabase"
    return f"Supabase error while {doing}: {message} (code {code}): {fix}"


# ---------------------------------------------------------------------------
# Matomo
# ---------------------------------------------------------------------------


class MatomoError(Exception):
    """A Matomo request failed. `kind` says how, which decides what to do next:
    'slow' (a proxy's 504, a read timeout: too much work for one request, ask for less),
    'limit' (API_bulk_request_limit: too many sub-requests), 'down' (a 5xx, no connection: the
    install or its proxy), 'html' (a page that is not the API), 'error' (Matomo's own error),
    'stopped' (the deadline or a signal came first: the request was never sent)."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind

    def same_as(self, other: MatomoError) -> bool:
        return (self.kind, str(self)) == (other.kind, str(other))


class MatomoConfigError(MatomoError):
    """The token is refused: every request would fail the same way."""


# Matomo runs a bulk request's sub-requests one after another inside one PHP request, which has
# its own time limit: a year for 100 sites in one request would read 36,500 archives.
MATOMO_SITE_DAYS_PER_REQUEST = 3000
# A site's range that is too slow for one request is asked for in halves down to this many days.
MATOMO_MIN_DAYS_PER_REQUEST = 7
# A raw-log look (a zero confirmed) is one query of the raw log on its index (site, time), at most
# a few visits long, and reads no archive, where a report's sub-request reads a day's archive for
# each of its days: a bulk request carries this many times as many looks as reports. (Matomo
# pays per request too: each starts PHP and the API's dispatch again.)
LOOKS_PER_SLOT = 3
# After the whole install failed alike, it is asked again after these pauses (a php-fpm restart,
# a proxy's blip) before the run gives up on what it lost meanwhile.
MATOMO_RECOVERY_PAUSES = (1, 2, 4)
URL_HINT = "MATOMO_URL is probably wrong (it must be the base URL of the Matomo install, where index.php is)"


@dataclass
class MatomoState:
    """What a run learns about its Matomo install, shared by the request threads."""

    cap: int  # sites per bulk request: MATOMO_BULK_SIZE, or the install's API_bulk_request_limit
    learned: bool = False  # whether the cap is the install's
    down: str | None = None  # what every request answers while the whole install fails alike
    down_with: MatomoError | None = None  # the failed request's error that began it
    # The outage that outlasted MATOMO_RECOVERY_PAUSES: the batches it costs are not waited for again.
    gave_up_on: str | None = None
    first_sent: bool = False  # the run's first bulk request goes alone (get_matomo_data)
    first_answered: threading.Event = field(default_factory=threading.Event, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    recovery: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one wait at a time

    def looks_cap(self) -> int:
        """Raw-log looks per bulk request: LOOKS_PER_SLOT times the reports, within PHP's
        max_input_vars, unless the install sets its own limit."""
        return self.cap if self.learned else min(MATOMO_MOST_SUB_REQUESTS, LOOKS_PER_SLOT * self.cap)

    def learn_cap(self, refused: int, error: MatomoError) -> None:
        with self.lock:
            if refused > self.cap and self.learned:
                return  # learned already, by a request sent before
            before, self.cap, self.learned = self.cap, min(self.cap, max(1, refused // 2)), True
        # (a request of raw-log looks, larger than the reports', may teach a limit the reports keep)
        advice = f" (set MATOMO_BULK_SIZE={self.cap}, or raise that limit)" if self.cap < before else ""
        log.warning("%s: asking at most %d sub-requests a request from now on%s", error, self.cap, advice)


@dataclass(frozen=True)
class MatomoClient:
    """The run's Matomo: its settings, its HTTP session (urllib3's Retry for 429/502/503), what
    the run learned of the install (MatomoState), and every request the run makes to it: the bulk
    requests and the failure ladder that answers a failed one (a learned bulk limit, less work
    per request, halves that find a site's PHP error, an install that is down and asked again),
    the raw-log looks that confirm zeros, the sites' creation days."""

    session: requests.Session
    endpoint: str
    token: str
    timeout: int
    retries: int
    bulk_size: int
    workers: int
    deadline: Deadline
    state: MatomoState
    broken: Once = field(default_factory=Once)  # the URL or the token is wrong
    unknown: dict[int, Reason] = field(default_factory=dict)  # ids the token may not view: never asked
    skipped: dict[SiteId, Reason] = field(default_factory=dict)  # sites whose matomo_site_id cannot be used
    down_said: Once = field(default_factory=Once)
    log_off_said: Once = field(default_factory=Once)

    @classmethod
    def of(cls, cfg: Config, deadline: Deadline) -> MatomoClient:
        """The run's Matomo, from the configuration."""
        # Reports are read-only, so a POST is as safe to retry as a GET. A 500 (PHP's fatal error
        # page), a proxy's 504 and a read timeout (too much work for one request; PHP goes on
        # working on it) would only fail again and add to the server's load: the request is split
        # instead (MatomoClient.visits_for_batch).
        retry = CappedRetry(
            total=cfg.http_retries,
            read=False,
            backoff_factor=0.5,
            status_forcelist=(429, 502, 503),
            allowed_methods=None,
            raise_on_status=False,
        )
        retry.cap = min(30.0, cfg.http_timeout)  # never wait longer than a request may take
        retry.deadline = deadline
        session = requests.Session()
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        base = cfg.matomo_url.rstrip("/")
        endpoint = base if base.endswith("index.php") else base + "/index.php"
        return cls(
            session,
            endpoint,
            cfg.matomo_token_auth,
            cfg.http_timeout,
            cfg.http_retries,
            cfg.matomo_bulk_size,
            cfg.matomo_workers,
            deadline,
            MatomoState(cfg.matomo_bulk_size),
        )

    def call(self, method: str, form: Mapping[str, str]) -> Any:
        """One POST to Matomo's API: its JSON answer, or a MatomoError that says how it failed."""
        # module and method stay in the query string so that an auth failure answers JSON;
        # the token goes in the body: Matomo 5 "secure only" tokens are refused in URLs.
        try:
            response = self.session.post(
                self.endpoint,
                params={"module": "API", "method": method, "format": "json"},
                data={"token_auth": self.token, **form},
                timeout=self.timeout,
            )
        except requests.ReadTimeout:
            raise MatomoError(
                f"Matomo did not answer within HTTP_TIMEOUT ({self.timeout} s)", "slow"
            ) from None
        except requests.RequestException as error:
            raise MatomoError(f"Matomo cannot be reached at MATOMO_URL: {error}", "down") from None
        status = response.status_code
        if status == 504:
            raise MatomoError("a proxy in front of Matomo gave up waiting for it (HTTP 504)", "slow")
        if "html" in response.headers.get("Content-Type", ""):
            kind = "down" if status >= 500 or status == 429 else "html"
            raise MatomoError(
                f"Matomo answered HTTP {status} with an HTML page, not JSON ({page_text(response.text)})",
                kind,
            )
        try:
            answer = response.json()
        except ValueError:
            raise MatomoError(
                f"Matomo answered HTTP {status} with malformed JSON", "down" if status >= 500 else "error"
            ) from None
        if isinstance(answer, dict) and answer.get("result") == "error":
            message = html.unescape(str(answer.get("message", "")))
            # A whole request refused for access (NoAccessException: 401) is the token's: a bad one, or
            # one whose user may view no site (in that user's language); a site's own is in its slot.
            if status == 401:
                raise MatomoConfigError(token_refused(message), "error")
            raise MatomoError(
                f"Matomo error (HTTP {status}): {message}", "refused" if status == 400 else "error"
            )
        if status >= 500:
            raise MatomoError(f"Matomo answered HTTP {status} (retried {self.retries} times)", "down")
        return answer

    def post_bulk_request(self, sub_queries: list[str]) -> list:
        """One API.getBulkRequest; returns its answer slots, one per sub-query. None starts once
        the deadline has passed (a signal included): not the halves of a failed one either."""
        if self.deadline.passed():
            raise MatomoError(self.deadline.why, "stopped")
        try:
            answer = self.call("API.getBulkRequest", {f"urls[{n}]": q for n, q in enumerate(sub_queries)})
        except MatomoError as error:
            if error.kind == "refused" and len(sub_queries) > 1:
                raise MatomoError(
                    f"Matomo refused {len(sub_queries)} sub-requests in one ({error}): the limit is its "
                    "API_bulk_request_limit (config.ini.php, Matomo 5.8+)",
                    "limit",
                ) from None
            raise
        if not isinstance(answer, list):
            raise MatomoError("Matomo answered HTTP 200 with an unexpected body")
        if len(answer) != len(sub_queries):
            raise MatomoError(
                f"Matomo answered {len(answer)} results for {len(sub_queries)} queries: the limit is PHP's "
                "max_input_vars (php.ini), past which PHP drops the rest of a request",
                "limit" if len(answer) < len(sub_queries) else "error",
            )
        return answer

    def version(self) -> str:
        """Matomo's version, or a MatomoError that names what to fix. The cheapest API call there
        is: it tells whether MATOMO_URL and the token work at all."""
        try:
            answer = self.call("API.getMatomoVersion", {})
        except MatomoConfigError:
            raise
        except MatomoError as error:
            if error.kind == "html":
                raise MatomoError(f"{error} to API.getMatomoVersion: {URL_HINT}", "html") from None
            if error.kind in ("down", "slow"):
                trouble = (
                    "the install or a proxy in front of it is having trouble; try again in a few minutes"
                )
                raise MatomoError(f"{error} (API.getMatomoVersion): {trouble}", error.kind) from None
            raise
        return str(answer.get("value", "?")) if isinstance(answer, dict) else "?"

    def install_trouble(self) -> MatomoError | None:
        """None when the install answers its own API (so a failed request failed for what it asked);
        else what it answers instead, its kind "html" for a wrong URL. That needs proof: an HTML
        page that is not an error status, twice; a 5xx or no connection is trouble that may pass."""
        for attempt in range(2):
            try:
                self.version()
                return None
            except MatomoConfigError:
                raise
            except MatomoError as error:
                if error.kind != "html" or attempt:
                    return error
            self.deadline.wait(1)
        raise AssertionError("unreachable")

    def database_trouble(self) -> str | None:
        """None when the install answers a call that needs its database and names none of the run's
        sites (the ids the token may view); else what it answers instead. API.getMatomoVersion needs
        no database: it may answer while MySQL is down."""
        method = "SitesManager.getSitesIdWithAtLeastViewAccess"
        try:
            answer = self.call(method, {})
        except MatomoConfigError:
            raise
        except MatomoError as error:
            return f"{method} ({error})"
        return None if isinstance(answer, list) else f"{method} (an unexpected answer)"

    def get_matomo_data(self, site_ids: Iterable[int], days: list[dt.date]) -> MatomoAnswer:
        """{matomo site id: {day: visits}} for the sites Matomo answered for (one bulk request's
        worth), what the install lost while it was down asked again once it answers. A site missing
        from the result has no value: it must not be stored as 0. The run's first request goes
        alone: what it learns (the install's bulk request limit, an install that is down) is known
        before the others are sent."""
        with self.state.lock:
            first, self.state.first_sent = not self.state.first_sent, True
        if not first:
            self.state.first_answered.wait()
        try:
            return self.visits_lost_while_down(self.visits_for_batch(sorted(set(site_ids)), days), days)
        finally:
            self.state.first_answered.set()

    def visits_for_batch(self, ids: list[int], days: list[dt.date]) -> MatomoAnswer:
        """The visits of one batch of sites; whatever fails, nothing but what Matomo answered."""
        if self.broken.happened:
            return {}
        if self.deadline.passed():
            return self.stopped_before(ids)
        if len(ids) > self.state.cap:  # the install's bulk request limit, learned earlier in the run
            return merged_answers(self.visits_for_batch(part, days) for part in chunks(ids, self.state.cap))
        return self.visits_asked(ids, days, probed=False)

    def stopped_before(self, ids: list[int]) -> MatomoAnswer:
        log.warning("%s: no Matomo values for %d sites (ids %s)", self.deadline.why, len(ids), id_list(ids))
        return {}

    def visits_asked(self, ids: list[int], days: list[dt.date], probed: bool) -> MatomoAnswer:
        """One bulk request for these sites and days, and what its failure calls for."""
        try:
            slots = self.post_bulk_request(matomo_queries(ids, days))
        except MatomoError as error:
            return self.visits_after(ids, days, error, probed)
        if self.state.down:  # it answers again: a later outage is waited for anew
            self.state.down = self.state.gave_up_on = None
        return visits_of_answer(ids, days, slots)

    def visits_after(
        self, ids: list[int], days: list[dt.date], error: MatomoError, probed: bool
    ) -> MatomoAnswer:
        """What a failed request calls for: less per request (a bulk limit, too much work), a look at
        the whole install (once per batch), or halves that find the one site whose PHP error sank it."""
        if isinstance(error, MatomoConfigError):
            return self.stop_asking(str(error))
        if error.kind == "stopped" or self.deadline.passed():
            return self.stopped_before(ids)
        if error.kind == "limit" and len(ids) > 1:
            self.state.learn_cap(len(ids), error)
            return self.visits_for_batch(ids, days)
        if error.kind == "slow":
            return self.visits_in_parts(ids, days, error)
        if not probed:
            if self.state.down and self.state.down_with and error.same_as(self.state.down_with):
                return self.install_down(ids, error, self.state.down)  # still down: no need to ask again
            try:
                trouble = self.install_trouble()
            except MatomoConfigError as refused:
                return self.stop_asking(str(refused))
            if trouble and trouble.kind == "html":  # MATOMO_URL is wrong
                return self.stop_asking(str(trouble))
            if trouble:
                return self.install_down(ids, error, f"{error}; to API.getMatomoVersion too")
        if len(ids) == 1:
            site_warnings.add(f"{error}; no Matomo value", f"Matomo site id {ids[0]}")  # one line a cause
            return {}
        return self.visits_in_halves(ids, days, error)

    def visits_in_halves(self, ids: list[int], days: list[dt.date], error: MatomoError) -> MatomoAnswer:
        """A request fails whole for one site's PHP error or for dropped POST variables: halves find
        the culprits and cost only them (at most 1 + 4 x log2(sites) requests for two). Both halves
        failing as the whole did proves nothing (each may hold one); the install is down only when a
        request that names no site fails too: then splitting further would only multiply requests."""
        log.info("%s for %d sites; asking for them in two halves", error, len(ids))
        halves = [ids[: len(ids) // 2], ids[len(ids) // 2 :]]
        answers: list[dict | MatomoError] = []
        for half in halves:
            try:
                answers.append(
                    visits_of_answer(half, days, self.post_bulk_request(matomo_queries(half, days)))
                )
            except MatomoError as failed:
                answers.append(failed)
        if all(isinstance(answer, MatomoError) and answer.same_as(error) for answer in answers):
            # Each half may hold one failing site: only a request that names none of them tells.
            trouble = self.database_trouble()
            if trouble:
                return self.install_down(
                    ids, error, f"{error}, for every part of the request and to {trouble}"
                )
        return merged_answers(
            answer if isinstance(answer, dict) else self.visits_after(half, days, answer, probed=True)
            for half, answer in zip(halves, answers)
        )

    def visits_in_parts(self, ids: list[int], days: list[dt.date], error: MatomoError) -> MatomoAnswer:
        """Too much work for one request (a proxy's 504, a read timeout): PHP is still working on the
        abandoned request, so the same one is never sent again; fewer sites, then fewer days, are."""
        if len(ids) > 1:
            log.info("%s for %d sites; asking for them in two halves", error, len(ids))
            return merged_answers(
                self.visits_asked(half, days, probed=True)
                for half in (ids[: len(ids) // 2], ids[len(ids) // 2 :])
            )
        if len(days) > MATOMO_MIN_DAYS_PER_REQUEST:
            log.info(
                "%s for site id %s over %d days; asking for them in two halves", error, ids[0], len(days)
            )
            parts = [
                self.visits_asked(ids, part, probed=True)
                for part in (days[: len(days) // 2], days[len(days) // 2 :])
            ]
            if any(part.get(ids[0]) is LOST_WHILE_DOWN for part in parts):
                return {ids[0]: LOST_WHILE_DOWN}  # asked again whole once the install answers
            found = {day: visits for part in parts for day, visits in part.get(ids[0], {}).items()}
            return {ids[0]: found} if found else {}
        site_warnings.add(f"{error} even for {len(days)} days; no Matomo value", f"Matomo site id {ids[0]}")
        return {}

    def stop_asking(self, why: str) -> MatomoAnswer:
        """The token or the URL is wrong: said once, and no further request is sent."""
        if self.broken.first(why):
            log.error("%s", why)
        return {}

    def install_down(self, ids: list[int], error: MatomoError, why: str) -> MatomoAnswer:
        """The whole install fails alike (its database down, PHP restarting): one error line, and the
        batch is asked again if the install answers within MATOMO_RECOVERY_PAUSES."""
        with self.state.lock:
            self.state.down, self.state.down_with = why, error
        if self.down_said.first():
            log.error(
                "Matomo fails every request alike: %s. The install (or its database) is down or overloaded; "
                "stored visits are kept, and what is missing is asked again if it answers within seconds "
                "(else the next nights fetch it)",
                why,
            )
        return dict.fromkeys(ids, LOST_WHILE_DOWN)

    def visits_lost_while_down(self, found: MatomoAnswer, days: list[dt.date]) -> MatomoAnswer:
        """What Matomo answered, its sites lost while the whole install failed alike asked again
        once it answers its API (a restart takes seconds); without them if it stays down."""
        lost = [m for m, by_day in found.items() if by_day is LOST_WHILE_DOWN]
        if lost:
            found = {m: by_day for m, by_day in found.items() if by_day is not LOST_WHILE_DOWN}
            with self.state.recovery:  # while one thread waits, the others wait for what it finds
                answers_again = self.install_answers_again()
            if answers_again:
                log.info("Matomo answers again: asking for the %d sites it failed for", len(lost))
                again = self.visits_for_batch(lost, days)
                found.update((m, by_day) for m, by_day in again.items() if by_day is not LOST_WHILE_DOWN)
        return found

    def install_answers_again(self) -> bool:
        """Whether the install answers its API again, within MATOMO_RECOVERY_PAUSES. An outage that
        outlasted them once is not waited for again: it would cost every later batch the pauses."""
        down = self.state.down
        if down is None:
            return True  # another thread found it answering
        if self.state.gave_up_on == down:
            return False
        for pause in MATOMO_RECOVERY_PAUSES:
            if self.deadline.passed():
                return False
            self.deadline.wait(pause)
            try:
                if self.database_trouble() is None:
                    self.state.down = None
                    return True
            except MatomoConfigError:
                return False
        self.state.gave_up_on = down
        return False

    def bulk_answers(self, queries: list[str], what: str, workers: int = 0, size: int = 0) -> list[Any]:
        """The answer slot of each sub-query, in bulk requests of `size` (the install's if 0),
        `workers` at a time (MATOMO_WORKERS if 0); None where a request failed (said once per
        request, as `what` could not be asked)."""

        def ask(batch: list[str]) -> list[Any]:
            if self.deadline.passed() or self.broken.happened:
                return [None] * len(batch)
            try:
                return self.post_bulk_request(batch)
            except MatomoError as error:
                if error.kind == "limit" and len(batch) > 1:
                    self.state.learn_cap(len(batch), error)
                    return [slot for part in chunks(batch, self.state.cap) for slot in ask(part)]
                log.info("Matomo: %s could not be asked for %d sites (%s)", what, len(batch), error)
                return [None] * len(batch)

        batches = chunks(queries, size or self.state.cap)
        if workers == 1:
            return [slot for batch in batches for slot in ask(batch)]
        with ThreadPoolExecutor(max_workers=workers or self.workers) as pool:
            return [slot for answers in pool.map(ask, batches) for slot in answers]

    def confirm_zeros(self, looks: list[ZeroLook], settled: dt.date) -> None:
        """Makes each 0 of the looks' days not final unless it is confirmed: when Matomo's raw log
        (the Live API) has no visit in its run of zero days (or, looked at over a site's span of
        zeros, no more visits than the archives count there); where the visitor log is off, when
        the day is older than `settled`. Asked in the caller's thread, one request at a time: the
        bulk requests beside it hold the other MATOMO_WORKERS."""
        behind: list[int] = []
        log_off = None
        while looks:
            answers = [
                slot
                for request in look_requests(looks, self.state.looks_cap())
                for slot in self.bulk_answers(
                    [raw_log_query(m, days, limit) for m, _, days, limit in request],
                    "the visitor log (to confirm zeros)",
                    workers=1,
                    size=len(request),
                )
            ]
            again = []
            for (m, by_day, days, limit), slot in zip(looks, answers):
                zeros = [day for day in days if by_day[day][0] == 0]
                if isinstance(slot, list) and len(slot) < limit:
                    continue  # no visit beyond what the archives count: the zeros are true
                if isinstance(slot, list) and limit > 1:
                    again += [(m, by_day, each, 1) for each in zero_runs({day: by_day[day] for day in zeros})]
                    continue  # a visit too many somewhere: each run of zeros is looked at alone
                if isinstance(slot, dict) and slot.get("result") == "error":
                    log_off = log_off or html.unescape(str(slot.get("message", "")))
                    zeros = [day for day in zeros if day >= settled]
                elif isinstance(slot, list):
                    behind.append(m)
                for day in zeros:
                    by_day[day] = (*by_day[day][:-1], False)
            looks = again
        for m in sorted(set(behind)):
            site_warnings.add(
                "Matomo answered 0 visits where its raw log has visits: those days are not archived yet "
                "(core:archive is behind). Stored as provisional (matomo_final = false); the next nights "
                "fetch them again",
                f"Matomo site id {m}",
            )
        if log_off and self.log_off_said.first():
            log.info(
                "Matomo's visitor log cannot confirm zeros (%s): a 0 is final once its day is older than "
                "MATOMO_SETTLE_DAYS",
                log_off,
            )

    def ids_of(self, sites: list[Site], fleet: list[Site] | None = None) -> dict[SiteId, int]:
        """{site id: Matomo id} for the sites Matomo is asked for; `skipped` says why each other site
        with a matomo_site_id is not (a person must act): a malformed id, or one that a site of a
        lower id in the deployed `fleet` has (that site gets its numbers; both would count the
        same visits), whether or not that site is asked for in this run (--site)."""
        ids: dict[SiteId, int] = {}
        owner: dict[int, SiteId] = {}
        for site in sorted(fleet or sites, key=lambda s: s.id):
            m = matomo_id(site)
            if m is not None:
                owner.setdefault(m, site.id)
        for site in sites:
            if site.matomo_site_id is None:
                continue
            found = matomo_id(site)
            if found is None:
                why = Reason(
                    f"matomo_site_id {site.matomo_site_id!r} is not a positive number", MATOMO_ID_FIX
                )
            elif owner[found] != site.id:
                why = Reason(
                    f"site {owner[found]} has the same matomo_site_id ({found}) and gets its numbers",
                    MATOMO_ID_FIX,
                )
            else:
                ids[site.id] = found
                continue
            self.skipped[site.id] = why
            site_warnings.add(f"{why}; Matomo skipped", site.label)
        return ids

    def learn_unknown(self, ids: Iterable[int]) -> None:
        """`unknown`: those of the ids the install does not know or the token may not view, from
        Matomo's own list of what the token may view (an error slot's words are in the token
        user's language); nothing if the list cannot be read (the bulk requests meet the fault)."""
        try:
            viewable = self.call("SitesManager.getSitesIdWithAtLeastViewAccess", {})
        except MatomoError:
            return
        ids = set(ids)
        if viewable == [] and ids:  # the token's user may view no site at all: one fault, not one a site
            self.stop_asking(
                "MATOMO_TOKEN_AUTH may view no site of the install: give its user view access to the sites "
                "(Administration > System > Users), or use a token of a user who has it"
            )
        elif isinstance(viewable, list):
            known = {int(m) for m in viewable if str(m).isdigit()}
            self.unknown.update((m, UNKNOWN_MATOMO_ID) for m in ids if m not in known)

    def unknown_sites(self, sites: Iterable[Site], ids: Mapping[SiteId, int]) -> list[Site]:
        """The sites whose Matomo id is `unknown`, said in one warning for them all."""
        found = [site for site in sites if ids.get(site.id) in self.unknown]
        for site in found:
            site_warnings.add(f"{UNKNOWN_MATOMO_ID}; Matomo not asked", site.label)
        return found

    def creation_days(self, ids: Iterable[int]) -> dict[int, dt.date | Reason]:
        """{Matomo id: the day the site was created in Matomo (ts_created, UTC), or why Matomo could
        not say (an unknown id)}; ids whose request failed are left out, to be asked another night."""
        found: dict[int, dt.date | Reason] = {m: self.unknown[m] for m in ids if m in self.unknown}
        ordered = sorted(set(ids) - found.keys())
        queries = [f"method=SitesManager.getSiteFromId&idSite={m}" for m in ordered]
        for m, slot in zip(ordered, self.bulk_answers(queries, "the sites' creation day")):
            created = slot.get("ts_created") if isinstance(slot, dict) else None
            if isinstance(created, str) and re.match(r"\d{4}-\d{2}-\d{2}", created):
                found[m] = dt.date.fromisoformat(created[:10])
            elif isinstance(slot, dict) and slot.get("result") == "error":
                found[m] = Reason(
                    f"Matomo: {html.unescape(str(slot.get('message', '')))}", UNKNOWN_MATOMO_ID_FIX
                )
        return found


class CappedRetry(Retry):
    """urllib3's Retry, but a server's Retry-After is obeyed for `cap` seconds at most (urllib3
    obeys `Retry-After: 3600` as it stands, on every retry), and none is left once the run's
    deadline has passed: each would wait up to HTTP_TIMEOUT more."""

    cap: float = 30.0
    deadline: Deadline | None = None

    def get_retry_after(self, response: Any) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, self.cap)

    def is_exhausted(self) -> bool:
        return super().is_exhausted() or bool(self.deadline and self.deadline.passed())

    def new(self, **kwargs: Any) -> CappedRetry:
        retry = super().new(**kwargs)
        retry.cap, retry.deadline = self.cap, self.deadline
        return retry


def matomo_date_param(days: list[dt.date]) -> str:
    return days[0].isoformat() if len(days) == 1 else f"{days[0]},{days[-1]}"


def page_text(page: str, limit: int = 160) -> str:
    """What an HTML error page says, in one short line: its title and text without the tags."""
    text = " ".join(html.unescape(re.sub(r"(?s)<(script|style).*?</\1>|<[^>]+>", " ", page)).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def token_refused(message: str) -> str:
    return (
        f"Matomo rejected MATOMO_TOKEN_AUTH ({message}): use a valid token (Administration > Personal > "
        "Security) of a user with view access to every site"
    )


# A site's day in Matomo: its numbers in MATOMO_METRICS' order (None: not in the answer), then
# whether they are final; the row's Matomo part as it is stored. A 0 its raw log has not
# confirmed is not final: a day the archiver has not processed answers exactly like a day
# without visits (matomo_final = false; the next nights fetch it again).
# A plain tuple, as a day of Search Console's is (metrics_by_day), not a NamedTuple: the cyclic
# collector stops tracking a plain tuple of plain values at its first pass, never an instance of
# a subclass of tuple, and a year of 10,000 sites makes 3.65 million of each. As NamedTuples they
# made most of what every collection of the young generations scanned (the year's collections
# took 14.7 s of CPU, 9.1 s as plain tuples).
MatomoDay = tuple
FINAL = (True,)


MatomoAnswer = dict[int, dict[dt.date, MatomoDay]]  # Matomo id -> day -> its numbers
# A site's days in a batch lost while the whole install failed alike (MatomoClient.install_down):
# asked again once it answers, never stored (compared by identity).
LOST_WHILE_DOWN: dict[dt.date, MatomoDay] = {}


# A day without visits: [] in the answer (one record serves them all).
EMPTY_DAY = (*NO_VISIT, True)


def matomo_days(
    slot: Any,
    dated: list[tuple[dt.date, str]],
    all_fields: Callable[[dict], tuple] = operator.itemgetter(*MATOMO_FIELDS),
) -> dict[dt.date, MatomoDay]:
    """Each day's numbers (in MATOMO_METRICS' order; None for a field the answer lacks, as where
    the install does not count unique visitors) from one VisitsSummary.get answer, its days given
    with their dates' text; raises ValueError for an error slot."""
    if isinstance(slot, dict) and slot.get("result") == "error":
        raise ValueError(slot.get("message", "error"))
    if len(dated) == 1:
        slot = {dated[0][1]: slot}
    if not isinstance(slot, dict):
        raise ValueError(f"unexpected answer {str(slot)[:80]!r}")
    found = {}
    # A year of 10,000 sites passes here 3.65 million times: each day's numbers are read with one
    # itemgetter, its record is one concatenation.
    answer_for = slot.get
    for day, text in dated:
        value = answer_for(text)
        if type(value) is dict:
            try:
                numbers = all_fields(value)
            except KeyError:
                numbers = tuple(map(value.get, MATOMO_FIELDS))
            # (a field that is not a whole number is refused by the table's column, for its row only)
            if type(numbers[0]) is not int:
                raise ValueError(f"no visits for {day} in the answer")
            found[day] = numbers + FINAL
        elif value == []:  # an empty day is [] (or an object of zeros), never a missing key
            found[day] = EMPTY_DAY
        else:
            raise ValueError(f"no visits for {day} in the answer")
    return found


def sites_per_request(bulk_size: int, days: int) -> int:
    """Sites per Matomo bulk request: MATOMO_BULK_SIZE, fewer for a long range, so that one
    request never asks for more than MATOMO_SITE_DAYS_PER_REQUEST site-days."""
    return max(1, min(bulk_size, MATOMO_SITE_DAYS_PER_REQUEST // days))


def matomo_queries(ids: list[int], days: list[dt.date]) -> list[str]:
    # showColumns: only the metrics we store (the rates and the rest are Matomo's to derive).
    query = urlencode(
        {
            "date": matomo_date_param(days),
            "period": "day",
            "showColumns": ",".join(MATOMO_FIELDS),
        }
    )
    return [f"method=VisitsSummary.get&idSite={i}&{query}" for i in ids]


def visits_of_answer(ids: list[int], days: list[dt.date], slots: list) -> MatomoAnswer:
    result = {}
    dated = [(day, day.isoformat()) for day in days]
    for site_id, slot in zip(ids, slots):
        try:
            result[site_id] = matomo_days(slot, dated)
        except ValueError as error:
            site_warnings.add(str(error), f"Matomo site id {site_id}")
    return result


def by_site_id(ids: Mapping[SiteId, int], answered: MatomoAnswer) -> dict[SiteId, dict]:
    """What Matomo answered ({Matomo id: {day: ...}}) by site id, for the sites it answered for."""
    return {site_id: answered[m] for site_id, m in ids.items() if m in answered}


def merged_answers(answers: Iterable[MatomoAnswer]) -> MatomoAnswer:
    result: MatomoAnswer = {}
    for answer in answers:
        result.update(answer)
    return result


def matomo_id(site: Site) -> int | None:
    """The site's Matomo id as a positive int, or None when it is missing or malformed."""
    value = site.matomo_site_id
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def zero_runs(by_day: Mapping[dt.date, MatomoDay]) -> list[list[dt.date]]:
    """The runs of consecutive days with 0 visits: one look at the raw log covers a run."""
    runs: list[list[dt.date]] = []
    # Every site-day of a run passes here: its visits read as a field (numbers), not a property.
    for day in sorted(day for day, matomo_day in by_day.items() if matomo_day[0] == 0):
        if runs and runs[-1][-1] == day - dt.timedelta(days=1):
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs


def raw_log_query(idsite: int, days: list[dt.date], limit: int) -> str:
    """Live.getLastVisitsDetails for these days: its first `limit` visits, their ids only (the
    API's showColumns), without their actions; [] if none."""
    period = "day" if len(days) == 1 else "range"
    return "method=Live.getLastVisitsDetails&" + urlencode(
        {
            "idSite": idsite,
            "period": period,
            "date": matomo_date_param(days),
            "filter_limit": limit,
            "showColumns": "idVisit",
            "doNotFetchActions": 1,
        }
    )


# A site's zeros are confirmed with one look at its raw log over all of them when that lists no
# more visits (those the archives count between them) than this for each run of zero days it
# stands for, and at most RAW_LOG_VISITS_PER_LOOK: a sparse site's year in one sub-request. Matomo
# builds each listed visit's details (though only ids come back): a run's own look lists none
# and costs about what ten listed visits do (a report request's 3,000 site-days are worth 300
# looks). Else each run of zero days is looked at alone.
RAW_LOG_VISITS_PER_RUN = 10
RAW_LOG_VISITS_PER_LOOK = 1000


# A look at the raw log: (Matomo id, the site's answer by day, the days looked at, filter_limit).
ZeroLook = tuple[int, dict[dt.date, MatomoDay], list[dt.date], int]


def zero_looks(answered: MatomoAnswer) -> list[ZeroLook]:
    """The raw-log looks that confirm the zeros of an answer, for each site: one over every zero
    day and the days between, listing one visit more than the archives count there (so that any
    visit on a zero day shows as one too many); else one per run."""
    looks: list[ZeroLook] = []
    for m, by_day in answered.items():
        runs = zero_runs(by_day)
        if len(runs) > 1:
            first, last = runs[0][0], runs[-1][-1]
            counted = sum(each[0] for day, each in by_day.items() if first <= day <= last)
            if counted < min(RAW_LOG_VISITS_PER_RUN * len(runs), RAW_LOG_VISITS_PER_LOOK):
                looks.append((m, by_day, days_between(first, last), counted + 1))
                continue
        looks += [(m, by_day, zeros, 1) for zeros in runs]
    return looks


def look_requests(looks: list[ZeroLook], most: int) -> list[list[ZeroLook]]:
    """The looks in the order given, in bulk requests of at most `most` looks that list at most
    MATOMO_SITE_DAYS_PER_REQUEST visits between them: Matomo builds each listed visit's details
    (plugins/Live/API.php) before showColumns drops them, about what a day's archive read costs."""
    requests: list[list[ZeroLook]] = []
    listed = 0
    for look in looks:
        if not requests or len(requests[-1]) == most or listed + look[3] > MATOMO_SITE_DAYS_PER_REQUEST:
            requests.append([])
            listed = 0
        requests[-1].append(look)
        listed += look[3]
    return requests


# What fixes a matomo_site_id that is no number, or one another site has.
MATOMO_ID_FIX = (
    "set sites.matomo_site_id to the site's own id in Matomo (All Websites), or status_deployment of a "
    "duplicate to something other than deployed"
)
# What fixes a Matomo id its install does not know (or the token may not view).
UNKNOWN_MATOMO_ID_FIX = (
    "correct sites.matomo_site_id, or add the site in Matomo (or give view access to it to the user of "
    "MATOMO_TOKEN_AUTH)"
)
UNKNOWN_MATOMO_ID = Reason(
    "Matomo has no site with its matomo_site_id that MATOMO_TOKEN_AUTH may view", UNKNOWN_MATOMO_ID_FIX
)


# ---------------------------------------------------------------------------
# Google Search Console
# ---------------------------------------------------------------------------


class GscMetrics(NamedTuple):
    """The layout of a site's day in Search Console, the row's part as it is stored; each is a plain
    tuple in this layout (see MatomoDay for why)."""

    clicks: int
    impressions: int
    ctr: float | None
    position: float | None
    final: bool = True  # False: Search Console may still revise the day


NO_SEARCH_TRAFFIC = tuple(GscMetrics(0, 0, None, None))
# Each metric's column in daily_analytics: a metric Search Console gives is a field of GscMetrics.
GSC_COLUMNS = tuple(f"gsc_{name}" for name in GscMetrics._fields if name != "final")
# A row: a tuple of these values, in this order, as store_analytics takes it (a quarter of the
# bytes of an object with its keys; None is no value). Each source's values travel with its final
# flag: a flag that is None says the source gave the row nothing.
STORED_COLUMNS = ("date", "site_id", *MATOMO_COLUMNS, "matomo_final", *GSC_COLUMNS, "gsc_final")
FINAL_FLAG = {"matomo": STORED_COLUMNS.index("matomo_final"), "gsc": STORED_COLUMNS.index("gsc_final")}
NO_GSC_PART = (None,) * (len(GSC_COLUMNS) + 1)  # a row's Search Console part when it gave nothing
NO_MATOMO_PART = (None,) * (len(MATOMO_COLUMNS) + 1)  # its Matomo part likewise


def search_console_today() -> dt.date:
    """Today on Search Console's clock (Pacific time), which dates its days."""
    try:
        from zoneinfo import ZoneInfo

        pacific: dt.tzinfo = ZoneInfo("America/Los_Angeles")
    except Exception:  # noqa: BLE001 - no time zone database: standard time is the later finish
        pacific = dt.timezone(dt.timedelta(hours=-8))
    return dt.datetime.now(pacific).date()


def newest_final_day(pacific_today: dt.date) -> dt.date:
    """Whatever an answer says, a day less than two days old in Pacific time is not final."""
    return pacific_today - dt.timedelta(days=DEFAULT_LAG_DAYS)


def service_account_email(key: AccountKey) -> str | None:
    return str(key.get("client_email")) if isinstance(key, dict) else None


class QuotaWindow:
    """At most `limit` queries in any rolling minute: one of Search Console's quotas.

    Pacing ourselves costs nothing under the quota and avoids a storm of 429s and backoffs above it.
    Only the thread that hands out the queries (SearchConsole.get_gsc_data) uses it: no lock.
    """

    SECONDS = 60.5  # a little over a minute, so that the server's own window never counts limit + 1

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sent: deque[float] = deque()

    def next_turn(self, now: float) -> float:
        """The moment (monotonic) from which one more query fits in the window."""
        while self._sent and now - self._sent[0] >= self.SECONDS:
            self._sent.popleft()
        return self._sent[0] + self.SECONDS if len(self._sent) >= self.limit else now

    def take(self, now: float) -> None:
        self._sent.append(now)


class AccountQuota:
    """When an account may send its next query: its own per-minute quota, its Cloud project's
    (shared with every account of the project), and a pause after Google said a quota is used up,
    or after OUTAGE_FAILURES queries in a row failed transiently (Search Console is down).

    Google answers every query in flight with the quota error at once: all the errors of queries
    sent before a pause began are that one event, never a new (doubled) pause. After a pause one
    query probes the quota; once one succeeds the account goes at full speed again and the next
    exhaustion starts from the first pause.
    """

    def __init__(self, qpm: int, project: QuotaWindow, first_pause: float) -> None:
        self.window, self.project, self.first_pause = QuotaWindow(qpm), project, first_pause
        self.pauses = 0  # pauses since the last query that succeeded
        self.paused_at = -math.inf  # when the last pause began
        self.resume_at = 0.0
        self.reasons: set[str] = set()  # what Google said while exhausted
        self.failures = 0  # queries that failed transiently since the last one that succeeded
        self.down: str | None = None  # what every query answered while Search Console failed

    def next_turn(self, now: float) -> float:
        return max(self.resume_at, self.window.next_turn(now), self.project.next_turn(now))

    def in_flight_allowed(self, workers: int) -> int:
        return 1 if self.pauses else workers  # after a pause, one probe first

    def sent(self, now: float) -> None:
        self.window.take(now)
        self.project.take(now)

    def succeeded(self, sent_at: float) -> None:
        self.failures = 0
        if sent_at >= self.paused_at:
            self.pauses, self.reasons, self.down = 0, set(), None

    def failing(self, said: str) -> bool:
        """Whether a query that failed transiently after its retries (a 5xx, a timeout) meets an
        outage of Search Console, which then pauses the account as a used-up quota does: from
        OUTAGE_FAILURES in a row without a success (a property or two that fail are no outage)."""
        self.failures += 1
        if self.failures >= OUTAGE_FAILURES and self.down is None:
            self.down = said
        return self.down is not None

    def exhausted(self, sent_at: float, now: float, reasons: set[str]) -> float | None:
        """A query sent at `sent_at` met a used-up quota: the pause that starts now (0 when the
        error belongs to a burst already paused for), None when the last pause did not help."""
        self.reasons |= reasons
        if sent_at < self.paused_at:
            return 0.0
        if self.pauses >= QUOTA_PAUSES:
            return None
        seconds = self.first_pause * 2**self.pauses
        self.pauses += 1
        self.paused_at, self.resume_at = now, now + seconds
        return seconds

    def why_exhausted(self, days: list[dt.date], until: str) -> str:
        """What stayed exhausted, and what to do about it."""
        if self.down:  # said alike of every account, so one line for them all
            return Reason(
                f"Search Console failed every query ({self.down}) {until}",
                "the next runs fetch these days by themselves",
                person=False,
                shared=True,
            )
        if self.reasons & LOAD_QUOTA_REASONS:
            return (
                f"Search Console's load or daily quota of this account stayed exhausted {until} (queries for "
                f"{days[0]} to {days[-1]}); it clears within the day: the next run fetches them, and long "
                "backfills spend that quota fastest"
            )
        return (
            f"Search Console's per-minute quota stayed exceeded {until}; re-run these dates later, "
            "or lower GSC_QPM (GSC_PROJECT_QPM when accounts share one OAuth client)"
        )


QUOTA_PAUSES = 5
# Queries of an account that fail transiently in a row, after their retries, that make an outage.
OUTAGE_FAILURES = 5
# Search Console's quota errors: the per-minute ones (429, or 403 rateLimitExceeded) and the
# load and daily quotas (403 quotaExceeded, dailyLimitExceeded), which googleapiclient does not
# retry at all. Newer front ends give the reason only in error.details[] (RATE_LIMIT_EXCEEDED)
# with the status RESOURCE_EXHAUSTED.
QUOTA_REASONS = {"quotaExceeded", "rateLimitExceeded", "userRateLimitExceeded", "dailyLimitExceeded"}
LOAD_QUOTA_REASONS = {"quotaExceeded", "dailyLimitExceeded"}
# The Search Console API is not enabled in the Cloud project: every call of its accounts fails.
API_DISABLED_REASONS = {"accessNotConfigured", "SERVICE_DISABLED"}


def is_quota_error(error: HttpError) -> bool:
    reasons = error_reasons(error)
    return error.status_code == 429 or (
        error.status_code == 403
        and bool(
            reasons & QUOTA_REASONS
            or "RESOURCE_EXHAUSTED" in reasons
            or any("EXCEEDED" in r for r in reasons)
        )
    )


def is_api_disabled(error: HttpError) -> bool:
    return error.status_code == 403 and bool(error_reasons(error) & API_DISABLED_REASONS)


def error_reasons(error: HttpError) -> set[str]:
    """Every reason a Google error body gives: `errors[].reason`, `details[].reason`, `status`."""
    try:
        body = json.loads(error.content).get("error", {})
        entries = [*body.get("errors", []), *body.get("details", [])]
        reasons = {
            str(entry.get("reason")) for entry in entries if isinstance(entry, dict) and entry.get("reason")
        }
        return reasons | ({str(body["status"])} if body.get("status") else set())
    except (ValueError, AttributeError, TypeError):
        return set()


class RunStopped(Exception):
    """The run's deadline passed (or a signal came) before a retry could be sent."""


class DeadlineHttp(httplib2.Http):
    """httplib2's Http that sends nothing once the run's deadline has passed: googleapiclient's
    own retries (num_retries) would go on after it, each waiting up to HTTP_TIMEOUT. It raises
    what googleapiclient does not retry."""

    def __init__(self, deadline: Deadline, timeout: int) -> None:
        super().__init__(timeout=timeout)
        self.deadline = deadline

    def request(self, *args: Any, **kwargs: Any) -> Any:
        if self.deadline.passed():
            raise RunStopped(self.deadline.why)
        return super().request(*args, **kwargs)


@dataclass(frozen=True)
class GscAccount:
    id: AccountId
    service_account: str | None  # its email, for a service account
    credentials: Credentials
    project: str  # the Cloud project its calls count against (quota_project)
    analytics: Any  # the service's searchanalytics() resource, shared by all threads
    properties: dict[str, str]
    quota: AccountQuota


def verified_properties(site_list_answer: dict) -> dict[str, str]:
    """{lower-cased property: property} for the properties whose data the account may read."""
    # The wire says siteUnverifiedUser, the v1 discovery document SITE_UNVERIFIED_USER.
    return {
        property_key(entry["siteUrl"]): entry["siteUrl"]
        for entry in site_list_answer.get("siteEntry", [])
        if isinstance(entry, dict)
        and isinstance(entry.get("siteUrl"), str)
        and str(entry.get("permissionLevel", "")).replace("_", "").lower() != "siteunverifieduser"
    }


def property_key(site_url: str) -> str:
    """A property as property_for_domain looks it up: lower case, its host in punycode."""
    text = site_url.lower()
    if text.startswith("sc-domain:"):
        return "sc-domain:" + (ascii_domain(text[len("sc-domain:") :]) or text[len("sc-domain:") :])
    parts = urlsplit(text)
    return parts._replace(netloc=ascii_domain(parts.netloc) or parts.netloc).geturl()


def ascii_domain(domain: str) -> str | None:
    """'bücher.de' -> 'xn--bcher-kva.de' (IDNA, as Search Console stores it); None if it cannot be."""
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def normalised_domain(raw: Any) -> str | None:
    """'https://WWW.Example.com/' -> 'example.com'; None when it is not a bare domain."""
    if not isinstance(raw, str):
        return None
    text = raw.strip().lower()
    text = re.sub(r"^[a-z][a-z0-9+.-]*://", "", text).rstrip("/").rstrip(".")
    text = text[4:] if text.startswith("www.") else text
    label = r"(?!-)[\w-]{1,63}(?<!-)"
    return ascii_domain(text) if re.fullmatch(rf"{label}(\.{label})+", text) else None


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


def metrics_by_day(answer: Any, days: list[dt.date], newest_final: dt.date) -> dict[dt.date, tuple]:
    """Per-day metrics of a searchanalytics.query answer (dataState "all") grouped by date.

    Search Console omits days without data (and omits `rows` entirely when nothing at all),
    so a day Google calls final that has no row had no search traffic: 0. A day from
    metadata.firstIncompleteDate on (or newer than `newest_final`, the clock's word) is
    provisional: its rows are kept, flagged, and a missing row there means "not known yet", so the
    day gets no value. Google sends that metadata only when the range holds incomplete days:
    without it, every day of the range is final. (An answer that disagrees with a stored final
    count is the table's to judge: store_analytics keeps the count.)
    """
    if not isinstance(answer, dict):
        raise ValueError(f"unexpected answer {str(answer)[:80]!r}")
    first_incomplete = (answer.get("metadata") or {}).get("firstIncompleteDate")
    if first_incomplete:
        newest_final = min(newest_final, dt.date.fromisoformat(first_incomplete) - dt.timedelta(days=1))
    metrics = dict.fromkeys([day for day in days if day <= newest_final], NO_SEARCH_TRAFFIC)
    wanted = {day.isoformat(): day for day in days}
    for row in answer.get("rows", []):
        day = wanted.get(row["keys"][0])
        if day is None:
            dt.date.fromisoformat(row["keys"][0])  # a day outside the range is skipped, not a non-date
            continue
        # a plain tuple in GscMetrics' layout (3 million in a year of 10,000 sites; see MatomoDay)
        metrics[day] = (
            round(row["clicks"]),
            round(row["impressions"]),
            row["ctr"],
            row["position"],
            day <= newest_final,
        )
    return metrics


def http_error_reason(error: HttpError) -> str:
    reason = error.reason
    if is_quota_error(error):
        return f"{reason} (Search Console quota exceeded)"
    if error.status_code == 403:
        return f"{reason} (grant this account access to the property in Search Console)"
    return reason


def needs_person(state: object) -> bool:
    """Whether an account's state (a Reason, or 'connected') needs a person."""
    return isinstance(state, Reason) and state.person


def is_shared(state: object) -> bool:
    return isinstance(state, Reason) and state.shared


def api_disabled(project: str) -> Reason:
    """Every call fails while the Search Console API is off in the Cloud project the calls count against."""
    return Reason(
        f"The Search Console API is not enabled in the Google Cloud {project}",
        "enable it (Google Cloud console > APIs & Services > Library > Google Search Console API)",
        shared=True,
    )


def quota_project(key: AccountKey) -> str:
    """The Cloud project an account's calls count against: a service account's own or, for
    refresh tokens, the OAuth client's (GOOGLE_CLIENT_ID); they share its per-project quota."""
    if isinstance(key, dict):
        return f"project {key.get('project_id')} of service account {key.get('client_email')}"
    return "project of GOOGLE_CLIENT_ID"


def refresh_error_reason(error: RefreshError, account_id: AccountId | str, key: AccountKey) -> Reason:
    """What a refused token refresh means for this account, and the fix. Google's OAuth error
    codes (invalid_grant, unauthorized_client, ...) are read here (oauth_refusal)."""
    said, (code, description) = refresh_error_text(error), oauth_refusal(error)
    email = service_account_email(key)
    if email:
        why = service_account_fix(code, description, account_id).about(
            f"Google refused service account {email}"
        )
    elif code == "invalid_client":
        return CLIENT_REFUSED
    elif code == "invalid_grant":
        why = Reason(
            "the refresh token has expired or been revoked",
            f"re-authorize this account ({program()} authorize --account {account_id})",
        )
    elif code == "unauthorized_client":
        why = Reason(
            "the refresh token was issued to another OAuth client",
            f"re-authorize this account with this GOOGLE_CLIENT_ID ({program()} authorize --account {account_id})",
        )
    else:
        why = TOKEN_ENDPOINT_DOWN
    return Reason(why.what, why.fix, why.person, said=said)


def refresh_error_text(error: RefreshError) -> str:
    """google-auth's message without the raw answer it carries beside it: 'invalid_grant: ...'."""
    return str(error.args[0]) if error.args else str(error)


def oauth_refusal(error: RefreshError) -> tuple[str, str]:
    """Google's OAuth error code (RFC 6749 5.2: invalid_grant, invalid_client, ...) and its
    description, from the answer google-auth keeps beside its message; ('', '') without one."""
    answer = error.args[1] if len(error.args) > 1 else None
    if isinstance(answer, dict):
        return str(answer.get("error", "")), str(answer.get("error_description", ""))
    return "", ""


def service_account_fix(code: str, description: str, account_id: AccountId | str) -> Reason:
    """The fix for each way Google's token endpoint refuses a service account's signed assertion
    (one code, invalid_grant, for several causes: its description tells them apart)."""
    if "Robot is disabled" in description:
        return Reason(
            "the service account is disabled", "enable it (Google Cloud console > IAM > Service accounts)"
        )
    if "short-lived token" in description or "reasonable timeframe" in description:
        return Reason(
            "this machine's clock is off, so Google takes the signed request for a stale one",
            "fix the clock (NTP)",
        )
    if code == "deleted_client":
        return Reason(
            "the service account was deleted",
            "create a new service account, add it as a user of each property, and store its key with "
            f"{program()} authorize --service-account KEY.json --account {account_id}",
        )
    if code == "invalid_grant":
        return Reason(
            "its key was deleted or is not this account's (Invalid JWT Signature)",
            "create a new JSON key (Google Cloud console > IAM > Service accounts > Keys) and store it with "
            f"{program()} authorize --service-account KEY.json --account {account_id}",
        )
    return TOKEN_ENDPOINT_DOWN


TOKEN_ENDPOINT_DOWN = Reason(
    "the Google token endpoint failed", "re-run these dates once it answers", person=False
)
CLIENT_REFUSED = Reason(
    "Google refused the OAuth client (invalid_client)",
    "GOOGLE_CLIENT_ID or GOOGLE_CLIENT_SECRET is wrong; copy both from Google Cloud console > APIs & Services > "
    "Credentials",
    shared=True,
)
NO_CLIENT = Reason(
    "GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET are not set",
    "an account with a refresh token needs the OAuth client that issued it; copy both from Google Cloud console > "
    "APIs & Services > Credentials into .env (accounts with a service-account key need none)",
    shared=True,
)


def search_query(days: list[dt.date]) -> dict:
    """The searchAnalytics.query body for a range of days."""
    # One query covers the whole range: it can hold 25,000 rows, far beyond GSC's 16 months.
    # dataState "all": without it a day that is not final yet is omitted like a day without
    # traffic, and would be stored as 0; with it, metadata says which days are not final.
    start, end = days[0].isoformat(), days[-1].isoformat()
    return {
        "startDate": start,
        "endDate": end,
        "dimensions": ["date"],
        "type": "web",
        "dataState": "all",
        "rowLimit": 25000,
    }


# One answer of Search Console for a site: its metrics by day, or None when it gave none.
GscAnswered = Callable[[SiteId, Union[dict, None]], None]


@dataclass
class GscRound:
    """The queries of one stream: waiting per account, in flight, and what came of them. Every
    site added is answered exactly once, with its metrics or with None."""

    console: SearchConsole
    answered: GscAnswered
    targets: dict[SiteId, tuple[GscAccount, str]] = field(default_factory=dict)
    days: dict[SiteId, list[dt.date]] = field(default_factory=dict)  # each site's query
    waiting: dict[AccountId, deque[SiteId]] = field(default_factory=dict)
    in_flight: dict[Future, tuple[SiteId, float]] = field(default_factory=dict)
    busy: Counter = field(default_factory=Counter)  # queries in flight per account
    # Each query as it ends: one put per answer, where waiting on every query in flight for the
    # first to end would take and give back 64 locks each time.
    ended: queue.Queue = field(default_factory=queue.Queue)
    given_up: dict[str, dict[AccountId, list[SiteId]]] = field(default_factory=lambda: defaultdict(dict))
    asked_again: set[SiteId] = field(default_factory=set)  # sites whose query failed once transiently

    def add_targets(self, targets: Mapping[SiteId, tuple[GscAccount, str]], days: list[dt.date]) -> None:
        for site_id, target in targets.items():
            self.targets[site_id], self.days[site_id] = target, days
            self.waiting.setdefault(target[0].id, deque()).append(site_id)

    def answer(self, site_id: SiteId, metrics: dict | None) -> None:
        del self.targets[site_id], self.days[site_id]
        self.answered(site_id, metrics)

    def give_up(self, account_id: AccountId, why: str, site_ids: Iterable[SiteId] = ()) -> None:
        """No value for these sites and the account's waiting ones, for this reason."""
        gone = [*site_ids, *self.waiting.pop(account_id, ())]
        self.given_up[why].setdefault(account_id, []).extend(gone)
        for site_id in gone:
            self.answer(site_id, None)

    def too_late(self, account: GscAccount, deadline: Deadline) -> None:
        """The account's waiting sites cannot be queried before the run must end."""
        paused = account.quota.pauses and not deadline.passed()
        days = self.days[self.waiting[account.id][0]]
        self.give_up(
            account.id, account.quota.why_exhausted(days, "until RUN_DEADLINE") if paused else deadline.why
        )

    def take_targets(self, feed: queue.Queue, timeout: float) -> bool:
        """Adds every site waiting in the feed to the round (waiting up to `timeout` for the first);
        False once the feed has ended."""
        try:
            targets = feed.get(timeout=timeout) if timeout else feed.get_nowait()
            while targets is not None:
                self.add_targets(*targets)
                targets = feed.get_nowait()
            return False
        except queue.Empty:
            return True

    def send_queries(self, query: Callable) -> float:
        """Hands every query that may go now to the pool, one account after another so that the
        threads spread over accounts; returns when the next waiting one may go."""
        console = self.console
        assert console.pool is not None
        next_turn, sent = math.inf, True
        while sent and len(self.in_flight) < console.cfg.gsc_workers:
            sent, now = False, time.monotonic()
            for account_id, sites_waiting in list(self.waiting.items()):
                account = self.targets[sites_waiting[0]][0]
                if self.busy[account_id] >= account.quota.in_flight_allowed(console.cfg.gsc_account_workers):
                    continue
                turn = account.quota.next_turn(now)
                if turn >= console.deadline.at:
                    self.too_late(account, console.deadline)
                elif turn > now:
                    next_turn = min(next_turn, turn)
                elif len(self.in_flight) < console.cfg.gsc_workers:
                    site_id = sites_waiting.popleft()
                    if not sites_waiting:
                        del self.waiting[account_id]
                    account.quota.sent(now)
                    future = console.pool.submit(query, *self.targets[site_id], self.days[site_id])
                    self.in_flight[future] = (site_id, now)
                    future.add_done_callback(self.ended.put)
                    self.busy[account_id] += 1
                    sent = True
        return next_turn

    def ended_within(self, timeout: float) -> list[Future]:
        """The queries that ended since the last call, waiting up to `timeout` for the first."""
        ended: list[Future] = []
        try:
            ended.append(self.ended.get(timeout=timeout))
            while True:
                ended.append(self.ended.get_nowait())
        except queue.Empty:
            return ended

    def take_answer(self, future: Future) -> None:
        """Files one finished query: its numbers, a quota error or an outage (the site waits again),
        or a warning."""
        site_id, sent_at = self.in_flight.pop(future)
        account, site_url = self.targets[site_id]
        self.busy[account.id] -= 1
        try:
            metrics = future.result()
        except RunStopped as stopped:
            self.give_up(account.id, str(stopped), [site_id])
            return
        except HttpError as error:
            said = f"HTTP {error.status_code}: {http_error_reason(error)}"
            if is_quota_error(error):
                self.paused(
                    site_id, sent_at, error_reasons(error), f"Search Console quota exceeded ({error.reason})"
                )
            elif is_api_disabled(error):
                self.give_up(account.id, api_disabled(account.project), [site_id])
            else:
                self.failed(site_id, sent_at, said, transient=error.status_code >= 500)
            return
        except Exception as error:  # noqa: BLE001 - a cut-off answer, a dropped refresh: this site only
            transient = isinstance(error, (OSError, httplib2.HttpLib2Error))  # no answer, or none in time
            self.failed(site_id, sent_at, f"{type(error).__name__}: {error}", transient)
            return
        account.quota.succeeded(sent_at)
        self.answer(site_id, metrics)

    def failed(self, site_id: SiteId, sent_at: float, said: str, transient: bool) -> None:
        """A query failed after its retries: the site waits again while Search Console fails every
        query alike (an outage, or a burst longer than the retries), else it is one line per cause
        (not per site) and no value."""
        account, site_url = self.targets[site_id]
        first = site_id not in self.asked_again  # a property that fails again is no sign of an outage
        if transient and (first or account.quota.down) and account.quota.failing(said):
            self.asked_again.add(site_id)
            # at the end of the queue: the probe after the pause is another property's query
            self.paused(site_id, sent_at, set(), f"Search Console fails every query ({said})", last=True)
        elif transient and first:  # its query met a burst: asked once more
            self.asked_again.add(site_id)
            self.waiting.setdefault(account.id, deque()).append(site_id)
        else:
            site_warnings.add(said, f"GSC {site_url}")
            self.answer(site_id, None)

    def paused(
        self, site_id: SiteId, sent_at: float, reasons: set[str], said: str, last: bool = False
    ) -> None:
        """The site's query met a used-up quota or an outage: it waits at the head of its account's
        queue (`last`: at its end), and the account pauses, once per burst of such errors."""
        account = self.targets[site_id][0]
        pause = account.quota.exhausted(sent_at, time.monotonic(), reasons)
        if pause is None:
            why = account.quota.why_exhausted(self.days[site_id], f"after {QUOTA_PAUSES} pauses")
            self.give_up(account.id, why, [site_id])
            return
        waiting = self.waiting.setdefault(account.id, deque())
        (waiting.append if last else waiting.appendleft)(site_id)
        if pause:
            log.info("GSC account %s: %s; pausing its queries for %.0f s", account.id, said, pause)

    def say_given_up(self) -> None:
        """One line per reason (and per account, unless the reason is the whole project's) for the
        sites left without a Search Console value."""
        for why, by_account in self.given_up.items():
            if is_shared(why):
                site_ids = sorted(site_id for ids in by_account.values() for site_id in ids)
                level = logging.ERROR if needs_person(why) else logging.WARNING
                log.log(level, "%s: no GSC data for %d sites (ids %s)", why, len(site_ids), id_list(site_ids))
                continue
            for account_id, site_ids in by_account.items():
                log.warning(
                    "GSC account %s: %s: no GSC data for %d sites (ids %s)",
                    account_id,
                    why,
                    len(site_ids),
                    id_list(site_ids),
                )


class SearchConsole:
    """The run's Search Console: its settings; the accounts (connected in parallel, each with its
    credentials, its properties and its quota, and its Cloud project's quota shared with the
    project's other accounts); the sites it is asked for (`targets`) and why the others of a
    connected account are not (`skipped`); and the stream of queries, each account's within its
    quota. `states` gets "connected" or the Reason for each account."""

    def __init__(
        self,
        cfg: Config,
        pool: Executor | None = None,
        deadline: Deadline | None = None,
        states: dict[AccountId, str] | None = None,
    ) -> None:
        self.cfg, self.pool = cfg, pool
        self.deadline = deadline or Deadline.after(cfg.run_deadline)
        self.states: dict[AccountId, str] = {} if states is None else states
        self.accounts: dict[AccountId, GscAccount] = {}
        self.targets: dict[SiteId, tuple[GscAccount, str]] = {}
        self.skipped: dict[SiteId, Reason] = {}
        # httplib2.Http is not thread-safe (google-api-python-client's docs/thread_safety.md):
        # each thread keeps one, shared by the accounts it serves.
        self.this_thread = threading.local()

    def credentials(self, key: AccountKey) -> Any:
        """Credentials that refresh themselves: a user's (refresh token) or a service account's
        (JSON key, signed JWT-bearer grant). Either way a malformed key raises ValueError, without
        the key."""
        cfg = self.cfg
        if isinstance(key, dict):
            # Imported here: only service accounts need it (and cryptography with it).
            from google.oauth2 import service_account

            info = {**key, "token_uri": cfg.google_token_uri}
            return service_account.Credentials.from_service_account_info(info, scopes=[GSC_SCOPE])
        return Credentials(
            token=None,
            refresh_token=key,
            client_id=cfg.google_client_id,
            client_secret=cfg.google_client_secret,
            token_uri=cfg.google_token_uri,
            scopes=[GSC_SCOPE],
        )

    def refresh_now(self, credentials: Any) -> None:
        """Asks the token endpoint for an access token now (the run's clients do it on first use)."""
        credentials.refresh(google_auth_httplib2.Request(httplib2.Http(timeout=self.cfg.http_timeout)))

    def get_google_client(self, credentials: Credentials) -> Any:
        """A Search Console service for one account; building it makes no network call."""
        # Our own Http carries the timeout and the deadline; the token refresh goes through it too.
        http = google_auth_httplib2.AuthorizedHttp(
            credentials, http=DeadlineHttp(self.deadline, timeout=self.cfg.http_timeout)
        )
        return build(
            "searchconsole",
            "v1",
            http=http,
            client_options={"api_endpoint": self.cfg.gsc_api_endpoint},
            cache_discovery=False,
            static_discovery=True,
        )

    def http(self, credentials: Credentials) -> google_auth_httplib2.AuthorizedHttp:
        """An authorized Http whose connections belong to the calling thread; the credentials are
        shared by all threads."""
        if not hasattr(self.this_thread, "http"):
            self.this_thread.http = DeadlineHttp(self.deadline, timeout=self.cfg.http_timeout)
        return google_auth_httplib2.AuthorizedHttp(credentials, http=self.this_thread.http)

    def connect_account(
        self, account_id: AccountId, key: AccountKey, project: QuotaWindow
    ) -> GscAccount | Reason:
        """An account ready to query (token refreshed, properties listed), or why it is not."""
        cfg = self.cfg
        if isinstance(key, str) and not (cfg.google_client_id and cfg.google_client_secret):
            return NO_CLIENT
        try:
            credentials = self.credentials(key)
        except ValueError as error:  # a key google-auth cannot read: nothing was sent anywhere
            return Reason(
                f"its service-account key cannot be used ({str(error).split('. ')[0]})",
                f"store the key file again with {program()} authorize --service-account KEY.json --account {account_id}",
            )
        try:
            service = self.get_google_client(credentials)
            listing = service.sites().list().execute(num_retries=cfg.http_retries)
            if not isinstance(listing, dict):
                raise ValueError("unexpected answer to sites.list; check GSC_API_ENDPOINT")
        except RefreshError as error:
            return refresh_error_reason(error, account_id, key)
        except HttpError as error:
            if is_api_disabled(error):
                return api_disabled(quota_project(key))
            return Reason(
                f"cannot list properties: HTTP {error.status_code}: {http_error_reason(error)}", person=False
            )
        except Exception as error:  # noqa: BLE001 - one account must never sink the run
            return Reason(str(error), person=False)
        return GscAccount(
            account_id,
            service_account_email(key),
            credentials,
            quota_project(key),
            service.searchanalytics(),
            verified_properties(listing),
            AccountQuota(cfg.gsc_qpm, project, cfg.gsc_quota_pause),
        )

    def connect(
        self, sites: list[Site], keys: Mapping[AccountId, AccountKey], every_account: bool = False
    ) -> None:
        """Every account that deployed sites use (or every account there is), connected in parallel.
        Each failure is one warning."""
        cfg, pool = self.cfg, self.pool
        assert pool is not None
        by_account: dict[AccountId, list[Site]] = defaultdict(list)
        for site in sites:
            if site.gsc_account_id is not None:
                by_account[site.gsc_account_id].append(site)
        if every_account:
            by_account = {account_id: [] for account_id in keys} | by_account
        for account_id in by_account.keys() - keys.keys():  # its row deleted: a person must act
            why = Reason(
                f"gsc_account_id {account_id} matches no row of gsc_accounts",
                f"set sites.gsc_account_id to an account `{program()} accounts` lists, or add one with authorize",
            )
            for site in by_account[account_id]:
                self.skipped[site.id] = why
                site_warnings.add(f"{why}; GSC skipped", site.label)  # one line for all its sites
        projects: dict[str, QuotaWindow] = {}
        futures = {
            account_id: pool.submit(
                self.connect_account,
                account_id,
                keys[account_id],
                projects.setdefault(quota_project(keys[account_id]), QuotaWindow(cfg.gsc_project_qpm)),
            )
            for account_id in by_account
            if account_id in keys
        }
        said = set()
        for account_id, future in futures.items():
            account = future.result()
            self.states[account_id] = "connected" if isinstance(account, GscAccount) else account
            if isinstance(account, GscAccount):
                self.accounts[account_id] = account
            elif is_shared(account):
                if account not in said:
                    said.add(account)
                    log.error("%s. No Search Console data from these accounts this run", account)
            else:  # one line per cause: an outage answers every account alike
                site_warnings.add(f"{account}; no GSC data for its sites", f"GSC account {account_id}")

    def match(self, sites: Iterable[Site], fleet: Iterable[Site] = ()) -> None:
        """`targets`: {site id: (account, property)} for the sites whose account holds a property for
        their domain; `skipped`: why each other site of a connected account is not asked (a person must act).

        Two deployed sites with one domain would both get its numbers: the first (lowest id) does,
        also when only the other is asked for (--site): the rest of the deployed `fleet` counts.
        """
        skipped, targets, asked = self.skipped, self.targets, {site.id for site in sites}
        owner_of: dict[str, SiteId] = {}  # a domain's site of the lowest id, asked for or not
        for site in sorted(fleet, key=lambda s: s.id, reverse=True):
            domain = normalised_domain(site.domain)
            if site.id not in asked and site.gsc_account_id is not None and domain:
                owner_of[domain] = site.id
        for site in sorted(sites, key=lambda s: s.id):
            account = self.accounts.get(site.gsc_account_id) if site.gsc_account_id is not None else None
            if account is None:
                continue  # no account, or one that failed: already logged
            domain = normalised_domain(site.domain)
            site_url = property_for_domain(domain, account.properties) if domain else None
            if domain is None:
                skipped[site.id] = Reason(
                    "its domain is not a bare domain like example.com", "correct sites.domain"
                )
                log.warning(
                    "Site %s: domain %r is not a bare domain like example.com; GSC skipped",
                    site.id,
                    site.domain,
                )
            elif site_url is None:
                skipped[site.id] = self.no_property(site, account, domain)
            elif owner_of.get(domain, site.id) < site.id:
                skipped[site.id] = Reason(
                    f"site {owner_of[domain]} has the same domain ({domain}) and gets its numbers",
                    "set status_deployment of the duplicate to something other than deployed",
                )
                log.warning(
                    "%s: site %s has the same domain (%s): only site %s gets its Search Console numbers; "
                    "set status_deployment of the duplicate to something other than deployed",
                    site.label,
                    owner_of[domain],
                    domain,
                    owner_of[domain],
                )
            else:
                owner_of[domain] = site.id
                targets[site.id] = (account, site_url)

    def no_property(self, site: Site, account: GscAccount, domain: str) -> Reason:
        """Why a site of a connected account is not asked (said as a warning too: one line for the
        account's sites, an account that lost its access to hundreds of properties included)."""
        robot = account.service_account
        site_warnings.add(
            f"account {account.id} has no verified Search Console property for the site's domain (looked "
            "for sc-domain: and https/http URL prefixes)"
            + (f"; add {robot} as a user of the property in Search Console" if robot else ""),
            site.label,
        )
        return Reason(
            f"account {account.id} has no Search Console property for {domain}",
            "add the property to the account, or set sites.gsc_account_id to the account that has it",
        )

    def query(
        self, account: GscAccount, site_url: str, days: list[dt.date], newest_final: dt.date
    ) -> dict[dt.date, tuple]:
        """One searchanalytics.query for the whole range (get_gsc_data decides when it may go)."""
        request = account.analytics.query(siteUrl=site_url, body=search_query(days))
        answer = request.execute(http=self.http(account.credentials), num_retries=self.cfg.http_retries)
        return metrics_by_day(answer, days, newest_final)

    def get_gsc_data(self, feed: queue.Queue, answered: GscAnswered) -> None:
        """Asks Search Console for each site that comes through `feed` (({site id: (account, property
        URL)}, days) at a time, None at the end), one query per site over its days, and calls
        `answered` for each as soon as it is known, until the feed ends and every site is answered.

        Each account's queries wait in a queue of their own and go to the pool only when its quota
        lets them: a paused or paced account holds no thread another account could use.
        """
        deadline = self.deadline
        query = functools.partial(self.query, newest_final=newest_final_day(search_console_today()))
        state, more = GscRound(self, answered), True
        while more or state.waiting or state.in_flight:
            if more:
                # Nothing to do but wait for more: a short wait, so that the deadline is seen soon.
                more = state.take_targets(feed, 0.5 if not (state.waiting or state.in_flight) else 0)
            if deadline.passed():
                for sites_waiting in list(state.waiting.values()):
                    state.too_late(state.targets[sites_waiting[0]][0], deadline)
            next_turn = state.send_queries(query)
            wait_for = max(0.0, min(next_turn - time.monotonic(), 0.05 if more else 0.5))
            if state.in_flight:
                for future in state.ended_within(wait_for):
                    state.take_answer(future)
            elif state.waiting:
                deadline.wait(wait_for)
        state.say_given_up()


# ---------------------------------------------------------------------------
# Shaping rows (pure)
# ---------------------------------------------------------------------------


def analytics_rows(
    sites: Iterable[Site],
    days: list[dt.date],
    visits: Mapping[SiteId, Mapping[dt.date, MatomoDay]],
    gsc: Mapping[SiteId, Mapping[dt.date, tuple]],
) -> list[tuple]:
    """One row (STORED_COLUMNS' values) per site and day that has at least one fetched value.

    A source's values are None where it did not answer for that site and day: that is what keeps
    a stored value from being overwritten.
    """
    rows: list[tuple] = []
    add = rows.append
    dated = [(day, day.isoformat()) for day in days]
    for site in sites:
        site_id, site_visits, site_gsc = site.id, visits.get(site.id, {}), gsc.get(site.id, {})
        # A year of 10,000 sites passes here 3.65 million times: each row is one tuple display (a
        # plain tuple, which the cyclic collector stops tracking: see MatomoDay).
        for day, iso in dated:
            matomo_day, m = site_visits.get(day), site_gsc.get(day)
            if matomo_day is not None:
                add((iso, site_id, *matomo_day, *(m or NO_GSC_PART)))
            elif m is not None:
                add((iso, site_id, *NO_MATOMO_PART, *m))
    return rows


def only_days(found: Mapping[SiteId, Mapping[dt.date, T]], days: Mapping[SiteId, set[dt.date]]) -> dict:
    """Each site's values for its own days only (a query covered more than its holes)."""
    return {
        site_id: {day: value for day, value in by_day.items() if day in days.get(site_id, ())}
        for site_id, by_day in found.items()
    }


@dataclass
class HealPlan:
    """What one night heals: Matomo by day range (one bulk request serves many sites), Search
    Console by site (one query spans all of a site's holes); and what is left for later nights."""

    matomo: dict[tuple[dt.date, dt.date], list[SiteId]] = field(default_factory=lambda: defaultdict(list))
    gsc: dict[SiteId, set[dt.date]] = field(default_factory=dict)
    left: Counter = field(default_factory=Counter)  # site-days per source
    oldest_left: dict[str, dt.date] = field(default_factory=dict)

    def leave_for_later(self, source: str, first: dt.date, days: int) -> None:
        self.left[source] += days
        self.oldest_left[source] = min(first, self.oldest_left.get(source, first))

    def site_days(self, source: str) -> int:
        if source == "matomo":
            return sum(((last - first).days + 1) * len(ids) for (first, last), ids in self.matomo.items())
        return sum(len(days) for days in self.gsc.values())

    def say(self, found: list[Hole], expiring: dt.date) -> None:
        matomo, gsc = self.site_days("matomo"), self.site_days("gsc")
        if matomo or gsc:
            log.info(
                "Healing: %d Matomo site-days (%d sites) and %d Search Console site-days (%d sites) of earlier nights",
                matomo,
                len({s for ids in self.matomo.values() for s in ids}),
                gsc,
                len(self.gsc),
            )
        for source, days in self.left.items():
            log.info(
                "%s: %d site-days of holes are left for the next nights (oldest %s); the budget is HEAL_%s",
                SOURCE_NAMES[source],
                days,
                self.oldest_left[source],
                "MATOMO_SITE_DAYS" if source == "matomo" else "GSC_QUERIES",
            )
        old = sorted({h.site_id for h in found if h.source == "gsc" and h.first < expiring})
        if old:
            log.warning(
                "Search Console: %d sites have days missing that Google drops within 30 days (sites %s): "
                "asked first; if they stay missing, they are lost",
                len(old),
                id_list(old),
            )


def heal_plan(
    found: Iterable[Hole],
    askable: Mapping[str, set[SiteId]],
    window_from: dt.date,
    expiring_before: dt.date,
    cfg: Config,
) -> HealPlan:
    """Tonight's share of the holes, within the budgets: Search Console days about to pass its
    retention first, then provisional values (each asked again for its own site: no night is
    widened for the fleet), then the heal window's holes before older history, oldest first;
    what does not fit is left for the next nights, in the same order."""
    plan = HealPlan()
    ordered = sorted(
        (hole for hole in found if hole.site_id in askable.get(hole.source, ())),
        key=lambda hole: (
            not (hole.source == "gsc" and hole.first < expiring_before),
            not hole.provisional,
            hole.last < window_from,
            hole.first,
            hole.site_id,
        ),
    )
    budget = cfg.heal_matomo_site_days
    for hole in (h for h in ordered if h.source == "matomo"):
        take = min(hole.size, budget)
        if take:
            plan.matomo[(hole.first, hole.first + dt.timedelta(days=take - 1))].append(hole.site_id)
            budget -= take
        if take < hole.size:
            plan.leave_for_later("matomo", hole.first + dt.timedelta(days=take), hole.size - take)
    by_site: dict[SiteId, list[Hole]] = defaultdict(list)
    for hole in (h for h in ordered if h.source == "gsc"):
        by_site[hole.site_id].append(hole)
    for site_id, site_holes in by_site.items():
        if len(plan.gsc) < cfg.heal_gsc_queries:
            plan.gsc[site_id] = {day for hole in site_holes for day in days_between(hole.first, hole.last)}
        else:
            for hole in site_holes:
                plan.leave_for_later("gsc", hole.first, hole.size)
    return plan


# ---------------------------------------------------------------------------
# Storing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Merged:
    """What store_analytics did with some rows: how many it wrote, the zeros it kept out (each
    {site_id, date, source, stored}), with a dry run the rows as they would stand; and how many
    rows could not be stored (an error)."""

    stored: int = 0
    kept: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    failed: int = 0

    def __add__(self, other: Merged) -> Merged:
        return Merged(
            self.stored + other.stored,
            self.kept + other.kept,
            self.rows + other.rows,
            self.failed + other.failed,
        )


def say_kept_zeros(kept: list[dict], domains: Mapping[SiteId, str | None]) -> None:
    """One warning per cause for the zeros store_analytics kept out of the table."""
    by_site: dict[tuple[SiteId, str], list[dict]] = defaultdict(list)
    for cell in kept:
        by_site[(cell["site_id"], cell["source"])].append(cell)
    for (site_id, source), cells in by_site.items():
        site_warnings.add(
            f"{SOURCE_NAMES[source]} answered 0 where positive counts were stored; kept the stored counts. "
            + (
                "Matomo has probably not archived these days yet (core:archive); if the visits really are "
                "0, re-run these dates with --accept-zero-visits"
                if source == "matomo"
                else "Search Console's answers disagree; the next nights ask again"
            ),
            site_label(site_id, domains.get(site_id)),
            f"{id_list([c['date'] for c in cells], 5)}: {id_list([c['stored'] for c in cells], 5)} stored",
        )


class Upserts:
    """The run's rows, gathered into chunks of UPSERT_CHUNK_SIZE (two rows of one site and day,
    one per source, become one), each sent to store_analytics as soon as it is full. At most
    UPSERT_WORKERS are in flight and as many wait: a caller with more waits, so that fetched rows
    never pile up faster than they are stored."""

    def __init__(
        self, client: Supabase, cfg: Config, pool: Executor, hopeless: Once, outcome: Any, accept_zeros: bool
    ) -> None:
        self.client, self.size, self.pool, self.hopeless = client, cfg.upsert_chunk_size, pool, hopeless
        self.outcome, self.accept_zeros = outcome, accept_zeros
        self.filling: dict[tuple[str, SiteId], tuple] = {}
        self.sent: list[Future] = []
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(2 * cfg.upsert_workers)

    def add(self, rows: list[tuple], index: int = 0) -> None:
        full = []
        with self.lock:
            for row in rows:
                key = (row[0], row[1])
                if key in self.filling:  # the other source's part of a healed site-day
                    self.filling[key] = self.joined(self.filling[key], row)
                else:
                    self.filling[key] = row
                if len(self.filling) >= self.size:
                    full.append(list(self.filling.values()))
                    self.filling = {}
        for chunk in full:
            self.send(chunk)

    @staticmethod
    def joined(first: tuple, then: tuple) -> tuple:
        """One site-day's two rows as one, source by source: each source's part from the later row
        that carries it (its final flag set), else from the first."""
        m = FINAL_FLAG["matomo"]  # a row: date, site_id, Matomo's part up to its flag, Search Console's
        matomo = then if then[m] is not None else first
        gsc = then if then[FINAL_FLAG["gsc"]] is not None else first
        return (*first[:2], *matomo[2 : m + 1], *gsc[m + 1 :])

    def send(self, chunk: list[tuple]) -> None:
        self.slots.acquire()
        future = self.pool.submit(self.store, chunk)
        future.add_done_callback(lambda _: self.slots.release())
        with self.lock:
            self.sent = [each for each in self.sent if not each.done()] + [future]

    def store(self, chunk: list[tuple]) -> None:
        merged = self.client.store_chunk(chunk, self.hopeless, self.accept_zeros)
        say_kept_zeros(merged.kept, self.outcome.domains)
        self.outcome.count_stored(merged)

    def finish(self) -> None:
        """Sends the rows not yet sent, and waits for every chunk."""
        with self.lock:
            rest, self.filling = list(self.filling.values()), {}
        if rest:  # never sent empty
            self.send(rest)
        with self.lock:
            sent = list(self.sent)
        for future in sent:
            future.result()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


# Each source, and the sites column that asks for it: a site without a Matomo id is not asked
# Matomo, one without an account not Search Console.
SOURCES = {"matomo": "matomo_site_id", "gsc": "gsc_account_id"}
SOURCE_NAMES = {"matomo": "Matomo", "gsc": "Search Console"}


def wants(site: Site, source: str) -> bool:
    return getattr(site, SOURCES[source]) is not None


@dataclass
class SourceCount:
    wanted: int = 0  # sites that ask for the source
    fetched: int = 0  # sites it answered for
    missing_sites: list[SiteId] = field(default_factory=list)  # sites it did not answer for


@dataclass
class Outcome:
    """What a run did, counted as it happens (main() owns it, so a signal or a crash still finds
    the true counts)."""

    days: list = field(default_factory=list)  # the days asked for, provisional ones included
    domains: dict = field(default_factory=dict)  # site id -> domain, for the re-run advice
    sites: int = 0
    matomo: SourceCount = field(default_factory=SourceCount)
    gsc: SourceCount = field(default_factory=SourceCount)
    gsc_provisional: int = 0  # (site, day) values stored with gsc_final = false
    zeros_kept: Counter = field(default_factory=Counter)  # per source: zeros not stored over positives
    would_store: int = 0  # rows a dry run would have written
    stored: int = 0
    not_stored: int = 0
    gsc_accounts: dict = field(default_factory=dict)  # account id -> "connected" or why not
    healed: Counter = field(default_factory=Counter)  # site-days of earlier nights filled, per source
    person: dict = field(default_factory=dict)  # what a person must fix -> the sites it costs
    sites_by_problem: dict = field(default_factory=dict)  # a warning many sites met -> every one
    sources_asked: list = field(default_factory=list)  # the sources the days asked for have
    lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    def sources(self) -> dict[str, SourceCount]:
        return {"matomo": self.matomo, "gsc": self.gsc}

    def begin(self, sites: list[Site], days: list[dt.date], sources: Iterable[str]) -> None:
        self.days, self.sites, self.sources_asked = days, len(sites), list(sources)
        self.domains = {site.id: site.domain for site in sites}
        for source in sources:
            self.sources()[source].wanted = sum(1 for site in sites if wants(site, source))

    def count_fetched(self, part: list[Site], answers: Mapping[str, Mapping[SiteId, Any]]) -> None:
        """Counts what each source answered for some sites."""
        for source, answered in answers.items():
            count = self.sources()[source]
            count.fetched += len(answered)
            count.missing_sites += [s.id for s in part if wants(s, source) and s.id not in answered]

    def give_up(self, sites: list[Site], sources: Iterable[str]) -> None:
        """The sites the deadline left unfetched are missing from every source they ask for."""
        for source in sources:
            self.sources()[source].missing_sites += [s.id for s in sites if wants(s, source)]

    def count_stored(self, merged: Merged) -> None:
        with self.lock:
            self.stored += merged.stored
            self.not_stored += merged.failed
            self.zeros_kept.update(cell["source"] for cell in merged.kept)
            progress.stored = self.stored

    def must_act(self, why: str, site_ids: Iterable[SiteId] = ()) -> None:
        """Something no later run can fix by itself: a credential, a property, the schema."""
        self.person.setdefault(why, []).extend(site_ids)

    def summary(self) -> str:
        return (
            f"Processed {plural(self.sites, 'site')}. Fetched Matomo data for {self.matomo.fetched}. "
            f"Fetched GSC data for {self.gsc.fetched}. Stored {plural(self.stored, 'record')}."
        )

    def exit_status(self) -> int:
        if self.person:
            return ExitStatus.PERSON
        if self.not_stored and not self.stored:
            return ExitStatus.FAILED
        complete = all(count.fetched == count.wanted for count in self.sources().values())
        return (
            ExitStatus.OK if complete and not self.zeros_kept and not self.not_stored else ExitStatus.PARTIAL
        )

    def source_report(self, source: str) -> dict:
        """A source's counts, and each site it did not answer for: id, domain, and why (what a
        person must fix, or a failure the next nights retry by themselves)."""
        count = self.sources()[source]
        why_of = {site_id: why for why, ids in self.person.items() for site_id in ids}
        missing = [
            {
                "id": site_id,
                "domain": self.domains.get(site_id),
                "source": source,
                "reason": why_of.get(site_id, "not fetched this run: the next nights fetch it"),
            }
            for site_id in count.missing_sites
        ]
        return {"wanted": count.wanted, "fetched": count.fetched, "missing_sites": missing}

    def report(self, status: int, seconds: float) -> dict:
        """The run for monitoring (--json) and for aggregator_runs."""
        return {
            "from": self.days[0].isoformat(),
            "to": self.days[-1].isoformat(),
            "sites": self.sites,
            "matomo": {**self.source_report("matomo"), "zeros_not_stored": self.zeros_kept["matomo"]},
            "gsc": {
                **self.source_report("gsc"),
                "zeros_not_stored": self.zeros_kept["gsc"],
                "provisional_values": self.gsc_provisional,
                "accounts": {str(account_id): state for account_id, state in self.gsc_accounts.items()},
            },
            "records": {"stored": self.stored, "not_stored": self.not_stored},
            "needs_a_person": [
                {"problem": why, "fix": getattr(why, "fix", None) or None, "sites": sorted(ids)}
                for why, ids in self.person.items()
            ],
            "sites_by_problem": self.sites_by_problem,
            "problems": problems.lines,
            "seconds": round(seconds, 3),
            "exit_status": status,
        }

    def say_provisional(self, dry_run: bool) -> None:
        if self.gsc_provisional:
            log.info(
                "Search Console: %d values are provisional (the day is not final yet): %s with "
                "gsc_final = false; the nightly run replaces them with the final numbers",
                self.gsc_provisional,
                "would be stored" if dry_run else "stored",
            )


@dataclass(frozen=True)
class Asked:
    """What the command line asks of a run."""

    days: list[dt.date]
    today: dt.date
    only_domains: tuple[str, ...] = ()
    dry_run: bool = False
    nightly: bool = False
    accept_zero_visits: bool = False

    def heals_tonight(self, cfg: Config) -> bool:
        """Whether this run heals earlier nights' holes: the nightly run does, within its budgets."""
        return self.nightly and bool(cfg.heal_matomo_site_days or cfg.heal_gsc_queries)

    def zeros_settled_before(self, cfg: Config) -> dt.date | None:
        """The day before which a Matomo 0 is final without its raw log's word (None: every 0 is
        taken, --accept-zero-visits)."""
        return None if self.accept_zero_visits else self.today - dt.timedelta(days=cfg.matomo_settle_days)


def run(cfg: Config, asked: Asked, deadline: Deadline, outcome: Outcome) -> Outcome:
    """The job: read the deployed sites and the accounts; get both sources' numbers, shape rows and
    upsert them, all busy side by side (fetch_and_store); in the nightly run, heal earlier holes."""
    client = replace(Supabase.of(cfg), deadline=deadline, refused={})
    lacks = client.missing_schema()
    if lacks:  # nothing is fetched that could not be stored, nor a night ended 0 with its healing off
        log.error("%s", lacks)
        outcome.must_act(lacks)
        return outcome
    fleet, sites, keys, days, learned = fleet_to_fetch(client, asked)
    gsc_days = [day for day in days if day >= gsc_oldest_day(asked.today)]
    outcome.begin(sites, days, ["matomo", "gsc"] if gsc_days else ["matomo"])
    with contextlib.ExitStack() as stack:
        stack.enter_context(progress.shown(cfg.progress_every, outcome))
        gsc_pool = stack.enter_context(ThreadPoolExecutor(max_workers=cfg.gsc_workers))
        upserts = stack.enter_context(ThreadPoolExecutor(max_workers=cfg.upsert_workers))
        hopeless = Once()  # a fault every upsert meets was found
        store = (
            DryRunTable(client, cfg, outcome, asked.accept_zero_visits)
            if asked.dry_run
            else Upserts(client, cfg, upserts, hopeless, outcome, asked.accept_zero_visits)
        )
        matomo = MatomoClient.of(cfg, deadline)
        matomo_ids = matomo.ids_of(sites, fleet)
        gsc = SearchConsole(cfg, gsc_pool, deadline, outcome.gsc_accounts)
        if gsc_days:
            gsc.connect(sites, keys)
            gsc.match(sites, fleet)
            progress.fetched("gsc", outcome.gsc.wanted - len(gsc.targets))  # nothing to ask for these
        known = sources_known(
            learned, cfg, asked, sites, matomo, matomo_ids, gsc.skipped, outcome.gsc_accounts
        )
        remembered = known is not None and not asked.dry_run and remember_sources(client, known, hopeless)
        # The holes end before tonight's days: they are read while the night is fetched.
        coverage = Coverage.of(cfg, asked.today, days[0])
        reader = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        holes_read = (
            reader.submit(client.holes, coverage) if remembered and asked.heals_tonight(cfg) else None
        )
        known_ids = {site_id: m for site_id, m in matomo_ids.items() if m not in matomo.unknown}
        fetchers = Fetchers(cfg, matomo, known_ids, asked.zeros_settled_before(cfg), gsc, deadline)
        fetch_and_store(
            fetchers, night_units(fetchers, sites, days, gsc_days), store, outcome, progress.fetched
        )
        if holes_read:
            heal(holes_read, fetchers, asked, sites, coverage, store, outcome)
        store.finish()
        what_needs_a_person(outcome, sites, matomo, matomo_ids, gsc.skipped, hopeless)
    outcome.say_provisional(asked.dry_run)
    return outcome


@dataclass(frozen=True)
class Fetchers:
    """What fetching from each source needs, as the run set it up."""

    cfg: Config
    matomo: MatomoClient
    matomo_ids: Mapping[SiteId, int]
    settled: dt.date | None  # Matomo zeros of days before it are final without the raw log's word
    gsc: SearchConsole
    deadline: Deadline


# How far the faster source may run ahead of the slower: site-days asked for and not yet shaped
# into rows. It bounds memory (a year of 10,000 sites is 3.65 million site-days) and holds many
# times what keeps every source busy: MATOMO_WORKERS requests of at most 3,000 site-days, and
# GSC_WORKERS queries of a year each.
SITE_DAYS_IN_FLIGHT = 40_000


@dataclass(eq=False)
class Unit:
    """A few sites on their way through the run: one Matomo bulk request's worth, with their
    Search Console queries, and what each source answered so far. A night's unit asks both
    sources for the night's days; a healing unit asks one source for a range of holes."""

    index: int  # its place in the fleet
    sites: list[Site]
    days: list[dt.date]  # Matomo's, and the rows'
    matomo_ids: dict[SiteId, int]
    targets: dict[SiteId, tuple[GscAccount, str]]
    gsc_days: list[dt.date]
    holes: Mapping[SiteId, set[dt.date]] | None = None  # healing: only these days of its query are stored
    waiting: int = 0  # answers still to come: Matomo's (one for the unit), one per Search Console query
    answered: MatomoAnswer = field(default_factory=dict)  # Matomo's answer while its zeros are looked at
    looks_left: int = 0  # its zeros' raw-log looks not answered yet
    visits: dict = field(default_factory=dict)  # Matomo's values by site, its zeros confirmed
    gsc: dict = field(default_factory=dict)

    @property
    def site_days(self) -> int:  # its place in the window
        return len(self.sites) * len(self.days)


def night_units(
    fetchers: Fetchers, sites: list[Site], days: list[dt.date], gsc_days: list[dt.date]
) -> list[Unit]:
    """The fleet's days asked, in units of one Matomo bulk request."""
    f, per_request = fetchers, sites_per_request(fetchers.cfg.matomo_bulk_size, len(days))
    return [
        Unit(
            n,
            part,
            days,
            {s.id: f.matomo_ids[s.id] for s in part if s.id in f.matomo_ids},
            {s.id: f.gsc.targets[s.id] for s in part if s.id in f.gsc.targets and gsc_days},
            gsc_days,
        )
        for n, part in enumerate(chunks(sites, per_request))
    ]


def heal_units(fetchers: Fetchers, plan: HealPlan, by_id: Mapping[SiteId, Site]) -> list[Unit]:
    """The heal plan, in units of the same size as the night's, oldest first, Matomo's and Search
    Console's in turn so that both are busy: Matomo by day range (one bulk request serves many
    sites), Search Console one query per site over the span of its holes, sites of a span together."""
    f = fetchers
    gsc_spans: dict[tuple[dt.date, dt.date], list[SiteId]] = defaultdict(list)
    for site_id, holes in plan.gsc.items():
        gsc_spans[(min(holes), max(holes))].append(site_id)

    def units_of(spans: Mapping[tuple[dt.date, dt.date], list[SiteId]], source: str) -> list[Unit]:
        units = []
        for (first, last), site_ids in sorted(spans.items()):
            days = days_between(first, last)
            for part in chunks(site_ids, sites_per_request(f.cfg.matomo_bulk_size, len(days))):
                sites = [by_id[site_id] for site_id in part]
                if source == "matomo":
                    units.append(Unit(0, sites, days, {s: f.matomo_ids[s] for s in part}, {}, []))
                else:
                    units.append(
                        Unit(0, sites, days, {}, {s: f.gsc.targets[s] for s in part}, days, plan.gsc)
                    )
        return units

    pairs = itertools.zip_longest(units_of(plan.matomo, "matomo"), units_of(gsc_spans, "gsc"))
    units = [unit for pair in pairs for unit in pair if unit]
    for n, unit in enumerate(units):
        unit.index = n
    return units


class Window:
    """At most `limit` site-days in flight (a unit larger than that goes alone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.changed, self.closed = limit, 0, threading.Condition(), False

    def enter(self, size: int, deadline: Deadline) -> bool:
        """Waits until `size` more site-days fit; False if the run must stop first."""
        with self.changed:
            while self.used and self.used + size > self.limit and not (deadline.passed() or self.closed):
                self.changed.wait(0.5)
            if deadline.passed() or self.closed:
                return False
            self.used += size
            return True

    def close(self) -> None:
        """No unit goes in any more: a part of the flow failed, and its units would never leave."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def leave(self, size: int) -> None:
        with self.changed:
            self.used -= size
            self.changed.notify_all()


def fetch_and_store(
    fetchers: Fetchers,
    units: list[Unit],
    store: Upserts | DryRunTable,
    outcome: Outcome,
    fetched: Callable[[str, int], None] | None,
) -> None:
    """Every unit's days from both sources, stored: the night's (`fetched` hears of each source's
    sites as they are answered), or healing's (None). Matomo's requests flow through its workers
    back to back, Search Console's queries through theirs, and a unit is shaped and stored as
    soon as both have answered for it, so that the run takes as long as its slowest service,
    not as the sum of their waits."""
    feed: queue.Queue = queue.Queue()  # each unit's Search Console queries, None at the end
    # One thread hands Search Console's queries out, MATOMO_WORKERS ask Matomo for the visits,
    # and twice as many check the zeros of what it answered in the raw log.
    with ThreadPoolExecutor(max_workers=2 * fetchers.matomo.workers) as checks:
        flow = Flow(fetchers, store, outcome, fetched, checks)
        with ThreadPoolExecutor(max_workers=1 + fetchers.matomo.workers) as pool:
            f = fetchers
            streams = [flow.watched(pool.submit(f.gsc.get_gsc_data, feed, flow.gsc_answered))]
            try:
                streams += flow.dispatch(units, pool, feed)
            finally:
                feed.put(None)
            for each in streams:
                each.result()
        for each in list(flow.checked):
            each.result()
    if flow.not_asked:
        log.warning(
            "%s: Matomo was not asked for %s", fetchers.deadline.why, plural(len(flow.not_asked), "site")
        )


class Flow:
    """The units of one run in flight: each source's answers gathered as they come, each unit
    shaped into rows and handed to the store once every source has answered for it."""

    def __init__(
        self,
        fetchers: Fetchers,
        store: Upserts | DryRunTable,
        outcome: Outcome,
        fetched: Callable[[str, int], None] | None,
        checks: Executor,
    ) -> None:
        self.checks, self.checked = checks, deque[Future]()
        self.fetchers, self.store, self.outcome = fetchers, store, outcome
        self.healing = fetched is None  # what it stores is counted as healed, not as the night's
        self.fetched = fetched or (lambda source, sites: None)
        self.window = Window(SITE_DAYS_IN_FLIGHT)
        self.by_site: dict[SiteId, Unit] = {}  # the unit of each site Search Console is asked for
        self.lock = threading.Lock()
        self.not_asked: set[SiteId] = set()  # sites Matomo was not asked for: the run was stopped first
        self.matomo_pending = 0  # bulk requests sent or about to be, not answered yet
        self.looks: list[tuple[ZeroLook, Unit]] = []  # raw-log looks not sent yet, each with its unit

    def dispatch(self, units: list[Unit], pool: Executor, feed: queue.Queue) -> list[Future]:
        """Lets the units in, as far as the window allows, until the run must stop; returns the
        Matomo requests."""
        asked: list[Future] = []
        for n, unit in enumerate(units):
            if not self.window.enter(unit.site_days, self.fetchers.deadline):
                self.stopped(units[n:])
                break
            unit.waiting = (1 if unit.matomo_ids else 0) + len(unit.targets)
            with self.lock:
                self.by_site.update(dict.fromkeys(unit.targets, unit))
            if unit.targets:
                feed.put((unit.targets, unit.gsc_days))
            if unit.matomo_ids:
                with self.lock:
                    self.matomo_pending += 1
                asked.append(self.watched(pool.submit(self.ask_matomo, unit)))
            elif not unit.targets:
                self.store_unit(unit)
        return asked

    def stopped(self, units: list[Unit]) -> None:
        """The units the run stopped before asking for: missing tonight (healing's are left for
        the next nights)."""
        # once each: a site with several holes is in several units
        left = list({site.id: site for rest in units for site in rest.sites}.values())
        if not self.window.closed:  # else the failure itself is said
            sites = plural(len(left), "site")
            what = (
                f"the holes of {sites} are left for the next nights"
                if self.healing
                else f"{sites} {'was' if len(left) == 1 else 'were'} not fetched"
            )
            log.warning("%s: %s", self.fetchers.deadline.why, what)
        if not self.healing:
            self.outcome.give_up(left, self.outcome.sources_asked)

    def ask_matomo(self, unit: Unit) -> None:
        """The unit's bulk request; its zeros are checked beside the next ones (check_zeros)."""
        answered: MatomoAnswer = {}
        try:
            if self.fetchers.deadline.passed():
                with self.lock:
                    self.not_asked.update(unit.matomo_ids)
            else:
                answered = self.fetchers.matomo.get_matomo_data(unit.matomo_ids.values(), unit.days)
        finally:
            self.to_check(unit, answered)

    def to_check(self, unit: Unit, answered: MatomoAnswer) -> None:
        """Hands the unit's zeros to check_zeros; a unit without a zero is done at once."""
        looks = zero_looks(answered) if self.fetchers.settled is not None else []
        with self.lock:
            self.matomo_pending -= 1
            unit.answered, unit.looks_left = answered, len(looks)
            self.looks += [(look, unit) for look in looks]
            due = self.due_looks()
        if due or not looks:
            self.send_looks(due, None if looks else unit)

    def due_looks(self) -> list[tuple[ZeroLook, Unit]]:
        """The raw-log looks to send now (under the lock). Looks wait for those of other units, so
        that a request carries a whole request's worth of them (looks_cap; Matomo pays per request
        as per sub-request): each whole request's worth goes at once, the rest once no bulk request
        is left to answer and a unit waits for nothing else (to_check and gsc_answered ask again)."""
        if not self.matomo_pending and any(unit.waiting == 1 for _, unit in self.looks):
            due, self.looks = self.looks, []
            return due
        cap = self.fetchers.matomo.state.looks_cap()
        sizes = [len(request) for request in look_requests([look for look, _ in self.looks], cap)]
        whole = sum(sizes) - (sizes[-1] if sizes and sizes[-1] < cap else 0)  # the last may grow
        due, self.looks = self.looks[:whole], self.looks[whole:]
        return due

    def send_looks(self, due: list[tuple[ZeroLook, Unit]], unit: Unit | None = None) -> None:
        """check_zeros in the checks' pool, watched: the looks due, and `unit` if it had none."""
        self.checked.append(self.watched(self.checks.submit(self.check_zeros, due, unit)))

    def check_zeros(self, due: list[tuple[ZeroLook, Unit]], unit: Unit | None) -> None:
        """Sends the looks due; each unit whose last look this was (or `unit`, which had none) is
        answered. A check that failed (a bug) leaves its units no Matomo value, never a 0 as final."""
        confirmed = False
        try:
            if due:
                self.fetchers.matomo.confirm_zeros(
                    [look for look, _ in due], self.fetchers.settled or dt.date.min
                )
            confirmed = True
        finally:
            done = [unit] if unit else []
            with self.lock:
                for _, owner in due:
                    owner.looks_left -= 1
                    owner.answered = owner.answered if confirmed else {}
                    done += [owner] if owner.looks_left == 0 else []
            for each in done:
                each.visits, each.answered = by_site_id(each.matomo_ids, each.answered), {}
                self.fetched("matomo", len(each.matomo_ids))
                self.answered(each)

    def watched(self, future: Future) -> Future:
        """The future, which closes the window if it fails: a bug ends the run, never hangs it."""

        def close_if_failed(done: Future) -> None:
            if done.exception() is not None:
                self.window.close()
                self.fetchers.deadline.stop("the run failed")  # nor is anything more asked

        future.add_done_callback(close_if_failed)
        return future

    def gsc_answered(self, site_id: SiteId, metrics: dict | None) -> None:
        with self.lock:
            unit = self.by_site.pop(site_id)
            if metrics is not None:
                unit.gsc[site_id] = metrics
        self.fetched("gsc", 1)
        self.answered(unit)
        if self.looks and not self.matomo_pending:  # the unit may now wait only for its looks
            with self.lock:
                due = self.due_looks()
            if due:
                self.send_looks(due)

    def answered(self, unit: Unit) -> None:
        with self.lock:
            unit.waiting -= 1
            last = unit.waiting == 0
        if last:
            self.store_unit(unit)

    def store_unit(self, unit: Unit) -> None:
        """The unit's rows, to the store; its place in the window, to the next."""
        outcome = self.outcome
        gsc = only_days(unit.gsc, unit.holes) if unit.holes is not None else unit.gsc
        rows = analytics_rows(unit.sites, unit.days, unit.visits, gsc)
        answers = {"matomo": unit.visits, "gsc": gsc}
        with outcome.lock:
            if self.healing:
                for source, flag in FINAL_FLAG.items():
                    outcome.healed[source] += sum(1 for row in rows if row[flag] is not None)
            else:
                outcome.count_fetched(
                    unit.sites, {source: answers[source] for source in outcome.sources_asked}
                )
                outcome.gsc_provisional += sum(1 for row in rows if row[FINAL_FLAG["gsc"]] is False)
        unit.visits, unit.gsc = {}, {}  # the fleet's list of units outlives them
        self.window.leave(unit.site_days)
        self.store.add(rows, unit.index)


def what_needs_a_person(
    outcome: Outcome,
    sites: list[Site],
    matomo: MatomoClient,
    matomo_ids: Mapping[SiteId, int],
    skipped: Mapping[SiteId, Reason],
    hopeless: Once,
) -> None:
    """The run's problems that another night cannot fix: each with the sites it costs."""
    if matomo.broken.happened:
        outcome.must_act(matomo.broken.why, [site.id for site in sites if site.id in matomo_ids])
    for site in matomo.unknown_sites(sites, matomo_ids):
        outcome.must_act(UNKNOWN_MATOMO_ID.about(site.label), [site.id])
    for account_id, state in outcome.gsc_accounts.items():
        if needs_person(state):
            why = state if is_shared(state) else state.about(f"GSC account {account_id}")
            outcome.must_act(why, [site.id for site in sites if site.gsc_account_id == account_id])
    for site_id, why in [*matomo.skipped.items(), *skipped.items()]:
        outcome.must_act(why.about(site_label(site_id, outcome.domains.get(site_id))), [site_id])
    if needs_person(hopeless.why):  # not Supabase silent at the deadline: the next nights store it
        outcome.must_act(hopeless.why)


def sources_known(
    learned: dict[tuple[SiteId, str], dict] | SupabaseError,
    cfg: Config,
    asked: Asked,
    sites: list[Site],
    matomo: MatomoClient,
    matomo_ids: Mapping[SiteId, int],
    skipped: Mapping[SiteId, Reason],
    account_states: Mapping[AccountId, str],
) -> list[dict] | None:
    """The site_sources rows this run learnt anew (stored before the night's rows: store_analytics
    reads each site's creation day there), once Matomo has said which ids the token may not view
    (MatomoClient.unknown, never asked): the creation day of each site new to Matomo (or with
    another Matomo id: asked only when Matomo is healed, the one use of older days), and why
    Search Console cannot be asked for a site tonight. None if site_sources could not be read:
    nothing is healed."""
    matomo.learn_unknown(matomo_ids.values())
    if isinstance(learned, SupabaseError):
        log.error("%s; the holes of earlier nights are not healed this run", learned)
        return None
    rows = matomo_rows(sites, matomo, matomo_ids, learned) if cfg.heal_matomo_site_days else []
    rows += gsc_rows(sites, skipped, account_states, learned, asked.today)
    return rows


def remember_sources(client: Supabase, known: list[dict], hopeless: Once) -> bool:
    """Stores what the run learnt of the sites' sources, before the night's rows (a site's
    history is for a site without values); False if it could not: then nothing is healed. An
    error every write would meet is the run's (`hopeless`): said once, and no row is sent."""
    try:
        client.store_learned_sources(known)
    except (APIError, httpx.HTTPError) as error:
        if supabase_error_kind(error) in UNTIL_A_PERSON_ACTS:
            client.stop_writing(hopeless, describe_supabase_error(error, "storing site_sources"))
        else:
            log.error(
                "%s; the holes of earlier nights are not healed this run",
                describe_supabase_error(error, "storing site_sources"),
            )
        return False
    return True


def matomo_rows(
    sites: list[Site],
    matomo: MatomoClient,
    matomo_ids: Mapping[SiteId, int],
    learned: Mapping[tuple[SiteId, str], dict],
) -> list[dict]:
    """site_sources rows for the sites whose creation day in Matomo is not known yet, or that
    Matomo no longer knows, or whose matomo_site_id cannot be used (status then lists them)."""
    new = {
        site.id: matomo_ids[site.id]
        for site in sites
        if site.id in matomo_ids
        and (
            (site.id, "matomo") not in learned
            or learned[(site.id, "matomo")]["source_key"] != str(matomo_ids[site.id])
            or not learned[(site.id, "matomo")]["available_from"]
            or matomo_ids[site.id] in matomo.unknown
        )
    }
    found = matomo.creation_days(new.values()) if new else {}
    rows = [source_row(site_id, "matomo", str(m), found[m]) for site_id, m in new.items() if m in found]
    for site in sites:
        why, was = matomo.skipped.get(site.id), learned.get((site.id, "matomo"), {})
        if why and (was.get("unavailable"), was.get("fix")) != (why, why.fix):
            rows.append(source_row(site.id, "matomo", str(site.matomo_site_id), why))
    return rows


def source_row(
    site_id: SiteId, source: str, key: str, state: dt.date | Reason | None, history: str = ""
) -> dict:
    """A site_sources row: the source's key for the site (its Matomo id, its account), and the day
    its data begins (`state`, a date: for Matomo the site's creation) or why it cannot be asked."""
    day = state.isoformat() if isinstance(state, dt.date) else None
    why = state if isinstance(state, Reason) else None
    return {
        "site_id": site_id,
        "source": source,
        "source_key": key,
        "available_from": day,
        "history_from": history or day,
        "unavailable": why,
        "fix": why.fix if why else None,
        "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


def gsc_rows(
    sites: list[Site],
    skipped: Mapping[SiteId, Reason],
    account_states: Mapping[AccountId, str],
    learned: Mapping[tuple[SiteId, str], dict],
    today: dt.date,
) -> list[dict]:
    """site_sources rows for the sites whose Search Console state changed: new to it, another
    account, or a reason it cannot be asked that appeared or went away."""
    rows = []
    for site in sites:
        if site.gsc_account_id is None:
            continue
        was = learned.get((site.id, "gsc"))
        key, why = str(site.gsc_account_id), gsc_unavailable(site, skipped, account_states)
        fix = why.fix if why else None
        if was and (was["source_key"], was["unavailable"], was["fix"]) == (key, why, fix):
            continue
        rows.append(source_row(site.id, "gsc", key, why, gsc_oldest_day(today).isoformat()))
    return rows


def gsc_unavailable(
    site: Site, skipped: Mapping[SiteId, Reason], account_states: Mapping[AccountId, str]
) -> Reason | None:
    """Why Search Console cannot be asked for a site tonight (a person must act), or None."""
    state = account_states.get(site.gsc_account_id) if site.gsc_account_id is not None else None
    if isinstance(state, Reason) and state.person:
        return state.about(f"account {site.gsc_account_id}")
    return skipped.get(site.id)


def heal(
    holes_read: Future,
    fetchers: Fetchers,
    asked: Asked,
    sites: list[Site],
    coverage: Coverage,
    store: Upserts | DryRunTable,
    outcome: Outcome,
) -> None:
    """The nightly run's second part: the holes of earlier nights (and new sites' history), oldest
    first within the budgets, each source asked only for its own holes, through the same flow
    as the night's days."""
    cfg = fetchers.cfg
    try:
        found = holes_read.result()
    except SupabaseError as error:
        log.error("%s; the holes of earlier nights are not healed this run", error)
        if error.person:  # the same read fails every night until someone acts
            outcome.must_act(str(error))
        return
    wanted = {site.id for site in sites}
    askable = {
        "matomo": set(fetchers.matomo_ids) & wanted if cfg.heal_matomo_site_days else set(),
        "gsc": set(fetchers.gsc.targets) & wanted if cfg.heal_gsc_queries else set(),
    }
    expiring = gsc_expiring_before(asked.today)
    plan = heal_plan(found, askable, coverage.window_from, expiring, cfg)
    plan.say([hole for hole in found if hole.site_id in askable[hole.source]], expiring)
    fetch_and_store(
        fetchers, heal_units(fetchers, plan, {site.id: site for site in sites}), store, outcome, None
    )
    if outcome.healed:
        log.info(
            "Healed %d Matomo and %d Search Console site-days of earlier nights",
            outcome.healed["matomo"],
            outcome.healed["gsc"],
        )


def fleet_to_fetch(
    client: Supabase, asked: Asked
) -> tuple[list[Site], list[Site], dict[AccountId, AccountKey], list[dt.date], dict | SupabaseError]:
    """Every deployed site (which of two alike gets the numbers is decided over them all), those to
    fetch, every account's credential, the days asked for (each site's older provisional values are
    the heal plan's), and what earlier runs learnt of the sites' sources (or why it could not be
    read), read side by side."""
    with ThreadPoolExecutor(max_workers=2) as side:
        sites_read = side.submit(client.deployed_sites)
        learned_read = side.submit(client.learned_sources)
        keys = client.account_keys()
        fleet = sites = sites_read.result()
        learned: dict | SupabaseError
        try:
            learned = learned_read.result()
        except SupabaseError as error:
            learned = error
    secret_filter.add(*secrets_of(keys.values()))
    if not sites:
        raise SupabaseError(client.no_sites())
    if not keys and any(site.gsc_account_id is not None for site in sites):
        log.error("%s", NO_ACCOUNTS)
    days = asked.days
    if asked.only_domains:
        sites = sites_with_domains(sites, asked.only_domains)
    log.info("Aggregating %s to %s for %d deployed sites", days[0], days[-1], len(sites))
    return fleet, sites, keys, days, learned


def sites_with_domains(sites: list[Site], domains: Iterable[str]) -> list[Site]:
    """The sites named by `domains`: a domain (compared normalised) or a sites.id; a usage error
    for the rest."""
    given = [d.strip() for d in domains]
    ids = {int(d) for d in given if d.isdigit()}
    wanted = {normalised_domain(d) or d for d in given if not d.isdigit()}
    chosen = [site for site in sites if site.id in ids or normalised_domain(site.domain) in wanted]
    found = {normalised_domain(site.domain) for site in chosen} | {str(site.id) for site in chosen}
    unknown = sorted((wanted | {str(i) for i in ids}) - found)
    if unknown:
        raise UsageError(f"--site {', '.join(unknown)}: no deployed site has this domain or id")
    return chosen


# ---------------------------------------------------------------------------
# What a run leaves for the operator: the dry-run table, the aggregator_runs row
# ---------------------------------------------------------------------------


# Exactly the columns a run would store, and the domain, so that a site reads as itself.
ROW_COLUMNS = ("date", "site_id", "domain", *STORED_COLUMNS[2:])
# Each column as wide as its name (the date, the id and the domain as wide as their values).
ROW_FORMAT = "{:<10}  {:>8}  {:<28}  " + "  ".join(f"{{:>{len(c)}}}" for c in ROW_COLUMNS[3:])


class DryRunTable:
    """--dry-run's stand-in for the upserts: the rows as store_analytics would leave them (the
    same rules, nothing written), as an aligned table in the fleet's order (`index` is a unit's
    place in it), whatever order the units are fetched in."""

    def __init__(self, client: Supabase, cfg: Config, outcome: Outcome, accept_zeros: bool) -> None:
        say(ROW_FORMAT.format(*ROW_COLUMNS))
        self.client, self.size = client, cfg.upsert_chunk_size
        self.outcome, self.accept_zeros = outcome, accept_zeros
        self.domains, self.next, self.lock = outcome.domains, 0, threading.Lock()
        self.hopeless = Once()
        self.waiting: dict[int, list[dict]] = {}  # units fetched before one earlier in the fleet

    def add(self, rows: list[tuple], index: int = 0) -> None:
        merged = Merged()
        for chunk in chunks(rows, self.size):
            merged += self.client.store_chunk(chunk, self.hopeless, self.accept_zeros, dry_run=True)
        say_kept_zeros(merged.kept, self.domains)
        place = {(row[0], row[1]): n for n, row in enumerate(rows)}
        with self.outcome.lock:
            self.outcome.would_store += merged.stored
        with self.lock:
            self.waiting[index] = sorted(
                merged.rows, key=lambda row: place.get((row["date"], row["site_id"]), 0)
            )
            while self.next in self.waiting:
                self.print_rows(self.waiting.pop(self.next), self.domains)
                self.next += 1

    def finish(self) -> None:
        with self.lock:
            for index in sorted(self.waiting):
                self.print_rows(self.waiting.pop(index), self.domains)

    @staticmethod
    def print_rows(rows: list[dict], domains: Mapping[SiteId, str | None]) -> None:
        """The rows as an aligned table; '-' is a column without a value."""
        lines = []
        for row in rows:
            cells = [row.get(column) for column in ROW_COLUMNS]
            cells[2] = domains.get(row["site_id"])
            lines.append(
                ROW_FORMAT.format(
                    *("-" if c is None else f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells)
                )
            )
        if lines:
            say(*lines)


def record_run(
    cfg: Config, started_at: dt.datetime, status: int, document: dict, kind: str = "nightly"
) -> Reason | None:
    """One row in aggregator_runs for dashboards and `accounts`; None, or what kept it from
    being written (whether a person must act, and the fix)."""
    row = {
        "started_at": started_at.isoformat(),
        "date_from": document["from"],
        "date_to": document["to"],
        "sites": document["sites"],
        "matomo_fetched": document["matomo"]["fetched"],
        "gsc_fetched": document["gsc"]["fetched"],
        "records_stored": document["records"]["stored"],
        "records_not_stored": document["records"]["not_stored"],
        "exit_status": status,
        "summary": document,
        "kind": kind,
        "arguments": " ".join(sys.argv[1:]),
    }
    try:  # a row that leaves the process: through the secret filter, like everything else
        row = redacted(row)
        Supabase.of(cfg).table("aggregator_runs").insert(row, returning=ReturnMethod.minimal).execute()
    except (APIError, httpx.HTTPError) as error:
        said, kind = describe_supabase_error(error, "recording the run"), supabase_error_kind(error)
        log.warning("%s; this run is not recorded", said)
        if kind in ("key", "schema"):  # the reads worked: the table or its grant lacks
            return Reason(f"aggregator_runs cannot be written: apply {MIGRATION}")
        return Reason(said, person=kind == "everywhere")
    return None


# ---------------------------------------------------------------------------
# check: reach every service as a run would, write nothing
# ---------------------------------------------------------------------------


class Check:
    """`check`: what each service answers, then one line per problem with its fix; nothing is
    written. Every service is checked whatever another answered: Supabase down must not hide a
    wrong Matomo token or Google secret."""

    def __init__(self, cfg: Config, today: dt.date) -> None:
        self.cfg, self.today = cfg, today
        # What each service answered (--json); "lines" and "notes" are printed before the problems.
        self.found: dict[str, Any] = {"lines": [], "notes": []}

    def run(self, as_json: bool) -> int:
        sites, keys = self.supabase()
        secret_filter.add(*secrets_of(keys.values()))
        self.matomo(sites)
        self.search_console(sites, keys)
        site_warnings.flush()
        return print_check_report(self.found, as_json)

    def supabase(self) -> tuple[list[Site], dict[AccountId, AccountKey]]:
        cfg, found = self.cfg, self.found
        try:
            client = Supabase.of(cfg)
            sites, keys = client.deployed_sites(), client.account_keys()
        except SupabaseError as error:
            log.error("%s", error)
            found["supabase"] = {"reachable": False}
            return [], {}
        found["lines"].append(f"Supabase: {len(sites)} deployed sites, {len(keys)} Search Console accounts")
        if not sites:
            log.error("%s", client.no_sites())
        elif not keys and any(site.gsc_account_id is not None for site in sites):
            log.error("%s", NO_ACCOUNTS)
        key = client.conflict_key_exists()
        if key:
            found["lines"].append("Supabase: daily_analytics has its (date, site_id) key")
        lacks = client.missing_schema()
        if lacks:
            log.error("%s", lacks)
        else:
            found["lines"].append("Supabase: every table, column and function the run uses is there")
        schema = lacks is None
        found["supabase"] = {
            "reachable": True,
            "sites": len(sites),
            "accounts": len(keys),
            "key": key,
            "schema": schema,
        }
        if sites and all(site.matomo_site_id is None and site.gsc_account_id is None for site in sites):
            log.error(
                "No deployed site has a matomo_site_id or a gsc_account_id: a run would fetch nothing. Set them "
                "in the sites table (matomo_site_id: the site's id in Matomo; gsc_account_id: a gsc_accounts id)"
            )
        for site in sites:
            missing = [name for name in ("matomo_site_id", "gsc_account_id") if getattr(site, name) is None]
            if missing:
                found["notes"].append(
                    f"Note: site {site.id} ({site.domain}) has no {' and '.join(missing)}: "
                    "that source is not fetched for it",
                )
        return sites, keys

    def matomo(self, sites: list[Site]) -> None:
        cfg, found = self.cfg, self.found
        matomo = MatomoClient.of(cfg, Deadline.after(cfg.run_deadline))
        try:
            version = matomo.version()
        except MatomoError as error:
            log.error("%s", error)
            found["matomo"] = {"reachable": False}
            return
        ids, days = matomo.ids_of(sites), [self.today - dt.timedelta(days=DEFAULT_LAG_DAYS)]
        matomo.learn_unknown(ids.values())
        matomo.unknown_sites(sites, ids)
        with ThreadPoolExecutor(max_workers=matomo.workers) as pool:
            parts = chunks(sorted(set(ids.values()) - matomo.unknown.keys()), matomo.bulk_size)
            visits = by_site_id(
                ids, merged_answers(pool.map(lambda part: matomo.get_matomo_data(part, days), parts))
            )
        answered = f"answered for {len(visits)} of the {len(ids)} sites with a Matomo id"
        found["lines"].append(f"Matomo {version}: {answered}")
        found["matomo"] = {"reachable": True, "version": version, "sites": len(ids), "answered": len(visits)}

    def search_console(self, sites: list[Site], keys: Mapping[AccountId, AccountKey]) -> None:
        cfg, found = self.cfg, self.found
        if not keys and cfg.google_client_id:
            self.google_client()  # no account to try it with: ask the token endpoint directly
        with ThreadPoolExecutor(max_workers=cfg.gsc_workers) as pool:
            console = SearchConsole(cfg, pool)
            console.connect(sites, keys, every_account=True)
        for account_id, state in console.states.items():
            shown = (
                f"{self.credential_kind(keys[account_id])}; {'' if state == 'connected' else 'not '}connected"
            )
            found["lines"].append(f"Search Console account {account_id}: {shown}")
        console.match(sites)
        connected, matched = len(console.accounts), len(console.targets)
        found["lines"].append(
            f"Search Console: {connected} of {len(keys)} accounts connected; {matched} sites matched to a property"
        )
        found["search_console"] = {"accounts": len(keys), "connected": connected, "sites": matched}

    @staticmethod
    def credential_kind(key: AccountKey) -> str:
        email = service_account_email(key)
        return f"service account {email}" if email else "refresh token"

    def google_client(self) -> None:
        """Logs an error if Google refuses GOOGLE_CLIENT_ID/SECRET, found with a refresh token that
        cannot exist: Google checks the client first (invalid_client) and only then the token."""
        console = SearchConsole(self.cfg)
        try:
            console.refresh_now(console.credentials("aggregator-check-not-a-token"))
        except RefreshError as error:
            code, _ = oauth_refusal(error)
            if code == "invalid_client":
                log.error("%s", CLIENT_REFUSED)
            elif code != "invalid_grant":
                log.error("Google's token endpoint (GOOGLE_TOKEN_URI) failed: %s", error)
        except Exception as error:  # noqa: BLE001 - unreachable, or not a token endpoint at all
            log.error("Google's token endpoint (GOOGLE_TOKEN_URI) cannot be reached: %s", error)


def print_check_report(found: dict, as_json: bool) -> int:
    status = ExitStatus.FAILED if problems.lines else ExitStatus.OK
    lines = found.pop("lines", []) + found.pop("notes", [])
    count = len(problems.lines)
    with contextlib.suppress(OutputClosed):  # the report is the last thing check does
        if as_json:
            say(json.dumps({**found, "problems": problems.lines, "exit_status": status}, default=str))
            return status
        for line in [*lines, *(f"Problem: {line}" for line in problems.lines)]:
            say(line)
        say("All good." if not count else f"{count} problem{'s' if count > 1 else ''}.")
    return status


# ---------------------------------------------------------------------------
# The fleet at a glance (status)
# ---------------------------------------------------------------------------


STATUS_FORMAT = "  {:<30} {:>12} {:>12} {:>10} {:>14}  {}"


class FleetStatus:
    """`status`: coverage per source, what the next night will heal, and the sites that need a
    person, as lines or as one JSON object; nothing is fetched from Matomo or Google."""

    def __init__(self, cfg: Config, today: dt.date) -> None:
        self.cfg, self.today = cfg, today

    def run(self, site_name: str | None, as_json: bool) -> int:
        """Coverage per source, what the next night will heal, and the sites that need a person."""
        cfg, today = self.cfg, self.today
        client = Supabase.of(cfg)
        sites = client.deployed_sites()
        if not sites:  # as `run` says it, with its exit status: an all-zero table would look healthy
            why = client.no_sites()
            log.error("%s", why)
            if as_json:
                say(json.dumps({"sites": 0, "problems": [why]}))
            return ExitStatus.FAILED
        site = sites_with_domains(sites, [site_name])[0] if site_name else None
        window_end = today - dt.timedelta(days=DEFAULT_LAG_DAYS + DEFAULT_LOOKBACK_DAYS - 1)
        coverage = Coverage.of(cfg, today, window_end, site.id if site else None)
        cells = client.call_function("analytics_coverage", coverage.arguments(), dict)
        found = client.holes(coverage)
        attention = [
            need
            for need in client.call_function(
                "analytics_attention",
                {"p_to": coverage.to.isoformat(), "p_deployed": client.deployed},
                list,
            )
            if site is None or need.get("site_id") == site.id
        ]
        askable = {
            source: {h.site_id for h in found if h.source == source}
            - self.unavailable_sites(attention, source)
            for source in SOURCES
        }
        expiring = gsc_expiring_before(today)
        plan = heal_plan(found, askable, coverage.window_from, expiring, cfg)
        report = {"sites": len(sites), **self.report(coverage, cells, found, plan, attention, expiring)}
        if as_json:
            say(json.dumps(report, default=str))
        else:
            say(*self.lines(report))
        return ExitStatus.OK

    @staticmethod
    def unavailable_sites(attention: list[dict], source: str) -> set[SiteId]:
        return {
            need["site_id"]
            for need in attention
            if need["kind"] == "unavailable" and need["source"] == source
        }

    def report(
        self,
        coverage: Coverage,
        cells: dict,
        found: list[Hole],
        plan: HealPlan,
        attention: list[dict],
        expiring: dt.date,
    ) -> dict:
        """The status as one JSON object (status --json); lines() prints it."""
        cfg = self.cfg
        oldest = {
            source: min((h.first for h in found if h.source == source), default=None) for source in SOURCES
        }
        lost_soon = sum(
            (min(h.last, expiring - dt.timedelta(days=1)) - h.first).days + 1
            for h in found
            if h.source == "gsc" and h.first < expiring
        )
        matomo_requests = sum(
            math.ceil(len(ids) / sites_per_request(cfg.matomo_bulk_size, (last - first).days + 1))
            for (first, last), ids in plan.matomo.items()
        )
        return {
            "window": {"from": coverage.window_from, "to": coverage.to, "days": cfg.heal_days},
            "coverage": {
                source: {**cells.get(source, {}), "oldest_hole": oldest[source]} for source in SOURCES
            },
            "next_night": {
                "matomo": {"site_days": plan.site_days("matomo"), "requests": matomo_requests},
                "gsc": {
                    "site_days": plan.site_days("gsc"),
                    "queries": len(plan.gsc),
                    "minutes_at_quota": round(len(plan.gsc) / min(cfg.gsc_qpm, cfg.gsc_project_qpm), 1),
                },
                "left": {
                    source: {"site_days": days, "oldest": plan.oldest_left[source]}
                    for source, days in plan.left.items()
                },
            },
            "gsc_lost_within_30_days": {"site_days": lost_soon, "before": expiring},
            # The fix, as the run that met the fault stored it (site_sources.fix), or as the
            # database that found a cliff says it; none from a run before migration 20261206000300.
            "needs_a_person": [
                {**need, "fix": need.get("fix") or "see the last run's log"} for need in attention
            ],
        }

    def lines(self, report: dict) -> list[str]:
        window = report["window"]
        lines = [
            f"Coverage of the deployed sites, site-days (heal window: the {window['days']} days "
            f"{window['from']} to {window['to']}; overall: back to each site's first day):",
            STATUS_FORMAT.format("", "stored", "provisional", "missing", "not available", "oldest not final"),
        ]
        for source, name in SOURCE_NAMES.items():
            cells = report["coverage"][source]
            for scope in ("window", "overall"):
                counts = cells.get(scope, {})
                lines.append(
                    STATUS_FORMAT.format(
                        f"{name}, {'heal window' if scope == 'window' else 'overall'}",
                        *(
                            f"{counts.get(k, 0):,}"
                            for k in ("stored", "provisional", "missing", "not_available")
                        ),
                        self.oldest_not_final(cells) if scope == "overall" else "",
                    )
                )
        night = report["next_night"]
        minutes = night["gsc"]["minutes_at_quota"]
        lines.append(
            f"Next night heals {night['matomo']['site_days']:,} Matomo site-days ({night['matomo']['requests']} bulk "
            f"requests) and {night['gsc']['site_days']:,} Search Console site-days ({night['gsc']['queries']} queries, "
            f"{'under a minute' if minutes < 1 else f'about {minutes:.0f} min'} at GSC_QPM)"
        )
        for source, left in night["left"].items():
            lines.append(
                f"  {SOURCE_NAMES[source]}: {left['site_days']:,} site-days left for later nights (oldest {left['oldest']})"
            )
        lost = report["gsc_lost_within_30_days"]
        if lost["site_days"]:
            lines.append(
                f"Search Console: {lost['site_days']:,} missing site-days pass its 16-month limit before "
                f"{lost['before']}: the next nights ask for them first"
            )
        needs = report["needs_a_person"]
        lines.append(f"Sites that need a person: {len(needs) or 'none'}")
        for need in needs:
            # a source that cannot be asked was stored with the run's own sentence, its fix included
            fix = "" if need["kind"] == "unavailable" else f". Fix: {need['fix']}"
            lines.append(
                f"  site {need['site_id']} ({need['domain']}), {SOURCE_NAMES[need['source']]}: {need['detail']}{fix}"
            )
        return lines

    @staticmethod
    def oldest_not_final(cells: dict) -> str:
        """The oldest day of a source without a final value (missing or provisional), where one is."""
        counts = cells.get("overall", {})
        return str(cells["oldest_hole"]) if counts.get("missing") or counts.get("provisional") else "-"


# ---------------------------------------------------------------------------
# accounts: the Search Console accounts at a glance
# ---------------------------------------------------------------------------

# Runs with --site touch only some accounts: an account's state is that of the newest of
# these many runs that used it.
RUNS_LOOKED_AT = 20


def list_accounts(cfg: Config) -> int:
    """One line per gsc_accounts row: id, label, deployed sites, how the last run went; never a token."""
    client = Supabase.of(cfg)
    # The service account's email, not its key: no credential is read to list the accounts.
    accounts = client.fetch_all("gsc_accounts", "id,label,email:service_account_key->>client_email")
    # A key pasted as JSON text has no client_email to select: which rows hold a key, read apart.
    with_keys = {
        row["id"]
        for row in client.fetch_all("gsc_accounts", "id", lambda q: q.not_.is_("service_account_key", "null"))
    }
    sites_per_account = Counter(site.gsc_account_id for site in client.deployed_sites())
    states = client.last_account_states()
    say(ACCOUNT_FORMAT.format("ID", "KIND", "LABEL", "SITES", "LAST RUN"))
    for account in accounts:
        account_id = account["id"]
        state = states.get(str(account_id))
        if state is None:
            state = "-" if not sites_per_account[account_id] else "not in the recorded runs"
        kind = "service account" if account_id in with_keys else "refresh token"
        label = account.get("label") or account.get("email") or "-"
        say(ACCOUNT_FORMAT.format(str(account_id), kind, label, sites_per_account[account_id], state))
    if not accounts:
        say(f"No account yet: add one with `{program()} authorize`")
    return ExitStatus.OK


ACCOUNT_FORMAT = "{:>6}  {:<15}  {:<40}  {:>5}  {}"


# ---------------------------------------------------------------------------
# authorize: a refresh token for a Google account, straight into gsc_accounts
# ---------------------------------------------------------------------------

GOOGLE_AUTH_URI = "https://accounts.google.com/o/oauth2/auth"
# Nothing listens there: the browser shows an error page whose address carries the code, which
# works on a headless server too (Google has retired the copy-the-code "oob" redirect).
REDIRECT_URI = "http://localhost/"


# The email scope lets the operator see which Google account was authorised (and store it as
# the account's label); Google answers it in an OpenID id_token beside the refresh token.
AUTHORIZE_SCOPES = ["openid", "https://www.googleapis.com/auth/userinfo.email", GSC_SCOPE]
CODE_ATTEMPTS = 3


class Authorize:
    """`authorize`: a Google account's refresh token (Google's installed-app flow, a browser round
    trip) or a service account's JSON key, tried with Google and stored in gsc_accounts (in
    `account_id`'s row, or a new one); never printed."""

    def __init__(self, cfg: Config, account_id: str | None, ask: Callable[[str], str] = input) -> None:
        self.cfg, self.account_id, self.ask = cfg, account_id, ask

    def refresh_token(self) -> int:
        """Run Google's installed-app flow and store the refresh token; the token is never printed."""
        cfg, account_id = self.cfg, self.account_id
        # Imported here: only this command needs it, and the nightly run starts faster without it.
        from google_auth_oauthlib.flow import Flow as InstalledAppFlow
        # OAUTHLIB_RELAX_TOKEN_SCOPE is set (take_over_the_process): the granted scopes are checked below.

        supabase = Supabase.of(cfg)
        if account_id and not supabase.account_exists(account_id):
            return ExitStatus.FAILED
        client = dict(client_id=cfg.google_client_id, client_secret=cfg.google_client_secret)
        client.update(auth_uri=GOOGLE_AUTH_URI, token_uri=cfg.google_token_uri)
        flow = InstalledAppFlow.from_client_config(
            {"installed": client}, scopes=AUTHORIZE_SCOPES, redirect_uri=REDIRECT_URI
        )
        url, _ = flow.authorization_url(access_type="offline", prompt="consent")
        say("Open this address in a browser signed in to the Google account, and allow access:")
        say(f"\n    {url}\n")
        say("The browser then goes to a page on localhost that does not load: copy that page's address.")
        if not self.code_accepted(flow):
            return ExitStatus.FAILED
        refresh_token = flow.credentials.refresh_token
        if not refresh_token:
            log.error(
                "Google sent no refresh token: remove this app's access in the Google account, then retry"
            )
            return ExitStatus.FAILED
        if GSC_SCOPE not in str(flow.oauth2session.token.get("scope", GSC_SCOPE)):
            log.error(
                "Search Console access was not granted (it can be unticked on Google's consent screen); "
                "nothing was stored. Run authorize again and leave every permission ticked"
            )
            return ExitStatus.FAILED
        email = self.email_of(flow.oauth2session.token.get("id_token"))
        if account_id and not self.keeps_the_sites(supabase, flow.credentials, email):
            log.error("Nothing was stored: gsc_accounts row %s keeps its credential", account_id)
            return ExitStatus.FAILED
        return supabase.store_refresh_token(account_id, refresh_token, email)

    def code_accepted(self, flow: Any) -> bool:
        """Whether Google took a pasted code (CODE_ATTEMPTS of them) for the flow's tokens."""
        for attempt in range(CODE_ATTEMPTS):
            code = self.pasted_code()
            if code is None:
                return False
            try:
                flow.fetch_token(code=code)
                return True
            except Exception as error:  # noqa: BLE001 - oauthlib raises many kinds; each is one line here
                log.error(
                    "Google refused the code (%s): codes work once and expire in minutes; %s",
                    error,
                    "open the address again and paste the new one"
                    if attempt + 1 < CODE_ATTEMPTS
                    else "run authorize again",
                )
        return False

    def keeps_the_sites(self, supabase: Supabase, credentials: Any, email: str | None) -> bool:
        """Whether the new login may replace row account_id's: it sees a property for each deployed
        site of that account, or the operator says to store it anyway (another Google login would
        silently cut those sites off their numbers)."""
        cfg, account_id = self.cfg, self.account_id
        sites = [site for site in supabase.deployed_sites() if str(site.gsc_account_id) == account_id]
        if not sites:
            return True
        try:
            listing = (
                SearchConsole(cfg)
                .get_google_client(credentials)
                .sites()
                .list()
                .execute(num_retries=cfg.http_retries)
            )
            properties = verified_properties(listing if isinstance(listing, dict) else {})
        except Exception as error:  # noqa: BLE001 - the check is a courtesy: the operator decides
            say(f"Which properties this login sees could not be checked ({type(error).__name__}).")
            lost = [site.label for site in sites]
        else:
            lost = [
                site.label
                for site in sites
                if property_for_domain(normalised_domain(site.domain) or "", properties) is None
            ]
        if not lost:
            return True
        who = f"The Google account {email}" if email else "This Google login"
        say(
            f"{who} sees no Search Console property for {plural(len(lost), 'site')} of gsc_accounts row "
            f"{account_id}: {', '.join(lost[:10])}{' ...' if len(lost) > 10 else ''}. Storing its token would "
            "leave them without Search Console numbers (was another Google account signed in?)."
        )
        try:
            return self.ask("Store it anyway? [y/N] ").strip().lower() in ("y", "yes")
        except EOFError:  # no one to answer (stdin closed): the safe answer
            return False

    def pasted_code(self) -> str | None:
        """The authorization code from what the operator pasted, or None (logged) if there is none."""
        try:
            answer = self.ask("Address (or just the code): ").strip()
        except EOFError:
            answer = ""
        fields_ = dict(parse_qsl(urlsplit(answer).query)) if "=" in answer else {}
        if fields_.get("error"):
            log.error(
                "Google answered %s: access was not allowed in the browser; nothing was stored. "
                "Run authorize again and choose Allow",
                fields_["error"],
            )
            return None
        code = fields_.get("code", answer)
        if not code:
            log.error("No code given: nothing was stored; run authorize again and paste the address")
            return None
        return code

    @staticmethod
    def email_of(id_token: str | None) -> str | None:
        """The email claim of an id_token received straight from Google's token endpoint over TLS,
        which is why its signature need not be checked (OpenID Connect Core 3.1.3.7)."""
        try:
            payload = id_token.split(".")[1]  # type: ignore[union-attr]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return str(claims["email"])
        except Exception:  # noqa: BLE001 - no email is no label, not a failure
            return None

    def service_account(self, key_file: Path) -> int:
        """Store a service account's JSON key once Google has accepted it; the key is never printed."""
        cfg, account_id = self.cfg, self.account_id
        key = self.service_account_key(key_file)
        secret_filter.add(*secrets_of([key]))
        client = Supabase.of(cfg)
        if account_id and not client.account_exists(account_id):
            return ExitStatus.FAILED
        email = str(key["client_email"])
        try:  # a deleted or foreign key is refused now, not at 3 a.m.
            console = SearchConsole(cfg)
            console.refresh_now(console.credentials(key))
        except RefreshError as error:
            log.error("%s; nothing was stored", refresh_error_reason(error, account_id or "ID", key))
            return ExitStatus.FAILED
        except Exception as error:  # noqa: BLE001 - unreachable, or a key cryptography cannot read
            log.error("The key of %s could not be tried with Google (%s); nothing was stored", email, error)
            return ExitStatus.FAILED
        same = None if account_id else client.row_of_service_account(email)
        if same is not None:  # a new key for the same robot (a rotation): its row, not a second one
            say(f"Service account {email} already has gsc_accounts row {same}: its key is replaced there.")
        done = client.stored_account_row(
            account_id or same, {"service_account_key": key, "label": email}, "oauth_refresh_token"
        )
        if done is None:
            return ExitStatus.FAILED
        say(
            f"Stored the key of service account {email} in gsc_accounts row {done}. Point sites at it with gsc_account_id."
        )
        say(
            f"One step is left: in Search Console, for each property of these sites, open Settings > Users and "
            f"permissions > Add user, and add {email} (permission Restricted is enough)."
        )
        say(f"The key is stored: delete {key_file} from this disk.")
        return ExitStatus.OK

    @staticmethod
    def service_account_key(key_file: Path) -> dict:
        """The JSON key in key_file, checked for what Google needs; ConfigError (one line) otherwise."""
        how = "download one: Google Cloud console > IAM > Service accounts > Keys > Add key > JSON"
        try:
            key = json.loads(key_file.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"--service-account {key_file}: cannot read it ({error.strerror})") from None
        except ValueError:
            raise ConfigError(f"--service-account {key_file} is not a JSON key file; {how}") from None
        if not isinstance(key, dict) or key.get("type") != "service_account":
            kind = key.get("type") if isinstance(key, dict) else None
            raise ConfigError(
                f"--service-account {key_file} is not a service account key (its type is {str(kind)[:30]!r}); {how}"
            )
        missing = [name for name in ("client_email", "private_key") if not key.get(name)]
        if missing:
            raise ConfigError(f"--service-account {key_file} has no {' and no '.join(missing)}; {how}")
        if "PRIVATE KEY-----" not in str(key["private_key"]):
            raise ConfigError(
                f"--service-account {key_file}: its private_key is not a PEM private key; {how}"
            )
        return key


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


# Options every command takes, before or after its name.
COMMON_OPTIONS = ("--env-file", "--log-level", "--log-file")


@dataclass
class Session:
    """One start of the script, as main() sets it up for the command: the day it runs, when it
    started, the deadline (a signal brings it forward), and a run's counts, kept here so that
    whatever ends the run, its summary tells the truth."""

    today: dt.date = field(default_factory=dt.date.today)
    started: float = field(default_factory=time.monotonic)
    deadline: Deadline = field(default_factory=lambda: Deadline.after(float("inf")))
    outcome: Outcome = field(default_factory=Outcome)
    signalled: dict[str, int] = field(default_factory=dict)  # {"status": 128 + signal number}


@dataclass(frozen=True)
class Command:
    """A subcommand as main() runs it: its handler (the configuration, its own options and the
    session in; an exit status out) and what it needs around it."""

    help: str
    handler: Callable[[Config, argparse.Namespace, Session], int]
    needs: Callable[[argparse.Namespace], tuple[str, ...]] = lambda args: ()  # settings beyond Supabase's
    # What may be a usage error, before the process is set up.
    before: Callable[[argparse.Namespace, Session], None] = lambda args, session: None
    # When the configuration or Supabase cannot be read: the exit status (after the error line).
    cannot_start: Callable[[argparse.Namespace], int] = lambda args: ExitStatus.FAILED
    after: Callable[[argparse.Namespace, Session, Config | None, int], int] = (  # the last word
        lambda args, session, cfg, status: status
    )
    interrupted: str = "nothing was stored"  # what Ctrl-C left
    stops_on_signals: bool = False  # Ctrl-C and SIGTERM end it as its deadline would
    prints_problems: bool = False  # its problems are printed once, as its own lines, not logged too


def days_asked(args: argparse.Namespace, session: Session) -> None:
    session.outcome.days = target_days(session.today, args.date, args.start, args.end, args.lookback)


def is_backfill(args: argparse.Namespace) -> bool:
    """Whether the run was given its days (--date, --from): a backfill does not heal."""
    return bool(args.date or args.start)


def run_command(cfg: Config, args: argparse.Namespace, session: Session) -> int:
    if not args.dry_run:
        ping(cfg, "start")
    asked = Asked(
        session.outcome.days,
        session.today,
        tuple(args.site),
        args.dry_run,
        nightly=not is_backfill(args),
        accept_zero_visits=args.accept_zero_visits,
    )
    return run(cfg, asked, session.deadline, session.outcome).exit_status()


COMMANDS = {
    "run": Command(
        "fetch and store the numbers (the default: `aggregator.py` alone is `aggregator.py run`)",
        run_command,
        needs=lambda args: ("MATOMO_URL", "MATOMO_TOKEN_AUTH"),
        before=days_asked,
        after=lambda args, session, cfg, status: finished(args, session, cfg, status),
        interrupted="re-run the same dates to complete them",
        stops_on_signals=True,
    ),
    "check": Command(
        "reach every service as a run would, write nothing, and name each problem with its fix",
        lambda cfg, args, session: Check(cfg, session.today).run(args.json),
        needs=lambda args: ("MATOMO_URL", "MATOMO_TOKEN_AUTH"),
        cannot_start=lambda args: print_check_report({}, args.json),
        prints_problems=True,
    ),
    "authorize": Command(
        "store a Google account's refresh token (a browser round trip), or a service account's key, "
        "in gsc_accounts",
        lambda cfg, args, session: (
            Authorize(cfg, args.account).service_account(args.service_account)
            if args.service_account
            else Authorize(cfg, args.account).refresh_token()
        ),
        # A service account needs no OAuth client.
        needs=lambda args: () if args.service_account else ("GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET"),
    ),
    "accounts": Command(
        "list the Search Console accounts: id, label, sites, and how the last run went",
        lambda cfg, args, session: list_accounts(cfg),
    ),
    "status": Command(
        "the fleet at a glance: which site-days are stored, provisional or missing per source, what the "
        "next night heals, and the sites that need a person",
        lambda cfg, args, session: FleetStatus(cfg, session.today).run(
            args.site[-1] if args.site else None, args.json
        ),
    ),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not the usage block."""

    owners: dict[str, str] = {}  # option -> the command it belongs to, for a clearer error

    def error(self, message: str) -> None:  # type: ignore[override]
        given = message.split(": ", 1)[-1].split()
        owner = self.owners.get(given[0].split("=")[0]) if message.startswith("unrecognized") else None
        if owner:
            message = (
                f"{given[0].split('=')[0]} is for the {owner} command: {program()} {owner} {given[0]} ..."
            )
        raise UsageError(f"{message} (see --help)")


def with_default_command(argv: list[str]) -> list[str]:
    """argv with `run` put in where no command is named, so that every older command line works."""
    position = 0
    while position < len(argv):
        token = argv[position]
        if token in ("-h", "--help", "--version") or token in COMMANDS:
            return argv
        if token in COMMON_OPTIONS:
            position += 2
        elif token.split("=")[0] in COMMON_OPTIONS:
            position += 1
        elif not token.startswith("-"):
            raise UsageError(f"invalid choice: {token!r}: the commands are {', '.join(COMMANDS)}")
        else:
            break
    return [*argv[:position], "run", *argv[position:]]


def add_common_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--env-file",
        type=Path,
        default=default if default is argparse.SUPPRESS else None,
        help="read configuration from this file instead of .env beside the script",
    )
    parser.add_argument(
        "--log-level",
        default=default if default is argparse.SUPPRESS else "INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log, e.g. --log-level DEBUG (default INFO)",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=default if default is argparse.SUPPRESS else None,
        metavar="PATH",
        help="also append the log to this file, at INFO whatever --log-level says (under cron: "
        "--log-level WARNING --log-file ... mails only what needs a person and keeps the rest)",
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", help="one day, e.g. 2026-11-20")
    parser.add_argument("--from", dest="start", help="first day of a backfill, e.g. 2026-10-01")
    parser.add_argument(
        "--to", dest="end", help="last day of a backfill, e.g. 2026-10-31 (default: today minus 2)"
    )
    parser.add_argument(
        "--lookback",
        type=int,
        help=f"the nightly run refreshes this many days ending today minus 2, e.g. --lookback 7 "
        f"(default {DEFAULT_LOOKBACK_DAYS}: Search Console keeps revising its last days)",
    )
    parser.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="only this site, by domain or sites.id, e.g. --site example.com (repeat for more); the others "
        "are not touched",
    )
    parser.add_argument(
        "--accept-zero-visits",
        action="store_true",
        help="store Matomo's 0 visits even over a stored positive count (by default such a 0 is taken "
        "for a day Matomo has not archived yet, and the stored count is kept)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--dry-run",
        action="store_true",
        help="fetch everything, write nothing: print the rows that would be stored",
    )
    output.add_argument(
        "--json", action="store_true", help="print a one-line JSON summary on stdout, for monitoring"
    )


def add_other_options(parsers: Mapping[str, argparse.ArgumentParser]) -> None:
    parsers["check"].add_argument("--json", action="store_true", help="print the problems as one JSON object")
    parsers["status"].add_argument("--json", action="store_true", help="print the status as one JSON object")
    parsers["status"].add_argument(
        "--site", action="append", default=[], metavar="DOMAIN", help="only this site"
    )
    parsers["authorize"].add_argument(
        "--account",
        metavar="ID",
        type=account_id_option,
        help="replace the credential of this gsc_accounts row instead of adding one",
    )
    parsers["authorize"].add_argument(
        "--service-account",
        metavar="KEY.json",
        type=Path,
        help="store this Google Cloud service account's JSON key instead of a user's refresh token "
        "(no browser; the key does not expire by itself)",
    )


def account_id_option(text: str) -> str:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--account takes a gsc_accounts id (a number), got {text!r}")
    return text.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; its `command` is the Command to run, with only its own options."""
    parser = OneLineParser(
        prog=program(),
        allow_abbrev=False,
        description="Store Matomo and Search Console numbers for every deployed site, one row per site and day.",
        epilog="Exit status: 0 ok, 1 nothing could be done, 2 usage error, 3 some values missing (a later "
        "run fetches them), 4 a person must fix something. "
        f"`{program()} COMMAND --help` tells more.",
    )
    add_common_options(parser, None)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command_name", metavar="COMMAND", parser_class=OneLineParser)
    common = OneLineParser(add_help=False)
    add_common_options(common, argparse.SUPPRESS)  # the values given before the command stand
    parsers = {
        name: commands.add_parser(name, parents=[common], help=c.help, description=c.help, allow_abbrev=False)
        for name, c in COMMANDS.items()
    }
    for name, sub in parsers.items():
        sub.set_defaults(command=COMMANDS[name])
    add_run_options(parsers["run"])
    add_other_options(parsers)
    OneLineParser.owners = {  # an option of several commands is said to be the first one's
        option: name
        for name, sub in reversed(list(parsers.items()))
        for action in sub._actions
        for option in action.option_strings
        if option not in (*COMMON_OPTIONS, "-h", "--help")
    }
    return parser.parse_args(with_default_command(list(sys.argv[1:] if argv is None else argv)))


def stop_on_signals(session: Session) -> None:
    """Ctrl-C and SIGTERM (a stopping system, `kill`) end the run as its deadline would: no new
    fetch starts, what was fetched is stored and the run recorded. A second one quits at once.
    session.signalled holds {"status": 128 + signal number} once one has come."""

    def handler(signum: int, frame: Any) -> None:
        if session.signalled:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        session.signalled["status"] = 128 + signum
        session.deadline.stop(f"stopped by {name}")
        log.warning("%s: no new fetch starts; storing what was fetched (again to quit at once)", name)

    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, handler)


def take_over_the_process(args: argparse.Namespace, session: Session) -> None:
    """Every process-wide effect of a start (the contents block lists them), here and nowhere else."""
    secret_filter.forget()
    problems.lines.clear()
    site_warnings.flush(say_nothing=True)
    progress.forget()
    # The libraries' objects live as long as the run: the cyclic collector need not scan them
    # again and again while thousands of answers are parsed; and fewer full collections (gen2
    # after 100 gen1 ones, not 10): young garbage (the HTTP libraries' reference cycles, which
    # hold request bodies) is still collected as often (docs/performance.md has the figures).
    gc.freeze()
    gc.set_threshold(700, 10, 100)
    setup_logging(args.log_level, args.log_file, quiet_problems=args.command.prints_problems)
    bound_every_exchange()
    # Google lets the operator untick a permission; oauthlib (authorize) would then raise "Scope
    # has changed", reported as a refused code: the granted scopes are checked instead.
    os.environ.setdefault("OAUTHLIB_RELAX_TOKEN_SCOPE", "1")
    if args.command.stops_on_signals:
        stop_on_signals(session)


def main(argv: list[str] | None = None) -> int:
    """Parse, set up, and call the command's handler inside the one `try` whose error lines pass
    the secret filter like every other line."""
    session = Session()
    try:
        args = parse_args(argv)
        command: Command = args.command
        if args.env_file and not args.env_file.is_file():
            raise UsageError(f"--env-file {args.env_file}: no such file")
        command.before(args, session)
        take_over_the_process(args, session)
    except UsageError as error:
        print(f"{program()}: error: {error}", file=sys.stderr)
        return ExitStatus.USAGE
    cfg, status = None, int(ExitStatus.FAILED)
    try:
        cfg = Config.load(args.env_file or Config.default_env_file(), required=command.needs(args))
        secret_filter.add(*cfg.secrets())
        WallClockSocket.limit = cfg.http_timeout
        session.deadline.at = time.monotonic() + cfg.run_deadline
        status = command.handler(cfg, args, session)
    except (ConfigError, SupabaseError) as error:
        log.error("%s", error)
        status = command.cannot_start(args)
    except UsageError as error:
        print(f"{program()}: error: {error}", file=sys.stderr)
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        log.error("Interrupted; %s", command.interrupted)
        status = ExitStatus.INTERRUPTED
    except OutputClosed:
        log.info("stdout was closed by its reader: stopped; %s", command.interrupted)
        status = ExitStatus.OUTPUT_CLOSED
    except Exception:  # noqa: BLE001 - a bug: log it (redacted) instead of a raw traceback
        log.exception("Unexpected error; please report it with this log")
    return int(command.after(args, session, cfg, int(status)))


def finished(args: argparse.Namespace, session: Session, cfg: Config | None, status: int) -> int:
    """The end of every run: the summary, the record, --json, and the verdict as the last line."""
    outcome = session.outcome
    status = session.signalled.get("status", status)
    outcome.sites_by_problem.update(site_warnings.flush())
    log.info("%s", outcome.summary())
    if args.dry_run:
        log.info("Dry run: nothing was written; %d records would have been stored", outcome.would_store)
    if outcome.not_stored:
        log.error("%d records were not stored; re-run the same dates to store them", outcome.not_stored)
    seconds = time.monotonic() - session.started
    if cfg and not args.dry_run:
        status = recorded(cfg, args, outcome, status, seconds)
    if args.json:
        with contextlib.suppress(OutputClosed):  # its reader gone: the log still gets the verdict
            say(json.dumps(outcome.report(status, seconds), default=str))
    verdict = f"Exit status {status} after {time.monotonic() - session.started:.1f} s.{what_to_do(outcome)}"
    log.log(logging.INFO if status == ExitStatus.OK else logging.WARNING, "%s", verdict)
    if cfg and not args.dry_run:
        ping(cfg, str(status), f"{outcome.summary()}\n{verdict}")
    return status


def recorded(cfg: Config, args: argparse.Namespace, outcome: Outcome, status: int, seconds: float) -> int:
    """Records the run in aggregator_runs; the exit status, made partial (or a person's to fix)
    when no record could be written: dashboards and `accounts` would miss the run."""
    kind = "one site" if args.site else "backfill" if is_backfill(args) else "nightly"
    started_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)
    failed = record_run(cfg, started_at, status, outcome.report(status, seconds), kind)
    if failed and status in (ExitStatus.OK, ExitStatus.PARTIAL):
        if failed.person:
            outcome.must_act(failed)
        return int(outcome.exit_status() if outcome.person else ExitStatus.PARTIAL)
    return status


def what_to_do(outcome: Outcome) -> str:
    """The verdict's advice: what a person must fix, and the command that fetches what is missing."""
    act = ""
    if outcome.person:
        first, more = next(iter(outcome.person)), len(outcome.person) - 1
        act = (
            f" A person must act: {first}"
            + (f" (and {more} more, above and in --json)" if more else "")
            + "."
        )
    rerun = rerun_command(outcome)
    return act + (f" To fetch what is missing: {rerun}" if rerun else "")


def ping(cfg: Config, what: str, body: str = "") -> None:
    """Tells the monitoring check (HEALTHCHECK_URL) that the run started, or how it ended (its exit
    status; the summary and verdict as the body, which healthchecks.io shows). Bounded by
    HTTP_TIMEOUT; a ping that fails is a warning, never the run's failure."""
    if not cfg.healthcheck_url:
        return
    try:
        requests.post(
            f"{cfg.healthcheck_url.rstrip('/')}/{what}",
            data=redacted(body).encode(),
            timeout=cfg.http_timeout,
        ).raise_for_status()
    except requests.RequestException as error:
        log.warning("HEALTHCHECK_URL could not be pinged (%s); the run is not affected", redacted(str(error)))


def program() -> str:
    """The name the job was started as, for its usage lines and advice: aggregator.py, or the
    console script analytics-aggregator (pipx, pip install)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name in ("aggregator.py", "analytics-aggregator") else "aggregator.py"


def this_command() -> str:
    """The interpreter and script this run was started with, as a re-run would name them: the
    venv's python and aggregator.py, or the installed analytics-aggregator command."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else "aggregator.py"
    if not script.endswith(".py"):
        return script  # a console script runs its own interpreter
    return f"{shlex.quote(sys.executable)} {shlex.quote(script)}"


def rerun_command(outcome: Outcome) -> str | None:
    """The command that re-runs just what is missing, or None when nothing is."""
    person = {site_id for site_ids in outcome.person.values() for site_id in site_ids}
    missing = sorted(
        {site_id for count in outcome.sources().values() for site_id in count.missing_sites} - person
    )
    if not outcome.days or not (missing or outcome.not_stored or outcome.zeros_kept):
        return None
    first, last = outcome.days[0].isoformat(), outcome.days[-1].isoformat()
    command = f"{this_command()} " + (f"--date {first}" if first == last else f"--from {first} --to {last}")
    domains = [outcome.domains.get(site_id) for site_id in missing]
    if missing and not outcome.not_stored and len(missing) <= 20 and all(domains):
        command += "".join(f" --site {domain}" for domain in domains)
    return command


if __name__ == "__main__":
    sys.exit(main())

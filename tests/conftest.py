"""Fixtures: a real PostgreSQL with the migration applied, the local stand-ins, a fleet builder,
and a runner that starts aggregator.py the way cron does."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import itertools
import json
import logging
import os
import pty
import re
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from aggregator import Config, newest_final_day, search_console_today
from fakes.database import create_database, drop_database, server_url
from fakes.google import FakeGoogle
from fakes.matomo import FakeMatomo
from fakes.postgrest import FakePostgrest
from fakes.settings import stand_in_settings, write_env_file

ROOT = Path(__file__).resolve().parent.parent
AGGREGATOR = ROOT / "aggregator.py"

SERVICE_KEY = "sb_secret_SERVICEkey0test0aggregator0Zq"
ANON_KEY = "sb_publishable_ANONkey0test0aggregator"
MATOMO_TOKEN = "matomoTOKEN0a1b2c3d4e5f6a7b8c9d0"
CLIENT_ID = "1234567890-test.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-CLIENTsecret0test0Yk"
# Every setting the script reads: an operator's shell must not leak into a test's run.
CONFIG_NAMES = tuple(f.name.upper() for f in fields(Config))

TODAY = dt.date.today()
DAY = TODAY - dt.timedelta(days=2)  # the default target date
# The newest day Search Console can have finalised, by the script's reckoning: DAY, except from
# midnight UTC to midnight in California, when Google's own today is still this one's yesterday.
GOOGLE_FINAL_DAY = min(DAY, newest_final_day(search_console_today()))


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def database() -> str:
    """A throwaway database with Supabase's roles and our migration; yields its conninfo."""
    url = server_url()
    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        where = conninfo_to_dict(url)
        pytest.exit(
            f"No PostgreSQL reachable at {where.get('host')}:{where.get('port')} ({str(error).strip()}). "
            "Set TEST_DATABASE_URL to a server where you may create databases, "
            "or run `bash tests/run-tests`, which starts one.",
            returncode=1,
        )
    name = f"aggregator_test_{os.getpid()}"
    yield create_database(admin, url, name)
    drop_database(admin, name)
    admin.close()


@pytest.fixture
def db(database: str):
    """A connection to the test database, every table empty."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "truncate daily_analytics, sites, gsc_accounts, aggregator_runs restart identity cascade"
        )
        yield conn


@pytest.fixture
def without_conflict_key(db):
    """daily_analytics without its (date, site_id) key, as before the migration was applied."""
    db.execute("alter table daily_analytics drop constraint daily_analytics_pkey")
    yield
    db.execute("truncate daily_analytics")
    db.execute("alter table daily_analytics add primary key (date, site_id)")


VERDICT = re.compile(r" Exit status \d+ after ")


def lines_with(text: str, output: str, verdict: bool = False) -> list[str]:
    """The lines of a run's output that contain `text`; the verdict (the last line, which names
    again what a person must fix) only when asked for."""
    return [line for line in output.splitlines() if text in line and (verdict or not VERDICT.search(line))]


def shown_on_a_terminal(launch, *args: str) -> str:
    """What a run writes to its stderr when that is a terminal."""
    terminal, screen = pty.openpty()
    process = launch(*args, log_level="WARNING", stderr=screen)
    process.communicate(timeout=120)
    os.close(screen)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the terminal is closed once everything was read
            break
        if not chunk:
            break
        shown += chunk
    return shown.decode()


def query_of(site) -> str:
    """The path of a site's searchAnalytics.query, as the client sends it."""
    return f"/sites/{quote(site.property, safe='')}/searchAnalytics/query"


def stored(db, day: dt.date = DAY) -> dict[int, dict]:
    """{site_id: row} of daily_analytics for one day, as a user would select it."""
    cursor = db.execute(
        "select site_id, matomo_visits, gsc_clicks, gsc_impressions, gsc_ctr, gsc_position "
        "from daily_analytics where date = %s order by site_id",
        [day],
    )
    names = [c.name for c in cursor.description]
    return {row[0]: dict(zip(names[1:], row[1:])) for row in cursor.fetchall()}


# ---------------------------------------------------------------------------
# Stand-in servers
# ---------------------------------------------------------------------------


@pytest.fixture
def gateway(database: str, db):
    server = FakePostgrest(database, SERVICE_KEY, ANON_KEY).start()
    yield server
    server.stop()


@pytest.fixture
def matomo():
    server = FakeMatomo(MATOMO_TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def google():
    server = FakeGoogle(CLIENT_ID, CLIENT_SECRET).start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------
# A fleet: rows in `sites` and `gsc_accounts`, and the numbers the stand-ins will answer
# ---------------------------------------------------------------------------


@dataclass
class AccountRef:
    id: int
    refresh_token: str


@dataclass
class SiteRef:
    id: int
    domain: str
    matomo_id: int | None
    property: str | None


class Fleet:
    def __init__(self, db, matomo: FakeMatomo, google: FakeGoogle):
        self.db, self.matomo, self.google = db, matomo, google
        self._matomo_ids = itertools.count(1)

    def account(self, revoked: bool = False) -> AccountRef:
        n = self.db.execute("select count(*) from gsc_accounts").fetchone()[0] + 1
        token = f"1//0refreshTOKEN-{n}-Xq8vL2pR7sT"
        account_id = self.db.execute(
            "insert into gsc_accounts (label, oauth_refresh_token) values (%s, %s) returning id",
            [f"owner{n}@example.com", token],
        ).fetchone()[0]
        self.google.add_account(token, {}).revoked = revoked
        return AccountRef(account_id, token)

    def service_account(
        self, wrong_key: bool = False, as_text: bool = False, pem: str | None = None
    ) -> AccountRef:
        """A gsc_accounts row holding a service account's JSON key, as Google Cloud issues it;
        with wrong_key, the row holds a key Google does not know (deleted, or another account's);
        with as_text, the key file's text was pasted into the jsonb column (a JSON string); pem
        replaces the private key (e.g. a damaged one)."""
        n = self.db.execute("select count(*) from gsc_accounts").fetchone()[0] + 1
        email = f"aggregator-{n}@fleet-analytics-{n}.iam.gserviceaccount.com"
        key, public_key = service_account_key(email)
        stored = service_account_key(email)[0] if wrong_key else dict(key)
        if pem is not None:
            stored["private_key"] = pem
        self.google.add_service_account(email, public_key, secret_parts(key) + secret_parts(stored))
        account_id = self.db.execute(
            "insert into gsc_accounts (label, service_account_key) values (%s, %s) returning id",
            [email, Jsonb(json.dumps(stored, indent=2) if as_text else stored)],
        ).fetchone()[0]
        return AccountRef(account_id, email)

    def google_account(self, ref: AccountRef):
        """The stand-in's record of an account: a user's (by refresh token) or a service account's."""
        if ref.refresh_token in self.google.service_accounts:
            return self.google.service_accounts[ref.refresh_token].account
        return self.google.accounts[ref.refresh_token]

    def site(
        self,
        domain: str,
        account: AccountRef | None = None,
        matomo: bool = True,
        prop: str | None = "domain",
        status: str = "deployed",
        permission: str = "siteOwner",
    ) -> SiteRef:
        """A site; prop is 'domain' (sc-domain:), a property URL, or None for no property."""
        matomo_id = next(self._matomo_ids) if matomo else None
        site_id = self.db.execute(
            "insert into sites (domain, status_deployment, matomo_site_id, gsc_account_id) "
            "values (%s, %s, %s, %s) returning id",
            [domain, status, matomo_id, account.id if account else None],
        ).fetchone()[0]
        if matomo_id:
            self.matomo.site_ids.add(matomo_id)
        site_url = f"sc-domain:{domain}" if prop == "domain" else prop
        if account and site_url:
            self.google_account(account).properties[site_url] = permission
        return SiteRef(site_id, domain, matomo_id, site_url)

    def many(self, count: int, accounts: list[AccountRef]) -> list[SiteRef]:
        """count sites spread over accounts, each with a domain property, in one insert."""
        base = next(self._matomo_ids)
        self._matomo_ids = itertools.count(base + count)
        rows = [(f"site{n}.example.net", base + n, accounts[n % len(accounts)].id) for n in range(count)]
        with self.db.cursor() as cursor:
            cursor.executemany(
                "insert into sites (domain, status_deployment, matomo_site_id, gsc_account_id) "
                "values (%s, 'deployed', %s, %s) returning id",
                rows,
                returning=True,
            )
            ids = []
            while True:
                ids.append(cursor.fetchone()[0])
                if not cursor.nextset():
                    break
        sites = []
        for n, (site_id, (domain, matomo_id, _)) in enumerate(zip(ids, rows)):
            account = accounts[n % len(accounts)]
            self.matomo.site_ids.add(matomo_id)
            self.google_account(account).properties[f"sc-domain:{domain}"] = "siteOwner"
            sites.append(SiteRef(site_id, domain, matomo_id, f"sc-domain:{domain}"))
        return sites

    def visits(self, site: SiteRef, visits: int, day: dt.date = DAY) -> None:
        self.matomo.visits[(site.matomo_id, day.isoformat())] = visits

    def search(
        self, site: SiteRef, clicks: int, impressions: int, position: float = 7.5, day: dt.date = DAY
    ) -> None:
        ctr = clicks / impressions if impressions else 0.0
        self.google.search[(site.property, day.isoformat())] = (clicks, impressions, ctr, position)

    def store(self, site: SiteRef, day: dt.date = DAY, **values) -> None:
        """A row already in daily_analytics, as an earlier good run left it."""
        columns = ["date", "site_id", *values]
        self.db.execute(
            f"insert into daily_analytics ({', '.join(columns)}) values ({', '.join(['%s'] * len(columns))})",
            [day, site.id, *values.values()],
        )


def service_account_key(email: str) -> tuple[dict, object]:
    """A service account's JSON key file's content as Google Cloud issues it, and its public half."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    key = {
        "type": "service_account",
        "project_id": email.split("@")[1].split(".")[0],
        "private_key_id": os.urandom(20).hex(),
        "private_key": pem,
        "client_email": email,
        "client_id": "1" + str(int.from_bytes(os.urandom(8), "big")).zfill(20),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{quote(email)}",
        "universe_domain": "googleapis.com",
    }
    return key, private.public_key()


def secret_parts(key: dict) -> list[str]:
    """What must never be printed of a key: the private key, any line of it, the key's id."""
    lines = [line for line in key["private_key"].splitlines() if len(line) >= 16 and "KEY-----" not in line]
    return [key["private_key"], key["private_key_id"], *lines]


@pytest.fixture
def fleet(db, matomo, google) -> Fleet:
    return Fleet(db, matomo, google)


# ---------------------------------------------------------------------------
# Running the script as cron does
# ---------------------------------------------------------------------------

SECRETS = (SERVICE_KEY, MATOMO_TOKEN, CLIENT_SECRET)
# nginx's page for a backend that is down or restarting: what a proxy in front of any service answers.
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"

SUMMARY = re.compile(
    r"Processed \d+ sites?\. Fetched Matomo data for \d+\. Fetched GSC data for \d+\. Stored \d+ records?\."
)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> str | None:
        found = SUMMARY.findall(self.stderr)
        return found[-1] if found else None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def config(gateway, matomo, google) -> dict[str, str]:
    """The .env a test's run uses; a test may change or delete entries before running."""
    # Healing is off but where a scenario is about it (tests/test_healing.py): every fleet here is
    # new, and its history (16 months of Search Console) would fill every other scenario's table.
    return {
        **stand_in_settings(gateway, matomo, google),
        "HTTP_TIMEOUT": "10",
        "HEAL_MATOMO_SITE_DAYS": "0",
        "HEAL_GSC_QUERIES": "0",
    }


# Every scenario runs at DEBUG unless told otherwise, so that the secret check below also covers
# what urllib3, httpx, httplib2 and google-auth log about URLs, headers and bodies.
LOG_LEVEL = os.environ.get("TEST_LOG_LEVEL", "DEBUG")


def assert_no_secret(text: str, google: FakeGoogle) -> None:
    keys = [part for account in google.service_accounts.values() for part in account.secrets]
    for secret in (*SECRETS, *google.accounts, *keys):
        assert secret not in text, "a secret was printed"


@pytest.fixture
def launch(tmp_path, config, google):
    """Start `python aggregator.py ARGS` as cron would, with the config written to a .env."""

    def start(
        *args: str, log_level: str = LOG_LEVEL, stderr=subprocess.PIPE, env_mode: int = 0o600
    ) -> subprocess.Popen:
        env_file = write_env_file(tmp_path / ".env", config)
        env_file.chmod(env_mode)
        environ = {k: v for k, v in os.environ.items() if k not in CONFIG_NAMES}
        command = [sys.executable, str(AGGREGATOR), "--env-file", str(env_file), "--log-level", log_level]
        return subprocess.Popen(
            [*command, *args],
            stdin=subprocess.PIPE,
            env=environ,
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )

    return start


@pytest.fixture
def run_aggregator(launch, google):
    """Run the script to its end; every run is checked for leaked secrets."""

    def run(
        *args: str,
        log_level: str = LOG_LEVEL,
        timeout: float = 180,
        answer: str | None = None,
        env_mode: int = 0o600,
    ) -> Result:
        process = launch(*args, log_level=log_level, env_mode=env_mode)
        stdout, stderr = process.communicate(answer, timeout=timeout)
        result = Result(process.returncode, stdout, stderr)
        assert_no_secret(result.output, google)
        return result

    return run


@pytest.fixture
def run_in_process(tmp_path, config, google, capsys, monkeypatch):
    """main(argv) called in this process, for the scenarios that end before the first network
    call (help, usage and configuration errors): the same Result as run_aggregator's, without
    the start-up of a new Python. What main() changes in the process is put back after."""
    import aggregator

    def run(*args: str, log_level: str = LOG_LEVEL) -> Result:
        env_file = write_env_file(tmp_path / ".env", config)
        for name in CONFIG_NAMES:
            monkeypatch.delenv(name, raising=False)
        with process_restored():
            try:
                status = aggregator.main(["--env-file", str(env_file), "--log-level", log_level, *args])
            except SystemExit as done:  # --help, --version
                status = done.code if isinstance(done.code, int) else 0
        stdout, stderr = capsys.readouterr()
        result = Result(int(status), stdout, stderr)
        assert_no_secret(result.output, google)
        return result

    return run


@contextlib.contextmanager
def process_restored():
    """Puts back what aggregator.take_over_the_process changes: the root log handlers and level,
    the socket classes, the signal handlers, the frozen collector."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sockets = socket.socket, ssl.SSLContext.sslsocket_class
    signals = {each: signal.getsignal(each) for each in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        root.handlers[:], root.level = handlers, level
        socket.socket, ssl.SSLContext.sslsocket_class = sockets
        for each, handler in signals.items():
            signal.signal(each, handler)
        gc.unfreeze()

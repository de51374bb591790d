"""Seeds a small fleet behind the local stand-ins, runs aggregator.py once as cron would, and
prints daily_analytics. Started by `bash tests/demo`, which provides the throwaway PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from fakes.database import ROOT, create_database, drop_database, server_url
from fakes.google import FakeGoogle
from fakes.matomo import FakeMatomo
from fakes.postgrest import FakePostgrest
from fakes.settings import stand_in_settings, write_env_file

SERVICE_KEY, ANON_KEY, MATOMO_TOKEN = "demo-service-key", "demo-anon-key", "demo-matomo-token"
CLIENT_ID, CLIENT_SECRET = "demo-client.apps.googleusercontent.com", "demo-client-secret"
FLEET = [  # domain, Matomo id, account, Search Console property (None: the account has none)
    ("shop.example.com", 1, 1, "sc-domain:shop.example.com"),
    ("blog.example.org", 2, 1, "https://www.blog.example.org/"),
    ("docs.example.io", 3, 2, "sc-domain:docs.example.io"),
    ("new.example.net", 4, 2, None),
    ("matomo-only.example.com", 5, None, None),
]


def seed(conn: psycopg.Connection, matomo: FakeMatomo, google: FakeGoogle) -> None:
    # The sites went live in Matomo a week ago: the run stores its three days and heals the rest.
    days = [dt.date.today() - dt.timedelta(days=n) for n in range(2, 8)]
    for account in (1, 2):
        conn.execute(
            "insert into gsc_accounts (label, oauth_refresh_token) values (%s, %s)",
            [f"owner{account}@example.com", f"demo-refresh-token-{account}"],
        )
        google.add_account(f"demo-refresh-token-{account}", {})
    for n, (domain, matomo_id, account, prop) in enumerate(FLEET, start=1):
        conn.execute(
            "insert into sites (domain, status_deployment, matomo_site_id, gsc_account_id) "
            "values (%s, 'deployed', %s, %s)",
            [domain, matomo_id, account],
        )
        matomo.site_ids.add(matomo_id)
        matomo.created[matomo_id] = f"{days[-1]} 09:12:44"
        for k, day in enumerate(days):
            matomo.visits[(matomo_id, day.isoformat())] = 40 * n + 7 * k
            if prop:
                google.accounts[f"demo-refresh-token-{account}"].properties[prop] = "siteOwner"
                clicks, impressions = 3 * n + k, 90 * n + 10 * k
                google.search[(prop, day.isoformat())] = (clicks, impressions, clicks / impressions, 4.0 + k)


def main() -> int:
    keep = "--keep" in sys.argv[1:]
    url = server_url()
    admin = psycopg.connect(url, autocommit=True)
    conninfo = create_database(admin, url, f"aggregator_demo_{os.getpid()}")
    gateway = FakePostgrest(conninfo, SERVICE_KEY, ANON_KEY).start()
    matomo, google = FakeMatomo(MATOMO_TOKEN).start(), FakeGoogle(CLIENT_ID, CLIENT_SECRET).start()
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn, tempfile.TemporaryDirectory() as tmp:
            seed(conn, matomo, google)
            # HISTORY_DAYS: a new site's history from its first week on, not 16 months of Search Console.
            settings = {**stand_in_settings(gateway, matomo, google), "HISTORY_DAYS": "7"}
            env_file = write_env_file(Path(tmp) / ".env", settings)
            print(
                "$ python aggregator.py            # the nightly run, against local stand-ins\n", flush=True
            )
            done = subprocess.run([sys.executable, str(ROOT / "aggregator.py"), "--env-file", str(env_file)])
            print(
                f"\nexit status {done.returncode} (4: a person must act: new.example.net has no Search Console property)\n"
            )
            stored = conn.execute("select count(*) from daily_analytics").fetchone()[0]
            cursor = conn.execute(
                "select a.date, s.domain, a.matomo_visits, a.gsc_clicks, a.gsc_impressions, "
                "round(a.gsc_ctr::numeric, 3), a.gsc_position from daily_analytics a "
                "join sites s on s.id = a.site_id order by a.date, s.id"
            )
            rows = [["date", "domain", "visits", "clicks", "impressions", "ctr", "position"]]
            rows += [["" if v is None else str(v) for v in row] for row in cursor.fetchall()]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for row in rows:
                print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
            print("\nAn empty cell was not fetched (no value yet), never a 0.")
            if done.returncode != 4 or not stored:  # not what the demo says: say so, to the shell too
                print(
                    f"demo: the run did not end as it should (exit {done.returncode}, {stored} rows)",
                    file=sys.stderr,
                )
                return 1
            if keep:
                sandbox(settings, google)
    finally:
        for server in (gateway, matomo, google):
            server.stop()
        drop_database(admin, f"aggregator_demo_{os.getpid()}")
    return 0


SANDBOX_CODE = "4/0sandbox-code-to-paste"


def stopped(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a closed terminal or a `kill` stops the sandbox as Ctrl-C does


def sandbox(settings: dict[str, str], google: FakeGoogle) -> None:
    """Leaves the stand-ins up, with their settings in sandbox.env, until Ctrl-C or SIGTERM."""
    # SIGINT too: a shell starts a background job (`demo.py --keep &` in a script) with SIGINT
    # ignored, and Python then leaves it so; the sandbox must still stop on it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stopped)
    env_file = write_env_file(ROOT / "sandbox.env", settings)
    google.codes[SANDBOX_CODE] = ("1//0sandbox-refresh-token", "sandbox@example.com")
    run = f"{sys.executable} {ROOT / 'aggregator.py'} --env-file {env_file}"
    print(
        f"""
The sandbox is up: the stand-ins keep running with the table above. Try, in another terminal:

  {run} check
  {run} --dry-run
  {run} status
  {run} accounts
  {run} --date {dt.date.today() - dt.timedelta(days=3)}
  OAUTHLIB_INSECURE_TRANSPORT=1 {run} authorize
      (open nothing: paste http://localhost/?state=s&code={SANDBOX_CODE} when asked)

Ctrl-C here stops the sandbox and removes sandbox.env.""",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nSandbox stopped.")
    finally:
        env_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())

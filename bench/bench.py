"""Benchmark aggregator.py against the local stand-ins with an injected latency per request and
the real PostgreSQL behind the PostgREST stand-in. Run by hand, not part of the test suite:

    .venv/bin/python bench/bench.py                      # every scenario, 50 ms per request
    .venv/bin/python bench/bench.py --only nightly,quota --latency 0.02

Prints one table: scenario, sites, days, wall seconds (the median of --repeat runs), peak RSS of
the aggregator, requests per service (of the last run), the round-trip lower bound (the round trips the job cannot avoid, given its concurrency
limits, times the latency; or Search Console's quota, when that is larger) and wall / bound, and
the CPU floor (the median of the CPU seconds the aggregator, the stand-ins and PostgreSQL used,
divided by the cores they share here: a run cannot be shorter than that either), and each
service's floor (Matomo / Search Console / Supabase: its total work over its parallelism, see
service_floors) with the run's ratio to the largest. The year-* scenarios are issue 23's two
cost profiles: Matomo-bound and latency-bound.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from aggregator import (  # noqa: E402
    DEFAULT_LAG_DAYS,
    DEFAULT_LOOKBACK_DAYS,
    PAGE_SIZE,
    Config,
)
from fakes.database import create_database, drop_database, server_url  # noqa: E402
from fakes.google import FakeGoogle  # noqa: E402
from fakes.matomo import FakeMatomo  # noqa: E402
from fakes.postgrest import FakePostgrest  # noqa: E402
from fakes.settings import stand_in_settings, write_env_file  # noqa: E402

SERVICE_KEY, ANON_KEY = "bench-service-key", "bench-anon-key"
MATOMO_TOKEN, CLIENT_ID, CLIENT_SECRET = "bench-matomo-token", "bench-client", "bench-secret"
LATEST = dt.date.today() - dt.timedelta(days=DEFAULT_LAG_DAYS)


@dataclass(frozen=True)
class Scenario:
    name: str
    sites: int
    accounts: int
    days: int
    target: str
    qpm: int | None = None  # the stand-in's per-account quota (per minute)
    project_qpm: int | None = None  # ... and its per-project one, told to the job as GSC_PROJECT_QPM
    # Days before the nightly window already stored (final): HEAL_DAYS (30) is a fleet without
    # holes, as on most nights; 0 leaves a 30-day hole in both sources for the run to heal.
    filled: int = 30
    # Cost profiles (issue 23): None takes --latency / --http10. Matomo's work is server time per
    # site-day, shared by PHP workers; PostgreSQL's a time per row on top of its own.
    latency: float | None = None
    http10: bool | None = None
    site_day_cost: float = 0.0
    php_workers: int | None = None
    row_cost: float = 0.0
    settings: tuple[str, ...] = ()  # the job's .env beyond the defaults, as --set gives them
    # One stored site-day in `provisional` of the two weeks before the nightly window is not final
    # (a Matomo 0 its raw log did not confirm, or a Search Console day not final; in turn).
    provisional: int = 0

    def first_day(self) -> dt.date:
        """The oldest day the run stores: its own, and in the nightly run the hole it heals."""
        first = LATEST - dt.timedelta(days=self.days - 1)
        return first - dt.timedelta(days=30 - self.filled) if self.days == DEFAULT_LOOKBACK_DAYS else first

    def args(self) -> list[str]:
        if self.days == DEFAULT_LOOKBACK_DAYS:
            return []  # the nightly run, as cron starts it
        start = LATEST - dt.timedelta(days=self.days - 1)
        return ["--from", start.isoformat(), "--to", LATEST.isoformat()]


SCENARIOS = [
    Scenario("nightly", 1000, 10, DEFAULT_LOOKBACK_DAYS, "wall <= 3 s; <= 1 GSC query per site"),
    Scenario("heal-30", 1000, 10, DEFAULT_LOOKBACK_DAYS, "wall <= 3 x nightly", filled=0),
    Scenario("backfill-30", 1000, 10, 30, "wall <= 4 s; as many requests as one day"),
    Scenario("backfill-365", 10000, 20, 365, "peak RSS <= 250 MB; every row stored"),
    # The two cost profiles of a long backfill: Matomo-bound (0.2 ms of PHP per site-day over 4
    # PHP workers, little latency) and latency-bound (50 ms a request, a new connection each).
    Scenario(
        "year-matomo-bound",
        10000,
        20,
        365,
        "wall <= 1.15 x largest service floor",
        latency=0.002,
        site_day_cost=0.0002,
        php_workers=4,
        # As the README advises: as many Matomo requests in flight as the install has PHP
        # workers to spare for them (three of four would leave a quarter of its time unused).
        settings=("MATOMO_WORKERS=4",),
    ),
    Scenario(
        "year-latency-bound",
        10000,
        20,
        365,
        "wall <= 1.15 x largest service floor",
        latency=0.05,
        http10=True,
    ),
    Scenario(
        "provisional",
        10000,
        20,
        DEFAULT_LOOKBACK_DAYS,
        "Matomo site-days <= 1.05 x (own + provisional cells)",
        provisional=50,
    ),
    Scenario("quota", 3000, 1, DEFAULT_LOOKBACK_DAYS, "0 failed sites; wall <= 1.2 x quota bound", qpm=1200),
    # 100 accounts authorised through one OAuth client share its Cloud project's quota (40,000
    # queries a minute at Google; scaled down here so that the floor is one minute, not hours).
    Scenario(
        "project",
        2000,
        100,
        DEFAULT_LOOKBACK_DAYS,
        "0 429s; wall <= 1.1 x quota bound",
        qpm=1200,
        project_qpm=1000,
    ),
]


def domain(n: int) -> str:
    return f"site{n}.bench.example"


def search_metrics(site_url: str, day: str) -> tuple | None:
    """Deterministic Search Console numbers; every fifth site-day has no data (no row)."""
    h = zlib.crc32(f"{site_url}{day}".encode())
    if h % 5 == 0:
        return None
    clicks, impressions = h % 40, 100 + h % 900
    return (clicks, impressions, clicks / impressions, 1 + (h % 300) / 10)


def seed(conn: psycopg.Connection, google: FakeGoogle, matomo: FakeMatomo, s: Scenario) -> None:
    conn.execute("truncate daily_analytics, sites, gsc_accounts, site_sources restart identity cascade")
    for a in range(1, s.accounts + 1):
        conn.execute("insert into gsc_accounts (oauth_refresh_token) values (%s)", [f"bench-token-{a}"])
        google.add_account(f"bench-token-{a}", {})
    with conn.cursor().copy(
        "copy sites (domain, status_deployment, matomo_site_id, gsc_account_id) from stdin"
    ) as copy:
        for n in range(1, s.sites + 1):
            account = 1 + n % s.accounts
            copy.write_row((domain(n), "deployed", n, account))
            google.accounts[f"bench-token-{account}"].properties[f"sc-domain:{domain(n)}"] = "siteOwner"
    google.search_fn = search_metrics
    google.qpm, google.project_qpm = s.qpm, s.project_qpm
    matomo.visits_fn = visits_fn(s.sites)
    matomo.site_ids = set(range(1, s.sites + 1))  # what the token may view


def visits_fn(sites: int):
    """Deterministic visits (a 0 now and then, which the job confirms in Matomo's raw log)."""
    return lambda site, day: (site * 7 + sum(map(ord, day))) % 50 if site <= sites else None


def seed_history(conn: psycopg.Connection, s: Scenario) -> None:
    """What earlier nights left: site_sources as the job learnt them (sites created in Matomo
    long ago, that have values: no history to fetch) and, for `filled` days before the nightly
    window, every value, final."""
    with conn.cursor().copy(
        "copy site_sources (site_id, source, source_key, available_from) from stdin"
    ) as copy:
        for n in range(1, s.sites + 1):
            copy.write_row((n, "matomo", str(n), "2020-01-01"))
            copy.write_row((n, "gsc", str(1 + n % s.accounts), None))
    window_start = LATEST - dt.timedelta(days=DEFAULT_LOOKBACK_DAYS - 1)
    days = [(window_start - dt.timedelta(days=k)).isoformat() for k in range(1, s.filled + 1)]
    visits = visits_fn(s.sites)
    columns = "date, site_id, matomo_visits, matomo_final, gsc_clicks, gsc_impressions, gsc_ctr, gsc_position, gsc_final"
    with conn.cursor().copy(f"copy daily_analytics ({columns}) from stdin") as copy:
        for n in range(1, s.sites + 1):
            for day in days:
                gsc = search_metrics(f"sc-domain:{domain(n)}", day) or (0, 0, None, None)
                copy.write_row((day, n, visits(n, day), True, *gsc, True))
    if s.provisional:
        cells = "date >= %s and (site_id * 31 + extract(doy from date)::int) %% %s = %s"
        recent = window_start - dt.timedelta(days=14)
        conn.execute(
            f"update daily_analytics set matomo_visits = 0, matomo_final = false where {cells}",
            [recent, s.provisional, 0],
        )
        conn.execute(
            f"update daily_analytics set gsc_final = false where {cells}", [recent, s.provisional, 1]
        )
    conn.execute("vacuum (analyze) daily_analytics")


def lower_bound(s: Scenario, latency: float, settings: list[str], counts: dict[str, int]) -> float:
    """Seconds the job cannot go below: the round trips on its critical path, from the requests it
    really made (counts) and its concurrency limits, times the latency; or Search Console's
    quota, when that is longer.

    A run fetches and stores side by side (each source's requests back to back, the upserts as
    rows come): the path is the longer of the fetches and the stores, plus the first Matomo
    request (it goes alone) and the last store.
    """
    overrides = {k.lower(): int(v) for k, _, v in (setting.partition("=") for setting in settings)}
    cfg = Config("", "", "", "", "", "", **overrides)
    reads = math.ceil(s.sites / PAGE_SIZE)  # pages of sites, one after another; the rest beside them
    queries, per_account = counts["query"], math.ceil(counts["query"] / s.accounts)
    connect = 2 if queries else 0  # a token refresh, then sites.list
    gsc = max(math.ceil(queries / cfg.gsc_workers), math.ceil(per_account / cfg.gsc_account_workers))
    fetch = max(gsc, math.ceil(counts["bulk"] / cfg.matomo_workers))
    store = math.ceil(counts["upsert"] / cfg.upsert_workers)
    pipeline = max(fetch, store) + 2
    record = 1  # the aggregator_runs row
    bound = latency * (reads + connect + pipeline + record)
    for quota, queries_under_it in ((s.qpm, per_account), (s.project_qpm, queries)):
        if quota and queries_under_it > quota:
            minutes = math.ceil(queries_under_it / quota) - 1
            bound = max(bound, minutes * 60 + latency * (reads + 3 + store + record))
    return bound


def service_floors(
    s: Scenario, latency: float, settings: list[str], counts: dict[str, int], site_days: int
) -> dict[str, float]:
    """Each service's floor: its total work over its parallelism. Matomo: the PHP time of every
    site-day over its PHP workers (or the job's MATOMO_WORKERS), plus each request's latency;
    Search Console: each query's latency over GSC_WORKERS (or its quota); Supabase: each upsert's
    latency and its rows' cost over UPSERT_WORKERS. No run can be shorter than the largest."""
    overrides = {k.lower(): int(v) for k, _, v in (setting.partition("=") for setting in settings)}
    cfg = Config("", "", **overrides)
    matomo = (counts["bulk"] * latency + site_days * s.site_day_cost) / (s.php_workers or cfg.matomo_workers)
    gsc = counts["query"] * latency / cfg.gsc_workers
    for quota, queries in (
        (s.qpm, math.ceil(counts["query"] / s.accounts)),
        (s.project_qpm, counts["query"]),
    ):
        if quota and queries > quota:
            gsc = max(gsc, (math.ceil(queries / quota) - 1) * 60)
    rows = s.sites * ((LATEST - s.first_day()).days + 1)
    supabase = (counts["upsert"] * latency + rows * s.row_cost) / cfg.upsert_workers
    return {"matomo": matomo, "gsc": gsc, "supabase": supabase}


def database_cpu(conn: psycopg.Connection) -> float | None:
    """CPU seconds PostgreSQL's processes have used so far: the postmaster's children (each
    connection's backend, once it has ended) and the live ones; None where /proc cannot tell
    (a database on another machine)."""
    try:
        backend = conn.execute("select pg_backend_pid()").fetchone()[0]
        postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
        ticks = 0
        for pid in [postmaster, *(p.name for p in Path("/proc").iterdir() if p.name.isdigit())]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(pid) == postmaster:
                ticks += sum(map(int, fields[11:15]))  # its own and its ended children's
            elif int(fields[1]) == postmaster:
                ticks += int(fields[11]) + int(fields[12])  # a live backend
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_aggregator(
    env_file: Path, args: list[str], conn: psycopg.Connection
) -> tuple[float, int, int, str, float | None]:
    """(wall seconds, peak RSS in MB, exit status, log, CPU floor) of one run; prints the CPU
    seconds of the aggregator, of the stand-ins (this process) and of PostgreSQL.

    The CPU floor is their sum over the cores: on this machine they share the cores, so no run
    can be shorter, whatever its round trips (None when PostgreSQL's CPU cannot be read)."""
    started, stand_ins = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    database_before = database_cpu(conn)
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "aggregator.py"),
            "--env-file",
            str(env_file),
            "--log-level",
            "WARNING",
            *args,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    served = after.ru_utime + after.ru_stime - stand_ins.ru_utime - stand_ins.ru_stime
    database_after = database_cpu(conn)
    aggregator = usage.ru_utime + usage.ru_stime
    database = (
        database_after - database_before
        if database_before is not None and database_after is not None
        else None
    )
    print(
        f"  wall {wall:.2f} s, cpu {aggregator:.2f} s (stand-ins: {served:.2f} s"
        f"{'' if database is None else f', PostgreSQL: {database:.2f} s'})",
        file=sys.stderr,
    )
    cpu_floor = None if database is None else (aggregator + served + database) / (os.cpu_count() or 1)
    return wall, usage.ru_maxrss // 1024, os.waitstatus_to_exitcode(status), stderr, cpu_floor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request, e.g. 0.05")
    parser.add_argument("--only", help="comma-separated scenario names, e.g. nightly,quota")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario; the table shows the median")
    parser.add_argument(
        "--http10",
        action="store_true",
        help="the stand-ins answer HTTP/1.0 and close every connection (a new one per request)",
    )
    parser.add_argument(
        "--full-answers",
        action="store_true",
        help="Matomo's stand-in answers every VisitsSummary object whole, whatever showColumns asks",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="a setting for the run's .env, e.g. --set GSC_WORKERS=64"
    )
    options = parser.parse_args()
    chosen = [s for s in SCENARIOS if not options.only or s.name in options.only.split(",")]

    url = server_url()
    admin = psycopg.connect(url, autocommit=True)
    name = f"aggregator_bench_{os.getpid()}"
    conninfo = create_database(admin, url, name)
    rows = []
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn, tempfile.TemporaryDirectory() as tmp:
            for s in chosen:
                gateway = FakePostgrest(conninfo, SERVICE_KEY, ANON_KEY).start()
                matomo, google = (
                    FakeMatomo(MATOMO_TOKEN).start(),
                    FakeGoogle(CLIENT_ID, CLIENT_SECRET).start(),
                )
                latency = options.latency if s.latency is None else s.latency
                for server in (gateway, matomo, google):
                    server.latency, server.keep_requests = latency, False
                    server.http10 = options.http10 if s.http10 is None else s.http10
                matomo.site_day_cost, gateway.row_cost = s.site_day_cost, s.row_cost
                matomo.full_answers = options.full_answers
                matomo.php_workers(s.php_workers)
                seed(conn, google, matomo, s)
                settings = {**stand_in_settings(gateway, matomo, google), "RUN_DEADLINE": "3600"}
                if s.project_qpm:
                    settings["GSC_PROJECT_QPM"] = str(s.project_qpm)
                chosen_settings = [*s.settings, *options.set]
                settings.update(setting.split("=", 1) for setting in chosen_settings)
                env_file = write_env_file(Path(tmp) / ".env", settings)
                print(f"running {s.name}: {s.sites} sites, {s.days} days ...", file=sys.stderr, flush=True)
                runs = []
                for _ in range(options.repeat):
                    for server in (gateway, matomo, google):
                        server.counts.clear()
                    # The table as earlier nights left it, the previous run's dead rows vacuumed
                    # now, not by autovacuum during this run (whose CPU would be counted as this
                    # run's PostgreSQL CPU).
                    conn.execute("truncate daily_analytics, site_sources")
                    seed_history(conn, s)
                    provisional = conn.execute(
                        "select count(*) filter (where not matomo_final) from daily_analytics"
                    ).fetchone()[0]
                    matomo.site_days_worked = 0
                    runs.append(run_aggregator(env_file, s.args(), conn))
                    own = s.sites * DEFAULT_LOOKBACK_DAYS if not s.args() else s.sites * s.days
                    print(
                        f"  Matomo site-days {matomo.site_days_worked} (own {own} + provisional cells "
                        f"{provisional}: x {matomo.site_days_worked / (own + provisional):.3f})",
                        file=sys.stderr,
                    )
                wall = statistics.median(r[0] for r in runs)
                rss, status, log = max(r[1] for r in runs), max(r[2] for r in runs), runs[-1][3]
                cpu_floors = [r[4] for r in runs if r[4] is not None]
                cpu_floor = f"{statistics.median(cpu_floors):.2f}" if cpu_floors else "-"
                first = s.first_day()
                stored = conn.execute(
                    "select count(*) from daily_analytics where date >= %s", [first]
                ).fetchone()[0]
                for server in (gateway, matomo, google):
                    server.stop()
                counts = {
                    "query": google.counts["query"],
                    "bulk": matomo.counts["bulk"],
                    "upsert": gateway.counts["upsert"] - 1,  # the last one records the run
                }
                bound = lower_bound(s, latency, chosen_settings, counts)
                floors = service_floors(s, latency, chosen_settings, counts, matomo.site_days_worked)
                rows.append(
                    [
                        s.name,
                        s.sites,
                        s.days,
                        f"{wall:.2f}",
                        rss,
                        status,
                        f"{stored}/{s.sites * ((LATEST - first).days + 1)}",
                        f"{gateway.counts['select']}+{gateway.counts['upsert']}",
                        f"{matomo.counts['bulk']}+{matomo.counts['raw log']}",
                        f"{google.counts['token']}+{google.counts['sites.list']}+{google.counts['query']}",
                        google.counts["429"],
                        f"{bound:.2f}",
                        f"{wall / bound:.2f}",
                        "/".join(f"{floors[k]:.1f}" for k in ("matomo", "gsc", "supabase")),
                        f"{wall / max(floors.values()):.2f}" if max(floors.values()) else "-",
                        cpu_floor,
                        s.target,
                    ]
                )
                if status != 0:
                    print(log[-2000:], file=sys.stderr)
    finally:
        drop_database(admin, name)
    print_table(rows, options.latency, options.http10)
    return 0


def print_table(rows: list[list], latency: float, http10: bool) -> None:
    header = [
        "scenario",
        "sites",
        "days",
        "wall s",
        "peak RSS MB",
        "exit",
        "rows stored",
        "supabase sel+ups",
        "matomo bulk+raw log",
        "google tok+list+query",
        "429s",
        "bound s",
        "wall/bound",
        "floors M/G/S s",
        "wall/max floor",
        "cpu floor s",
        "target",
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    connections = "HTTP/1.0, a new connection per request" if http10 else "HTTP/1.1 keep-alive"
    print(
        f"\nlatency {latency * 1000:.0f} ms per request, {connections}, {os.cpu_count()} cores, "
        "defaults from Config (a scenario with a cost profile sets its own latency and connections)\n"
    )
    for r in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    sys.exit(main())

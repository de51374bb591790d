"""Supabase's PostgREST gateway as unkind as it really is: statement timeouts, its own transient
errors, a gateway that hangs or is not Supabase, and a schema that is not the migrations'."""

from __future__ import annotations

import datetime as dt
import os
import time

import psycopg
import pytest
import requests
from psycopg.conninfo import make_conninfo

from conftest import (
    ANON_KEY,
    DAY,
    HTML_502,
    ROOT,
    SERVICE_KEY,
    lines_with,
    stored,
)
from fakes.database import MIGRATIONS, SUPABASE_BOOTSTRAP, SUPABASE_ROLES, server_url

STORE = "/rest/v1/rpc/store_analytics"  # every write of daily_analytics: the migration's function


def upserts(gateway) -> int:
    return gateway.count(lambda r: r.method == "POST" and r.path == STORE)


@pytest.fixture
def refusing_trigger(db):
    """A trigger that refuses every row, as a project's own trigger may (P0001)."""
    db.execute(
        "create function refuse() returns trigger language plpgsql as "
        "$$ begin raise exception 'rows are frozen for the audit'; end $$"
    )
    db.execute(
        "create trigger refuse before insert or update on daily_analytics for each row execute function refuse()"
    )
    yield
    db.execute("drop trigger refuse on daily_analytics")
    db.execute("drop function refuse()")


def rows_sent(request) -> list[dict]:
    """The rows a store_analytics call carries: arrays of values in the order p_columns names."""
    body = request.json()
    return [dict(zip(body["p_columns"], row)) for row in body["p_rows"]]


def upsert_with(site_id):
    """Matches an upsert request whose rows include this site."""
    return lambda r: r.path == STORE and any(row["site_id"] == site_id for row in rows_sent(r))


def delete_before_the_first_upsert(db, gateway, site) -> None:
    """The site is deleted during the run, after its rows were fetched: they fail its foreign key."""

    def delete(request) -> None:
        if request.method == "POST" and request.path == STORE:
            db.execute("delete from sites where id = %s", [site.id])
            gateway.before = None

    gateway.before = delete


def postgrest_error(status: int, code: str | None, message: str) -> dict:
    body = {"code": code, "details": None, "hint": None, "message": message}
    return {"status": status, "body": body if code else {"message": message}}


def cloudflare(status: int) -> dict:
    page = (
        f"<!DOCTYPE html><html><head><title>error code: {status}</title></head><body>Cloudflare</body></html>"
    )
    return {"status": status, "body": page, "content_type": "text/html; charset=UTF-8"}


TRANSIENT = [
    postgrest_error(503, "PGRST000", "Could not connect with the database"),
    postgrest_error(503, "PGRST001", "Could not connect with the database due to an internal error"),
    postgrest_error(503, "PGRST002", "Could not query the database for the schema cache. Retrying."),
    postgrest_error(504, "PGRST003", "Timed out acquiring connection from connection pool."),
    postgrest_error(503, "57P01", "terminating connection due to administrator command"),
    postgrest_error(503, "53300", "sorry, too many clients already"),
    postgrest_error(503, "08006", "connection to server was lost"),
    postgrest_error(500, "40001", "could not serialize access due to concurrent update"),
    postgrest_error(500, "40P01", "deadlock detected"),
    postgrest_error(502, None, "An invalid response was received from the upstream server"),
    cloudflare(520),
    cloudflare(522),
]


def read_of(table: str, **query: str | None):
    """Matches a read of `table` with these query parameters (None: without that parameter)."""
    return lambda r: (
        r.method == "GET"
        and r.path == f"/rest/v1/{table}"
        and all(r.query.get(k) == v for k, v in query.items())
    )


def upsert_of(site):
    return lambda r: (
        r.method == "POST" and r.path == STORE and any(row["site_id"] == site.id for row in rows_sent(r))
    )


# ---------------------------------------------------------------------------
# Storing
# ---------------------------------------------------------------------------


def test_a_chunk_cancelled_by_the_statement_timeout_is_halved_and_stored(fleet, db, gateway, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(30)]
    for site in sites:
        fleet.visits(site, 5)
    gateway.rows_within_timeout = 40  # the chunk of 90 rows is cancelled at that size, every time

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.summary.endswith("Stored 90 records.")
    assert db.execute("select count(*), sum(matomo_visits) from daily_analytics").fetchone() == (90, 150)
    assert upserts(gateway) <= 7  # 90 -> 45 + 45 -> four of 22 or 23; never the same size again


@pytest.mark.parametrize("fault", ["read-only", "trigger"])
def test_an_error_every_row_meets_is_one_line_and_few_requests(
    fault, fleet, db, gateway, config, request, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(30)]
    for site in sites:
        fleet.visits(site, 5)
    fleet.store(sites[0], matomo_visits=9)
    if fault == "read-only":
        gateway.read_only = True  # Supabase's read-only mode: the disk at 95% of the quota
    else:
        request.getfixturevalue("refusing_trigger")
    config["UPSERT_CHUNK_SIZE"] = "10"  # nine chunks

    result = run_aggregator()

    assert result.returncode == 4
    # Each of the UPSERT_WORKERS (6) chunks in flight halves down to a row of a site or two (at most
    # nine requests for a chunk of ten) until rows of REFUSED_SITES sites are refused; no more after.
    assert upserts(gateway) <= 6 * 9
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line and "not stored" not in line]
    assert len(errors) == 1, "\n".join(errors)
    assert (
        ("read-only" in errors[0] and "disk" in errors[0]) if fault == "read-only" else "trigger" in errors[0]
    )
    assert stored(db)[sites[0].id]["matomo_visits"] == 9
    assert lines_with("records were not stored", result.stderr)


@pytest.mark.parametrize("fault", ["read-only", "trigger"])
def test_once_every_write_is_refused_no_further_fetch_starts(
    fault, fleet, db, gateway, matomo, config, request, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(60)]
    for site in sites:
        fleet.visits(site, 5)
    if fault == "read-only":
        gateway.read_only = True  # the site_sources write before the fetch meets it first
    else:
        request.getfixturevalue("refusing_trigger")  # the first chunk of rows meets it
    matomo.inject(lambda r: "VisitsSummary" in r.body.decode(), status=200, delay=0.2, times=999)
    config.update(MATOMO_BULK_SIZE="2", MATOMO_WORKERS="1", UPSERT_CHUNK_SIZE="2")

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 4
    assert len(matomo.report_requests()) <= 5  # of 30: nothing of the rest could be stored
    assert lines_with("Supabase refuses every write: ", result.stderr)
    assert result.summary.endswith("Stored 0 records.")


def test_a_supabase_that_stops_answering_writes_holds_the_run_no_longer_than_its_deadline(
    fleet, db, gateway, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(40)]
    for site in sites:
        fleet.visits(site, 7)
    gateway.inject(lambda r: r.path == STORE, hang=True, times=999)
    config.update(
        UPSERT_CHUNK_SIZE="1", UPSERT_WORKERS="2", HTTP_TIMEOUT="2", HTTP_RETRIES="1", RUN_DEADLINE="3"
    )

    started = time.monotonic()
    result = run_aggregator("--date", DAY.isoformat())

    # Retried until the deadline, then no chunk waits for it: 40 chunks of 4.5 s each took 90 s.
    assert time.monotonic() - started < 3 + 2 * 2 + 5
    assert result.returncode == 1
    assert result.summary.endswith("Stored 0 records.")
    assert lines_with(
        "RUN_DEADLINE reached: Supabase did not answer in time while storing rows", result.stderr
    )
    assert lines_with("40 records were not stored; re-run the same dates", result.stderr)


def test_a_project_gone_read_only_before_the_run_is_recorded_names_its_own_fix(
    fleet, db, gateway, run_aggregator
):
    fleet.visits(fleet.site("shop.example.com"), 1)

    def disk_full_once_stored(request) -> None:  # the disk reaches 95% with the run's last rows
        if request.path == "/rest/v1/aggregator_runs" and request.method == "POST":
            gateway.read_only = True

    gateway.before = disk_full_once_stored
    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 4
    assert stored(db)
    (verdict,) = lines_with("Exit status 4", result.stderr, verdict=True)
    assert "read-only mode" in verdict and "free disk space" in verdict
    assert "migrations" not in verdict  # nothing to apply: a full disk


@pytest.mark.parametrize("status", [429, 408])
def test_a_429_from_a_proxy_in_front_of_supabase_is_waited_out_not_taken_for_a_broken_table(
    status, fleet, db, gateway, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(4)]
    for site in sites:
        fleet.visits(site, 7)
    too_many = {
        "status": status,
        "body": f"<html><title>{status}</title></html>",
        "content_type": "text/html",
    }
    gateway.inject(lambda r: r.path == STORE, times=3, **too_many)  # a burst for every write in flight

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 0, result.stderr[-2000:]  # it was 3: halved as a row's fault, rows lost
    assert len(stored(db)) == 4


def test_a_503_on_an_upsert_chunk_is_retried(fleet, db, gateway, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(4)]
    for site in sites:
        fleet.visits(site, 7)
    gateway.inject(upsert_with(sites[2].id), status=503, body=HTML_502, content_type="text/html", times=1)
    config["UPSERT_CHUNK_SIZE"] = "2"

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert len(stored(db)) == 4
    assert gateway.count(upsert_with(sites[2].id)) == 2


def test_an_upsert_chunk_that_keeps_failing_keeps_the_others(fleet, db, gateway, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(6)]
    for site in sites:
        fleet.visits(site, 7)
    gateway.inject(upsert_with(sites[2].id), status=503, body=HTML_502, content_type="text/html", times=99)
    config.update(UPSERT_CHUNK_SIZE="2", HTTP_RETRIES="1")

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 3
    assert result.summary.endswith("Stored 4 records.")
    assert sorted(stored(db)) == [sites[n].id for n in (0, 1, 4, 5)]
    assert lines_with("2 records were not stored; re-run the same dates", result.stderr)
    assert gateway.count(upsert_with(sites[2].id)) == 2


def test_an_upsert_chunk_refused_for_one_row_loses_only_that_row(fleet, db, gateway, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(5)]
    for site in sites:
        fleet.visits(site, 7)
    doomed = sites[2]
    delete_before_the_first_upsert(db, gateway, doomed)

    result = run_aggregator()

    assert result.returncode == 3
    assert sorted(stored(db)) == [s.id for s in sites if s is not doomed]
    assert result.summary.endswith("Stored 12 records.")
    assert lines_with("3 records were not stored", result.stderr)


def test_two_rows_a_trigger_refuses_lose_only_themselves(fleet, db, gateway, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(8)]
    for site in sites:
        fleet.visits(site, 7)
    first, last = sites[0], sites[-1]  # one in each half of the chunk
    db.execute(
        "create function refuse_two() returns trigger language plpgsql as $$ begin "
        f"if new.site_id in ({first.id}, {last.id}) then raise exception 'site is being migrated'; end if; "
        "return new; end $$"
    )
    db.execute(
        "create trigger refuse_two before insert or update on daily_analytics "
        "for each row execute function refuse_two()"
    )
    try:
        result = run_aggregator("--date", DAY.isoformat())
    finally:  # the database outlives the test
        db.execute("drop trigger refuse_two on daily_analytics")
        db.execute("drop function refuse_two()")

    assert result.returncode == 3  # two bad sites are not an outage
    assert sorted(stored(db)) == [site.id for site in sites[1:-1]]
    assert lines_with("2 records were not stored", result.stderr)


def test_a_site_deleted_during_a_backfill_costs_a_few_requests_not_one_per_row(
    fleet, db, gateway, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(3)]
    month = [DAY - dt.timedelta(days=n) for n in range(29, -1, -1)]
    for site in sites:
        for day in month:
            fleet.visits(site, 7, day=day)
    doomed = sites[1]
    delete_before_the_first_upsert(db, gateway, doomed)

    result = run_aggregator("--from", month[0].isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 3
    assert sorted(stored(db)) == [sites[0].id, sites[2].id]
    assert lines_with("30 records were not stored", result.stderr)
    assert upserts(gateway) <= 20  # halves down to its first row, then its other rows are not sent


@pytest.mark.parametrize("errors", [TRANSIENT[:6], TRANSIENT[6:]], ids=["first six", "last six"])
def test_postgrests_own_transient_errors_are_retried_on_reads_and_writes(
    errors, fleet, db, gateway, config, run_aggregator
):
    for _ in range(4):
        fleet.account()  # accounts without sites: gsc_accounts is read, no query is made
    sites = [fleet.site(f"s{n}.example.com") for n in range(6)]
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1)
    gateway.max_rows = 3  # two pages of sites and two of accounts
    reads = [
        read_of("sites", id=None),  # the first page
        read_of("sites", id="gt.3"),  # the next: the rows after the last one read
        read_of("gsc_accounts", id=None),
        read_of("gsc_accounts", id="gt.3"),
        lambda r: r.path == "/rest/v1/rpc/schema_missing",  # the schema check before any fetch
        lambda r: r.path == "/rest/v1/rpc/site_sources_known",  # a function's answer
    ]
    for match, error in zip(reads, errors):
        gateway.inject(match, **error)
    for site, error in zip(sites, errors):
        gateway.inject(upsert_of(site), **error)
    config["UPSERT_CHUNK_SIZE"] = "3"  # one chunk per site: its three days

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.summary == (
        "Processed 6 sites. Fetched Matomo data for 6. Fetched GSC data for 0. Stored 18 records."
    )
    assert [row["matomo_visits"] for row in stored(db).values()] == [1, 2, 3, 4, 5, 6]
    assert [n for n, fault in enumerate(gateway.faults) if fault.times] == [], "every error was met"


# ---------------------------------------------------------------------------
# A gateway that is not answering, or not Supabase
# ---------------------------------------------------------------------------


def test_a_rejected_supabase_key_stops_the_run(config, run_aggregator):
    config["SUPABASE_SERVICE_ROLE_KEY"] = "sb_secret_WRONGkey0000000"

    result = run_aggregator()

    assert result.returncode == 1
    assert lines_with("use the service_role key", result.stderr)


def test_the_gateways_invalid_api_key_names_the_key(gateway, config, run_aggregator):
    gateway.inject("/rest/v1/", status=401, body={"message": "Invalid API key"}, times=99)

    result = run_aggregator()

    assert result.returncode == 1
    assert lines_with("use the service_role key", result.stderr)
    assert gateway.count("/rest/v1/rpc/schema_missing") == 1  # a wrong key is not retried


def test_an_unreachable_supabase_stops_the_run(config, run_aggregator):
    config["SUPABASE_URL"] = "http://127.0.0.1:9"  # the discard port: nothing listens

    result = run_aggregator()

    assert result.returncode == 1
    assert lines_with("cannot reach Supabase while reading", result.stderr)
    assert "Traceback" not in result.output


def test_a_hung_supabase_ends_the_run_with_one_line(gateway, config, run_aggregator):
    gateway.inject("/rest/v1/sites", hang=True, times=99)
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="0")

    result = run_aggregator()

    assert result.returncode == 1
    assert lines_with("Supabase did not answer in time while reading sites", result.stderr)
    assert result.summary is not None


def test_a_trickling_supabase_ends_the_run_with_one_line(gateway, config, run_aggregator):
    gateway.inject("/rest/v1/sites", trickle=1.0, times=99)  # minutes for one answer
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="0")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 60
    assert result.returncode == 1
    assert lines_with("Supabase did not answer in time while reading sites", result.stderr)
    assert result.summary is not None


def test_a_supabase_url_that_answers_html_is_one_clear_error(matomo, config, run_aggregator):
    config["SUPABASE_URL"] = matomo.url  # answers 200 with an HTML page to everything

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert lines_with("SUPABASE_URL", result.stderr)


# ---------------------------------------------------------------------------
# The schema and its policies
# ---------------------------------------------------------------------------


def test_a_missing_unique_constraint_names_the_migration(
    fleet, db, gateway, without_conflict_key, run_aggregator
):
    fleet.visits(fleet.site("example.com"), 1)

    result = run_aggregator()

    assert result.returncode == 4
    line = lines_with("no unique or exclusion constraint", result.stderr)[0]
    assert "apply every file of supabase/migrations/" in line
    assert upserts(gateway) == 1


@pytest.mark.parametrize(
    "break_it, migration, named",
    [
        (
            "alter table gsc_accounts drop column service_account_key",
            "20261125000300_service_accounts.sql",
            "gsc_accounts.service_account_key",
        ),
        (
            "alter function analytics_holes rename to analytics_holes_gone",
            "20261201000000_coverage.sql",
            "analytics_holes()",
        ),
        (
            "alter function store_analytics rename to store_analytics_gone;"
            "alter function schema_missing rename to schema_missing_gone",
            "20261206000100_store_analytics.sql",
            "schema_missing()",
        ),
        (
            "alter function store_analytics rename to store_analytics_gone",
            "20261207000000_rows_as_arrays.sql",
            "store_analytics()",
        ),
    ],
    ids=["a column", "the heal plan's function", "the check itself", "rows as arrays"],
)
def test_a_database_missing_a_migration_object_stops_the_run_before_any_fetch(
    break_it, migration, named, fleet, db, matomo, google, run_aggregator
):
    fleet.visits(fleet.site("example.com", fleet.account()), 1)
    undo = {
        "gsc_accounts.service_account_key": (ROOT / "supabase/migrations" / migration).read_text(),
        "analytics_holes()": "alter function analytics_holes_gone rename to analytics_holes",
        "store_analytics()": "alter function store_analytics_gone rename to store_analytics",
        "schema_missing()": "alter function store_analytics_gone rename to store_analytics;"
        "alter function schema_missing_gone rename to schema_missing",
    }[named]
    db.execute(break_it)
    try:
        result = run_aggregator()
    finally:
        db.execute(undo)

    assert result.returncode == 4, result.stderr[-3000:]
    (line,) = lines_with("ERROR", result.stderr)
    assert named in line and f"apply every file of supabase/migrations/ from {migration} on" in line
    assert "A person must act: the database lacks" in result.stderr.splitlines()[-1]
    assert matomo.count() == 0 and google.count("searchAnalytics") == 0  # nothing fetched to be lost
    assert db.execute("select count(*) from daily_analytics").fetchone() == (0,)


def test_the_anon_key_reads_no_refresh_token(fleet, gateway):
    fleet.account()
    headers = {"apikey": ANON_KEY, "Authorization": f"Bearer {ANON_KEY}"}

    anonymous = requests.get(f"{gateway.url}/rest/v1/gsc_accounts?select=*", headers=headers, timeout=10)
    service = requests.get(
        f"{gateway.url}/rest/v1/gsc_accounts?select=id",
        headers={"apikey": SERVICE_KEY, "Authorization": f"Bearer {SERVICE_KEY}"},
        timeout=10,
    )

    assert anonymous.status_code == 200 and anonymous.json() == []
    assert len(service.json()) == 1


def test_the_anon_key_sees_no_site_and_both_run_and_check_say_why(fleet, config, run_aggregator):
    fleet.site("shop.example.com", fleet.account())
    config["SUPABASE_SERVICE_ROLE_KEY"] = ANON_KEY  # row level security shows it no row

    run, check = run_aggregator(), run_aggregator("check")

    assert run.returncode == 1 and "use the service_role key" in run.stderr
    assert check.returncode == 1
    problems = [line for line in check.stdout.splitlines() if line.startswith("Problem: ")]
    assert len(problems) == 1 and "service_role key" in problems[0]
    assert check.stdout.splitlines()[-1] == "1 problem."


def test_the_bootstrap_makes_a_service_role_another_project_made_bypass_row_level_security(database):
    # Roles belong to the whole server: another project's tests may have made service_role without
    # BYPASSRLS. One transaction, so that no test beside this one ever sees the role changed.
    with psycopg.connect(server_url(), autocommit=True) as admin, admin.transaction():
        admin.execute("select pg_advisory_xact_lock(7243011)")  # the bootstrap's own lock
        admin.execute("alter role service_role nobypassrls")
        admin.execute("alter role anon bypassrls")
        admin.execute(SUPABASE_ROLES)
        roles = admin.execute(
            "select rolname, rolbypassrls from pg_roles where rolname in ('anon', 'service_role') order by 1"
        ).fetchall()
        assert roles == [("anon", False), ("service_role", True)]


def test_an_existing_sites_table_keeps_its_rows_and_policies_and_gets_the_columns(database):

    name = f"aggregator_existing_{os.getpid()}"
    with psycopg.connect(server_url(), autocommit=True) as admin:
        admin.execute(f"drop database if exists {name} with (force)")
        admin.execute(f"create database {name}")
        try:
            with psycopg.connect(make_conninfo(server_url(), dbname=name), autocommit=True) as conn:
                conn.execute(SUPABASE_BOOTSTRAP)
                # the operator's own table: other columns, its own status values, no RLS
                conn.execute(
                    "create table public.sites (id bigint generated by default as identity primary key, "
                    "name text not null, status text)"
                )
                conn.execute("insert into public.sites (name, status) values ('Shop', 'live')")
                for migration in MIGRATIONS:
                    conn.execute(migration.read_text())
                columns = {
                    row[0]
                    for row in conn.execute(
                        "select column_name from information_schema.columns where table_name = 'sites'"
                    )
                }
                kept = conn.execute("select name, status, status_deployment from public.sites").fetchall()
                rls = conn.execute(
                    "select relrowsecurity from pg_class where oid = 'public.sites'::regclass"
                ).fetchone()
                key = conn.execute(
                    "select count(*) from pg_constraint where conrelid = 'public.sites'::regclass and contype = 'f'"
                ).fetchone()
        finally:
            admin.execute(f"drop database if exists {name} with (force)")

    assert {"domain", "status_deployment", "matomo_site_id", "gsc_account_id", "name", "status"} <= columns
    assert kept == [("Shop", "live", "pending")]
    assert rls == (False,) and key == (1,)

"""Faults injected into the stand-ins: every one ends with nothing lost, the right exit status,
a log line that says what to do, and (checked by the runner for every run) no secret printed.
The README's table "Fault -> what happens" lists these scenarios one to one."""

from __future__ import annotations

import datetime as dt
import signal
import time

import pytest
import requests

from conftest import ANON_KEY, DAY, ROOT, SERVICE_KEY, TODAY, lines_with, query_of, stored
from fakes.google import RATE_LIMIT_BODY

HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


def upsert_with(site_id):
    """Matches an upsert request whose rows include this site."""
    return lambda r: (
        r.path == "/rest/v1/daily_analytics" and any(row["site_id"] == site_id for row in r.json())
    )


# ---------------------------------------------------------------------------
# Search Console and Google's token endpoint
# ---------------------------------------------------------------------------


def test_gsc_429_bursts_and_5xx_are_retried(fleet, db, google, config, run_aggregator):
    account = fleet.account()
    busy, flaky = fleet.site("busy.example.com", account), fleet.site("flaky.example.com", account)
    fleet.search(busy, 4, 40)
    fleet.search(flaky, 5, 50)
    google.inject(query_of(busy), status=429, body=RATE_LIMIT_BODY, times=2)
    google.inject(query_of(flaky), status=503, body=HTML_502, content_type="text/html", times=1)
    google.inject(lambda r: r.path == "/webmasters/v3/sites", status=500, times=1)
    config["HTTP_RETRIES"] = "2"

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    rows = stored(db)
    assert (rows[busy.id]["gsc_clicks"], rows[flaky.id]["gsc_clicks"]) == (4, 5)
    assert google.count(query_of(busy)) == 3


def test_a_property_that_keeps_failing_costs_only_its_gsc_value(fleet, db, google, config, run_aggregator):
    account = fleet.account()
    broken, fine = fleet.site("broken.example.com", account), fleet.site("fine.example.com", account)
    fleet.store(broken, gsc_clicks=8, gsc_impressions=80, gsc_ctr=0.1, gsc_position=2.0)
    fleet.visits(broken, 12)
    fleet.search(fine, 1, 10)
    google.inject(query_of(broken), status=503, times=99)
    config["HTTP_RETRIES"] = "1"

    result = run_aggregator()

    assert result.returncode == 3
    assert result.summary.endswith("Fetched GSC data for 1. Stored 6 records.")  # 2 sites x 3 days
    assert stored(db)[broken.id] == dict(
        matomo_visits=12, gsc_clicks=8, gsc_impressions=80, gsc_ctr=0.1, gsc_position=2.0
    )
    assert lines_with("GSC sc-domain:broken.example.com: HTTP 503", result.stderr)


def test_a_token_endpoint_5xx_is_retried_by_google_auth(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.search(site, 3, 30)
    google.inject("/token", status=503, body={"error": "backendError"}, times=1)

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert stored(db)[site.id]["gsc_clicks"] == 3


def test_a_token_endpoint_that_stays_down_costs_that_accounts_gsc_values(fleet, db, google, run_aggregator):
    account = fleet.account()
    site = fleet.site("example.com", account)
    fleet.store(site, gsc_clicks=6, gsc_impressions=60)
    fleet.visits(site, 2)
    google.inject("/token", status=500, body={"error": "internal_failure"}, times=99)

    result = run_aggregator()

    assert result.returncode == 3
    row = stored(db)[site.id]
    assert (row["matomo_visits"], row["gsc_clicks"], row["gsc_impressions"]) == (2, 6, 60)
    assert lines_with(f"GSC account {account.id}: the Google token endpoint failed", result.stderr)


# ---------------------------------------------------------------------------
# Matomo
# ---------------------------------------------------------------------------


def test_an_html_page_says_matomo_url_is_probably_wrong(fleet, db, matomo, config, run_aggregator):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(3)]
    fleet.store(sites[0], matomo_visits=40)
    fleet.search(sites[0], 2, 20)
    config.update(MATOMO_URL=matomo.url + "/not-matomo/", MATOMO_BULK_SIZE="1", MATOMO_WORKERS="1")

    result = run_aggregator()

    assert result.returncode == 4
    assert (
        result.summary
        == "Processed 3 sites. Fetched Matomo data for 0. Fetched GSC data for 3. Stored 7 records."
    )  # 3 sites x 2 final days, and the provisional DAY of the one site with search traffic
    assert (stored(db)[sites[0].id]["matomo_visits"], stored(db)[sites[0].id]["gsc_clicks"]) == (40, 2)
    assert len(lines_with("MATOMO_URL is probably wrong", result.stderr)) == 1  # and the verdict again
    # the first chunk and the API.getMatomoVersion probe, twice (a wrong URL needs proof); the other
    # chunks would fail the same way
    assert matomo.count() == 3


def test_a_rejected_matomo_token_is_one_clear_line(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(5)]
    fleet.store(sites[0], matomo_visits=40)
    matomo.token = "another-token"
    config["MATOMO_BULK_SIZE"] = "2"

    result = run_aggregator(log_level="INFO")

    assert result.returncode == 4
    assert (
        result.summary
        == "Processed 5 sites. Fetched Matomo data for 0. Fetched GSC data for 0. Stored 0 records."
    )
    assert stored(db)[sites[0].id]["matomo_visits"] == 40
    warnings = [
        line
        for line in result.stderr.splitlines()
        if (" WARNING " in line or " ERROR " in line) and " Exit status " not in line  # the verdict
    ]
    assert len(warnings) == 1 and "Matomo rejected MATOMO_TOKEN_AUTH" in warnings[0]


def test_a_5xx_on_a_matomo_chunk_is_retried(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(4)]
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1)
    matomo.inject("/index.php", status=503, body=HTML_502, content_type="text/html", times=2)
    config["MATOMO_BULK_SIZE"] = "2"

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert [row["matomo_visits"] for row in stored(db).values()] == [1, 2, 3, 4]


def test_a_matomo_request_that_keeps_failing_costs_only_the_site_that_fails_it(
    fleet, db, matomo, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(4)]
    for site in sites:
        fleet.store(site, matomo_visits=99)
        fleet.visits(site, 5)
    third_site = f"idSite%3D{sites[2].matomo_id}%26".encode()
    matomo.inject(lambda r: third_site in r.body, status=502, body={"error": "bad gateway"}, times=99)
    config.update(MATOMO_BULK_SIZE="2", HTTP_RETRIES="1")

    result = run_aggregator()

    assert result.returncode == 3
    assert [row["matomo_visits"] for row in stored(db).values()] == [5, 5, 99, 5]
    assert lines_with(
        f"Matomo site id {sites[2].matomo_id}: Matomo answered HTTP 502 (retried 1 times)", result.stderr
    )


def test_a_malformed_matomo_answer_costs_only_that_chunk(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(2)]
    fleet.store(sites[0], matomo_visits=30)
    fleet.visits(sites[1], 8)
    first_site = f"idSite%3D{sites[0].matomo_id}%26".encode()
    matomo.inject(lambda r: first_site in r.body, status=200, body='[{"nb_visits": 3, "nb_act', times=1)
    config["MATOMO_BULK_SIZE"] = "1"

    result = run_aggregator()

    assert result.returncode == 3
    assert [row["matomo_visits"] for row in stored(db).values()] == [30, 8]
    assert lines_with("Matomo answered HTTP 200 with malformed JSON", result.stderr)


def test_the_matomo_token_travels_only_in_the_post_body(fleet, matomo, run_aggregator):
    fleet.visits(fleet.site("example.com"), 1)

    assert run_aggregator().returncode == 0
    assert matomo.requests  # the report, and the raw log's look at the zero days
    for request in matomo.requests:
        assert request.method == "POST" and request.form["token_auth"] == matomo.token
        assert "token_auth" not in request.query
        assert request.query == {"module": "API", "method": "API.getBulkRequest", "format": "json"}


# ---------------------------------------------------------------------------
# Supabase / PostgREST
# ---------------------------------------------------------------------------


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


def test_a_missing_unique_constraint_names_the_migration(
    fleet, db, gateway, without_conflict_key, run_aggregator
):
    fleet.visits(fleet.site("example.com"), 1)

    result = run_aggregator()

    assert result.returncode == 4
    line = lines_with("no unique or exclusion constraint", result.stderr)[0]
    assert "apply every file of supabase/migrations/" in line
    assert gateway.count(lambda r: r.method == "POST" and r.path == "/rest/v1/daily_analytics") == 1


def test_a_database_without_the_newest_migration_names_the_migrations(fleet, db, run_aggregator):
    fleet.visits(fleet.site("example.com", fleet.account()), 1)
    db.execute("alter table gsc_accounts drop column service_account_key")  # the code is newer
    try:
        result = run_aggregator()
    finally:
        db.execute((ROOT / "supabase/migrations/20261125000300_service_accounts.sql").read_text())

    assert result.returncode == 1
    (line,) = lines_with("ERROR", result.stderr)
    assert "service_account_key" in line and "apply every file of supabase/migrations/, in order" in line
    assert db.execute("select count(*) from daily_analytics").fetchone() == (0,)


def test_a_rejected_supabase_key_stops_the_run(config, run_aggregator):
    config["SUPABASE_SERVICE_ROLE_KEY"] = "sb_secret_WRONGkey0000000"

    result = run_aggregator()

    assert result.returncode == 1
    assert lines_with("use the service_role key", result.stderr)


def test_an_unreachable_supabase_stops_the_run(config, run_aggregator):
    config["SUPABASE_URL"] = "http://127.0.0.1:9"  # the discard port: nothing listens

    result = run_aggregator()

    assert result.returncode == 1
    assert lines_with("cannot reach Supabase while reading", result.stderr)
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------
# Servers that accept the connection and never answer
# ---------------------------------------------------------------------------


def test_a_hung_matomo_times_out_and_the_rest_is_stored(fleet, db, matomo, config, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, matomo_visits=21)
    fleet.search(site, 2, 20)
    matomo.inject("/index.php", hang=True, times=99)
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="1")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 30
    assert result.returncode == 3
    assert result.summary.endswith("Fetched Matomo data for 0. Fetched GSC data for 1. Stored 3 records.")
    assert (stored(db)[site.id]["matomo_visits"], stored(db)[site.id]["gsc_clicks"]) == (21, 2)


def test_a_hung_search_console_ends_at_the_run_deadline(fleet, db, google, config, run_aggregator):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(6)]
    for site in sites:
        fleet.visits(site, 3)
    google.inject("/searchAnalytics/query", hang=True, times=99)
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="0", RUN_DEADLINE="2", GSC_ACCOUNT_WORKERS="1")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 30
    assert result.returncode == 3
    assert (
        result.summary
        == "Processed 6 sites. Fetched Matomo data for 6. Fetched GSC data for 0. Stored 18 records."
    )
    assert lines_with("RUN_DEADLINE reached", result.stderr)
    assert google.count("/searchAnalytics/query") < 6


def test_a_hung_supabase_ends_the_run_with_one_line(gateway, config, run_aggregator):
    gateway.inject("/rest/v1/sites", hang=True, times=99)
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="0")

    result = run_aggregator()

    assert result.returncode == 1
    assert lines_with("Supabase did not answer in time while reading sites", result.stderr)
    assert result.summary is not None


def test_a_hung_token_endpoint_costs_only_that_accounts_gsc(fleet, db, google, config, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.visits(site, 4)
    google.inject("/token", hang=True, times=99)
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="0")

    result = run_aggregator()

    assert result.returncode == 3
    assert stored(db)[site.id]["matomo_visits"] == 4


# ---------------------------------------------------------------------------
# Killed and overlapping runs
# ---------------------------------------------------------------------------


def expected_rows(fleet, sites):
    return {
        site.id: dict(
            matomo_visits=n,
            gsc_clicks=n % 7,
            gsc_impressions=10 * n,
            gsc_ctr=(n % 7) / (10 * n),
            gsc_position=7.5,
        )
        for n, site in enumerate(sites, start=1)
    }


def seeded(fleet, count):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(count)]
    for n, site in enumerate(sites, start=1):
        fleet.visits(site, n)
        fleet.search(site, n % 7, 10 * n)
    return sites


def test_a_killed_run_then_a_normal_run_leaves_the_table_as_one_clean_run(
    fleet, db, gateway, config, launch, run_aggregator
):
    sites = seeded(fleet, 30)
    config["UPSERT_CHUNK_SIZE"] = "3"
    gateway.latency = 0.2
    process = launch()
    deadline = time.monotonic() + 60
    while (
        db.execute("select count(*) from daily_analytics").fetchone()[0] == 0 and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert 0 < db.execute("select count(*) from daily_analytics").fetchone()[0] < 30 * 3
    gateway.latency = 0

    result = run_aggregator()

    assert result.returncode == 0
    assert stored(db) == expected_rows(fleet, sites)


def test_two_overlapping_runs_leave_the_table_correct(fleet, db, gateway, launch):
    sites = seeded(fleet, 20)
    gateway.latency = 0.02

    first, second = launch(), launch()
    outputs = [first.communicate(timeout=120), second.communicate(timeout=120)]

    assert (first.returncode, second.returncode) == (0, 0), outputs
    assert stored(db) == expected_rows(fleet, sites)


# ---------------------------------------------------------------------------
# Bad rows in `sites`
# ---------------------------------------------------------------------------


@pytest.fixture
def loose_sites_schema(db):
    """An operator's own `sites` table: matomo_site_id as text and no foreign key to accounts."""
    db.execute("alter table sites drop constraint sites_gsc_account_id_fkey")
    db.execute("alter table sites alter column matomo_site_id type text")
    yield
    db.execute("truncate daily_analytics, sites, gsc_accounts restart identity cascade")
    db.execute("alter table sites alter column matomo_site_id type integer using matomo_site_id::integer")
    db.execute(
        "alter table sites add constraint sites_gsc_account_id_fkey foreign key (gsc_account_id) "
        "references gsc_accounts (id) on delete set null"
    )


def test_bad_rows_are_skipped_for_their_source_with_one_warning_each(
    fleet, db, matomo, google, loose_sites_schema, run_aggregator
):
    account = fleet.account()
    properties = google.accounts[account.refresh_token].properties
    properties.update(
        {
            "sc-domain:example.com": "siteOwner",
            "https://www.shop.example.org/": "siteFullUser",
            "sc-domain:dot.example.net": "siteOwner",
        }
    )
    google.search[("sc-domain:example.com", DAY.isoformat())] = (5, 50, 0.1, 3.0)
    matomo.site_ids.update({1, 2, 3, 4, 5, 6})
    matomo.visits[(1, DAY.isoformat())] = 11
    rows = [  # domain, matomo_site_id, gsc_account_id
        ("HTTPS://WWW.Example.COM/", "1", account.id),  # normalised: matches sc-domain:example.com
        ("shop.example.org", " 2 ", account.id),  # matches the https://www. URL-prefix property
        ("dot.example.net.", "3", account.id),  # trailing dot
        (None, "4", account.id),  # no domain: Matomo only
        ("", "5", account.id),  # empty domain: Matomo only
        ("example.com/blog", "6", account.id),  # a path is not a domain: Matomo only
        ("fine.example.com", "abc", None),  # non-numeric Matomo id
        ("lost.example.com", None, 999),  # an account that does not exist
    ]
    ids = [
        db.execute(
            "insert into sites (domain, status_deployment, matomo_site_id, gsc_account_id) "
            "values (%s, 'deployed', %s, %s) returning id",
            row,
        ).fetchone()[0]
        for row in rows
    ]

    result = run_aggregator()

    assert result.returncode == 4
    assert (
        result.summary
        == "Processed 8 sites. Fetched Matomo data for 6. Fetched GSC data for 3. Stored 18 records."
    )
    table = stored(db)
    assert sorted(table) == ids[:6]
    assert (table[ids[0]]["matomo_visits"], table[ids[0]]["gsc_clicks"]) == (11, 5)
    assert (table[ids[1]]["gsc_clicks"], table[ids[2]]["gsc_clicks"]) == (None, None)  # DAY: provisional
    yesterday_but_one = stored(db, DAY - dt.timedelta(days=1))
    assert (yesterday_but_one[ids[1]]["gsc_clicks"], yesterday_but_one[ids[2]]["gsc_clicks"]) == (0, 0)
    for site_id, text in [(ids[3], "None"), (ids[4], "''"), (ids[5], "'example.com/blog'")]:
        assert len(lines_with(f"Site {site_id}: domain {text} is not a bare domain", result.stderr)) == 1
    assert (
        len(
            lines_with(
                f"Site {ids[6]} (fine.example.com): matomo_site_id 'abc' is not a positive number",
                result.stderr,
            )
        )
        == 1
    )
    assert (
        len(lines_with(f"Site {ids[7]} (lost.example.com): gsc_account_id 999 matches no row", result.stderr))
        == 1
    )


# ---------------------------------------------------------------------------
# Secrets and input
# ---------------------------------------------------------------------------


def test_an_env_file_readable_by_others_is_warned_about(fleet, tmp_path, run_aggregator):
    fleet.site("example.com")

    result = run_aggregator(env_mode=0o644)

    assert result.returncode == 0, result.stderr[-3000:]
    assert lines_with(f"{tmp_path / '.env'} is readable by other users; run: chmod 600", result.stderr)


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


def test_a_date_older_than_search_console_keeps_still_fetches_matomo(fleet, db, google, run_aggregator):
    old = TODAY - dt.timedelta(days=500)
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, day=old, gsc_clicks=17, gsc_impressions=170)
    fleet.visits(site, 6, day=old)

    result = run_aggregator("--date", old.isoformat())

    assert result.returncode == 0
    assert lines_with("older than Search Console keeps", result.stderr)
    assert google.count("/searchAnalytics/query") == 0
    row = stored(db, old)[site.id]
    assert (row["matomo_visits"], row["gsc_clicks"], row["gsc_impressions"]) == (6, 17, 170)

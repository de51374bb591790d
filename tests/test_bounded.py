"""Every run ends, in bounded time, stores what it fetched and counts it truly; one site or
account never sinks the run; bad configuration is one line without a secret; the fleet's odd
data. Each test makes a stand-in misbehave the way real networks and servers do."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time

import pytest

from conftest import DAY, SERVICE_KEY, SUMMARY, lines_with, query_of, stored

# ---------------------------------------------------------------------------
# A server that answers one byte at a time
# ---------------------------------------------------------------------------


def test_a_trickling_matomo_is_cut_off_by_the_wall_clock(fleet, db, matomo, config, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, matomo_visits=21)
    fleet.search(site, 2, 20)
    matomo.inject("/index.php", trickle=0.2, times=99)  # a 300-byte answer takes a minute
    config.update(HTTP_TIMEOUT="1")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 8
    assert result.returncode == 3
    assert (stored(db)[site.id]["matomo_visits"], stored(db)[site.id]["gsc_clicks"]) == (21, 2)


def test_a_trickling_search_console_is_cut_off_by_the_wall_clock(fleet, db, google, config, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, gsc_clicks=4, gsc_impressions=40)
    fleet.visits(site, 3)
    google.inject("/searchAnalytics/query", trickle=0.2, times=99)
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="1")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 10
    assert result.returncode == 3
    assert (stored(db)[site.id]["matomo_visits"], stored(db)[site.id]["gsc_clicks"]) == (3, 4)


def test_a_trickling_supabase_ends_the_run_with_one_line(gateway, config, run_aggregator):
    gateway.inject("/rest/v1/sites", trickle=0.2, times=99)
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="0")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert lines_with("Supabase did not answer in time while reading sites", result.stderr)
    assert result.summary is not None


# ---------------------------------------------------------------------------
# Whatever ends a run, its counts are true
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_fetching_stores_what_was_fetched_and_counts_it_truly(
    signum, status, fleet, db, matomo, launch
):
    sites = fleet.many(300, [fleet.account()])
    db.execute("update sites set gsc_account_id = null")  # Matomo only: three slices of 100 sites
    for site in sites:
        fleet.visits(site, 1)
    matomo.latency = 0.4
    start = (DAY - dt.timedelta(days=99)).isoformat()
    process = launch("--from", start, "--to", DAY.isoformat(), "--json", log_level="INFO")

    deadline = time.monotonic() + 60
    while db.execute("select count(*) from daily_analytics").fetchone()[0] == 0:
        assert time.monotonic() < deadline and process.poll() is None, "the first slice was never stored"
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == status, stderr[-3000:]
    in_table = db.execute("select count(*) from daily_analytics").fetchone()[0]
    assert 0 < in_table < 30000
    summary = SUMMARY.findall(stderr)[-1]
    assert summary.endswith(f"Stored {in_table} records.")
    assert json.loads(stdout)["records"]["stored"] == in_table
    recorded = db.execute("select records_stored, exit_status from aggregator_runs").fetchall()
    assert recorded == [(in_table, status)]
    assert lines_with(signal.Signals(signum).name, stderr)


def test_sigterm_mid_backfill_stores_exactly_what_both_sources_gave_and_counts_it(
    fleet, db, matomo, google, launch, config
):
    sites = fleet.many(40, [fleet.account(), fleet.account()])
    matomo.visits_fn = lambda site, day: 3 if site <= sites[-1].matomo_id else None
    google.search_fn = lambda site_url, day: (2, 20, 0.1, 4.5)
    matomo.latency, google.latency = 0.3, 0.5
    config["MATOMO_BULK_SIZE"] = "2"  # 20 Matomo requests, 3 at a time: about 2 s
    start = (DAY - dt.timedelta(days=199)).isoformat()
    process = launch("--from", start, "--to", DAY.isoformat(), log_level="INFO")

    deadline = time.monotonic() + 60
    while db.execute("select count(*) from daily_analytics").fetchone()[0] == 0:
        assert time.monotonic() < deadline and process.poll() is None, "nothing was ever stored"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 143, stderr[-3000:]
    rows, matomo_sites, gsc_sites = db.execute(
        "select count(*), count(distinct site_id) filter (where matomo_visits is not null), "
        "count(distinct site_id) filter (where gsc_clicks is not null) from daily_analytics"
    ).fetchone()
    assert 0 < matomo_sites < 40
    # Every site a source answered for has all its days stored; the summary counts the table.
    assert db.execute(
        "select count(*) from daily_analytics where matomo_visits is null and gsc_clicks is null"
    ).fetchone() == (0,)
    assert db.execute("select count(matomo_visits) from daily_analytics").fetchone() == (matomo_sites * 200,)
    assert db.execute("select count(gsc_clicks) from daily_analytics").fetchone() == (gsc_sites * 200,)
    assert SUMMARY.findall(stderr)[-1] == (
        f"Processed 40 sites. Fetched Matomo data for {matomo_sites}. Fetched GSC data for {gsc_sites}. "
        f"Stored {rows} records."
    )


# ---------------------------------------------------------------------------
# One site or account never sinks the run
# ---------------------------------------------------------------------------


def test_a_search_console_answer_cut_off_mid_body_costs_only_that_site(
    fleet, db, google, config, run_aggregator
):
    account = fleet.account()
    cut, fine = fleet.site("cut.example.com", account), fleet.site("fine.example.com", account)
    fleet.store(cut, gsc_clicks=6, gsc_impressions=60)
    fleet.search(cut, 1, 10)
    fleet.search(fine, 2, 20)
    google.inject(query_of(cut), cut=20, times=99)  # http.client.IncompleteRead
    config["HTTP_RETRIES"] = "1"

    result = run_aggregator()

    assert result.returncode == 3
    assert result.summary.startswith("Processed 2 sites. Fetched Matomo data for 2. Fetched GSC data for 1.")
    assert (stored(db)[cut.id]["gsc_clicks"], stored(db)[fine.id]["gsc_clicks"]) == (6, 2)
    assert len(lines_with("cut.example.com", result.stderr.replace("DEBUG", "\n"))) >= 1
    assert "Traceback" not in result.stderr


def test_a_connection_dropped_during_a_token_refresh_mid_run_costs_only_that_accounts_sites(
    fleet, db, google, config, run_aggregator
):
    first, second = fleet.account(), fleet.account()
    sites = [fleet.site(f"s{n}.example.com", first if n % 2 else second) for n in range(6)]
    for n, site in enumerate(sites):
        fleet.search(site, n + 1, 10, day=DAY - dt.timedelta(days=1))
    google.token_lifetime = 0.3  # every account refreshes again mid-run
    google.latency = 0.15
    refreshes = iter(range(1000))
    google.inject(lambda r: r.path == "/token" and next(refreshes) >= 2, drop=True, times=99)
    config.update(GSC_ACCOUNT_WORKERS="1", HTTP_RETRIES="0")

    result = run_aggregator()

    assert result.returncode == 3, result.stderr[-3000:]
    assert result.summary.startswith("Processed 6 sites. Fetched Matomo data for 6.")
    assert len(stored(db)) == 6  # Matomo stored for all, GSC for what came before the drop
    assert "Traceback" not in result.stderr


def test_a_property_listing_entry_without_site_url_does_not_cost_the_account(
    fleet, db, google, run_aggregator
):
    site = fleet.site("example.com", fleet.account())
    fleet.search(site, 3, 30, day=DAY - dt.timedelta(days=1))
    google.odd_entries = [{"permissionLevel": "siteOwner"}]

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert stored(db, DAY - dt.timedelta(days=1))[site.id]["gsc_clicks"] == 3


def test_a_429_html_page_from_one_matomo_request_is_not_a_wrong_url(
    fleet, db, matomo, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(4)]
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1)
    page = "<html><head><title>429 Too Many Requests</title></head><body>nginx</body></html>"
    matomo.inject("/index.php", status=429, body=page, content_type="text/html", times=2)
    config["HTTP_RETRIES"] = "1"

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["matomo_visits"] for row in stored(db).values()] == [1, 2, 3, 4]
    assert not lines_with("MATOMO_URL", result.stderr)


def test_a_retry_after_of_an_hour_is_capped(fleet, db, matomo, config, run_aggregator):
    site = fleet.site("example.com")
    fleet.visits(site, 5)
    matomo.inject("/index.php", status=503, body={"error": "busy"}, headers={"Retry-After": "3600"}, times=1)
    config["HTTP_TIMEOUT"] = "2"

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 15
    assert result.returncode == 0, result.stderr[-3000:]
    assert stored(db)[site.id]["matomo_visits"] == 5


def test_pacing_to_the_quota_ends_at_the_run_deadline(fleet, db, google, config, run_aggregator):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(3)]
    for site in sites:
        fleet.visits(site, 2)
    config.update(GSC_QPM="1", RUN_DEADLINE="3")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 20
    assert result.returncode == 3
    assert [row["matomo_visits"] for row in stored(db).values()] == [2, 2, 2]


def test_an_upsert_chunk_refused_for_one_row_loses_only_that_row(fleet, db, gateway, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(5)]
    for site in sites:
        fleet.visits(site, 7)
    doomed = sites[2]

    def delete_the_site_before_the_first_upsert(request) -> None:
        if request.method == "POST" and request.path == "/rest/v1/daily_analytics":
            db.execute("delete from sites where id = %s", [doomed.id])
            gateway.before = None

    gateway.before = delete_the_site_before_the_first_upsert

    result = run_aggregator()

    assert result.returncode == 3
    assert sorted(stored(db)) == [s.id for s in sites if s is not doomed]
    assert result.summary.endswith("Stored 12 records.")
    assert lines_with("3 records were not stored", result.stderr)


# ---------------------------------------------------------------------------
# Supabase that is not Supabase; bad configuration
# ---------------------------------------------------------------------------


def test_a_supabase_url_that_answers_html_is_one_clear_error(matomo, config, run_aggregator):
    config["SUPABASE_URL"] = matomo.url  # answers 200 with an HTML page to everything

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert lines_with("SUPABASE_URL", result.stderr)


def test_a_configuration_error_never_echoes_a_value(config, run_aggregator):
    config["SUPABASE_URL"], config["SUPABASE_SERVICE_ROLE_KEY"] = (
        config["SUPABASE_SERVICE_ROLE_KEY"],
        config["SUPABASE_URL"],
    )
    config["HTTP_TIMEOUT"] = "²"

    result = run_aggregator("--json")

    assert result.returncode == 1
    assert SERVICE_KEY not in result.output  # the runner checks every secret; this one first
    assert lines_with("SUPABASE_URL must be an http(s) URL", result.stderr)
    assert lines_with("HTTP_TIMEOUT must be a whole number", result.stderr)
    assert "Traceback" not in result.stderr


def test_an_env_file_that_is_not_utf8_is_one_line(tmp_path, config, run_aggregator):
    env_file = tmp_path / "latin1.env"
    env_file.write_bytes("".join(f"{k}={v}\n" for k, v in config.items()).encode() + b"# caf\xe9\n")
    env_file.chmod(0o600)

    result = run_aggregator("--env-file", str(env_file))

    assert result.returncode == 1
    assert lines_with("UTF-8", result.stderr)
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# Data the fleet really has
# ---------------------------------------------------------------------------


def test_two_sites_with_one_domain_do_not_both_get_its_search_numbers(fleet, db, google, run_aggregator):
    account = fleet.account()
    first = fleet.site("example.com", account)
    second = fleet.site("www.example.com", account, prop=None)  # the same domain, once normalised
    fleet.search(first, 4, 40, day=DAY - dt.timedelta(days=1))

    result = run_aggregator()

    yesterday_but_one = stored(db, DAY - dt.timedelta(days=1))
    assert yesterday_but_one[first.id]["gsc_clicks"] == 4
    assert yesterday_but_one[second.id]["gsc_clicks"] is None
    assert result.returncode == 4  # a person must set the duplicate's status
    (line,) = lines_with(f"Site {second.id} (www.example.com):", result.stderr)
    assert f"site {first.id}" in line and "example.com" in line
    (verdict,) = lines_with("Exit status 4", result.stderr, verdict=True)
    assert "set status_deployment of the duplicate" in verdict


def test_a_unicode_domain_matches_its_punycode_property_and_back(fleet, db, google, run_aggregator):
    account = fleet.account()
    umlaut = fleet.site("bücher.de", account, prop="sc-domain:xn--bcher-kva.de")
    puny = fleet.site("xn--mnchen-3ya.de", account, prop="sc-domain:münchen.de")
    fleet.search(umlaut, 5, 50, day=DAY - dt.timedelta(days=1))
    fleet.search(puny, 6, 60, day=DAY - dt.timedelta(days=1))

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    yesterday_but_one = stored(db, DAY - dt.timedelta(days=1))
    assert (yesterday_but_one[umlaut.id]["gsc_clicks"], yesterday_but_one[puny.id]["gsc_clicks"]) == (5, 6)

"""Every run ends, in bounded time, stores what it fetched and counts it truly; one site or
account never sinks the run; bad configuration is one line without a secret; the fleet's odd
data. Each test makes a stand-in misbehave the way real networks and servers do."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time

import pytest

from conftest import DAY, SUMMARY, stored


def lines_with(text: str, output: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


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
    config.update(HTTP_TIMEOUT="1")

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

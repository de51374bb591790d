"""Matomo as unkind as a real install: a few seconds of a proxy's 5xx, a whole install down for
every request alike, a proxy that gives up while PHP goes on working, Matomo 5.8's bulk request
limit, and one site's long range too heavy for one request."""

from __future__ import annotations

import datetime as dt

import pytest

from conftest import DAY, lines_with, stored
from fakes.base import Response
from fakes.matomo import BAD_GATEWAY_PAGE, FATAL_PAGE, MYSQL_DOWN_MESSAGE


def visited(fleet, sites, day: dt.date = DAY) -> None:
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1, day=day)


def visits_on(db, sites, day: dt.date = DAY) -> list:
    rows = stored(db, day)
    return [rows.get(site.id, {}).get("matomo_visits") for site in sites]


def test_a_few_seconds_of_a_proxys_502_lose_nothing_and_blame_no_url(
    fleet, db, matomo, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(30)]
    visited(fleet, sites)
    matomo.outage(4, Response(502, BAD_GATEWAY_PAGE, "text/html"))  # php-fpm restarting
    config["HTTP_RETRIES"] = "1"

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert visits_on(db, sites) == list(range(1, 31))
    assert not lines_with("probably wrong", result.stderr)


@pytest.mark.parametrize(
    "answer",
    [
        Response(200, {"result": "error", "message": MYSQL_DOWN_MESSAGE}),
        Response(500, FATAL_PAGE.replace("TypeError", MYSQL_DOWN_MESSAGE), "text/html; charset=utf-8"),
    ],
    ids=["json-error", "html-500"],
)
def test_a_whole_install_down_is_one_error_and_a_few_requests(
    answer, fleet, db, matomo, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(250)]
    fleet.store(sites[0], matomo_visits=12)
    matomo.outage(None, answer)  # MySQL is down all night
    config.update(HTTP_RETRIES="0")

    result = run_aggregator()

    assert result.returncode == 3
    batches = 3  # 250 sites, MATOMO_BULK_SIZE 100
    assert matomo.count() <= 2 * batches + 4, matomo.count()
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or " WARNING " in line]
    matomo_errors = [line for line in errors if "Matomo" in line and "Exit status" not in line]
    assert len(matomo_errors) == 1, "\n".join(matomo_errors)
    assert "Connection refused" in matomo_errors[0] and "probably wrong" not in matomo_errors[0]
    assert visits_on(db, sites[:1]) == [12]
    assert result.summary.startswith("Processed 250 sites. Fetched Matomo data for 0.")


def test_a_proxys_504_asks_for_less_never_the_same_again(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(20)]
    visited(fleet, sites)
    matomo.site_day_cost, matomo.proxy_timeout = 0.02, 1.0  # 60 site-days take 1.2 s: 504

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert visits_on(db, sites) == list(range(1, 21))
    assert len(matomo.bodies) == len(set(matomo.bodies)), "a request was sent again as it was"
    assert matomo.site_days_worked <= 2 * 60


def test_matomos_bulk_request_limit_is_learned_once_for_the_run(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(250)]
    visited(fleet, sites)
    matomo.bulk_request_limit = 30  # Matomo 5.8+: API_bulk_request_limit = 30 in config.ini.php

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert visits_on(db, sites) == list(range(1, 251))
    assert matomo.counts["over limit"] <= 2


def test_one_sites_long_range_too_heavy_for_one_request_is_fetched_in_parts(
    fleet, db, matomo, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(2)]
    first, last = DAY - dt.timedelta(days=199), DAY
    for site in sites:
        fleet.visits(site, 3, day=first)
        fleet.visits(site, 4, day=last)
    matomo.site_day_cost, matomo.proxy_timeout = 0.008, 1.0  # 200 days of one site take 1.6 s: 504

    result = run_aggregator("--from", first.isoformat(), "--to", last.isoformat())

    assert result.returncode == 0, result.stderr[-3000:]
    assert db.execute("select count(*), sum(matomo_visits) from daily_analytics").fetchone() == (400, 14)
    assert len(matomo.bodies) == len(set(matomo.bodies)), "a request was sent again as it was"


def test_a_slow_batch_of_a_backfill_holds_up_neither_the_other_batches_nor_search_console(
    fleet, db, matomo, google, config, run_aggregator
):
    sites = fleet.many(60, [fleet.account(), fleet.account()])
    matomo.visits_fn = lambda site, day: 1 + site % 5 if site <= sites[-1].matomo_id else None
    google.search_fn = lambda site_url, day: (2, 20, 0.1, 4.5)
    first, last = DAY - dt.timedelta(days=364), DAY
    # 60 sites of a year, 3 to a Matomo request: 20 requests, 21,900 rows. One of them (not the
    # first, which goes alone) takes 3 s, as one busy PHP worker or a cold archive would.
    config["MATOMO_BULK_SIZE"] = "3"
    slow_site = sites[6].matomo_id
    matomo.inject(lambda r: f"idSite%3D{slow_site}%26" in r.body.decode(), status=200, delay=3.0)

    result = run_aggregator("--from", first.isoformat(), "--to", last.isoformat())

    assert result.returncode == 0, result.stderr[-3000:]
    assert db.execute(
        "select count(*), count(matomo_visits), count(gsc_clicks) from daily_analytics"
    ).fetchone() == (
        60 * 365,
        60 * 365,
        60 * 365,
    )
    slow = next(r for r in matomo.report_requests() if f"idSite%3D{slow_site}%26" in r.body.decode())
    during = [r for r in matomo.report_requests() if slow.received < r.received < slow.received + 3.0]
    queries = [r for r in google.requests if google.kind(r) == "query" and r.received < slow.received + 3.0]
    # In lockstep (slices of 27 sites, each waiting for its slowest request) at most 8 other
    # requests would overlap the slow one, and the queries of the later slices would wait for it.
    assert len(during) >= 15, f"{len(during)} Matomo requests went while the slow one was worked on"
    assert len(queries) == 60, f"{len(queries)} Search Console queries went before the slow one's answer"

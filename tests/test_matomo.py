"""Matomo as unkind as a real install: a proxy's 5xx, a whole install down for every request
alike, a proxy that gives up while PHP goes on working, a wrong URL or token, one site's PHP
error, PHP's and Matomo 5.8's limits, a slow batch, and days the archiver has not processed."""

from __future__ import annotations

import datetime as dt
import json
import time
from urllib.parse import parse_qsl

import pytest

from conftest import DAY, HTML_502, lines_with, stored
from fakes.base import Response
from fakes.matomo import BAD_GATEWAY_PAGE, FATAL_PAGE, MEMORY_EXHAUSTED_PAGE, MYSQL_DOWN_MESSAGE


def visited(fleet, sites, day: dt.date = DAY) -> None:
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1, day=day)


def visits_on(db, sites, day: dt.date = DAY) -> list:
    rows = stored(db, day)
    return [rows.get(site.id, {}).get("matomo_visits") for site in sites]


def matomo_sub_queries(matomo) -> list[dict[str, str]]:
    """Every VisitsSummary.get sub-query the stand-in received, decoded."""
    return [
        dict(parse_qsl(value))
        for request in matomo.report_requests()
        for name, value in request.form.items()
        if name.startswith("urls[")
    ]


# ---------------------------------------------------------------------------
# A proxy, an install down, a slow request
# ---------------------------------------------------------------------------


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
    matomo.outage(None, answer, version_answers=True)  # MySQL is down all night; PHP is not
    config.update(HTTP_RETRIES="0")

    result = run_aggregator()

    assert result.returncode == 3
    batches = 3  # 250 sites, MATOMO_BULK_SIZE 100
    assert matomo.count() <= 1 + 2 * batches + 4, matomo.count()  # and the ids the token may view
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or " WARNING " in line]
    matomo_errors = [line for line in errors if "Matomo" in line and "Exit status" not in line]
    assert len(matomo_errors) == 1, "\n".join(matomo_errors)
    assert "Connection refused" in matomo_errors[0] and "probably wrong" not in matomo_errors[0]
    assert visits_on(db, sites[:1]) == [12]
    assert result.summary.startswith("Processed 250 sites. Fetched Matomo data for 0.")


def test_a_5xx_on_a_matomo_chunk_is_retried(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(4)]
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1)
    matomo.inject("/index.php", status=503, body=HTML_502, content_type="text/html", times=2)
    config["MATOMO_BULK_SIZE"] = "2"

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert [row["matomo_visits"] for row in stored(db).values()] == [1, 2, 3, 4]


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

    assert time.monotonic() - started < 60  # far from the hour, with room for a busy machine
    assert result.returncode == 0, result.stderr[-3000:]
    assert stored(db)[site.id]["matomo_visits"] == 5


def test_a_proxys_504_asks_for_less_never_the_same_again(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(20)]
    visited(fleet, sites)
    matomo.site_day_cost, matomo.proxy_timeout = 0.02, 1.0  # 60 site-days take 1.2 s: 504

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert visits_on(db, sites) == list(range(1, 21))
    assert len(matomo.bodies) == len(set(matomo.bodies)), "a request was sent again as it was"
    assert matomo.site_days_worked <= 2 * 60


def test_a_bulk_request_too_slow_for_the_timeout_is_split(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(4)]
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1)
    matomo.site_day_cost = 0.1  # 4 sites x 10 days: 4 s in one request, 2 s for two sites
    config.update(HTTP_TIMEOUT="3")  # a second of room for a busy machine

    result = run_aggregator("--from", (DAY - dt.timedelta(days=9)).isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert [row["matomo_visits"] for row in stored(db).values()] == [1, 2, 3, 4]


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
    # first, which goes alone) takes 8 s, as one busy PHP worker or a cold archive would: long
    # enough that a loaded CI machine sends the others in it (3 s were not, once, on Python 3.9).
    config["MATOMO_BULK_SIZE"] = "3"
    slow_site, slow_for = sites[6].matomo_id, 8.0
    matomo.inject(lambda r: f"idSite%3D{slow_site}%26" in r.body.decode(), status=200, delay=slow_for)

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
    during = [r for r in matomo.report_requests() if slow.received < r.received < slow.received + slow_for]
    queries = [
        r for r in google.requests if google.kind(r) == "query" and r.received < slow.received + slow_for
    ]
    # In lockstep (slices of 27 sites, each waiting for its slowest request) at most 8 other
    # requests would overlap the slow one, and the queries of the later slices would wait for it.
    assert len(during) >= 15, f"{len(during)} Matomo requests went while the slow one was worked on"
    assert len(queries) == 60, f"{len(queries)} Search Console queries went before the slow one's answer"


def test_a_hung_matomo_times_out_and_the_rest_is_stored(fleet, db, matomo, config, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, matomo_visits=21)
    fleet.search(site, 2, 20)
    matomo.inject("/index.php", hang=True, times=99)
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="1")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 60  # never answers: any bound shows the timeout
    assert result.returncode == 3
    assert result.summary.endswith("Fetched Matomo data for 0. Fetched GSC data for 1. Stored 3 records.")
    assert (stored(db)[site.id]["matomo_visits"], stored(db)[site.id]["gsc_clicks"]) == (21, 2)


def test_a_matomo_answering_503_slowly_is_not_retried_past_the_run_deadline(
    fleet, matomo, config, run_aggregator
):
    for n in range(6):
        fleet.site(f"s{n}.example.com")
    # A proxy's 503 after a second and a half, every time: urllib3 retries a 503 (HTTP_RETRIES).
    bulk = lambda r: r.query.get("method") == "API.getBulkRequest"  # noqa: E731
    matomo.inject(bulk, status=503, body=HTML_502, content_type="text/html", delay=1.5, times=999)
    config.update(
        HTTP_TIMEOUT="2", HTTP_RETRIES="3", RUN_DEADLINE="2", MATOMO_BULK_SIZE="1", MATOMO_WORKERS="1"
    )

    started = time.monotonic()
    result = run_aggregator("--date", DAY.isoformat())

    assert time.monotonic() - started < 2 + 2 + 3  # 9.8 s when each request used its retries
    assert matomo.count(bulk) <= 2  # the first request's attempts: none after the deadline
    assert result.returncode == 3
    assert lines_with("RUN_DEADLINE reached: Matomo was not asked for", result.stderr)


def test_a_trickling_matomo_is_cut_off_by_the_wall_clock(fleet, db, matomo, config, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, matomo_visits=21)
    fleet.search(site, 2, 20)
    matomo.inject("/index.php", trickle=1.0, times=99)  # a 300-byte answer takes five minutes
    config.update(HTTP_TIMEOUT="1")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 60
    assert result.returncode == 3
    assert (stored(db)[site.id]["matomo_visits"], stored(db)[site.id]["gsc_clicks"]) == (21, 2)


# ---------------------------------------------------------------------------
# A wrong URL or token
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
    # the ids the token may view, the first chunk and the API.getMatomoVersion probe, twice (a wrong
    # URL needs proof); the other chunks would fail the same way
    assert matomo.count() == 4


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


def test_sites_matomo_does_not_know_are_a_persons_to_fix_and_never_asked(fleet, db, matomo, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(12)]
    for site in sites[:10]:  # deleted in Matomo, or the token's user lost its view access
        matomo.site_ids.discard(site.matomo_id)

    result = run_aggregator("--date", DAY.isoformat(), "--json")

    assert result.returncode == 4  # it was 3, with a re-run that could never fetch them
    asked = {site for body in matomo.bodies for site, _ in body}
    assert asked == {sites[10].matomo_id, sites[11].matomo_id}
    warnings = [
        line for line in lines_with("Matomo has no site with its", result.stderr) if " WARNING " in line
    ]
    assert len(warnings) == 1 and "and 5 more" in warnings[0], warnings  # it was one line a site
    needs = json.loads(result.stdout)["needs_a_person"]
    assert sorted(need["sites"][0] for need in needs) == sorted(site.id for site in sites[:10])
    assert all("correct sites.matomo_site_id" in need["fix"] for need in needs)


def test_a_matomo_id_two_sites_share_gives_its_numbers_to_one_and_a_person_decides(
    fleet, db, matomo, run_aggregator
):
    first, copy = fleet.site("shop.example.com"), fleet.site("shop-copy.example.com")
    fleet.visits(first, 7, day=DAY)
    db.execute("update sites set matomo_site_id = %s where id = %s", [first.matomo_id, copy.id])

    result = run_aggregator("--date", DAY.isoformat(), "--json")

    assert result.returncode == 4  # it was 0: both sites stored the same visits, counted twice
    assert {site: row["matomo_visits"] for site, row in stored(db).items()} == {first.id: 7}
    (need,) = json.loads(result.stdout)["needs_a_person"]
    assert need["sites"] == [copy.id] and f"site {first.id} has the same matomo_site_id" in need["problem"]
    assert "matomo_site_id" in need["fix"]


def test_a_matomo_id_that_is_no_number_is_a_persons_to_fix(fleet, db, matomo, run_aggregator):
    site = fleet.site("shop.example.com")
    db.execute("update sites set matomo_site_id = -5 where id = %s", [site.id])

    result = run_aggregator("--date", DAY.isoformat(), "--json")

    assert result.returncode == 4  # it was 3, with a re-run that could never fetch it
    (need,) = json.loads(result.stdout)["needs_a_person"]
    assert need["sites"] == [site.id] and "set sites.matomo_site_id" in need["fix"]
    assert matomo.report_requests() == []


def test_a_token_whose_user_may_view_no_site_is_one_fault(fleet, db, matomo, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(5)]
    matomo.site_ids.clear()  # a new token's user, never given access to any site

    result = run_aggregator("--date", DAY.isoformat(), "--json")

    assert result.returncode == 4
    assert matomo.report_requests() == []
    (need,) = json.loads(result.stdout)["needs_a_person"]
    assert "MATOMO_TOKEN_AUTH may view no site" in need["problem"]
    assert sorted(need["sites"]) == sorted(site.id for site in sites)


def test_many_sites_each_failing_with_the_same_php_error_are_one_warning(
    fleet, db, matomo, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(30)]
    visited(fleet, sites)
    matomo.fatal_sites.update(site.matomo_id for site in sites[::3])  # ten sites' archives are broken
    config["MATOMO_BULK_SIZE"] = "10"

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 3
    assert visits_on(db, sites) == [None if n % 3 == 0 else n + 1 for n in range(30)]
    warnings = [line for line in lines_with("no Matomo value", result.stderr) if " WARNING " in line]
    assert len(warnings) == 1 and "and 5 more" in warnings[0], warnings  # it was one line a site


def test_the_matomo_token_travels_only_in_the_post_body(fleet, matomo, run_aggregator):
    fleet.visits(fleet.site("example.com"), 1)

    assert run_aggregator().returncode == 0
    assert matomo.requests  # the report, and the raw log's look at the zero days
    for request in matomo.requests:
        assert request.method == "POST" and request.form["token_auth"] == matomo.token
        assert "token_auth" not in request.query
        assert request.query == {"module": "API", "method": request.query["method"], "format": "json"}
    assert {request.query["method"] for request in matomo.requests} == {
        "SitesManager.getSitesIdWithAtLeastViewAccess",  # the ids the token may view, once
        "API.getBulkRequest",
    }


# ---------------------------------------------------------------------------
# One site, PHP's limits, long ranges
# ---------------------------------------------------------------------------


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


def test_one_sites_php_error_costs_only_that_site(fleet, db, matomo, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(7)]
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1)
    fleet.store(sites[3], matomo_visits=99)
    matomo.fatal_sites.add(sites[3].matomo_id)  # its sub-request turns the bulk answer into a 500 page

    result = run_aggregator()

    assert result.returncode == 3
    assert [row["matomo_visits"] for row in stored(db).values()] == [1, 2, 3, 99, 5, 6, 7]
    assert result.summary.startswith("Processed 7 sites. Fetched Matomo data for 6.")
    assert len(lines_with(f"Matomo site id {sites[3].matomo_id}", result.stderr)) == 1
    assert not lines_with("MATOMO_URL", result.stderr)


def test_two_sites_php_errors_in_one_request_cost_only_those_two_sites(
    fleet, db, matomo, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(32)]
    visited(fleet, sites)
    fleet.store(sites[6], matomo_visits=99)
    bad = {sites[6].matomo_id, sites[12].matomo_id, sites[20].matomo_id}  # two in the first batch
    matomo.fatal_sites.update(bad)  # a request naming one of them: PHP's memory_limit, HTTP 500
    matomo.fatal_page = MEMORY_EXHAUSTED_PAGE
    config.update(MATOMO_BULK_SIZE="16", HTTP_RETRIES="0")

    result = run_aggregator()

    assert result.returncode == 3, result.stderr[-3000:]
    expected = [None if site.matomo_id in bad else n + 1 for n, site in enumerate(sites)]
    expected[6] = 99
    assert visits_on(db, sites) == expected
    assert result.summary.startswith("Processed 32 sites. Fetched Matomo data for 29.")
    assert not lines_with("fails every request alike", result.stderr)
    # the halving of the first batch, then of the second, each within 1 + 4 x log2(16) requests
    assert matomo.count() <= 2 * 17, matomo.count()


def test_slots_dropped_by_phps_max_input_vars_are_asked_for_again(fleet, db, matomo, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(8)]
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1)
    matomo.max_input_vars = 4  # token_auth and 3 urls[N]: the rest is silently dropped

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert [row["matomo_visits"] for row in stored(db).values()] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_matomos_bulk_request_limit_is_learned_once_for_the_run(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(250)]
    visited(fleet, sites)
    matomo.bulk_request_limit = 30  # Matomo 5.8+: API_bulk_request_limit = 30 in config.ini.php

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert visits_on(db, sites) == list(range(1, 251))
    assert matomo.counts["over limit"] <= 2


def test_every_number_matomo_answers_is_stored_from_the_same_request(fleet, db, matomo, run_aggregator):
    counted, uncounted = fleet.site("counted.example.com"), fleet.site("uncounted.example.com")
    fleet.visits(counted, 10)
    fleet.visits(uncounted, 4)
    fleet.store(uncounted, matomo_visits=3, matomo_unique_visitors=3, matomo_final=True)

    result = run_aggregator("--date", DAY.isoformat())
    first = matomo.report_requests()
    matomo.unique_visitors_off = True  # the install stops counting unique visitors
    again = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == again.returncode == 0, result.stderr[-3000:] + again.stderr[-3000:]
    assert len(first) == 1  # one bulk request, as for the visits alone
    columns = "matomo_visits, matomo_unique_visitors, matomo_actions, matomo_bounces, matomo_visit_seconds"
    rows = db.execute(f"select site_id, {columns} from daily_analytics order by site_id").fetchall()
    # the stand-in's summary: unique = visits, actions 3 x visits, bounces half, a minute a visit
    assert rows == [(counted.id, 10, 10, 30, 5, 600), (uncounted.id, 4, 4, 12, 2, 240)]
    fleet.visits(counted, 11)
    db.execute("update daily_analytics set matomo_unique_visitors = null where site_id = %s", [counted.id])
    assert run_aggregator("--date", DAY.isoformat()).returncode == 0
    rows = db.execute(f"select site_id, {columns} from daily_analytics order by site_id").fetchall()
    # an answer without the field: NULL where none was stored, never 0; a stored count kept
    assert rows == [(counted.id, 11, None, 33, 5, 660), (uncounted.id, 4, 4, 12, 2, 240)]


def test_a_year_long_backfill_keeps_each_bulk_request_small_and_asks_only_for_what_is_stored(
    fleet, db, matomo, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(12)]
    start = DAY - dt.timedelta(days=364)
    fleet.visits(sites[0], 3, day=start)

    result = run_aggregator("--from", start.isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert db.execute("select count(*), sum(matomo_visits) from daily_analytics").fetchone() == (12 * 365, 3)
    per_request = [
        sum(365 for name in request.form if name.startswith("urls[")) for request in matomo.report_requests()
    ]
    assert max(per_request) <= 3000 and len(per_request) == 2
    stored_fields = "nb_visits,nb_uniq_visitors,nb_actions,bounce_count,sum_visit_length"
    assert {sub.get("showColumns") for sub in matomo_sub_queries(matomo)} == {stored_fields}


def test_a_long_backfill_asks_matomo_in_full_requests_only(fleet, db, config, matomo, run_aggregator):
    # A year fits 8 sites in one bulk request (3,000 site-days). The fleet was sliced by
    # MATOMO_BULK_SIZE sites (here 10: slices of 20, each ending in a request of 4), which also
    # made a year's slices 3.65 times the rows they are meant to hold.
    config["MATOMO_BULK_SIZE"] = "10"
    for n in range(48):
        fleet.site(f"s{n}.example.com")
    start = DAY - dt.timedelta(days=364)

    result = run_aggregator("--from", start.isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert db.execute("select count(*) from daily_analytics").fetchone() == (48 * 365,)
    assert len(matomo.report_requests()) == 48 // 8


# ---------------------------------------------------------------------------
# A day Matomo has not archived
# ---------------------------------------------------------------------------


def test_a_zero_from_a_day_matomo_has_not_archived_never_lowers_a_stored_count(
    fleet, db, matomo, gateway, run_aggregator
):
    busy, new = fleet.site("busy.example.com"), fleet.site("new.example.com")
    fleet.store(busy, matomo_visits=40, matomo_actions=120)
    fleet.visits(busy, 41)
    matomo.not_archived.add(DAY.isoformat())  # core:archive has not run for DAY yet

    result = run_aggregator("--json")

    assert result.returncode == 3, result.stderr
    assert stored(db)[busy.id]["matomo_visits"] == 40
    busy_actions = "select matomo_actions from daily_analytics where site_id = %s and date = %s"
    assert db.execute(busy_actions, [busy.id, DAY]).fetchone() == (120,)  # the day's numbers kept together
    assert stored(db)[new.id]["matomo_visits"] == 0  # nothing stored before: a 0 lowers nothing
    warnings = lines_with(f"Site {busy.id}", result.stderr)
    assert len(warnings) == 1 and DAY.isoformat() in warnings[0] and "archiv" in warnings[0]
    assert json.loads(result.stdout)["matomo"]["zeros_not_stored"] == 1
    # judged where the counts are stored (store_analytics), not by reading them first
    assert not gateway.count(lambda r: r.method == "GET" and "matomo_visits" in r.query.get("select", ""))

    accepted = run_aggregator("--accept-zero-visits")
    assert accepted.returncode == 0, accepted.stderr
    assert stored(db)[busy.id]["matomo_visits"] == 0


def raw_log_looks(matomo) -> int:
    """Sub-requests of Matomo's bulk requests that asked the raw log (Live) for some days."""
    return sum(r.body.decode().count("Live.getLastVisitsDetails") for r in matomo.requests)


def test_the_zeros_of_a_backfills_bulk_requests_are_confirmed_together_not_one_raw_log_request_each(
    fleet, db, matomo, run_aggregator
):
    sites = fleet.many(40, [fleet.account()])
    year = [DAY - dt.timedelta(days=n) for n in range(364, -1, -1)]
    # Busy sites, each with one day of 0 visits (a look at the raw log each); a year is 8 sites to
    # a bulk request: 5 bulk requests, 40 looks.
    zero_day = {site.matomo_id: year[7 * n + 3].isoformat() for n, site in enumerate(sites)}
    matomo.visits_fn = lambda m, day: (0 if day == zero_day[m] else 20) if m in zero_day else None

    result = run_aggregator("--from", year[0].isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert db.execute(
        "select count(*) filter (where matomo_visits = 0 and matomo_final), count(*) from daily_analytics"
    ).fetchone() == (40, 40 * 365)
    assert len(matomo.report_requests()) == 5 and raw_log_looks(matomo) == 40
    # The looks of the bulk requests answered meanwhile go together (up to MATOMO_BULK_SIZE
    # sub-requests), not one raw-log request for each bulk request's few.
    raw_log_requests = [r for r in matomo.requests if matomo.kind(r) == "raw log"]
    assert len(raw_log_requests) <= 2, f"{len(raw_log_requests)} raw-log requests for 5 bulk requests"


def test_raw_log_looks_go_three_to_a_bulk_slot_within_the_limit_the_install_sets(
    fleet, db, matomo, config, run_aggregator
):
    sites = fleet.many(60, [fleet.account()])
    year = [DAY - dt.timedelta(days=n) for n in range(364, -1, -1)]
    zero_day = {site.matomo_id: year[5 * n + 2].isoformat() for n, site in enumerate(sites)}
    matomo.visits_fn = lambda m, day: (0 if day == zero_day[m] else 20) if m in zero_day else None
    config["MATOMO_BULK_SIZE"] = "20"
    span = ("--from", year[0].isoformat(), "--to", DAY.isoformat())

    result = run_aggregator(*span)

    assert result.returncode == 0, result.stderr[-3000:]
    assert raw_log_looks(matomo) == 60
    # A look is one indexed query of the raw log, no archive read: a request carries three
    # times MATOMO_BULK_SIZE of them (60 here), where it carries MATOMO_BULK_SIZE reports.
    looks_a_request = [r.body.decode().count("Live.getLastVisitsDetails") for r in matomo.requests]
    assert sorted(n for n in looks_a_request if n) == [60]
    # An install that caps its bulk requests (API_bulk_request_limit): the cap learned from the
    # reports holds for the looks too, never a refused request of looks.
    db.execute("delete from daily_analytics")
    matomo.requests.clear()
    matomo.bulk_request_limit = 5  # a year's report request carries 8 sites

    again = run_aggregator(*span)

    assert again.returncode == 0, again.stderr[-3000:]
    assert db.execute(
        "select count(*) filter (where matomo_visits = 0 and matomo_final), count(*) from daily_analytics"
    ).fetchone() == (60, 60 * 365)
    looks_a_request = [r.body.decode().count("Live.getLastVisitsDetails") for r in matomo.requests]
    assert sum(looks_a_request) == 60 and max(looks_a_request) <= 5  # none refused
    assert matomo.counts["over limit"] <= 2


def test_looks_past_phps_max_input_vars_are_asked_again_within_it_and_their_zeros_confirmed(
    fleet, db, matomo, config, run_aggregator
):
    sites = fleet.many(30, [fleet.account()])
    week = [DAY - dt.timedelta(days=n) for n in range(6, -1, -1)]
    zero_day = {site.matomo_id: week[n % 7].isoformat() for n, site in enumerate(sites)}
    matomo.visits_fn = lambda m, day: (0 if day == zero_day[m] else 20) if m in zero_day else None
    # Reports of 10 sites fit in PHP's max_input_vars; 30 looks (three to a report's slot) do not.
    config["MATOMO_BULK_SIZE"] = "10"
    matomo.max_input_vars = 12  # token_auth and 11 urls[N]: the rest is silently dropped

    result = run_aggregator("--from", week[0].isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr[-3000:]
    assert db.execute(
        "select count(*) filter (where matomo_visits = 0 and matomo_final), count(*) from daily_analytics"
    ).fetchone() == (30, 30 * 7)
    assert raw_log_looks(matomo) <= 30 + 30  # the dropped request, then requests within the limit
    (learnt,) = lines_with("max_input_vars", result.stderr)
    # the reports keep their size, already within the limit: no advice to set it
    assert "asking at most 10 sub-requests a request" in learnt and "set MATOMO_BULK_SIZE" not in learnt


def test_a_busy_sites_few_zeros_are_looked_at_one_by_one_not_by_listing_its_visits(
    fleet, db, matomo, run_aggregator
):
    busy = fleet.site("busy.example.com")
    month = [DAY - dt.timedelta(days=n) for n in range(29, -1, -1)]
    zeros = {month[5], month[14], month[22]}
    for day in month:
        fleet.visits(busy, 0 if day in zeros else 20, day=day)

    result = run_aggregator("--from", month[0].isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr[-3000:]
    assert db.execute(
        "select count(*) filter (where matomo_visits = 0 and matomo_final) from daily_analytics"
    ).fetchone() == (3,)
    # Matomo builds every visit a look lists: three looks of one day each list none, where one
    # look over the span of the zeros would list the 340 visits between them.
    assert raw_log_looks(matomo) == 3 and matomo.visits_listed == 0


def test_a_request_of_looks_lists_no_more_visits_than_a_request_of_reports_reads_days(
    fleet, db, matomo, run_aggregator
):
    sites = fleet.many(30, [fleet.account()])
    ids = {site.matomo_id for site in sites}
    year = [DAY - dt.timedelta(days=n) for n in range(364, -1, -1)]
    # Sparse sites, a visit every other day: a look each over its year, listing its 182 or 183 visits.
    matomo.visits_fn = lambda m, day: (
        (dt.date.fromisoformat(day).toordinal() % 2 if day else 0) if m in ids else None
    )
    # Matomo builds each listed visit's details, about what a day's archive read costs; behind a
    # proxy that gives up after 4 s, a request of 8 sites' year of reports (2,920 days) is answered,
    # one that lists the 5,500 or so visits of the 30 sites' looks is not.
    matomo.site_day_cost = matomo.visit_cost = 0.001
    matomo.proxy_timeout = 4

    result = run_aggregator("--from", year[0].isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr[-3000:]
    assert db.execute(
        "select count(*) filter (where matomo_visits = 0), count(*) filter (where matomo_final) from daily_analytics"
    ).fetchone() == (30 * sum(1 for day in year if day.toordinal() % 2 == 0), 30 * 365)
    assert raw_log_looks(matomo) == 30


def test_a_sparse_sites_year_costs_two_sub_requests_and_a_day_not_archived_is_still_found(
    fleet, db, matomo, run_aggregator
):
    quiet, lagging = fleet.site("quiet.example.com"), fleet.site("lagging.example.com")
    year = [DAY - dt.timedelta(days=n) for n in range(364, -1, -1)]
    for n, day in enumerate(year):
        fleet.visits(quiet, n % 2, day=day)  # a visit every other day: 183 runs of one zero day
        fleet.visits(lagging, n % 2, day=day)
    late = year[100]  # a zero for Matomo's archives, a visit in its raw log: not archived yet
    fleet.visits(lagging, 1, day=late)
    matomo.not_archived.add(late.isoformat())

    result = run_aggregator("--from", year[0].isoformat(), "--to", DAY.isoformat(), "--site", quiet.domain)

    assert result.returncode == 0, result.stderr
    finals = db.execute(
        "select matomo_visits, matomo_final, count(*) from daily_analytics group by 1, 2 order by 1"
    ).fetchall()
    assert finals == [(0, True, 183), (1, True, 182)]
    # The report and one look at the raw log for the whole year (it has exactly the visits the
    # archives count), not one per run of zero days.
    assert len(matomo.report_requests()) == 1 and raw_log_looks(matomo) == 1

    result = run_aggregator("--from", year[0].isoformat(), "--to", DAY.isoformat(), "--site", lagging.domain)

    assert result.returncode == 0, result.stderr
    rows = {
        day: (visits, final)
        for day, visits, final in db.execute(
            "select date, matomo_visits, matomo_final from daily_analytics where site_id = %s", [lagging.id]
        )
    }
    assert rows[late] == (0, False)  # found although the year's look had more visits than counted
    assert sorted(set(rows.values())) == [(0, False), (0, True), (1, True)]
    assert sum(1 for value in rows.values() if value == (0, True)) == 182

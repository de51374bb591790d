"""Numbers that stay true against services as unkind as the real ones: a day Search Console has
not finalised, a day Matomo has not archived, PostgREST's own transient errors, Google's quota and
client errors. Each test makes a stand-in behave as the real service does and asserts the table."""

from __future__ import annotations

import datetime as dt
import json
from urllib.parse import parse_qsl

import pytest

from conftest import DAY, GOOGLE_FINAL_DAY, TODAY, lines_with, stored
from fakes.google import QUOTA_EXCEEDED_BODY, RATE_LIMIT_BODY

YESTERDAY = TODAY - dt.timedelta(days=1)


def gsc_state(db, site, day: dt.date = DAY) -> tuple:
    return db.execute(
        "select gsc_clicks, gsc_impressions, gsc_final from daily_analytics where site_id = %s and date = %s",
        [site.id, day],
    ).fetchone()


def account_of(google, site):
    return next(a for a in google.accounts.values() if site.property in a.properties)


# ---------------------------------------------------------------------------
# Search Console: final and provisional days
# ---------------------------------------------------------------------------


# A day of the nightly window that Search Console can finalise before the next run, whatever the
# hour (the nightly run fetches DAY and the two days before it).
DUE = GOOGLE_FINAL_DAY


def test_a_day_search_console_has_not_finalised_is_never_stored_as_zero(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, DUE, gsc_clicks=7, gsc_impressions=70)  # what an earlier night stored
    account_of(google, site).final_through = DUE - dt.timedelta(days=1)  # DUE is not published yet

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert gsc_state(db, site, DUE) == (7, 70, None)  # kept: Google has no final word on DUE yet
    assert gsc_state(db, site, DUE - dt.timedelta(days=1)) == (0, 0, True)  # final, no traffic: 0

    account_of(google, site).final_through = DUE  # the next night, Google has finalised DUE
    fleet.search(site, 9, 90, day=DUE)
    assert run_aggregator().returncode == 0
    assert gsc_state(db, site, DUE) == (9, 90, True)


def test_a_provisional_day_is_flagged_then_replaced_by_the_final_numbers(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    account_of(google, site).final_through = DUE - dt.timedelta(days=1)
    fleet.search(site, 3, 30, day=DUE)  # fresh, partial data: served only with dataState "all"

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert gsc_state(db, site, DUE) == (3, 30, False)
    assert "provisional" in result.stderr

    fleet.search(site, 5, 52, day=DUE)
    account_of(google, site).final_through = DUE
    assert run_aggregator().returncode == 0
    assert gsc_state(db, site, DUE) == (5, 52, True)


def test_a_final_value_is_never_replaced_by_a_provisional_one(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, matomo_visits=4, gsc_clicks=20, gsc_impressions=200, gsc_final=True)
    fleet.search(site, 3, 30)  # Google now calls DAY incomplete again, with other numbers
    fleet.visits(site, 6)

    assert run_aggregator().returncode == 0
    assert gsc_state(db, site) == (20, 200, True)
    assert stored(db)[site.id]["matomo_visits"] == 6  # the rest of the row is still updated


def test_provisional_days_are_fetched_again_whatever_the_lookback(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    week_ago = DAY - dt.timedelta(days=5)
    fleet.store(site, day=week_ago, gsc_clicks=1, gsc_impressions=10, gsc_final=False)
    fleet.search(site, 4, 44, day=week_ago)  # final by now

    assert run_aggregator("--lookback", "1").returncode == 0
    assert gsc_state(db, site, week_ago) == (4, 44, True)
    query = next(r for r in google.requests if r.path.endswith("/searchAnalytics/query"))
    assert (query.json()["startDate"], query.json()["endDate"]) == (week_ago.isoformat(), DAY.isoformat())


def test_yesterday_can_be_asked_for_and_is_flagged_provisional(fleet, db, google, run_aggregator):
    site, quiet = fleet.site("example.com", fleet.account()), fleet.site("quiet.example.com", fleet.account())
    for each in (site, quiet):
        account_of(google, each).final_through = TODAY  # whatever Google says, yesterday is not final
    fleet.search(site, 2, 12, day=YESTERDAY)
    fleet.visits(site, 5, day=YESTERDAY)

    result = run_aggregator("--date", YESTERDAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert gsc_state(db, site, YESTERDAY) == (2, 12, False)
    assert gsc_state(db, quiet, YESTERDAY) == (None, None, None)  # no row yet is not zero clicks
    assert "provisional" in result.stderr


def test_today_is_not_over_and_is_refused(run_aggregator):
    result = run_aggregator("--date", TODAY.isoformat())

    assert result.returncode == 2
    assert "yesterday" in result.stderr


# ---------------------------------------------------------------------------
# Matomo: unarchived days, one bad site in a bulk request, PHP's limits
# ---------------------------------------------------------------------------


def matomo_sub_queries(matomo) -> list[dict[str, str]]:
    """Every VisitsSummary.get sub-query the stand-in received, decoded."""
    return [
        dict(parse_qsl(value))
        for request in matomo.report_requests()
        for name, value in request.form.items()
        if name.startswith("urls[")
    ]


def test_a_zero_from_a_day_matomo_has_not_archived_never_lowers_a_stored_count(
    fleet, db, matomo, run_aggregator
):
    busy, new = fleet.site("busy.example.com"), fleet.site("new.example.com")
    fleet.store(busy, matomo_visits=40)
    fleet.visits(busy, 41)
    matomo.not_archived.add(DAY.isoformat())  # core:archive has not run for DAY yet

    result = run_aggregator("--json")

    assert result.returncode == 3, result.stderr
    assert stored(db)[busy.id]["matomo_visits"] == 40
    assert stored(db)[new.id]["matomo_visits"] == 0  # nothing stored before: a 0 lowers nothing
    warnings = lines_with(f"Site {busy.id}", result.stderr)
    assert len(warnings) == 1 and DAY.isoformat() in warnings[0] and "archiv" in warnings[0]
    assert json.loads(result.stdout)["matomo"]["zeros_not_stored"] == 1

    accepted = run_aggregator("--accept-zero-visits")
    assert accepted.returncode == 0, accepted.stderr
    assert stored(db)[busy.id]["matomo_visits"] == 0


def test_when_the_stored_counts_cannot_be_read_matomo_zeros_are_held_back_and_said_once(
    fleet, db, matomo, gateway, run_aggregator
):
    busy, new = fleet.site("busy.example.com"), fleet.site("new.example.com")
    fleet.store(busy, matomo_visits=40)
    matomo.not_archived.add(DAY.isoformat())
    reads_stored_visits = lambda r: r.method == "GET" and "matomo_visits" in r.query.get("select", "")  # noqa: E731
    gateway.inject(
        reads_stored_visits, 400, {"code": "PGRST100", "message": "failed to parse filter"}, times=9
    )

    result = run_aggregator("--json")

    assert result.returncode == 3, result.stderr
    assert stored(db)[busy.id]["matomo_visits"] == 40
    assert new.id not in stored(db) or stored(db)[new.id]["matomo_visits"] is None
    (warning,) = lines_with("zeros", result.stderr)
    assert "could not be read" in warning and "2 sites" in warning and "re-run" in warning
    assert not lines_with("were stored", result.stderr)  # no stored count was read: none is quoted
    assert json.loads(result.stdout)["matomo"]["zeros_not_stored"] == 2 * 3  # 2 sites, the nightly's 3 days


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


def test_slots_dropped_by_phps_max_input_vars_are_asked_for_again(fleet, db, matomo, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(8)]
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1)
    matomo.max_input_vars = 4  # token_auth and 3 urls[N]: the rest is silently dropped

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert [row["matomo_visits"] for row in stored(db).values()] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_bulk_request_too_slow_for_the_timeout_is_split(fleet, db, matomo, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(4)]
    for n, site in enumerate(sites):
        fleet.visits(site, n + 1)
    matomo.site_day_cost = 0.03  # 4 sites x 10 days: 1.2 s in one request, 0.6 s for two sites
    config.update(HTTP_TIMEOUT="1")

    result = run_aggregator("--from", (DAY - dt.timedelta(days=9)).isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert [row["matomo_visits"] for row in stored(db).values()] == [1, 2, 3, 4]


def test_a_year_long_backfill_keeps_each_bulk_request_small_and_asks_only_for_visits(
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
    assert {sub.get("showColumns") for sub in matomo_sub_queries(matomo)} == {"nb_visits"}


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


def test_a_bulk_size_past_phps_post_variable_limit_is_refused(config, run_aggregator):
    config["MATOMO_BULK_SIZE"] = "1000"

    result = run_aggregator()

    assert result.returncode == 1
    assert lines_with("MATOMO_BULK_SIZE must be at most 900", result.stderr)


# ---------------------------------------------------------------------------
# Supabase: PostgREST's own transient errors are JSON
# ---------------------------------------------------------------------------


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
        r.method == "POST"
        and r.path == "/rest/v1/daily_analytics"
        and any(row["site_id"] == site.id for row in r.json())
    )


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
        read_of("daily_analytics", gsc_final="eq.false"),
        read_of("daily_analytics", matomo_visits="gt.0"),
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


def test_the_gateways_invalid_api_key_names_the_key(gateway, config, run_aggregator):
    gateway.inject("/rest/v1/", status=401, body={"message": "Invalid API key"}, times=99)

    result = run_aggregator()

    assert result.returncode == 1
    assert lines_with("use the service_role key", result.stderr)
    assert gateway.count("/rest/v1/sites") == 1  # a wrong key is not retried


# ---------------------------------------------------------------------------
# Google: quota, client and token errors as they really come
# ---------------------------------------------------------------------------


def test_the_load_quota_pauses_the_account_and_its_sites_are_fetched_after(
    fleet, db, google, config, run_aggregator
):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(4)]
    for n, site in enumerate(sites):
        fleet.search(site, n + 1, 10, day=DAY - dt.timedelta(days=1))
    google.inject("/searchAnalytics/query", status=403, body=QUOTA_EXCEEDED_BODY, times=2)
    config.update(GSC_QUOTA_PAUSE="1", GSC_ACCOUNT_WORKERS="1")

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["gsc_clicks"] for row in stored(db, DAY - dt.timedelta(days=1)).values()] == [1, 2, 3, 4]
    assert lines_with("quota", result.stderr) and not lines_with("grant", result.stderr)


def test_a_quota_that_outlasts_the_deadline_costs_those_sites_and_says_quota(
    fleet, db, google, config, run_aggregator
):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(3)]
    fleet.store(sites[0], gsc_clicks=5, gsc_impressions=50, gsc_final=False)
    google.inject("/searchAnalytics/query", status=429, body=RATE_LIMIT_BODY, times=999)
    config.update(GSC_QUOTA_PAUSE="1", HTTP_RETRIES="0", RUN_DEADLINE="3")

    result = run_aggregator()

    assert result.returncode == 3
    assert gsc_state(db, sites[0]) == (5, 50, False)
    warnings = [line for line in lines_with(f"account {account.id}", result.stderr) if " WARNING " in line]
    assert len(warnings) == 1 and "quota" in warnings[0] and "grant" not in warnings[0]


def test_a_wrong_client_secret_is_one_error_naming_the_variable(fleet, db, google, config, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com", fleet.account()) for n in range(3)]
    fleet.visits(sites[0], 2)
    config["GOOGLE_CLIENT_SECRET"] = "GOCSPX-anotherSECRET0000"

    result = run_aggregator()

    assert result.returncode == 4
    assert stored(db)[sites[0].id]["matomo_visits"] == 2
    assert len(lines_with("GOOGLE_CLIENT_SECRET", result.stderr)) == 1
    assert not lines_with("next run will retry", result.stderr)
    assert "GOCSPX-anotherSECRET0000" not in result.output


def test_a_refresh_token_of_another_oauth_client_says_reauthorize(fleet, db, google, run_aggregator):
    account = fleet.account()
    site = fleet.site("example.com", account)
    google.accounts[account.refresh_token].client_id = "999-other.apps.googleusercontent.com"

    result = run_aggregator()

    assert result.returncode == 4
    (line,) = lines_with(f"GSC account {account.id}", result.stderr)
    assert "another OAuth client" in line and f"authorize --account {account.id}" in line
    assert stored(db)[site.id]["gsc_clicks"] is None


def test_a_run_that_outlives_its_access_tokens_still_fetches_everything(
    fleet, db, google, config, run_aggregator
):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(6)]
    for n, site in enumerate(sites):
        fleet.search(site, n + 1, 10, day=DAY - dt.timedelta(days=1))
    google.token_lifetime = 0.3  # "expires_in": 3599, yet the API refuses it after 0.3 s
    google.latency = 0.15
    config["GSC_ACCOUNT_WORKERS"] = "1"

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["gsc_clicks"] for row in stored(db, DAY - dt.timedelta(days=1)).values()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    assert google.count("/token") > 1


def test_permission_levels_are_compared_as_the_discovery_document_spells_them(
    fleet, db, google, run_aggregator
):
    account = fleet.account()
    site = fleet.site("example.com", account, permission="SITE_UNVERIFIED_USER")
    fleet.store(site, gsc_clicks=3, gsc_impressions=30)

    result = run_aggregator()

    assert result.returncode == 4
    assert lines_with("no verified Search Console property for example.com", result.stderr)
    assert google.count("/searchAnalytics/query") == 0
    assert gsc_state(db, site)[:2] == (3, 30)


def test_an_answer_without_metadata_never_lowers_a_final_value_to_zero(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, DUE, gsc_clicks=7, gsc_impressions=70, gsc_final=True)  # an earlier night's
    google.omit_metadata = True  # and no row for DUE: nothing says DUE is final and empty
    old = DAY - dt.timedelta(days=4)  # older than Google's usual lag: final whatever the answer says

    result = run_aggregator("--from", old.isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr[-3000:]
    assert gsc_state(db, site, DUE) == (7, 70, True)
    assert gsc_state(db, site, old) == (0, 0, True)

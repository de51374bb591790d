"""Search Console as Google really runs it: days not final yet, quotas that answer every query in
flight at once, one property's failure, and tokens and OAuth clients that go wrong."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from aggregator import days_between
from conftest import (
    DAY,
    GOOGLE_FINAL_DAY,
    HTML_502,
    TODAY,
    lines_with,
    query_of,
    stored,
)
from fakes.google import QUOTA_EXCEEDED_BODY, RATE_LIMIT_BODY, resource_exhausted

FINAL = DAY - dt.timedelta(days=1)  # a day the stand-in has finalised


def searched(fleet, sites, day: dt.date = FINAL) -> None:
    for n, site in enumerate(sites):
        fleet.search(site, n + 1, 100, day=day)


def clicks_on(db, sites, day: dt.date = FINAL) -> list:
    rows = stored(db, day)
    return [rows.get(site.id, {}).get("gsc_clicks") for site in sites]


def queries_of(google, sites) -> list[float]:
    """When each query for these sites arrived."""
    properties = {site.property.replace(":", "%3A") for site in sites}
    return [
        r.received
        for r in google.requests
        if r.path.endswith("/searchAnalytics/query") and r.path.split("/")[4] in properties
    ]


YESTERDAY = TODAY - dt.timedelta(days=1)
# What Google answers while Search Console itself fails (an outage: every query alike)
UNAVAILABLE = {
    "error": {"code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE"}
}


def gsc_state(db, site, day: dt.date = DAY) -> tuple:
    return db.execute(
        "select gsc_clicks, gsc_impressions, gsc_final from daily_analytics where site_id = %s and date = %s",
        [site.id, day],
    ).fetchone()


def account_of(google, site):
    return next(a for a in google.accounts.values() if site.property in a.properties)


# A day of the nightly window that Search Console can finalise before the next run, whatever the
# hour (the nightly run fetches DAY and the two days before it).
DUE = GOOGLE_FINAL_DAY


# ---------------------------------------------------------------------------
# Final and provisional days
# ---------------------------------------------------------------------------


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


def test_provisional_days_are_fetched_again_whatever_the_lookback(fleet, db, google, config, run_aggregator):
    config["HEAL_GSC_QUERIES"] = "10"  # the nightly run heals them, one query for their site
    site, other = fleet.site("example.com", fleet.account()), fleet.site("other.example.com", fleet.account())
    week_ago = DAY - dt.timedelta(days=5)
    for each in (site, other):
        for day in days_between(DAY - dt.timedelta(days=40), DAY - dt.timedelta(days=1)):
            fleet.store(
                each, day=day, gsc_clicks=2, gsc_impressions=20, gsc_final=each is other or day != week_ago
            )
    db.execute("update daily_analytics set gsc_clicks = 1 where gsc_final = false")
    fleet.search(site, 4, 44, day=week_ago)  # final by now

    assert run_aggregator("--lookback", "1").returncode == 0
    assert gsc_state(db, site, week_ago) == (4, 44, True)
    queries = [r.json() for r in google.requests if r.path.endswith("/searchAnalytics/query")]
    # The night asks each site for its own day; the provisional day, its site alone.
    assert sorted((q["startDate"], q["endDate"]) for q in queries) == sorted(
        [(week_ago.isoformat(), week_ago.isoformat())] + [(DAY.isoformat(), DAY.isoformat())] * 2
    )


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


def test_an_answer_without_metadata_never_lowers_a_final_value_to_zero(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, DUE, gsc_clicks=7, gsc_impressions=70, gsc_final=True)  # an earlier night's
    google.omit_metadata = True  # and no row for DUE: the answer says DUE is final and empty
    old = DAY - dt.timedelta(days=4)

    result = run_aggregator("--from", old.isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 3, result.stderr[-3000:]  # the answer disagrees with a stored final
    assert gsc_state(db, site, DUE) == (7, 70, True)  # the table's rule keeps it, and says so
    assert lines_with("Search Console answered 0 where positive counts were stored", result.stderr)
    assert gsc_state(db, site, old) == (0, 0, True)


def test_a_range_google_answers_as_all_final_stores_its_empty_days_as_final_zeros(
    fleet, db, google, run_aggregator
):
    site = fleet.site("example.com", fleet.account())
    before = DUE - dt.timedelta(days=1)
    fleet.store(site, before, gsc_clicks=3, gsc_impressions=30, gsc_final=False)  # provisional, then
    account_of(google, site).final_through = DAY  # Google finalised the whole window: no metadata
    # and, final, no row for either day: they had no search traffic

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert gsc_state(db, site, before) == (0, 0, True)  # not 3 provisional clicks for 3 more nights
    assert gsc_state(db, site, DUE) == (0, 0, True)  # not NULL


def test_a_final_zero_never_replaces_a_stored_final_count_unless_the_run_says_so(
    fleet, db, google, run_aggregator
):
    site = fleet.site("example.com", fleet.account())
    old = DAY - dt.timedelta(days=5)  # final in Search Console
    fleet.store(site, old, gsc_clicks=7, gsc_impressions=70, gsc_final=True)  # an earlier night's
    # Search Console now answers no row for `old`: a final 0 that disagrees with what it said before

    result = run_aggregator("--date", old.isoformat(), "--json")

    assert result.returncode == 3, result.stderr[-3000:]
    assert gsc_state(db, site, old) == (7, 70, True)
    (warning,) = lines_with("Search Console answered 0 where positive counts were stored", result.stderr)
    assert old.isoformat() in warning and "example.com" in warning
    assert json.loads(result.stdout)["gsc"]["zeros_not_stored"] == 1

    accepted = run_aggregator("--date", old.isoformat(), "--accept-zero-visits")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert gsc_state(db, site, old) == (0, 0, True)


# ---------------------------------------------------------------------------
# Quotas as Google really applies them
# ---------------------------------------------------------------------------


# The load quota (403 quotaExceeded, which googleapiclient does not retry) and the newer 429
# RESOURCE_EXHAUSTED form (which it retries with its own backoff before we see it).
@pytest.mark.parametrize("answer", [None, resource_exhausted(429)], ids=["403-load-quota", "429-newer-form"])
def test_a_quota_burst_is_one_pause_and_the_account_resumes_when_it_ends(
    answer, fleet, db, google, config, run_aggregator
):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(40)]
    searched(fleet, sites)
    google.latency = 0.05  # the account's 16 queries are in flight together when the quota runs out
    google.exhaust(fleet.google_account(account), 3, answer)  # then it clears after 3 s
    config.update(GSC_QUOTA_PAUSE="5")

    started = time.monotonic()
    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started < 60  # one pause, not 60 + 120 s of them
    assert clicks_on(db, sites) == list(range(1, 41))
    assert len(lines_with("pausing its queries", result.stderr)) <= 1


def test_a_paused_account_holds_no_thread_another_account_needs(fleet, db, google, config, run_aggregator):
    paused, healthy = fleet.account(), fleet.account()
    waiting = [fleet.site(f"p{n}.example.com", paused) for n in range(30)]
    going = [fleet.site(f"h{n}.example.com", healthy) for n in range(10)]
    searched(fleet, waiting + going)
    google.latency = 0.05
    google.exhaust(fleet.google_account(paused), 3)
    config.update(GSC_QUOTA_PAUSE="8", GSC_WORKERS="4", GSC_ACCOUNT_WORKERS="2")

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert clicks_on(db, going) == list(range(31, 41))
    first_query = min(queries_of(google, waiting + going))
    assert max(queries_of(google, going)) - first_query < 4  # not after the paused account's 8 s
    assert clicks_on(db, waiting) == list(range(1, 31))


def test_a_quota_error_in_the_newer_form_pauses_and_never_blames_permissions(
    fleet, db, google, config, run_aggregator
):
    site = fleet.site("example.com", fleet.account())
    searched(fleet, [site])
    # RESOURCE_EXHAUSTED with the reason only in error.details[], as newer front ends send it.
    google.inject("/searchAnalytics/query", status=403, body=resource_exhausted(403).body, times=2)
    config.update(GSC_QUOTA_PAUSE="1")

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert clicks_on(db, [site]) == [1]
    assert lines_with("quota", result.stderr) and not lines_with("grant", result.stderr)


def test_a_cloud_project_without_the_search_console_api_is_one_error_naming_it(
    fleet, db, google, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com", fleet.account()) for n in range(3)]
    for site in sites:
        fleet.visits(site, 4)
    google.api_disabled.add("oauth-client")  # every account of the OAuth client meets it

    result = run_aggregator()

    assert result.returncode == 4
    assert [row["matomo_visits"] for row in stored(db).values()] == [4, 4, 4]
    named = lines_with("Search Console API", result.stderr)
    assert len(named) == 1 and "enable" in named[0].lower(), result.stderr[-3000:]
    assert not lines_with("grant", result.stderr)


def test_accounts_of_one_oauth_client_are_paced_to_the_projects_quota(
    fleet, db, google, config, run_aggregator
):
    accounts = [fleet.account(), fleet.account()]
    for n in range(6):
        fleet.site(f"s{n}.example.com", accounts[n % 2])
    google.project_qpm = 4  # the Cloud project's queries per minute, shared by both accounts
    config.update(GSC_PROJECT_QPM="4", RUN_DEADLINE="3")

    result = run_aggregator()

    assert result.returncode == 3
    assert google.counts["429"] == 0
    assert google.count("/searchAnalytics/query") == 4
    assert result.summary.endswith("Fetched GSC data for 4. Stored 18 records.")


def test_a_daily_quota_that_never_clears_is_named_with_its_dates(fleet, db, google, config, run_aggregator):
    account = fleet.account()
    for n in range(3):
        fleet.site(f"s{n}.example.com", account)
    google.exhaust(fleet.google_account(account), None)  # 403 quotaExceeded all day
    config.update(GSC_QUOTA_PAUSE="1", HTTP_RETRIES="0", RUN_DEADLINE="4")

    result = run_aggregator()

    assert result.returncode == 3
    named = [line for line in lines_with(f"account {account.id}", result.stderr) if " WARNING " in line]
    assert len(named) == 1 and "load" in named[0] and str(DAY) in named[0], result.stderr[-3000:]
    assert "GSC_QPM" not in named[0]


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


def test_pacing_to_the_quota_ends_at_the_run_deadline(fleet, db, google, config, run_aggregator):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(3)]
    for site in sites:
        fleet.visits(site, 2)
    config.update(GSC_QPM="1", RUN_DEADLINE="3")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 60  # not the two minutes the quota asks for
    assert result.returncode == 3
    assert [row["matomo_visits"] for row in stored(db).values()] == [2, 2, 2]


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


# ---------------------------------------------------------------------------
# One property, one answer
# ---------------------------------------------------------------------------


def test_a_gsc_403_keeps_the_stored_clicks(fleet, db, google, run_aggregator):
    account = fleet.account()
    site = fleet.site("example.com", account)
    fleet.store(site, gsc_clicks=8, gsc_impressions=80, gsc_ctr=0.1, gsc_position=5.0)
    fleet.visits(site, 4)
    google.inject(
        "/searchAnalytics/query",
        status=403,
        body={
            "error": {
                "code": 403,
                "message": "User does not have sufficient permission for site 'sc-domain:example.com'.",
                "errors": [{"domain": "global", "reason": "forbidden"}],
                "status": "PERMISSION_DENIED",
            }
        },
    )

    result = run_aggregator()

    assert result.returncode == 3
    assert stored(db)[site.id] == dict(
        matomo_visits=4, gsc_clicks=8, gsc_impressions=80, gsc_ctr=0.1, gsc_position=5.0
    )
    assert "sc-domain:example.com: HTTP 403" in result.stderr


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


def test_a_search_console_outage_is_one_warning_not_one_per_site(fleet, db, google, config, run_aggregator):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(50)]
    for site in sites:
        fleet.visits(site, 3)
    google.inject("/searchAnalytics/query", status=503, body=UNAVAILABLE, times=9999)
    config.update(HTTP_RETRIES="0", GSC_QUOTA_PAUSE="1", RUN_DEADLINE="6")

    result = run_aggregator()

    assert result.returncode == 3
    assert result.summary.endswith("Fetched Matomo data for 50. Fetched GSC data for 0. Stored 150 records.")
    # cron mails warnings: one line for the cause, with the count, not fifty (a fleet's thousands)
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, warnings  # the cause, and the verdict
    assert "HTTP 503: The service is currently unavailable." in warnings[0] and "50 sites" in warnings[0]
    # Not one query per site: the 16 in flight, those sent as the first failures (OUTAGE_FAILURES - 1)
    # came back, then one probe after each pause (1, 2, 4 s) that fits before the deadline
    assert google.count("/searchAnalytics/query") <= 16 + 4 + 3


def test_a_search_console_outage_met_while_connecting_the_accounts_is_one_warning(
    fleet, db, google, config, run_aggregator
):
    accounts = [fleet.account() for _ in range(20)]
    for account in accounts:
        fleet.visits(fleet.site(f"shop{account.id}.example.com", account), 3)
    google.inject(lambda r: google.kind(r) == "sites.list", status=503, body=UNAVAILABLE, times=9999)
    config["HTTP_RETRIES"] = "0"

    result = run_aggregator()

    assert result.returncode == 3  # the next nights fetch them by themselves
    assert result.summary.endswith("Fetched Matomo data for 20. Fetched GSC data for 0. Stored 60 records.")
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, warnings  # the cause (with the accounts it cost), and the verdict
    assert "HTTP 503" in warnings[0] and "and 15 more" in warnings[0]


def test_a_burst_of_503s_for_every_query_in_flight_costs_no_site(fleet, db, google, config, run_aggregator):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(30)]
    searched(fleet, sites)
    # Search Console fails for a moment, longer than googleapiclient's retries: every query in flight
    google.inject("/searchAnalytics/query", status=503, body=UNAVAILABLE, times=16)
    config.update(HTTP_RETRIES="0", GSC_QUOTA_PAUSE="1")

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert clicks_on(db, sites) == list(range(1, 31))


def test_properties_that_fail_in_a_row_are_no_outage_of_their_account(
    fleet, db, google, config, run_aggregator
):
    account = fleet.account()
    bad = [fleet.site(f"bad{n}.example.com", account) for n in range(5)]
    good = [fleet.site(f"good{n}.example.com", account) for n in range(10)]
    searched(fleet, good)
    for site in bad:  # five properties whose queries fail whatever is asked: enough to look like an outage
        google.inject(query_of(site), status=500, body=UNAVAILABLE, times=99)
    config.update(HTTP_RETRIES="0", GSC_QUOTA_PAUSE="1", GSC_ACCOUNT_WORKERS="1")

    result = run_aggregator()

    assert result.returncode == 3
    assert clicks_on(db, good) == list(range(1, 11)) and clicks_on(db, bad) == [None] * 5
    assert result.summary.startswith(
        "Processed 15 sites. Fetched Matomo data for 15. Fetched GSC data for 10."
    )
    # one pause (the first five in a row), not a pause for each of their queries asked again
    assert len(lines_with("pausing its queries", result.stderr)) <= 1


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


def test_a_property_listing_entry_without_site_url_does_not_cost_the_account(
    fleet, db, google, run_aggregator
):
    site = fleet.site("example.com", fleet.account())
    fleet.search(site, 3, 30, day=DAY - dt.timedelta(days=1))
    google.odd_entries = [{"permissionLevel": "siteOwner"}]

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert stored(db, DAY - dt.timedelta(days=1))[site.id]["gsc_clicks"] == 3


def test_an_account_that_lost_its_properties_is_one_warning_for_its_sites(fleet, db, google, run_aggregator):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account, prop=None) for n in range(20)]  # access removed

    result = run_aggregator("--json")

    assert result.returncode == 4
    warnings = [
        line for line in lines_with("has no verified Search Console", result.stderr) if " WARNING " in line
    ]
    assert len(warnings) == 1 and "and 15 more" in warnings[0], warnings  # it was one line a site
    needs = json.loads(result.stdout)["needs_a_person"]
    assert sorted(site_id for need in needs for site_id in need["sites"]) == sorted(s.id for s in sites)


def test_permission_levels_are_compared_as_the_discovery_document_spells_them(
    fleet, db, google, run_aggregator
):
    account = fleet.account()
    site = fleet.site("example.com", account, permission="SITE_UNVERIFIED_USER")
    fleet.store(site, gsc_clicks=3, gsc_impressions=30)

    result = run_aggregator()

    assert result.returncode == 4
    assert lines_with("(example.com): account 1 has no verified Search Console property", result.stderr)
    assert google.count("/searchAnalytics/query") == 0
    assert gsc_state(db, site)[:2] == (3, 30)


@pytest.mark.parametrize("retries", ["0", "3"])
def test_a_hung_search_console_ends_at_the_run_deadline(retries, fleet, db, google, config, run_aggregator):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(6)]
    for site in sites:
        fleet.visits(site, 3)
    google.inject("/searchAnalytics/query", hang=True, times=99)
    # googleapiclient retries a timed-out query HTTP_RETRIES times, each waiting up to HTTP_TIMEOUT.
    config.update(HTTP_TIMEOUT="2", HTTP_RETRIES=retries, RUN_DEADLINE="2", GSC_ACCOUNT_WORKERS="1")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 2 + 2 + 2 + 3  # its first timeout, one pause: 16.6 s with retries
    assert google.count("/searchAnalytics/query") == 1  # no retry after the deadline
    assert result.returncode == 3
    assert (
        result.summary
        == "Processed 6 sites. Fetched Matomo data for 6. Fetched GSC data for 0. Stored 18 records."
    )
    assert lines_with("GSC account 1: RUN_DEADLINE reached: no GSC data for", result.stderr)


def test_a_trickling_search_console_is_cut_off_by_the_wall_clock(fleet, db, google, config, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, gsc_clicks=4, gsc_impressions=40)
    fleet.visits(site, 3)
    google.inject("/searchAnalytics/query", trickle=1.0, times=99)  # minutes for one answer
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="1")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 60
    assert result.returncode == 3
    assert (stored(db)[site.id]["matomo_visits"], stored(db)[site.id]["gsc_clicks"]) == (3, 4)


# ---------------------------------------------------------------------------
# Tokens and the OAuth client
# ---------------------------------------------------------------------------


def test_a_revoked_refresh_token_costs_only_that_accounts_gsc_values(fleet, db, run_aggregator):
    good, revoked = fleet.account(), fleet.account(revoked=True)
    fine = fleet.site("fine.example.com", good)
    orphan = fleet.site("orphan.example.com", revoked)
    fleet.store(orphan, gsc_clicks=3, gsc_impressions=30)
    fleet.search(fine, 2, 20)
    fleet.visits(orphan, 9)

    result = run_aggregator()

    assert result.returncode == 4
    assert result.summary == (
        "Processed 2 sites. Fetched Matomo data for 2. Fetched GSC data for 1. Stored 6 records."
    )
    rows = stored(db)
    assert (rows[orphan.id]["matomo_visits"], rows[orphan.id]["gsc_clicks"]) == (9, 3)
    assert rows[fine.id]["gsc_clicks"] == 2
    warning = next(line for line in result.stderr.splitlines() if "invalid_grant" in line)
    assert f"GSC account {revoked.id}:" in warning and "re-authorize" in warning


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


def test_a_hung_token_endpoint_costs_only_that_accounts_gsc(fleet, db, google, config, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.visits(site, 4)
    google.inject("/token", hang=True, times=99)
    config.update(HTTP_TIMEOUT="1", HTTP_RETRIES="0")

    result = run_aggregator()

    assert result.returncode == 3
    assert stored(db)[site.id]["matomo_visits"] == 4


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


def test_accounts_whose_property_list_never_comes_are_not_waited_for_past_the_run_deadline(
    fleet, db, google, config, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com", fleet.account()) for n in range(3)]
    for site in sites:
        fleet.visits(site, 3)
    google.inject(lambda r: google.kind(r) == "sites.list", hang=True, times=99)
    config.update(HTTP_TIMEOUT="2", HTTP_RETRIES="3", RUN_DEADLINE="2")

    started = time.monotonic()
    result = run_aggregator()

    assert time.monotonic() - started < 2 + 2 + 2 + 3  # each account's first timeout and one pause
    assert google.count(lambda r: google.kind(r) == "sites.list") == 3  # no retry after the deadline
    assert result.returncode == 3
    assert result.summary.endswith("Fetched GSC data for 0. Stored 0 records.")
    (said,) = [line for line in lines_with("no GSC data for", result.stderr) if " WARNING " in line]
    assert said.count("GSC account") == 3  # one line for the three accounts (it was one each)

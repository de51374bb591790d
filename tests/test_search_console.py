"""Search Console's quotas as Google really applies them: a burst of errors for every query in
flight at once, two accounts at once, the newer error forms, a Cloud project's quota shared by
every account of one OAuth client, an API not enabled in the project."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from conftest import DAY, lines_with, stored
from fakes.google import resource_exhausted

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
    assert time.monotonic() - started < 30
    assert clicks_on(db, sites) == list(range(1, 41))
    assert len(lines_with("pausing its queries", result.stderr)) <= 1


def test_a_paused_account_holds_no_thread_another_account_needs(fleet, db, google, config, run_aggregator):
    paused, healthy = fleet.account(), fleet.account()
    waiting = [fleet.site(f"p{n}.example.com", paused) for n in range(30)]
    going = [fleet.site(f"h{n}.example.com", healthy) for n in range(10)]
    searched(fleet, waiting + going)
    google.latency = 0.05
    google.exhaust(fleet.google_account(paused), 3)
    config.update(GSC_QUOTA_PAUSE="5", GSC_WORKERS="4", GSC_ACCOUNT_WORKERS="2")

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert clicks_on(db, going) == list(range(31, 41))
    first_query = min(queries_of(google, waiting + going))
    assert max(queries_of(google, going)) - first_query < 2
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

"""Numbers that stay true against services as unkind as the real ones: a day Search Console has
not finalised, a day Matomo has not archived, PostgREST's own transient errors, Google's quota and
client errors. Each test makes a stand-in behave as the real service does and asserts the table."""

from __future__ import annotations

import datetime as dt

from conftest import DAY, TODAY, stored

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


def test_a_day_search_console_has_not_finalised_is_never_stored_as_zero(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, gsc_clicks=7, gsc_impressions=70)  # what an earlier night stored for DAY
    account_of(google, site).final_through = DAY - dt.timedelta(days=1)  # DAY is not published yet

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert gsc_state(db, site) == (7, 70, None)  # kept: Google has no final word on DAY yet
    assert gsc_state(db, site, DAY - dt.timedelta(days=1)) == (0, 0, True)  # final, no traffic: 0

    account_of(google, site).final_through = DAY  # the next night, Google has finalised DAY
    fleet.search(site, 9, 90)
    assert run_aggregator().returncode == 0
    assert gsc_state(db, site) == (9, 90, True)


def test_a_provisional_day_is_flagged_then_replaced_by_the_final_numbers(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.search(site, 3, 30)  # fresh, partial data for DAY: served only with dataState "all"

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert gsc_state(db, site) == (3, 30, False)
    assert "provisional" in result.stderr

    fleet.search(site, 5, 52)
    account_of(google, site).final_through = DAY
    assert run_aggregator().returncode == 0
    assert gsc_state(db, site) == (5, 52, True)


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

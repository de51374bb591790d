"""Reading the data: the views a dashboard reads, and what each run was."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

from conftest import ANON_KEY, DAY, SERVICE_KEY

MONDAY = DAY - dt.timedelta(days=DAY.weekday() + 7)  # a whole week, every day of it final


def test_weekly_ctr_and_position_are_weighted_by_impressions_never_averaged(fleet, db):
    site = fleet.site("shop.example.com")
    days = [(10, 100, 2.0), (0, 900, 20.0), *[(1, 10, 5.0)] * 5]  # clicks, impressions, position
    for n, (clicks, impressions, position) in enumerate(days):
        fleet.store(
            site,
            MONDAY + dt.timedelta(days=n),
            matomo_visits=3,
            matomo_final=True,
            gsc_clicks=clicks,
            gsc_impressions=impressions,
            gsc_ctr=clicks / impressions,
            gsc_position=position,
            gsc_final=True,
        )

    week = db.execute(
        "select domain, matomo_visits, gsc_clicks, gsc_impressions, gsc_ctr, gsc_position, matomo_complete, "
        "gsc_complete from analytics_weekly where site_id = %s and week = %s",
        [site.id, MONDAY],
    ).fetchone()

    assert week[:4] == ("shop.example.com", 21, 15, 1050)
    assert week[4] == pytest.approx(15 / 1050)  # not the mean of daily CTRs (0.0857...)
    assert week[5] == pytest.approx((2.0 * 100 + 20.0 * 900 + 5.0 * 50) / 1050)  # not 7.43
    assert week[6:] == (True, True)
    db.execute("delete from daily_analytics where site_id = %s and date = %s", [site.id, MONDAY])  # a hole
    assert db.execute(
        "select gsc_complete, matomo_complete from analytics_weekly where site_id = %s and week = %s",
        [site.id, MONDAY],
    ).fetchone() == (False, False)


@pytest.mark.parametrize(
    "view", ["analytics_daily", "analytics_weekly", "analytics_monthly", "analytics_runs"]
)
def test_the_views_are_not_readable_with_the_public_keys(view, gateway, fleet):
    fleet.store(fleet.site("shop.example.com"), matomo_visits=3, matomo_final=True)

    def read(key: str) -> httpx.Response:
        return httpx.get(
            f"{gateway.url}/rest/v1/{view}", headers={"apikey": key, "Authorization": f"Bearer {key}"}
        )

    assert read(ANON_KEY).status_code == 401
    assert read(SERVICE_KEY).status_code == 200


def test_each_run_records_its_kind_and_arguments(fleet, db, run_aggregator):
    fleet.visits(fleet.site("shop.example.com"), 4)

    assert run_aggregator().returncode == 0
    assert run_aggregator("--date", DAY.isoformat()).returncode == 0
    assert run_aggregator("--site", "shop.example.com").returncode == 0

    runs = db.execute(
        "select kind, arguments, age < interval '1 minute' from analytics_runs order by id"
    ).fetchall()
    assert [kind for kind, _, _ in runs] == ["nightly", "backfill", "one site"]
    assert f"--date {DAY}" in runs[1][1] and all(recent for _, _, recent in runs)


def test_the_views_derive_matomo_rates_from_sums_and_add_no_unique_visitors_across_days(fleet, db):
    site = fleet.site("shop.example.com")
    days = [(10, 8, 30, 5, 600), (90, 70, 100, 9, 3000), *[(2, 2, 2, 2, 0)] * 5]  # visits, unique, ...
    for n, (visits, unique, actions, bounces, seconds) in enumerate(days):
        fleet.store(
            site,
            MONDAY + dt.timedelta(days=n),
            matomo_visits=visits,
            matomo_unique_visitors=unique,
            matomo_actions=actions,
            matomo_bounces=bounces,
            matomo_visit_seconds=seconds,
            matomo_final=True,
        )
    older = MONDAY - dt.timedelta(days=7)
    for n in range(7):  # a week stored before the metrics existed: visits only
        fleet.store(site, older + dt.timedelta(days=n), matomo_visits=4, matomo_final=True)

    daily = db.execute(
        "select matomo_unique_visitors, matomo_bounce_rate, matomo_avg_visit_seconds from analytics_daily "
        "where site_id = %s and date = %s",
        [site.id, MONDAY],
    ).fetchone()
    week = db.execute(
        "select matomo_visits, matomo_actions, matomo_bounces, matomo_visit_seconds, matomo_bounce_rate, "
        "matomo_avg_visit_seconds, matomo_complete, matomo_metrics_complete from analytics_weekly "
        "where site_id = %s and week = %s",
        [site.id, MONDAY],
    ).fetchone()
    before = db.execute(
        "select matomo_visits, matomo_actions, matomo_bounce_rate, matomo_complete, matomo_metrics_complete "
        "from analytics_weekly where site_id = %s and week = %s",
        [site.id, older],
    ).fetchone()
    weekly_columns = {
        row[0]
        for row in db.execute(
            "select column_name from information_schema.columns where table_name = 'analytics_weekly'"
        )
    }

    assert daily == (8, 0.5, 60.0)
    assert week[:4] == (110, 140, 24, 3600)
    assert week[4] == pytest.approx(24 / 110)  # not the mean of daily rates (0.82...)
    assert week[5] == pytest.approx(3600 / 110)
    assert week[6:] == (True, True)
    assert before == (28, None, None, True, False)  # the visits vouched for, the rest not fetched
    assert not any("uniq" in column for column in weekly_columns)  # not a sum of daily uniques

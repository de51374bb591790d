"""A table that heals itself: the nightly run refills what earlier nights left missing or
provisional, gives new sites their history, and confirms Matomo's zeros."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from aggregator import gsc_oldest_day
from conftest import DAY, TODAY, lines_with

WINDOW_START = DAY - dt.timedelta(days=2)  # the nightly run's own three days


def days_back(first: int, last: int = 1) -> list[dt.date]:
    """The days from `first` to `last` days before the nightly window, oldest first."""
    return [WINDOW_START - dt.timedelta(days=n) for n in range(first, last - 1, -1)]


@pytest.fixture
def healing(config):
    """Healing as an operator has it: the default budgets."""
    del config["HEAL_MATOMO_SITE_DAYS"], config["HEAL_GSC_QUERIES"]
    return config


def traffic(fleet, site, days, visits=10, clicks=3, impressions=30):
    """What the stand-ins know of a site on these days."""
    for day in days:
        fleet.visits(site, visits, day=day)
        fleet.search(site, clicks, impressions, day=day)


def keep(fleet, site, days, matomo=True, gsc=True):
    """Rows as earlier good nights left them: the stand-ins' numbers, final."""
    for day in days:
        values = {}
        if matomo:
            values.update(
                matomo_visits=fleet.matomo.visits_on(site.matomo_id, day.isoformat()), matomo_final=True
            )
        if gsc:
            clicks, impressions, ctr, position = fleet.google.search.get(
                (site.property, day.isoformat()), (0, 0, 0.0, 0.0)
            )
            values.update(
                gsc_clicks=clicks,
                gsc_impressions=impressions,
                gsc_ctr=ctr,
                gsc_position=position,
                gsc_final=True,
            )
        fleet.store(site, day, **values)


def table(db, site) -> dict[dt.date, tuple]:
    """{day: (visits, matomo_final, clicks, gsc_final)} of one site, as a user would select it."""
    rows = db.execute(
        "select date, matomo_visits, matomo_final, gsc_clicks, gsc_final from daily_analytics "
        "where site_id = %s order by date",
        [site.id],
    ).fetchall()
    return {row[0]: row[1:] for row in rows}


def test_one_nightly_run_fills_the_holes_of_an_outage_an_account_failure_and_a_missed_night(
    healing, fleet, db, run_aggregator
):
    good, broken = fleet.account(), fleet.account()
    sites = [fleet.site("shop.example.com", good), fleet.site("blog.example.org", broken)]
    window = days_back(30)
    for site in sites:
        traffic(fleet, site, [*window, WINDOW_START, DAY - dt.timedelta(days=1), DAY])
    matomo_down, account_failed, missed = days_back(12, 8), days_back(6, 3), days_back(2, 2)
    for site in sites:
        for day in window:
            if day in missed:
                continue
            keep(
                fleet,
                site,
                [day],
                matomo=day not in matomo_down,
                gsc=not (site is sites[1] and day in account_failed),
            )

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    for site in sites:
        rows = table(fleet.db, site)
        assert [day for day in window if rows.get(day) != (10, True, 3, True)] == [], site
    healed = 2 * len(matomo_down) + 2 * len(missed)  # Matomo site-days
    assert lines_with(
        f"Healed {healed} Matomo and {len(account_failed) + 2 * len(missed)} Search Console", result.stderr
    )
    # each source was asked only for its holes: Matomo never for the days it had
    asked = {date for body in fleet.matomo.bodies for _, date in body}
    assert f"{matomo_down[0]},{matomo_down[-1]}" in asked and f"{missed[0]}" in asked


def test_a_new_site_gets_its_history_and_no_zero_before_it_existed(
    healing, fleet, db, matomo, run_aggregator
):
    old = fleet.site("old.example.com", fleet.account())
    keep(fleet, old, days_back(40))
    new = fleet.site("new.example.com", fleet.account())
    created = TODAY - dt.timedelta(days=60)
    matomo.created[new.matomo_id] = f"{created} 14:03:11"
    oldest = gsc_oldest_day(TODAY)
    traffic(fleet, new, [oldest, oldest + dt.timedelta(days=100), created, created + dt.timedelta(days=9)])

    first, second = run_aggregator(), run_aggregator()

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    rows = table(db, new)
    gsc_days = sorted(day for day, row in rows.items() if row[2] is not None)
    matomo_days = sorted(day for day, row in rows.items() if row[0] is not None)
    assert gsc_days[0] == oldest and rows[oldest][2:] == (3, True)
    assert rows[oldest + dt.timedelta(days=100)][2:] == (3, True)
    assert matomo_days[0] == created, "no Matomo value before the site was created"
    assert rows[created][:2] == (10, True) and rows[created + dt.timedelta(days=1)][:2] == (0, True)
    assert all(rows[day][0] is not None for day in matomo_days if day >= created)
    assert len(matomo_days) == (DAY - created).days + 1
    # the site with values gets its heal window, not years of history
    assert min(table(db, old)) >= days_back(40)[0]


def test_zeros_matomo_had_not_archived_are_provisional_and_replaced_once_it_has(
    healing, fleet, db, matomo, run_aggregator
):
    site = fleet.site("shop.example.com")
    keep(fleet, site, days_back(30, 9), gsc=False)
    behind = days_back(8, 1) + [WINDOW_START, DAY - dt.timedelta(days=1), DAY]  # 11 days
    for day in behind:
        fleet.visits(site, 25, day=day)
    matomo.not_archived.update(day.isoformat() for day in behind[-6:])  # the archiver is 6 days behind
    quiet = days_back(8, 6)
    for day in quiet:
        fleet.visits(site, 0, day=day)  # really no visit: the raw log is empty too

    behind_run = run_aggregator()

    assert behind_run.returncode == 0, behind_run.stderr
    rows = table(db, site)
    assert [rows[day][:2] for day in behind[-6:]] == [(0, False)] * 6  # provisional, not final
    assert [rows[day][:2] for day in quiet] == [(0, True)] * 3  # confirmed by the raw log
    assert lines_with("not archived yet", behind_run.stderr)

    matomo.not_archived.clear()  # core:archive caught up
    caught_up = run_aggregator()

    assert caught_up.returncode == 0, caught_up.stderr
    rows = table(db, site)
    assert [rows[day][:2] for day in behind[-6:]] == [(25, True)] * 6
    assert not [day for day, row in rows.items() if row[1] is False]


def test_a_budget_smaller_than_the_holes_heals_the_oldest_first_and_the_rest_next_night(
    healing, fleet, db, run_aggregator
):
    healing["HEAL_MATOMO_SITE_DAYS"] = "10"
    sites = [fleet.site("a.example.com"), fleet.site("b.example.com")]
    window = days_back(30)
    hole = days_back(20, 13)  # 8 days, both sites: 16 site-days
    for site in sites:
        traffic(fleet, site, window)
        keep(fleet, site, [day for day in window if day not in hole], gsc=False)

    first = run_aggregator()

    assert first.returncode == 0, first.stderr
    filled = sorted((day, site.id) for site in sites for day in hole if table(db, site).get(day))
    assert filled == sorted([(day, sites[0].id) for day in hole] + [(day, sites[1].id) for day in hole[:2]])
    assert lines_with(f"6 site-days of holes are left for the next nights (oldest {hole[2]})", first.stderr)

    second = run_aggregator()

    assert second.returncode == 0, second.stderr
    assert all(table(db, site)[day][:2] == (10, True) for site in sites for day in hole)


def test_healing_keeps_every_worker_busy_as_the_night_does_not_one_hole_after_another(
    healing, fleet, db, matomo, google, run_aggregator
):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(9)]
    window = days_back(30)
    holes = {site.id: days_back(3 + 2 * n, 3 + 2 * n)[0] for n, site in enumerate(sites)}
    for site in sites:
        traffic(fleet, site, [*window, WINDOW_START, DAY - dt.timedelta(days=1), DAY])
        keep(fleet, site, [day for day in window if day != holes[site.id]])
    # Each hole is its own day range: its own Matomo request and Search Console query, each
    # answered after a second, as a busy PHP worker or a slow API would.
    asked_for_a_hole = {f"date%3D{day}%26" for day in holes.values()}
    matomo.inject(
        lambda r: any(d in r.body.decode() for d in asked_for_a_hole), status=200, delay=1.0, times=99
    )
    google.inject(
        lambda r: (
            r.path.endswith("/query") and r.json()["startDate"] in {d.isoformat() for d in holes.values()}
        ),
        status=200,
        delay=1.0,
        times=99,
    )

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert all(table(db, site)[day] == (10, True, 3, True) for site in sites for day in [holes[site.id]])
    assert lines_with("Healed 9 Matomo and 9 Search Console site-days", result.stderr)
    heal_requests = [
        r for r in matomo.report_requests() if any(d in r.body.decode() for d in asked_for_a_hole)
    ]
    heal_queries = [
        r
        for r in google.requests
        if r.path.endswith("/query") and r.json()["startDate"] in {d.isoformat() for d in holes.values()}
    ]
    for requests, workers in ((heal_requests, 3), (heal_queries, 9)):
        first = min(r.received for r in requests)
        # MATOMO_WORKERS (3) requests, and every query, in flight at once; one after another, none.
        assert sum(1 for r in requests if r.received < first + 0.9) >= workers, [
            r.received - first for r in requests
        ]


def test_a_provisional_cell_is_asked_again_for_its_site_ahead_of_older_holes_and_widens_no_night(
    healing, fleet, db, matomo, google, run_aggregator
):
    healing["HEAL_MATOMO_SITE_DAYS"] = "4"
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(8)]
    window = days_back(30)
    late, unconfirmed = days_back(9, 9)[0], days_back(4, 4)[0]
    hole = days_back(25, 22)  # an ordinary hole, older: it waits for the next night
    for site in sites:
        traffic(fleet, site, [*window, WINDOW_START, DAY - dt.timedelta(days=1), DAY])
        keep(fleet, site, [day for day in window if day not in (late, unconfirmed, *hole)])
        keep(fleet, site, [late, unconfirmed] if site is not sites[0] else [unconfirmed], gsc=True)
    keep(fleet, sites[0], hole)
    for site in sites[1:]:
        keep(fleet, site, hole)
    fleet.store(
        sites[0], late, matomo_visits=10, matomo_final=True, gsc_clicks=1, gsc_impressions=9, gsc_final=False
    )
    db.execute(  # a Matomo 0 its raw log did not confirm (the archiver was behind)
        "update daily_analytics set matomo_visits = 0, matomo_final = false where site_id = %s and date = %s",
        [sites[1].id, unconfirmed],
    )
    db.execute("delete from daily_analytics where site_id = %s and date = any(%s)", [sites[2].id, hole])

    night = run_aggregator()

    assert night.returncode == 0, night.stderr
    assert table(db, sites[0])[late][2:] == (3, True)  # Search Console's final numbers
    assert table(db, sites[1])[unconfirmed][:2] == (10, True)  # healed ahead of the older hole
    # The budget's rest (3 site-days) went to the older hole; its last day waits for the next night.
    assert [day for day in hole if table(db, sites[2]).get(day, (None,))[0] is not None] == hole[:3]
    # Matomo: every site's own three days, the one provisional cell, and the budget's rest (3 of
    # the hole's days): no night widened for all eight sites.
    assert matomo.site_days_worked <= 8 * 3 + 4
    # Search Console: one query a site for its own days, one for each site with a hole (the
    # provisional day asked alone, the older hole), none wider.
    queries = sorted(
        (r.json()["startDate"], r.json()["endDate"])
        for r in google.requests
        if r.path.endswith("/searchAnalytics/query")
    )
    own = ((DAY - dt.timedelta(days=2)).isoformat(), DAY.isoformat())
    healed = [(late.isoformat(), late.isoformat()), (hole[0].isoformat(), hole[-1].isoformat())]
    assert queries == sorted([own] * 8 + healed)


def test_status_shows_each_kind_of_cell_and_each_site_that_needs_a_person(
    healing, fleet, db, matomo, run_aggregator
):
    good, revoked = fleet.account(), fleet.account(revoked=True)
    newest = WINDOW_START - dt.timedelta(days=1)  # the newest day the heal window holds

    def back(n: int) -> dt.date:
        return newest - dt.timedelta(days=n)

    shop = fleet.site("shop.example.com", good)
    keep(fleet, shop, [back(n) for n in range(29, -1, -1) if n not in (4, 5)])
    fleet.store(
        shop, back(4), matomo_visits=0, matomo_final=False, gsc_clicks=2, gsc_impressions=9, gsc_final=False
    )
    reauthorize = fleet.site("blog.example.org", revoked)
    no_property = fleet.site("docs.example.io", good, prop=None)
    tracking_gone = fleet.site("gone.example.com", good)
    for n in range(3):
        fleet.store(tracking_gone, back(n), matomo_visits=0, matomo_final=True, gsc_clicks=5, gsc_final=True)
    cliff = fleet.site("cliff.example.com", good)
    for n in range(14):
        fleet.store(cliff, back(n), matomo_visits=5 if n < 7 else 100, matomo_final=True)
    # a run learns which sources cannot be asked, and when each site was created in Matomo
    assert run_aggregator("--date", DAY.isoformat()).returncode == 4

    shown = run_aggregator("status")
    as_json = run_aggregator("status", "--json")
    one = run_aggregator("status", "--site", "shop.example.com", "--json")

    assert shown.returncode == as_json.returncode == one.returncode == 0, shown.stderr + as_json.stderr
    report = json.loads(as_json.stdout)
    needs = {(need["site_id"], need["source"], need["kind"]): need for need in report["needs_a_person"]}
    assert set(needs) == {
        (reauthorize.id, "gsc", "unavailable"),
        (no_property.id, "gsc", "unavailable"),
        (tracking_gone.id, "matomo", "tracking"),
        (cliff.id, "matomo", "cliff"),
    }
    assert (
        f"aggregator.py authorize --account {revoked.id}"
        in needs[(reauthorize.id, "gsc", "unavailable")]["fix"]
    )
    assert report["sites"] == 5
    assert needs[(no_property.id, "gsc", "unavailable")]["fix"].startswith("add the property to the account")
    assert "visits down from 700 to 35" in needs[(cliff.id, "matomo", "cliff")]["detail"]
    shop_cells = json.loads(one.stdout)["coverage"]
    assert shop_cells["matomo"]["window"] == {
        "stored": 28,
        "provisional": 1,
        "missing": 1,
        "not_available": 0,
    }
    assert shop_cells["gsc"]["window"] == {"stored": 28, "provisional": 1, "missing": 1, "not_available": 0}
    assert shop_cells["matomo"]["oldest_hole"] == back(5).isoformat()
    assert json.loads(one.stdout)["needs_a_person"] == []
    # the fleet: the revoked account's and the propertyless site's Search Console days are not available
    gsc = report["coverage"]["gsc"]["window"]
    assert gsc["not_available"] >= 2 * 30 and gsc["provisional"] == 1
    assert (
        report["next_night"]["gsc"]["queries"] == 3
    )  # shop, gone and cliff; not the two that cannot be asked
    assert lines_with("Sites that need a person: 4", shown.stdout)
    (blog,) = lines_with(f"site {reauthorize.id} (blog.example.org), Search Console", shown.stdout)
    assert blog.count("authorize --account") == 1 and "Fix:" not in blog  # the fix said once
    (docs,) = lines_with(f"site {no_property.id} (docs.example.io)", shown.stdout)
    assert docs.count("add the") == 1
    assert lines_with("Matomo, heal window", shown.stdout) and lines_with("Next night heals", shown.stdout)


def test_status_names_the_fix_each_fault_was_met_with(healing, fleet, db, run_aggregator):
    wrong_key, good = fleet.service_account(wrong_key=True), fleet.account()
    robot = fleet.site("robot.example.com", wrong_key)
    path = fleet.site("shop.example.com/store", good, prop=None)  # not a bare domain
    fleet.site("twin.example.com", good)
    twin = fleet.site("twin.example.com", good)  # the same domain again: the first gets its numbers
    unknown = fleet.site("ghost.example.com")
    fleet.matomo.site_ids.discard(unknown.matomo_id)  # no such site in Matomo
    assert run_aggregator().returncode == 4

    report = json.loads(run_aggregator("status", "--json").stdout)

    fixes = {need["site_id"]: need["fix"] for need in report["needs_a_person"]}
    # Each fix as the fault was met (a service account's key is stored with --service-account),
    # not guessed from the words of the stored reason.
    assert fixes[robot.id].endswith(f"authorize --service-account KEY.json --account {wrong_key.id}")
    assert fixes[path.id] == "correct sites.domain"
    assert fixes[twin.id] == "set status_deployment of the duplicate to something other than deployed"
    assert fixes[unknown.id].startswith("correct sites.matomo_site_id")


def test_a_site_matomo_stops_knowing_is_named_by_status(healing, fleet, db, run_aggregator):
    site = fleet.site("gone.example.com")
    fleet.visits(site, 5)
    assert run_aggregator().returncode == 0  # its creation day learnt: Matomo knew it
    fleet.matomo.site_ids.discard(site.matomo_id)  # deleted in Matomo, or the token's access withdrawn
    fleet.matomo.site_ids.add(999)  # the install's other sites, which the token may view

    assert run_aggregator().returncode == 4
    report = json.loads(run_aggregator("status", "--json").stdout)

    (need,) = report["needs_a_person"]
    assert (need["site_id"], need["source"]) == (site.id, "matomo")
    assert need["fix"].startswith("correct sites.matomo_site_id")


def test_a_matomo_id_two_sites_share_is_named_by_status_until_it_is_corrected(
    healing, fleet, db, run_aggregator
):
    first, copy = fleet.site("shop.example.com"), fleet.site("shop-copy.example.com")
    db.execute("update sites set matomo_site_id = %s where id = %s", [first.matomo_id, copy.id])

    assert run_aggregator().returncode == 4
    (need,) = json.loads(run_aggregator("status", "--json").stdout)["needs_a_person"]
    assert (need["site_id"], need["source"]) == (copy.id, "matomo")
    assert need["fix"].startswith("set sites.matomo_site_id")

    fleet.matomo.site_ids.add(first.matomo_id + 100)
    db.execute("update sites set matomo_site_id = %s where id = %s", [first.matomo_id + 100, copy.id])
    assert run_aggregator().returncode == 0
    assert json.loads(run_aggregator("status", "--json").stdout)["needs_a_person"] == []


def test_status_of_an_empty_fleet_says_why_as_run_does(fleet, config, run_aggregator):
    fleet.site("shop.example.com")
    config["DEPLOYED_STATUS"] = "live"  # matches no row

    run, shown, as_json = run_aggregator(), run_aggregator("status"), run_aggregator("status", "--json")

    assert run.returncode == shown.returncode == as_json.returncode == 1
    (said,) = lines_with("Supabase returned no deployed site", run.stderr)
    assert "'live'" in said and lines_with(said.split(" ERROR ")[1], shown.stderr)
    assert "Sites that need a person" not in shown.stdout
    assert json.loads(as_json.stdout)["sites"] == 0


def test_where_the_visitor_log_is_off_a_zero_is_final_once_its_day_has_settled(
    fleet, db, matomo, run_aggregator
):
    site = fleet.site("shop.example.com")
    matomo.visitor_log_off = True
    first = TODAY - dt.timedelta(days=10)

    result = run_aggregator("--from", first.isoformat(), "--to", DAY.isoformat())

    assert result.returncode == 0, result.stderr
    rows = table(db, site)
    settled = TODAY - dt.timedelta(days=7)  # MATOMO_SETTLE_DAYS
    assert {day: row[:2] for day, row in rows.items()} == {
        day: (0, day < settled)
        for day in [first + dt.timedelta(days=n) for n in range((DAY - first).days + 1)]
    }
    assert lines_with("Visits log is deactivated globally", result.stderr)


def test_a_heal_window_longer_than_search_console_keeps_asks_it_nothing_older(
    healing, fleet, db, google, run_aggregator
):
    healing["HEAL_DAYS"] = "700"
    site = fleet.site("shop.example.com", fleet.account())
    keep(fleet, site, [DAY - dt.timedelta(days=600)])  # a site with values: its heal window, no history

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    queried = [
        request.json()["startDate"] for request in google.requests if "searchAnalytics" in request.path
    ]
    assert min(queried) == gsc_oldest_day(TODAY).isoformat()
    rows = table(db, site)
    assert min(
        day for day, row in rows.items() if row[2] is not None and day != DAY - dt.timedelta(days=600)
    ) == (gsc_oldest_day(TODAY))


def test_a_site_deployed_again_has_the_days_it_was_away_healed(healing, fleet, db, run_aggregator):
    site, other = fleet.site("shop.example.com"), fleet.site("other.example.com")
    window = days_back(30)
    traffic(fleet, site, window)
    keep(fleet, site, window[:20], gsc=False)  # then it was undeployed for ten days
    keep(fleet, other, window, gsc=False)
    db.execute("update sites set status_deployment = 'pending' where id = %s", [site.id])
    assert run_aggregator().returncode == 0 and not table(db, site).get(window[25])
    db.execute("update sites set status_deployment = 'deployed' where id = %s", [site.id])

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert [table(db, site)[day][:2] for day in window[20:]] == [(10, True)] * 10


def test_holes_the_statement_timeout_cannot_list_are_a_persons_to_fix(
    healing, fleet, db, gateway, run_aggregator
):
    fleet.visits(fleet.site("shop.example.com"), 4)
    # A table grown past what analytics_holes reads within the API's statement_timeout (8 s).
    timeout = {
        "code": "57014",
        "details": None,
        "hint": None,
        "message": "canceling statement due to statement timeout",
    }
    gateway.inject("/rest/v1/rpc/analytics_holes", status=500, body=timeout, times=9)

    result = run_aggregator()

    assert result.returncode == 4  # it was 0: no night would ever heal, and no one heard
    assert result.summary.endswith("Stored 3 records.")  # the night's own days
    (error,) = lines_with("calling analytics_holes", result.stderr)
    assert "alter role service_role set statement_timeout" in error and "UPSERT_CHUNK_SIZE" not in error


def test_a_day_before_2005_is_refused_with_the_reason(run_aggregator):
    result = run_aggregator("--date", "1999-12-31")

    assert result.returncode == 2
    assert "1999-12-31 is before 2005" in result.stderr


def test_healing_cut_short_by_the_deadline_counts_each_site_once(
    healing, fleet, db, matomo, config, run_aggregator
):
    site = fleet.site("shop.example.com")
    created = TODAY - dt.timedelta(days=45)
    matomo.created[site.matomo_id] = f"{created} 09:00:00"
    for back in (10, 20, 30):  # three stored days split its history into four holes: four requests
        fleet.store(site, day=DAY - dt.timedelta(days=back), matomo_visits=5, matomo_final=True)
    night = f"{DAY - dt.timedelta(days=2)},{DAY}"
    heals = lambda r: "VisitsSummary.get" in str(r.form) and night not in str(r.form)  # noqa: E731
    matomo.inject(heals, status=200, delay=5, times=99)  # Matomo slow on old days: the deadline comes
    config.update(RUN_DEADLINE="4", MATOMO_BULK_SIZE="1", MATOMO_WORKERS="1")  # the night's own, in time

    result = run_aggregator()

    said = [line for line in lines_with("RUN_DEADLINE reached", result.stderr) if " WARNING " in line]
    assert said and all(" 1 site" in line for line in said), said  # one site, however many holes
    assert result.returncode == 0  # the night's own days are stored: the holes wait for the next nights

"""The nightly run, end to end: Supabase sites -> Matomo + Search Console -> daily_analytics."""

from __future__ import annotations

import datetime as dt

import pytest

from conftest import DAY, TODAY, stored


def test_a_normal_night_over_three_accounts(fleet, db, run_aggregator):
    a, b, c = fleet.account(), fleet.account(), fleet.account()
    shop = fleet.site("shop.example.com", a)
    blog = fleet.site("Blog.Example.org", b, prop="https://www.blog.example.org/")
    docs = fleet.site("docs.example.io", c, prop="http://docs.example.io/")
    quiet = fleet.site("quiet.example.com", c)  # a property with no search traffic: no `rows`
    no_gsc = fleet.site("matomo-only.example.com")
    no_matomo = fleet.site("gsc-only.example.com", a, matomo=False)
    fleet.site("staging.example.com", a, status="pending")
    fleet.visits(shop, 120)
    fleet.visits(blog, 45)
    fleet.visits(no_gsc, 7)  # quiet and docs: Matomo answers an all-zero object
    fleet.search(shop, 30, 1000, 4.2)
    fleet.search(blog, 3, 150, 11.0)
    fleet.search(docs, 1, 10, 2.0)
    fleet.search(no_matomo, 9, 90, 3.0)

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert result.summary == (
        "Processed 6 sites. Fetched Matomo data for 5. Fetched GSC data for 5. Stored 18 records."
    )
    rows = stored(db)
    assert stored(db, DAY - dt.timedelta(days=1))[quiet.id]["gsc_clicks"] == 0  # a final day: 0 is true
    assert rows == {
        shop.id: dict(matomo_visits=120, gsc_clicks=30, gsc_impressions=1000, gsc_ctr=0.03, gsc_position=4.2),
        blog.id: dict(matomo_visits=45, gsc_clicks=3, gsc_impressions=150, gsc_ctr=0.02, gsc_position=11.0),
        docs.id: dict(matomo_visits=0, gsc_clicks=1, gsc_impressions=10, gsc_ctr=0.1, gsc_position=2.0),
        # DAY is not final in Search Console yet, and quiet has no row: not known yet, not 0
        quiet.id: dict(
            matomo_visits=0, gsc_clicks=None, gsc_impressions=None, gsc_ctr=None, gsc_position=None
        ),
        no_gsc.id: dict(
            matomo_visits=7, gsc_clicks=None, gsc_impressions=None, gsc_ctr=None, gsc_position=None
        ),
        no_matomo.id: dict(
            matomo_visits=None, gsc_clicks=9, gsc_impressions=90, gsc_ctr=0.1, gsc_position=3.0
        ),
    }


def test_the_nightly_run_refreshes_the_three_days_ending_today_minus_two(fleet, db, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.visits(site, 5, day=DAY)

    assert run_aggregator().returncode == 0
    days = db.execute("select date from daily_analytics order by date").fetchall()
    assert days == [(DAY - dt.timedelta(days=2),), (DAY - dt.timedelta(days=1),), (DAY,)]


def test_lookback_sets_the_nightly_window(fleet, db, google, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.search(site, 2, 20, day=DAY - dt.timedelta(days=6))

    assert run_aggregator("--lookback", "7").returncode == 0
    assert db.execute("select count(*), sum(gsc_clicks) from daily_analytics").fetchone() == (7, 2)
    assert google.count("/searchAnalytics/query") == 1


@pytest.mark.parametrize("max_rows", [1000, 400])  # Supabase's default cap, and a lower one
def test_a_fleet_larger_than_supabases_row_cap_is_read_whole(max_rows, fleet, db, gateway, run_aggregator):
    accounts = [fleet.account() for _ in range(3)]
    sites = fleet.many(1205, accounts)
    for site in sites[::100]:
        fleet.visits(site, 3)
    gateway.max_rows = max_rows

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.summary == (
        "Processed 1205 sites. Fetched Matomo data for 1205. Fetched GSC data for 1205. Stored 3615 records."
    )
    assert db.execute("select count(*), sum(matomo_visits) from daily_analytics").fetchone() == (3615, 3 * 13)


def test_rerunning_a_date_updates_values_without_duplicating_rows(fleet, db, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.visits(site, 10)
    fleet.search(site, 1, 20)
    assert run_aggregator("--date", DAY.isoformat()).returncode == 0
    first_update = db.execute("select updated_at from daily_analytics").fetchone()[0]
    fleet.visits(site, 11)  # Matomo re-archived the day; Search Console revised it
    fleet.search(site, 2, 25)

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 0
    assert db.execute("select count(*) from daily_analytics").fetchone()[0] == 1
    row = stored(db)[site.id]
    assert (row["matomo_visits"], row["gsc_clicks"], row["gsc_impressions"]) == (11, 2, 25)
    assert db.execute("select updated_at from daily_analytics").fetchone()[0] > first_update


def test_failed_sources_never_overwrite_stored_values(fleet, db, matomo, run_aggregator):
    account = fleet.account()
    broken_matomo = fleet.site("one.example.com", account)
    forbidden_gsc = fleet.site("two.example.com", account, permission="siteUnverifiedUser")
    healthy = fleet.site("three.example.com", account)
    fleet.store(
        broken_matomo, matomo_visits=50, gsc_clicks=5, gsc_impressions=100, gsc_ctr=0.05, gsc_position=3.0
    )
    fleet.store(
        forbidden_gsc, matomo_visits=60, gsc_clicks=6, gsc_impressions=200, gsc_ctr=0.03, gsc_position=4.0
    )
    matomo.error_slots[broken_matomo.matomo_id] = "Archiving failed: General error"
    fleet.visits(forbidden_gsc, 61)
    fleet.search(broken_matomo, 7, 140, 2.5)
    fleet.visits(healthy, 1)

    result = run_aggregator()

    assert result.returncode == 4
    assert result.summary == (
        "Processed 3 sites. Fetched Matomo data for 2. Fetched GSC data for 2. Stored 9 records."
    )
    rows = stored(db)
    assert rows[broken_matomo.id] == dict(
        matomo_visits=50, gsc_clicks=7, gsc_impressions=140, gsc_ctr=0.05, gsc_position=2.5
    )
    assert rows[forbidden_gsc.id] == dict(
        matomo_visits=61, gsc_clicks=6, gsc_impressions=200, gsc_ctr=0.03, gsc_position=4.0
    )
    assert "Archiving failed" in result.stderr
    assert "two.example.com" in result.stderr


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


def test_sites_without_a_source_are_not_errors(fleet, db, run_aggregator):
    site = fleet.site("plain.example.com", account=None, matomo=False)

    result = run_aggregator()

    assert result.returncode == 0
    assert (
        result.summary
        == "Processed 1 site. Fetched Matomo data for 0. Fetched GSC data for 0. Stored 0 records."
    )
    assert site.id not in stored(db)


def test_a_missing_variable_is_named_before_any_network_call(config, gateway, matomo, google, run_aggregator):
    del config["MATOMO_TOKEN_AUTH"]
    del config["GOOGLE_CLIENT_SECRET"]

    result = run_aggregator()

    assert result.returncode == 1
    assert "Missing configuration: MATOMO_TOKEN_AUTH, GOOGLE_CLIENT_SECRET" in result.stderr
    assert "Traceback" not in result.output
    assert gateway.requests == matomo.requests == google.requests == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--date", "2026-13-01"], "is not a real calendar date"),
        (["--date", "20/11/2026"], "is not a date: use YYYY-MM-DD"),
        (["--date", (TODAY + dt.timedelta(days=1)).isoformat()], "is in the future"),
        (["--from", "2026-03-10", "--to", "2026-03-01"], "ends (2026-03-01) before it starts"),
        (["--date", "2026-01-01", "--from", "2026-01-01"], "either --date or --from/--to"),
        (["--dat=2026-01-01"], "unrecognized arguments: --dat=2026-01-01"),
        (["--verbose"], "unrecognized arguments: --verbose"),
        (["backfill"], "invalid choice: 'backfill'"),
    ],
)
def test_bad_command_line_is_one_line_and_exit_2(args, message, gateway, matomo, google, run_aggregator):
    result = run_aggregator(*args)

    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert gateway.requests == matomo.requests == google.requests == []


def test_malformed_settings_are_all_named_at_once(config, gateway, run_aggregator):
    config.update(MATOMO_URL="matomo.example.com", HTTP_TIMEOUT="soon", GSC_QPM="0")

    result = run_aggregator()

    assert result.returncode == 1
    (line,) = lines = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert "MATOMO_URL must be an http(s) URL" in line, lines
    assert "HTTP_TIMEOUT must be a whole number of at least 1" in line
    assert "GSC_QPM must be a whole number of at least 1" in line
    assert "matomo.example.com" not in line and "soon" not in line  # values are never echoed
    assert gateway.requests == []


def test_a_fleet_with_no_deployed_site_is_a_failed_run_that_names_the_likely_cause(fleet, db, run_aggregator):
    fleet.site("staging.example.com", fleet.account(), status="pending")

    result = run_aggregator()

    assert result.returncode == 1, result.stderr[-2000:]
    assert "use the service_role key" in result.stderr
    assert (
        result.summary
        == "Processed 0 sites. Fetched Matomo data for 0. Fetched GSC data for 0. Stored 0 records."
    )
    assert stored(db) == {}


def test_a_backfill_costs_one_request_per_site_whatever_its_length(fleet, db, matomo, google, run_aggregator):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(3)]
    first, last = DAY - dt.timedelta(days=9), DAY
    for n, site in enumerate(sites):
        fleet.visits(site, 10 + n, day=first)
        fleet.search(site, n + 1, 50, day=last)

    result = run_aggregator("--from", first.isoformat(), "--to", last.isoformat())

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.summary.endswith("Stored 30 records.")
    assert db.execute(
        "select count(*), sum(matomo_visits), sum(gsc_clicks) from daily_analytics"
    ).fetchone() == (30, 33, 6)
    assert stored(db, first)[sites[0].id]["gsc_clicks"] == 0  # inside a successful answer, no row: 0
    assert google.count("/searchAnalytics/query") == 3 and len(matomo.report_requests()) == 1
    assert matomo.counts["raw log"] == 1  # one look at the raw log confirms every zero of the range


def test_sites_deleted_between_two_pages_of_the_read_do_not_end_the_run(fleet, db, gateway, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(10)]
    for site in sites:
        fleet.visits(site, 2)
    gateway.max_rows = 4  # the sites come in pages of four

    def delete_the_first_seven(request) -> None:
        if (
            request.path == "/rest/v1/sites"
            and request.method == "GET"
            and gateway.count("/rest/v1/sites") == 2
        ):
            db.execute("delete from sites where id <= %s", [sites[6].id])

    gateway.before = delete_the_first_seven

    result = run_aggregator()

    assert result.returncode != 1, result.stderr[-3000:]
    assert "PGRST103" not in result.stderr
    assert sorted(stored(db)) == [site.id for site in sites[7:]]
    assert [row["matomo_visits"] for row in stored(db).values()] == [2, 2, 2]

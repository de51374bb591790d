"""The nightly run end to end (Supabase sites -> Matomo + Search Console -> daily_analytics):
a night, some sites, whatever ends a run, the fleet's odd data, and what a run tells."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
import threading
import time

import pytest

from conftest import (
    AGGREGATOR,
    DAY,
    SUMMARY,
    TODAY,
    lines_with,
    stored,
)


def expected_rows(fleet, sites):
    return {
        site.id: dict(
            matomo_visits=n,
            gsc_clicks=n % 7,
            gsc_impressions=10 * n,
            gsc_ctr=(n % 7) / (10 * n),
            gsc_position=7.5,
        )
        for n, site in enumerate(sites, start=1)
    }


def seeded(fleet, count):
    account = fleet.account()
    sites = [fleet.site(f"s{n}.example.com", account) for n in range(count)]
    for n, site in enumerate(sites, start=1):
        fleet.visits(site, n)
        fleet.search(site, n % 7, 10 * n)
    return sites


@pytest.fixture
def loose_sites_schema(db):
    """An operator's own `sites` table: matomo_site_id as text and no foreign key to accounts."""
    db.execute("alter table sites drop constraint sites_gsc_account_id_fkey")
    db.execute("alter table sites alter column matomo_site_id type text")
    yield
    db.execute("truncate daily_analytics, sites, gsc_accounts restart identity cascade")
    db.execute("alter table sites alter column matomo_site_id type integer using matomo_site_id::integer")
    db.execute(
        "alter table sites add constraint sites_gsc_account_id_fkey foreign key (gsc_account_id) "
        "references gsc_accounts (id) on delete set null"
    )


# ---------------------------------------------------------------------------
# A night
# ---------------------------------------------------------------------------


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


def test_sites_without_a_source_are_not_errors(fleet, db, run_aggregator):
    site = fleet.site("plain.example.com", account=None, matomo=False)

    result = run_aggregator()

    assert result.returncode == 0
    assert (
        result.summary
        == "Processed 1 site. Fetched Matomo data for 0. Fetched GSC data for 0. Stored 0 records."
    )
    assert site.id not in stored(db)


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


# ---------------------------------------------------------------------------
# Some sites, a look before writing
# ---------------------------------------------------------------------------


def test_site_restricts_the_run_and_leaves_the_others_untouched(fleet, db, run_aggregator):
    account = fleet.account()
    chosen, other = fleet.site("chosen.example.com", account), fleet.site("other.example.com", account)
    fleet.store(other, matomo_visits=70)
    fleet.visits(chosen, 5)
    fleet.visits(other, 6)

    result = run_aggregator("--site", "https://WWW.Chosen.example.com/")

    assert result.returncode == 0
    assert result.summary.startswith("Processed 1 site.")
    assert stored(db)[chosen.id]["matomo_visits"] == 5
    assert stored(db)[other.id]["matomo_visits"] == 70


def test_site_takes_a_sites_id_as_well_as_a_domain(fleet, db, run_aggregator):
    shop, blog = fleet.site("shop.example.com"), fleet.site("blog.example.com")
    fleet.visits(shop, 2)
    fleet.visits(blog, 3)

    result = run_aggregator("--date", DAY.isoformat(), "--site", str(blog.id))
    unknown = run_aggregator("--date", DAY.isoformat(), "--site", "999999")

    assert result.returncode == 0 and list(stored(db)) == [blog.id]
    assert (
        unknown.returncode == 2 and "--site 999999: no deployed site has this domain or id" in unknown.stderr
    )


def test_deployed_status_names_which_sites_are_aggregated(fleet, db, config, run_aggregator):
    live = fleet.site("shop.example.com", status="live")
    fleet.visits(live, 5)
    fleet.site("draft.example.com", status="deployed")  # not live: another table's meaning
    config["DEPLOYED_STATUS"] = "live"

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert result.summary.startswith("Processed 1 site.")
    assert list(stored(db)) == [live.id]


def test_dry_run_prints_the_rows_and_writes_nothing(fleet, db, gateway, run_aggregator):
    account = fleet.account()
    shop, blog = fleet.site("shop.example.com", account), fleet.site("blog.example.com")
    fleet.visits(shop, 12)
    fleet.search(shop, 3, 40, 2.5)
    fleet.visits(blog, 4)

    result = run_aggregator("--date", DAY.isoformat(), "--dry-run")

    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "date",
        "site_id",
        "domain",
        "matomo_visits",
        "matomo_unique_visitors",
        "matomo_actions",
        "matomo_bounces",
        "matomo_visit_seconds",
        "matomo_final",
        "gsc_clicks",
        "gsc_impressions",
        "gsc_ctr",
        "gsc_position",
        "gsc_final",
    ]
    matomo_numbers = ["12", "12", "36", "6", "720", "True"]  # the stand-in's visits, unique, actions...
    shown = [
        DAY.isoformat(),
        str(shop.id),
        "shop.example.com",
        *matomo_numbers,
        "3",
        "40",
        "0.0750",
        "2.5000",
    ]
    assert lines[1].split() == [*shown, "False"]  # DAY is not final in Search Console yet
    blog_numbers = ["4", "4", "12", "2", "240", "True"]
    assert lines[2].split() == [DAY.isoformat(), str(blog.id), "blog.example.com", *blog_numbers, *["-"] * 5]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert stored(db) == {}
    # a write is a POST or PATCH to a table (a POST to /rpc/ calls a read-only function)
    assert gateway.count(lambda r: r.method in ("POST", "PATCH") and "/rpc/" not in r.path) == 0
    assert "Dry run: nothing was written; 2 records would have been stored" in result.stderr


# ---------------------------------------------------------------------------
# Whatever ends a run, its counts are true
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_fetching_stores_what_was_fetched_and_counts_it_truly(
    signum, status, fleet, db, matomo, launch, config
):
    sites = fleet.many(300, [fleet.account()])
    db.execute("update sites set gsc_account_id = null")  # Matomo only: three slices of 100 sites
    first_slice = {site.matomo_id for site in sites[:100]}
    released = threading.Event()

    def visits(site: int, day: str) -> int:
        # The other slices' answers wait until the signal has done its work (not a race on a
        # busy machine): what is stored is the first slice, whatever the machine's speed.
        if day and site not in first_slice:
            released.wait(120)
        return 1

    matomo.visits_fn = visits
    matomo.latency = 0.4
    config["HTTP_TIMEOUT"] = "3"  # how long the run waits for what is in flight when stopped
    start = (DAY - dt.timedelta(days=99)).isoformat()
    process = launch("--from", start, "--to", DAY.isoformat(), "--json", log_level="INFO")
    try:
        deadline = time.monotonic() + 60
        while db.execute("select count(*) from daily_analytics").fetchone()[0] == 0:
            assert time.monotonic() < deadline and process.poll() is None, "the first slice was never stored"
            time.sleep(0.05)
        process.send_signal(signum)
        signalled = time.monotonic()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        released.set()
    # What is in flight gets its HTTP_TIMEOUT; no request starts after the signal (not the halves
    # of one that timed out: those would take minutes here).
    assert time.monotonic() - signalled < 30

    assert process.returncode == status, stderr[-3000:]
    in_table = db.execute("select count(*) from daily_analytics").fetchone()[0]
    assert 0 < in_table < 30000
    summary = SUMMARY.findall(stderr)[-1]
    assert summary.endswith(f"Stored {in_table} records.")
    assert json.loads(stdout)["records"]["stored"] == in_table
    recorded = db.execute("select records_stored, exit_status from aggregator_runs").fetchall()
    assert recorded == [(in_table, status)]
    assert lines_with(signal.Signals(signum).name, stderr)


def test_sigterm_mid_backfill_stores_exactly_what_both_sources_gave_and_counts_it(
    fleet, db, matomo, google, launch, config
):
    sites = fleet.many(40, [fleet.account(), fleet.account()])
    matomo.visits_fn = lambda site, day: 3 if site <= sites[-1].matomo_id else None
    google.search_fn = lambda site_url, day: (2, 20, 0.1, 4.5)
    matomo.latency, google.latency = 0.3, 0.5
    config["MATOMO_BULK_SIZE"] = "2"  # 20 Matomo requests, 3 at a time: about 2 s
    start = (DAY - dt.timedelta(days=199)).isoformat()
    process = launch("--from", start, "--to", DAY.isoformat(), log_level="INFO")

    deadline = time.monotonic() + 60
    while db.execute("select count(*) from daily_analytics").fetchone()[0] == 0:
        assert time.monotonic() < deadline and process.poll() is None, "nothing was ever stored"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 143, stderr[-3000:]
    rows, matomo_sites, gsc_sites = db.execute(
        "select count(*), count(distinct site_id) filter (where matomo_visits is not null), "
        "count(distinct site_id) filter (where gsc_clicks is not null) from daily_analytics"
    ).fetchone()
    assert 0 < matomo_sites < 40
    # Every site a source answered for has all its days stored; the summary counts the table.
    assert db.execute(
        "select count(*) from daily_analytics where matomo_visits is null and gsc_clicks is null"
    ).fetchone() == (0,)
    assert db.execute("select count(matomo_visits) from daily_analytics").fetchone() == (matomo_sites * 200,)
    assert db.execute("select count(gsc_clicks) from daily_analytics").fetchone() == (gsc_sites * 200,)
    assert SUMMARY.findall(stderr)[-1] == (
        f"Processed 40 sites. Fetched Matomo data for {matomo_sites}. Fetched GSC data for {gsc_sites}. "
        f"Stored {rows} records."
    )


def test_a_killed_run_then_a_normal_run_leaves_the_table_as_one_clean_run(
    fleet, db, gateway, config, launch, run_aggregator
):
    sites = seeded(fleet, 30)
    config["UPSERT_CHUNK_SIZE"] = "3"
    gateway.latency = 0.2
    process = launch()
    deadline = time.monotonic() + 60
    while (
        db.execute("select count(*) from daily_analytics").fetchone()[0] == 0 and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert 0 < db.execute("select count(*) from daily_analytics").fetchone()[0] < 30 * 3
    gateway.latency = 0

    result = run_aggregator()

    assert result.returncode == 0
    assert stored(db) == expected_rows(fleet, sites)


def test_two_overlapping_runs_leave_the_table_correct(fleet, db, gateway, launch):
    sites = seeded(fleet, 20)
    gateway.latency = 0.02

    first, second = launch(), launch()
    outputs = [first.communicate(timeout=120), second.communicate(timeout=120)]

    assert (first.returncode, second.returncode) == (0, 0), outputs
    assert stored(db) == expected_rows(fleet, sites)


# ---------------------------------------------------------------------------
# Data the fleet really has
# ---------------------------------------------------------------------------


def test_bad_rows_are_skipped_for_their_source_with_one_warning_each(
    fleet, db, matomo, google, loose_sites_schema, run_aggregator
):
    account = fleet.account()
    properties = google.accounts[account.refresh_token].properties
    properties.update(
        {
            "sc-domain:example.com": "siteOwner",
            "https://www.shop.example.org/": "siteFullUser",
            "sc-domain:dot.example.net": "siteOwner",
        }
    )
    google.search[("sc-domain:example.com", DAY.isoformat())] = (5, 50, 0.1, 3.0)
    matomo.site_ids.update({1, 2, 3, 4, 5, 6})
    matomo.visits[(1, DAY.isoformat())] = 11
    rows = [  # domain, matomo_site_id, gsc_account_id
        ("HTTPS://WWW.Example.COM/", "1", account.id),  # normalised: matches sc-domain:example.com
        ("shop.example.org", " 2 ", account.id),  # matches the https://www. URL-prefix property
        ("dot.example.net.", "3", account.id),  # trailing dot
        (None, "4", account.id),  # no domain: Matomo only
        ("", "5", account.id),  # empty domain: Matomo only
        ("example.com/blog", "6", account.id),  # a path is not a domain: Matomo only
        ("fine.example.com", "abc", None),  # non-numeric Matomo id
        ("lost.example.com", None, 999),  # an account that does not exist
    ]
    ids = [
        db.execute(
            "insert into sites (domain, status_deployment, matomo_site_id, gsc_account_id) "
            "values (%s, 'deployed', %s, %s) returning id",
            row,
        ).fetchone()[0]
        for row in rows
    ]

    result = run_aggregator()

    assert result.returncode == 4
    assert (
        result.summary
        == "Processed 8 sites. Fetched Matomo data for 6. Fetched GSC data for 3. Stored 18 records."
    )
    table = stored(db)
    assert sorted(table) == ids[:6]
    assert (table[ids[0]]["matomo_visits"], table[ids[0]]["gsc_clicks"]) == (11, 5)
    assert (table[ids[1]]["gsc_clicks"], table[ids[2]]["gsc_clicks"]) == (None, None)  # DAY: provisional
    yesterday_but_one = stored(db, DAY - dt.timedelta(days=1))
    assert (yesterday_but_one[ids[1]]["gsc_clicks"], yesterday_but_one[ids[2]]["gsc_clicks"]) == (0, 0)
    for site_id, text in [(ids[3], "None"), (ids[4], "''"), (ids[5], "'example.com/blog'")]:
        assert len(lines_with(f"Site {site_id}: domain {text} is not a bare domain", result.stderr)) == 1
    assert (
        len(
            lines_with(
                f"Site {ids[6]} (fine.example.com): matomo_site_id 'abc' is not a positive number",
                result.stderr,
            )
        )
        == 1
    )
    assert (
        len(lines_with(f"Site {ids[7]} (lost.example.com): gsc_account_id 999 matches no row", result.stderr))
        == 1
    )


def test_the_sites_of_an_account_row_that_is_gone_are_one_warning(
    fleet, db, loose_sites_schema, run_aggregator
):
    for n in range(30):  # their gsc_accounts row was deleted (a sites table of its own, no foreign key)
        db.execute(
            "insert into sites (domain, status_deployment, gsc_account_id) values (%s, 'deployed', 999)",
            [f"s{n}.example.com"],
        )

    result = run_aggregator("--date", DAY.isoformat())

    warnings = [
        line for line in lines_with("gsc_account_id 999 matches no row", result.stderr) if " WARNING " in line
    ]
    assert len(warnings) == 1 and "and 25 more" in warnings[0], warnings
    assert result.returncode == 4  # no later night can fix it: a person must


def test_two_sites_with_one_domain_do_not_both_get_its_search_numbers(fleet, db, google, run_aggregator):
    account = fleet.account()
    first = fleet.site("example.com", account)
    second = fleet.site("www.example.com", account, prop=None)  # the same domain, once normalised
    fleet.search(first, 4, 40, day=DAY - dt.timedelta(days=1))

    result = run_aggregator()

    yesterday_but_one = stored(db, DAY - dt.timedelta(days=1))
    assert yesterday_but_one[first.id]["gsc_clicks"] == 4
    assert yesterday_but_one[second.id]["gsc_clicks"] is None
    assert result.returncode == 4  # a person must set the duplicate's status
    (line,) = lines_with(f"Site {second.id} (www.example.com):", result.stderr)
    assert f"site {first.id}" in line and "example.com" in line
    (verdict,) = lines_with("Exit status 4", result.stderr, verdict=True)
    assert "set status_deployment of the duplicate" in verdict


def test_a_duplicate_asked_for_alone_with_site_still_does_not_get_the_numbers(
    fleet, db, google, run_aggregator
):
    account = fleet.account()
    first = fleet.site("example.com", account)
    second = fleet.site("www.example.com", account, prop=None)  # the same domain, once normalised
    db.execute("update sites set matomo_site_id = %s where id = %s", [first.matomo_id, second.id])
    fleet.visits(first, 7)
    fleet.search(first, 4, 40, day=DAY - dt.timedelta(days=1))

    result = run_aggregator("--site", str(second.id))  # by hand: only the duplicate is read

    assert result.returncode == 4
    assert stored(db, DAY - dt.timedelta(days=1)).get(second.id) is None  # neither its visits nor its clicks
    assert stored(db).get(second.id) is None


def test_a_unicode_domain_matches_its_punycode_property_and_back(fleet, db, google, run_aggregator):
    account = fleet.account()
    umlaut = fleet.site("bücher.de", account, prop="sc-domain:xn--bcher-kva.de")
    puny = fleet.site("xn--mnchen-3ya.de", account, prop="sc-domain:münchen.de")
    fleet.search(umlaut, 5, 50, day=DAY - dt.timedelta(days=1))
    fleet.search(puny, 6, 60, day=DAY - dt.timedelta(days=1))

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    yesterday_but_one = stored(db, DAY - dt.timedelta(days=1))
    assert (yesterday_but_one[umlaut.id]["gsc_clicks"], yesterday_but_one[puny.id]["gsc_clicks"]) == (5, 6)


def test_a_date_older_than_search_console_keeps_still_fetches_matomo(fleet, db, google, run_aggregator):
    old = TODAY - dt.timedelta(days=500)
    site = fleet.site("example.com", fleet.account())
    fleet.store(site, day=old, gsc_clicks=17, gsc_impressions=170)
    fleet.visits(site, 6, day=old)

    result = run_aggregator("--date", old.isoformat())

    assert result.returncode == 0
    assert lines_with("older than Search Console keeps", result.stderr)
    assert google.count("/searchAnalytics/query") == 0
    row = stored(db, old)[site.id]
    assert (row["matomo_visits"], row["gsc_clicks"], row["gsc_impressions"]) == (6, 17, 170)


# ---------------------------------------------------------------------------
# What a run tells: the verdict, --json, aggregator_runs
# ---------------------------------------------------------------------------


def test_the_last_line_is_a_verdict_with_the_command_that_fetches_what_is_missing(
    fleet, db, matomo, run_aggregator
):
    fleet.site("fine.example.com")
    broken = fleet.site("broken.example.com")
    matomo.error_slots[broken.matomo_id] = "Archiving failed: General error"

    result = run_aggregator("--date", DAY.isoformat(), log_level="INFO")

    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert "Exit status 3 after" in last
    assert last.endswith(f"{sys.executable} {AGGREGATOR} --date {DAY.isoformat()} --site broken.example.com")


def test_exit_4_names_what_a_person_must_fix_and_the_rerun_only_what_a_rerun_can(
    fleet, matomo, run_aggregator
):
    account = fleet.account()
    flaky = fleet.site("shop.example.com", account)
    no_property = fleet.site("docs.example.io", account, prop=None)
    matomo.error_slots[flaky.matomo_id] = "Archiving failed: General error"  # another night fetches it

    result = run_aggregator("--date", DAY.isoformat(), "--json")

    assert result.returncode == 4, result.stderr
    verdict = result.stderr.strip().splitlines()[-1]
    problem = f"Site {no_property.id} (docs.example.io): account {account.id} has no Search Console property for docs.example.io"
    assert f"A person must act: {problem}" in verdict
    assert verdict.endswith(
        f"To fetch what is missing: {sys.executable} {AGGREGATOR} --date {DAY} --site shop.example.com"
    )
    report = json.loads(result.stdout)
    assert [need["sites"] for need in report["needs_a_person"]] == [[no_property.id]]
    assert report["needs_a_person"][0]["problem"].startswith(problem)


def test_json_summarises_the_run_for_monitoring(fleet, db, matomo, run_aggregator):
    account = fleet.account()
    fine, broken = fleet.site("fine.example.com", account), fleet.site("broken.example.com", account)
    fleet.visits(fine, 3)
    matomo.error_slots[broken.matomo_id] = "Archiving failed: General error"

    result = run_aggregator("--date", DAY.isoformat(), "--json")

    assert result.returncode == 3
    summary = json.loads(result.stdout)
    assert summary["from"] == summary["to"] == DAY.isoformat()
    assert summary["sites"] == 2
    assert summary["matomo"] == {
        "wanted": 2,
        "fetched": 1,
        "missing_sites": [
            {
                "id": broken.id,
                "domain": "broken.example.com",
                "source": "matomo",
                "reason": "not fetched this run: the next nights fetch it",
            }
        ],
        "zeros_not_stored": 0,
    }
    assert summary["gsc"] == {
        "wanted": 2,
        "fetched": 2,
        "missing_sites": [],
        "zeros_not_stored": 0,
        "provisional_values": 0,
        "accounts": {str(account.id): "connected"},
    }
    # broken: no Matomo value, and DAY is not final in Search Console with no row yet: nothing to store
    assert summary["records"] == {"stored": 1, "not_stored": 0}
    assert any("Archiving failed" in line for line in summary["problems"])
    assert summary["exit_status"] == 3 and summary["seconds"] > 0
    assert result.summary is not None  # the human line stays on the log


def test_json_holds_the_same_problems_whatever_the_log_level(fleet, db, matomo, run_aggregator):
    fine, broken = fleet.site("fine.example.com"), fleet.site("broken.example.com")
    fleet.visits(fine, 2)
    matomo.error_slots[broken.matomo_id] = "Archiving failed: General error"

    quiet = run_aggregator("--date", DAY.isoformat(), "--json", log_level="ERROR")
    loud = run_aggregator("--date", DAY.isoformat(), "--json", log_level="DEBUG")

    problems = [json.loads(r.stdout)["problems"] for r in (quiet, loud)]
    assert problems[0] == problems[1] and any("Archiving failed" in p for p in problems[0])
    assert "Archiving failed" not in quiet.stderr  # the log itself still shows only ERROR


def test_a_cause_many_sites_meet_is_one_warning_and_json_lists_every_site(fleet, db, matomo, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(12)]
    for site in sites:
        fleet.visits(site, 9)
        fleet.store(site, matomo_visits=9, matomo_final=False)  # stored before the archiver was behind
    matomo.not_archived.add(DAY.isoformat())
    for site in sites[:8]:
        matomo.error_slots[site.matomo_id] = "Archiving failed: General error"

    result = run_aggregator("--date", DAY.isoformat(), "--json", log_level="INFO")

    assert result.returncode == 3
    (failed,) = lines_with("Archiving failed: General error", result.stderr)
    assert "WARNING Matomo site id" in failed and "and 3 more: " in failed
    (kept,) = lines_with("kept the stored counts", result.stderr)
    assert all(f"Site {site.id} (s{n}.example.com)" in kept for n, site in enumerate(sites) if n >= 8)
    report = json.loads(result.stdout)
    assert len(report["sites_by_problem"]["Archiving failed: General error"]) == 8
    assert len([p for p in report["problems"] if "kept the stored counts" in p]) == 1


def test_every_run_is_recorded_in_aggregator_runs(fleet, db, matomo, run_aggregator):
    site = fleet.site("example.com", fleet.account())
    fleet.visits(site, 2)
    matomo.error_slots[fleet.site("broken.example.com").matomo_id] = "Archiving failed"

    assert run_aggregator("--date", DAY.isoformat()).returncode == 3
    assert run_aggregator("--date", DAY.isoformat(), "--dry-run").returncode == 3  # writes nothing

    (run,) = db.execute(
        "select date_from, date_to, sites, matomo_fetched, gsc_fetched, records_stored, records_not_stored, "
        "exit_status, jsonb_path_query_array(summary, '$.matomo.missing_sites[*].id'), "
        "finished_at >= started_at from aggregator_runs"
    ).fetchall()
    assert run == (
        DAY,
        DAY,
        2,
        1,
        1,
        1,
        0,
        3,
        [fleet.db.execute("select max(id) from sites").fetchone()[0]],
        True,
    )


def test_a_run_that_cannot_record_itself_is_not_exit_0(fleet, db, run_aggregator):
    fleet.visits(fleet.site("shop.example.com"), 1)
    # the table is there (a missing one stops the run before it fetches), but refuses the job
    db.execute("revoke insert on aggregator_runs from service_role")
    try:
        result = run_aggregator("--date", DAY.isoformat())
    finally:
        db.execute("grant insert on aggregator_runs to service_role")

    assert result.returncode == 4
    (verdict,) = lines_with("Exit status 4", result.stderr, verdict=True)
    assert "aggregator_runs cannot be written: apply every file of supabase/migrations/" in verdict
    assert stored(db)  # the numbers themselves were stored

"""What an operator does by hand: restrict a run to some sites, look before writing."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from conftest import AGGREGATOR, ANON_KEY, CONFIG_NAMES, DAY, ROOT, lines_with, shown_on_a_terminal, stored
from fakes.database import MIGRATIONS, SUPABASE_BOOTSTRAP, server_url
from fakes.settings import write_env_file


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
        "matomo_final",
        "gsc_clicks",
        "gsc_impressions",
        "gsc_ctr",
        "gsc_position",
        "gsc_final",
    ]
    shown = [DAY.isoformat(), str(shop.id), "shop.example.com", "12", "True", "3", "40", "0.0750", "2.5000"]
    assert lines[1].split() == [*shown, "False"]  # DAY is not final in Search Console yet
    assert lines[2].split() == [DAY.isoformat(), str(blog.id), "blog.example.com", "4", "True", *["-"] * 5]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert stored(db) == {}
    # a write is a POST or PATCH to a table (a POST to /rpc/ calls a read-only function)
    assert gateway.count(lambda r: r.method in ("POST", "PATCH") and "/rpc/" not in r.path) == 0
    assert "Dry run: nothing was written; 2 records would have been stored" in result.stderr


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
        "provisional_values": 0,
        "accounts": {str(account.id): "connected"},
    }
    # broken: no Matomo value, and DAY is not final in Search Console with no row yet: nothing to store
    assert summary["records"] == {"stored": 1, "not_stored": 0}
    assert any("Archiving failed" in line for line in summary["problems"])
    assert summary["exit_status"] == 3 and summary["seconds"] > 0
    assert result.summary is not None  # the human line stays on the log


def test_json_reports_a_run_that_could_not_start(config, run_aggregator):
    del config["SUPABASE_URL"]

    result = run_aggregator("--json")

    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["exit_status"] == 1
    assert "Missing configuration: SUPABASE_URL" in summary["problems"][0]


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


def test_check_reports_a_healthy_setup_and_writes_nothing(fleet, db, run_aggregator):
    account = fleet.account()
    fleet.site("shop.example.com", account)
    fleet.site("plain.example.com", matomo=False)

    result = run_aggregator("check")

    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        "Supabase: 2 deployed sites, 1 Search Console accounts",
        "Supabase: daily_analytics has its (date, site_id) key",
        "Supabase: every table, column and function the run uses is there",
        "Matomo 5.4.0: answered for 1 of the 1 sites with a Matomo id",
        f"Search Console account {account.id}: refresh token; connected",
        "Search Console: 1 of 1 accounts connected; 1 sites matched to a property",
        f"Note: site {fleet.db.execute('select max(id) from sites').fetchone()[0]} (plain.example.com) has no "
        "matomo_site_id and gsc_account_id: that source is not fetched for it",
        "All good.",
    ]
    assert db.execute(
        "select (select count(*) from daily_analytics) + (select count(*) from aggregator_runs)"
    ).fetchone() == (0,)


def test_check_names_each_problem_with_its_fix(fleet, db, matomo, without_conflict_key, run_aggregator):
    revoked = fleet.account(revoked=True)
    fleet.site("orphan.example.com", revoked)
    lost = fleet.site("lost.example.com", fleet.account(), prop=None)
    unknown = fleet.site("unknown.example.com")
    matomo.site_ids.discard(unknown.matomo_id)

    result = run_aggregator("check")

    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("Problem: ")]
    assert len(problems) == 4, result.stdout
    assert any("apply every file of supabase/migrations/" in p for p in problems)
    assert any(f"Matomo site id {unknown.matomo_id}: An unexpected website" in p for p in problems)
    assert any(
        f"GSC account {revoked.id}: the refresh token has expired or been revoked" in p for p in problems
    )
    assert any(
        f"Site {lost.id} (lost.example.com): account" in p and "no verified Search Console property" in p
        for p in problems
    )
    assert result.stdout.splitlines()[-1] == "4 problems."


def authorization_address(google, refresh_token: str, code: str = "4/0AfJohX-test-code") -> str:
    google.codes[code] = refresh_token
    return (
        f"http://localhost/?state=s&code={code}&scope=https://www.googleapis.com/auth/webmasters.readonly\n"
    )


def test_authorize_stores_a_new_account_and_never_prints_the_token(db, google, run_aggregator, monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the stand-in speaks http, not https

    result = run_aggregator("authorize", answer=authorization_address(google, "1//0newTOKEN-Zq9"))

    assert result.returncode == 0, result.stderr
    assert "accounts.google.com/o/oauth2/auth?" in result.stdout and "access_type=offline" in result.stdout
    (row,) = db.execute("select id, oauth_refresh_token from gsc_accounts").fetchall()
    assert row[1] == "1//0newTOKEN-Zq9"
    assert f"Stored the refresh token in gsc_accounts row {row[0]}" in result.stdout


def test_authorize_replaces_an_accounts_token(fleet, db, google, run_aggregator, monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    account = fleet.account(revoked=True)

    result = run_aggregator(
        "authorize", "--account", str(account.id), answer=authorization_address(google, "1//0renewed-Kp2")
    )

    assert result.returncode == 0, result.stderr
    assert db.execute("select oauth_refresh_token from gsc_accounts").fetchall() == [("1//0renewed-Kp2",)]


def test_authorize_with_a_used_code_says_what_to_do(db, google, run_aggregator, monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")

    result = run_aggregator("authorize", answer="4/0unknown-code\n")

    assert result.returncode == 1
    assert "Google refused the code" in result.stderr and "run authorize again" in result.stderr
    assert db.execute("select count(*) from gsc_accounts").fetchone() == (0,)


def test_progress_shows_on_a_terminal_and_not_under_cron(fleet, launch, run_aggregator):
    for n in range(3):
        fleet.visits(fleet.site(f"s{n}.example.com"), 1)

    under_cron = run_aggregator("--date", DAY.isoformat())
    shown = shown_on_a_terminal(launch, "--date", DAY.isoformat())

    assert "sites fetched" not in under_cron.stderr
    assert "\r\x1b[KMatomo 3/3 and GSC 0/0 sites fetched, stored 3 records" in shown


def test_the_demo_runs_the_real_aggregator_and_prints_the_table(database):
    demo = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "demo.py")], capture_output=True, text=True, timeout=120
    )

    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "exit status 4" in demo.stdout
    assert (
        "Processed 5 sites. Fetched Matomo data for 5. Fetched GSC data for 3. Stored 39 records."
        in demo.stderr
    )
    assert "Healed 15 Matomo and 9 Search Console site-days of earlier nights" in demo.stderr
    table = [line.split() for line in demo.stdout.splitlines() if line.startswith("20")]
    assert len(table) == 30 and ["shop.example.com", "40", "3", "90", "0.033", "4.0"] in [
        row[1:] for row in table
    ]


# ---------------------------------------------------------------------------
# Never "All good" wrongly; a verdict on every run; options that belong to their command
# ---------------------------------------------------------------------------


def test_the_anon_key_sees_no_site_and_both_run_and_check_say_why(fleet, config, run_aggregator):
    fleet.site("shop.example.com", fleet.account())
    config["SUPABASE_SERVICE_ROLE_KEY"] = ANON_KEY  # row level security shows it no row

    run, check = run_aggregator(), run_aggregator("check")

    assert run.returncode == 1 and "use the service_role key" in run.stderr
    assert check.returncode == 1
    problems = [line for line in check.stdout.splitlines() if line.startswith("Problem: ")]
    assert len(problems) == 1 and "service_role key" in problems[0]
    assert check.stdout.splitlines()[-1] == "1 problem."


def test_a_site_that_matches_no_deployed_site_is_a_usage_error(fleet, db, run_aggregator):
    fleet.site("shop.example.com")

    result = run_aggregator("--site", "shp.example.com")

    assert result.returncode == 2
    assert "shp.example.com" in result.stderr
    assert db.execute("select count(*) from aggregator_runs").fetchone() == (0,)


@pytest.mark.parametrize(
    "args, text",
    [
        (["--account", "3"], "--account is for the authorize command"),
        (["check", "--site", "example.com"], "--site is for the run command"),
        (["authorize", "--date", "2026-11-01"], "--date is for the run command"),
    ],
)
def test_an_option_of_another_command_is_a_usage_error(args, text, db, gateway, run_aggregator):
    result = run_aggregator(*args)

    assert result.returncode == 2
    assert text in result.stderr
    assert gateway.requests == []


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


def test_json_holds_the_same_problems_whatever_the_log_level(fleet, db, matomo, run_aggregator):
    fine, broken = fleet.site("fine.example.com"), fleet.site("broken.example.com")
    fleet.visits(fine, 2)
    matomo.error_slots[broken.matomo_id] = "Archiving failed: General error"

    quiet = run_aggregator("--date", DAY.isoformat(), "--json", log_level="ERROR")
    loud = run_aggregator("--date", DAY.isoformat(), "--json", log_level="DEBUG")

    problems = [json.loads(r.stdout)["problems"] for r in (quiet, loud)]
    assert problems[0] == problems[1] and any("Archiving failed" in p for p in problems[0])
    assert "Archiving failed" not in quiet.stderr  # the log itself still shows only ERROR


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


# ---------------------------------------------------------------------------
# check sees every table, column and function a run uses; a run that cannot record itself
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "break_it, named",
    [
        ("alter table aggregator_runs rename to aggregator_runs_gone", "aggregator_runs"),
        ("alter table daily_analytics rename column gsc_final to gsc_final_gone", "gsc_final"),
        ("alter table daily_analytics rename column matomo_final to matomo_final_gone", "matomo_final"),
        ("alter table site_sources rename to site_sources_gone", "site_sources"),
        ("alter function analytics_holes rename to analytics_holes_gone", "analytics_holes"),
    ],
)
def test_check_names_every_missing_table_column_and_function(break_it, named, fleet, db, run_aggregator):
    fleet.visits(fleet.site("shop.example.com"), 1)
    undo = {
        "aggregator_runs": "alter table aggregator_runs_gone rename to aggregator_runs",
        "gsc_final": "alter table daily_analytics rename column gsc_final_gone to gsc_final",
        "matomo_final": "alter table daily_analytics rename column matomo_final_gone to matomo_final",
        "site_sources": "alter table site_sources_gone rename to site_sources",
        "analytics_holes": "alter function analytics_holes_gone rename to analytics_holes",
    }[named]
    db.execute(break_it)
    try:
        result = run_aggregator("check")
    finally:
        db.execute(undo)

    assert result.returncode == 1, result.stdout
    problems = [line for line in result.stdout.splitlines() if line.startswith("Problem:")]
    assert any(named in line and "apply every file of supabase/migrations/" in line for line in problems), (
        problems
    )
    assert "All good." not in result.stdout


def test_check_says_a_fleet_with_no_source_configured_is_a_problem(fleet, run_aggregator):
    fleet.site("shop.example.com", matomo=False)

    result = run_aggregator("check")

    assert result.returncode == 1
    assert "No deployed site has a matomo_site_id or a gsc_account_id" in result.stdout


def test_a_run_that_cannot_record_itself_is_not_exit_0(fleet, db, run_aggregator):
    fleet.visits(fleet.site("shop.example.com"), 1)
    db.execute("alter table aggregator_runs rename to aggregator_runs_gone")
    try:
        result = run_aggregator("--date", DAY.isoformat())
    finally:
        db.execute("alter table aggregator_runs_gone rename to aggregator_runs")

    assert result.returncode == 4
    (verdict,) = lines_with("Exit status 4", result.stderr, verdict=True)
    assert "aggregator_runs cannot be written: apply every file of supabase/migrations/" in verdict
    assert stored(db)  # the numbers themselves were stored


# ---------------------------------------------------------------------------
# Smaller things an operator meets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--date", ""], ["--from", ""], ["--from", "2026-11-01", "--to", " "]])
def test_an_empty_date_option_is_a_usage_error_not_the_nightly_run(args, db, run_aggregator):
    result = run_aggregator(*args)

    assert result.returncode == 2
    assert "is empty (an empty shell variable?)" in result.stderr
    assert db.execute("select count(*) from aggregator_runs").fetchone() == (0,)


def test_supabase_key_is_taken_for_the_service_role_key(config, fleet, run_aggregator):
    fleet.site("shop.example.com")
    config["SUPABASE_KEY"] = "sb_secret_pasted_under_another_name"

    result = run_aggregator("--date", DAY.isoformat())

    assert lines_with("SUPABASE_KEY in", result.stderr)
    assert "did you mean SUPABASE_SERVICE_ROLE_KEY?" in result.stderr


def test_an_account_id_that_is_not_a_number_is_a_usage_error(run_aggregator):
    result = run_aggregator("authorize", "--account", "abc")

    assert result.returncode == 2
    assert "--account takes a gsc_accounts id (a number), got 'abc'" in result.stderr


def test_log_lines_say_their_utc_offset_and_one_site_is_one_site(fleet, run_aggregator):
    fleet.visits(fleet.site("shop.example.com"), 1)

    result = run_aggregator("--date", DAY.isoformat())

    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO) ", result.stderr)
    assert (
        result.summary
        == "Processed 1 site. Fetched Matomo data for 1. Fetched GSC data for 0. Stored 1 record."
    )


# ---------------------------------------------------------------------------
# It installs like a command-line tool
# ---------------------------------------------------------------------------


def test_a_python_without_the_dependencies_says_what_to_run_instead():
    # -S: no site-packages, as the system's python3 started outside the venv
    done = subprocess.run([sys.executable, "-S", str(ROOT / "aggregator.py")], capture_output=True, text=True)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "is not installed for" in done.stderr and "the README's first command sets up .venv" in done.stderr


def test_pip_install_gives_the_analytics_aggregator_command(tmp_path):
    source, target = tmp_path / "clone", tmp_path / "installed"
    source.mkdir()  # pip builds in the source tree: a copy keeps the checkout clean
    for name in ("aggregator.py", "pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]

    done = subprocess.run(
        [str(target / "bin" / "analytics-aggregator"), "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )

    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"aggregator\.py \d+\.\d+\.\d+\n", done.stdout)
    assert os.access(ROOT / "aggregator.py", os.X_OK)  # ./aggregator.py runs too


# ---------------------------------------------------------------------------
# An operator who already has a sites table
# ---------------------------------------------------------------------------


def test_an_existing_sites_table_keeps_its_rows_and_policies_and_gets_the_columns(database):

    name = f"aggregator_existing_{os.getpid()}"
    with psycopg.connect(server_url(), autocommit=True) as admin:
        admin.execute(f"drop database if exists {name} with (force)")
        admin.execute(f"create database {name}")
        try:
            with psycopg.connect(make_conninfo(server_url(), dbname=name), autocommit=True) as conn:
                conn.execute(SUPABASE_BOOTSTRAP)
                # the operator's own table: other columns, its own status values, no RLS
                conn.execute(
                    "create table public.sites (id bigint generated by default as identity primary key, "
                    "name text not null, status text)"
                )
                conn.execute("insert into public.sites (name, status) values ('Shop', 'live')")
                for migration in MIGRATIONS:
                    conn.execute(migration.read_text())
                columns = {
                    row[0]
                    for row in conn.execute(
                        "select column_name from information_schema.columns where table_name = 'sites'"
                    )
                }
                kept = conn.execute("select name, status, status_deployment from public.sites").fetchall()
                rls = conn.execute(
                    "select relrowsecurity from pg_class where oid = 'public.sites'::regclass"
                ).fetchone()
                key = conn.execute(
                    "select count(*) from pg_constraint where conrelid = 'public.sites'::regclass and contype = 'f'"
                ).fetchone()
        finally:
            admin.execute(f"drop database if exists {name} with (force)")

    assert {"domain", "status_deployment", "matomo_site_id", "gsc_account_id", "name", "status"} <= columns
    assert kept == [("Shop", "live", "pending")]
    assert rls == (False,) and key == (1,)


def test_deployed_status_names_which_sites_are_aggregated(fleet, db, config, run_aggregator):
    live = fleet.site("shop.example.com", status="live")
    fleet.visits(live, 5)
    fleet.site("draft.example.com", status="deployed")  # not live: another table's meaning
    config["DEPLOYED_STATUS"] = "live"

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert result.summary.startswith("Processed 1 site.")
    assert list(stored(db)) == [live.id]


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


# ---------------------------------------------------------------------------
# Each command asks only for the settings it uses
# ---------------------------------------------------------------------------


def test_accounts_and_status_need_only_supabase(config, fleet, run_aggregator):
    fleet.account()
    for name in ("MATOMO_URL", "MATOMO_TOKEN_AUTH", "GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET"):
        del config[name]

    accounts, status = run_aggregator("accounts"), run_aggregator("status")

    assert accounts.returncode == 0, accounts.stderr
    assert status.returncode == 0, status.stderr
    assert "Missing configuration" not in accounts.stderr + status.stderr


def test_a_fleet_of_service_accounts_needs_no_oauth_client(config, fleet, db, run_aggregator):
    robot = fleet.service_account()
    site = fleet.site("shop.example.com", robot)
    fleet.search(site, 3, 30, day=DAY - dt.timedelta(days=1))
    del config["GOOGLE_CLIENT_ID"], config["GOOGLE_CLIENT_SECRET"]

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert stored(db, DAY - dt.timedelta(days=1))[site.id]["gsc_clicks"] == 3


def test_a_refresh_token_without_the_oauth_client_says_which_settings(config, fleet, run_aggregator):
    fleet.site("shop.example.com", fleet.account())
    del config["GOOGLE_CLIENT_ID"], config["GOOGLE_CLIENT_SECRET"]

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 4
    (verdict,) = lines_with("Exit status 4", result.stderr, verdict=True)
    assert "GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET are not set" in verdict


def test_the_demo_keeps_a_sandbox_where_the_commands_run_until_ctrl_c(database):
    demo = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "demo.py"), "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        shown = ""
        while "The sandbox is up" not in shown:
            line = demo.stdout.readline()
            assert line, shown
            shown += line
        while "Ctrl-C here stops" not in shown:
            shown += demo.stdout.readline()
        env_file = ROOT / "sandbox.env"
        assert env_file.exists() and f"--env-file {env_file} status" in shown
        command = [sys.executable, str(ROOT / "aggregator.py"), "--env-file", str(env_file)]
        environ = {k: v for k, v in os.environ.items() if k not in CONFIG_NAMES}
        status = subprocess.run([*command, "status"], capture_output=True, text=True, env=environ, timeout=60)
        accounts = subprocess.run(
            [*command, "accounts"], capture_output=True, text=True, env=environ, timeout=60
        )
        assert status.returncode == 0 and "Sites that need a person: 1" in status.stdout, status.stderr
        assert accounts.returncode == 0 and "refresh token" in accounts.stdout
    finally:
        demo.send_signal(signal.SIGINT)
        demo.communicate(timeout=30)

    assert not (ROOT / "sandbox.env").exists()


def test_a_placeholder_exported_in_the_environment_is_blamed_on_the_environment(tmp_path, config):
    env_file = write_env_file(tmp_path / ".env", config)
    environ = {k: v for k, v in os.environ.items() if k not in CONFIG_NAMES}
    environ["MATOMO_TOKEN_AUTH"] = "replace-with-your-matomo-token"  # an old export in the shell

    done = subprocess.run(
        [sys.executable, str(AGGREGATOR), "--env-file", str(env_file), "--date", DAY.isoformat()],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )

    assert done.returncode == 1
    assert "MATOMO_TOKEN_AUTH still holds the placeholder of .env.example in the environment" in done.stderr

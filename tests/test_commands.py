"""The operator's commands: check (never "All good" wrongly), accounts, authorize, the progress a
long run shows, and the demo."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import CONFIG_NAMES, DAY, ROOT, lines_with, shown_on_a_terminal

HELD_PORTS: list[socket.socket] = []


def closed_url() -> str:
    """An address where nothing listens: connections are refused. The port stays bound (never
    listening) for the session, so that another test's server cannot take it meanwhile."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    HELD_PORTS.append(probe)
    return f"http://127.0.0.1:{probe.getsockname()[1]}/"


def problems_of(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("Problem: ")]


def google_answer(
    google, refresh_token: str, email: str = "owner@example.com", code: str = "4/0AfJohX-code"
) -> str:
    """The address the browser lands on after Allow, as the operator pastes it."""
    google.codes[code] = (refresh_token, email)
    return f"http://localhost/?state=s&code={code}&scope=email%20openid\n"


@pytest.fixture
def insecure_transport(monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the stand-in speaks http, not https


def waiting_for_input(pid: int) -> None:
    """Returns once the process waits in a read of its stdin pipe (Linux's /proc tells; elsewhere
    after half a second)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if "pipe_read" in Path(f"/proc/{pid}/wchan").read_text():
                return
        except OSError:
            break
        time.sleep(0.01)
    time.sleep(0.5)


def authorization_address(google, refresh_token: str, code: str = "4/0AfJohX-test-code") -> str:
    google.codes[code] = refresh_token
    return (
        f"http://localhost/?state=s&code={code}&scope=https://www.googleapis.com/auth/webmasters.readonly\n"
    )


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------


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
    assert any(f"Site {unknown.id} (unknown.example.com): Matomo has no site with its" in p for p in problems)
    assert any(
        f"GSC account {revoked.id}: the refresh token has expired or been revoked" in p for p in problems
    )
    assert any(
        f"Site {lost.id} (lost.example.com): account" in p and "no verified Search Console property" in p
        for p in problems
    )
    assert result.stdout.splitlines()[-1] == "4 problems."


def test_check_counts_a_dead_matomo_once_without_the_librarys_retries(fleet, config, run_aggregator):
    fleet.site("shop.example.com")
    config.update(MATOMO_URL=closed_url(), HTTP_RETRIES="2")

    result = run_aggregator("check")

    assert result.returncode == 1
    (problem,) = problems_of(result)
    assert "Matomo cannot be reached at MATOMO_URL" in problem
    assert result.stdout.splitlines()[-1] == "1 problem."
    # Printed once: as a Problem line, not again in the log (both show on a terminal).
    assert len(lines_with("Matomo cannot be reached", result.output)) == 1


def test_check_says_a_matomo_url_that_answers_html_is_probably_wrong(fleet, matomo, config, run_aggregator):
    fleet.site("shop.example.com")
    config["MATOMO_URL"] = matomo.url + "/login/"  # a login page, not the install's base URL

    result = run_aggregator("check")

    (problem,) = problems_of(result)
    assert "MATOMO_URL is probably wrong" in problem and "not JSON" in problem


def test_check_goes_on_past_a_dead_supabase_to_a_wrong_token_and_secret(config, run_aggregator):
    config.update(
        SUPABASE_URL=closed_url(),
        HTTP_RETRIES="1",
        MATOMO_TOKEN_AUTH="not-the-token-0123456789",
        GOOGLE_CLIENT_SECRET="GOCSPX-not-the-secret",
    )

    result = run_aggregator("check")

    assert result.returncode == 1
    problems = problems_of(result)
    assert len(problems) == 3, result.stdout
    assert "reading sites" in problems[0]
    assert "MATOMO_TOKEN_AUTH" in problems[1]
    assert "GOOGLE_CLIENT_ID or GOOGLE_CLIENT_SECRET is wrong" in problems[2]
    assert "not-the-token" not in result.output and "not-the-secret" not in result.output


@pytest.mark.parametrize("language", ["en", "de"])
def test_check_names_the_fix_for_a_token_whose_user_may_view_no_site_in_its_users_language(
    fleet, matomo, language, run_aggregator
):
    fleet.site("shop.example.com")
    matomo.site_ids.clear()  # a new token's user, never given access to any site
    matomo.language = language

    result = run_aggregator("check")

    assert result.returncode == 1
    (problem,) = problems_of(result)
    assert "MATOMO_TOKEN_AUTH" in problem and "view access" in problem, problem


def test_check_tries_every_account_also_those_without_sites(fleet, run_aggregator):
    fleet.site("shop.example.com", fleet.account())
    unused = fleet.account(revoked=True)

    result = run_aggregator("check")

    assert result.returncode == 1
    (problem,) = problems_of(result)
    assert f"GSC account {unused.id}: the refresh token has expired or been revoked" in problem
    assert "Search Console: 1 of 2 accounts connected; 1 sites matched to a property" in result.stdout


def test_check_spots_placeholders_and_mistyped_settings_before_any_network_call(
    config, gateway, matomo, google, run_in_process
):
    config.update(SUPABASE_SERVICE_ROLE_KEY="replace-with-your-service-role-key", GSC_QMP="600")

    result = run_in_process("check")

    assert result.returncode == 1
    problems = problems_of(result)
    assert len(problems) == 2, result.stdout
    assert "GSC_QMP" in problems[0] and "did you mean GSC_QPM?" in problems[0]
    assert "SUPABASE_SERVICE_ROLE_KEY still holds the placeholder of .env.example" in problems[1]
    assert gateway.requests == matomo.requests == google.requests == []


def test_check_json_gives_the_same_problems_for_monitoring(fleet, matomo, run_aggregator):
    unknown = fleet.site("unknown.example.com")
    matomo.site_ids.discard(unknown.matomo_id)
    matomo.site_ids.add(999)  # the install's other sites, which the token may view

    result = run_aggregator("check", "--json")

    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["exit_status"] == 1
    assert len(report["problems"]) == 1 and f"Site {unknown.id} (unknown." in report["problems"][0]
    assert report["matomo"] == {"reachable": True, "version": "5.4.0", "sites": 1, "answered": 0}
    assert report["supabase"]["sites"] == 1


def test_check_json_with_a_bad_configuration_is_still_json(config, run_in_process):
    del config["MATOMO_URL"]

    result = run_in_process("check", "--json")

    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert "MATOMO_URL" in report["problems"][0]


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


# ---------------------------------------------------------------------------
# accounts
# ---------------------------------------------------------------------------


def test_accounts_lists_each_account_with_its_last_run_and_no_token(fleet, db, run_aggregator):
    working, revoked, unused = fleet.account(), fleet.account(revoked=True), fleet.account()
    fleet.site("a.example.com", working)
    fleet.site("b.example.com", working)
    fleet.site("c.example.com", revoked)
    run_aggregator()  # the nightly run records how each account did

    result = run_aggregator("accounts")

    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert result.stdout.splitlines()[0].split() == ["ID", "KIND", "LABEL", "SITES", "LAST", "RUN"]
    assert re.match(
        rf"\s*{working.id}\s+refresh token\s+owner1@example.com\s+2\s+connected \(\d{{4}}-",
        rows[str(working.id)],
    )
    assert re.match(
        rf"\s*{revoked.id}\s+refresh token\s+owner2@example.com\s+1\s+the refresh token has expired or been revoked",
        rows[str(revoked.id)],
    )
    assert re.match(rf"\s*{unused.id}\s+refresh token\s+owner3@example.com\s+0\s+-$", rows[str(unused.id)])


# ---------------------------------------------------------------------------
# authorize
# ---------------------------------------------------------------------------


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


def test_authorize_shows_and_stores_which_google_account_it_was(
    db, google, insecure_transport, run_aggregator
):
    result = run_aggregator("authorize", answer=google_answer(google, "1//0mail-Tq4", "ops@example.org"))

    assert result.returncode == 0, result.stderr
    assert "Google account ops@example.org" in result.stdout
    assert "userinfo.email" in result.stdout  # the scope is asked for in the address shown
    assert db.execute("select label, oauth_refresh_token from gsc_accounts").fetchall() == [
        ("ops@example.org", "1//0mail-Tq4")
    ]


@pytest.mark.parametrize("account", ["999"])
def test_authorize_checks_the_account_before_the_browser_round_trip(account, db, google, run_aggregator):
    result = run_aggregator("authorize", "--account", account, answer="")

    assert result.returncode == 1
    assert "accounts.google.com" not in result.stdout
    assert (
        len(lines_with("ERROR", result.stderr)) == 1 and "accounts" in lines_with("ERROR", result.stderr)[0]
    )


@pytest.mark.parametrize("answer, stored", [("n", False), ("y", True)])
def test_reauthorizing_with_another_google_login_asks_before_cutting_the_sites_off(
    answer, stored, fleet, db, google, insecure_transport, run_aggregator
):
    account = fleet.account()
    shop = fleet.site("shop.example.com", account)
    fleet.site("blog.example.com", account)
    pasted = google_answer(google, "1//0another-login-Kp2", "someone.else@example.org")

    result = run_aggregator("authorize", "--account", str(account.id), answer=pasted + answer + "\n")

    assert result.returncode == (0 if stored else 1), result.stderr
    assert (
        "The Google account someone.else@example.org sees no Search Console property for 2 sites"
        in result.stdout
    )
    assert f"Site {shop.id} (shop.example.com)" in result.stdout
    (token,) = db.execute("select oauth_refresh_token from gsc_accounts").fetchone()
    assert (token == "1//0another-login-Kp2") is stored


def test_reauthorizing_the_same_login_asks_nothing(fleet, db, google, insecure_transport, run_aggregator):
    account = fleet.account()
    fleet.site("shop.example.com", account)

    result = run_aggregator(
        "authorize", "--account", str(account.id), answer=google_answer(google, account.refresh_token)
    )

    assert result.returncode == 0, result.stderr
    assert "Store it anyway" not in result.stdout


def test_authorize_asks_again_after_a_wrong_code(db, google, insecure_transport, run_aggregator):
    answer = "4/0mistyped-code\n" + google_answer(google, "1//0second-try-Hz7")

    result = run_aggregator("authorize", answer=answer)

    assert result.returncode == 0, result.stderr
    assert "Google refused the code" in result.stderr and "paste the new one" in result.stderr
    assert db.execute("select oauth_refresh_token from gsc_accounts").fetchall() == [("1//0second-try-Hz7",)]


def test_authorize_with_search_console_unticked_says_so_and_stores_nothing(
    db, google, insecure_transport, run_aggregator
):
    google.codes["4/0AfJohX-partial"] = (
        "1//0partial-Rt5",
        "owner@example.com",
        "openid https://www.googleapis.com/auth/userinfo.email",
    )

    result = run_aggregator("authorize", answer="http://localhost/?state=s&code=4/0AfJohX-partial\n")

    assert result.returncode == 1
    (line,) = lines_with("ERROR", result.stderr)
    assert "Search Console access was not granted" in line and "leave every permission ticked" in line
    assert db.execute("select count(*) from gsc_accounts").fetchone() == (0,)


def test_authorize_after_deny_in_the_browser_says_so_in_one_line(
    db, google, insecure_transport, run_aggregator
):
    result = run_aggregator("authorize", answer="http://localhost/?error=access_denied&state=s\n")

    assert result.returncode == 1
    assert "Traceback" not in result.output
    (line,) = lines_with("ERROR", result.stderr)
    assert "access_denied" in line and "choose Allow" in line
    assert db.execute("select count(*) from gsc_accounts").fetchone() == (0,)


def test_authorize_interrupted_at_the_prompt_is_one_line(db, google, insecure_transport, launch):
    # Started as from a terminal, with Ctrl-C at its default. A suite started in the background
    # (`pytest &`) has SIGINT ignored, its children inherit that, and Python then installs no
    # handler for it: the signal would be lost and the script wait at its prompt.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = launch("authorize", log_level="INFO")
    finally:
        signal.signal(signal.SIGINT, inherited)
    shown, deadline = b"", time.monotonic() + 60
    while b"Address" not in shown and time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 1)[0]:
            shown += os.read(process.stdout.fileno(), 4096)
    # As a person would, press Ctrl-C once the prompt waits for input: the prompt is shown just
    # before input() blocks in read(), and a signal in between waits for the next input (CPython
    # checks for signals when read() is interrupted, not before it starts).
    waiting_for_input(process.pid)
    process.send_signal(signal.SIGINT)
    # stdin stays open until the script has ended, as a terminal's does.
    process.wait(timeout=30)
    _, stderr = process.communicate()

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert lines_with("ERROR", stderr) and "nothing was stored" in lines_with("ERROR", stderr)[0]


# ---------------------------------------------------------------------------
# A long run shows that it is alive
# ---------------------------------------------------------------------------


def test_under_cron_a_long_run_logs_progress_lines(fleet, matomo, config, run_aggregator):
    for n in range(3):
        fleet.visits(fleet.site(f"s{n}.example.com"), 1)
    matomo.site_day_cost = 0.8  # seconds per site and day: three requests one after another
    config.update(PROGRESS_EVERY="1", MATOMO_BULK_SIZE="1", MATOMO_WORKERS="1")

    result = run_aggregator("--date", DAY.isoformat(), log_level="INFO")

    assert result.returncode == 0
    progress = lines_with("INFO Progress: Matomo ", result.stderr)
    assert progress, result.stderr
    assert re.search(r"Progress: Matomo [0-3]/3 and GSC 0/0 sites done, stored 0 records", progress[0])
    assert "\r" not in result.stderr and "\x1b" not in result.stderr


def test_on_a_terminal_log_lines_are_not_glued_to_the_progress_line(fleet, matomo, config, launch):
    sites = [fleet.site(f"s{n}.example.com") for n in range(3)]
    matomo.error_slots[sites[1].matomo_id] = "Archiving failed: General error"
    matomo.site_day_cost = 0.2
    config.update(MATOMO_BULK_SIZE="1", MATOMO_WORKERS="1")

    shown = shown_on_a_terminal(launch, "--date", DAY.isoformat())

    warnings = [
        m.start()
        for m in re.finditer(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+[+-]\d\d:\d\d WARNING Matomo site id", shown
        )
    ]
    assert warnings, shown
    for start in warnings:
        assert shown[:start].endswith(("\r\x1b[K", "\n")), repr(shown[start - 40 : start])
    assert re.search(r"Matomo 1/3 and GSC 0/0 sites done, stored 0 records, about \d+ s left", shown), shown


def test_progress_shows_on_a_terminal_and_not_under_cron(fleet, launch, run_aggregator):
    for n in range(3):
        fleet.visits(fleet.site(f"s{n}.example.com"), 1)

    under_cron = run_aggregator("--date", DAY.isoformat())
    shown = shown_on_a_terminal(launch, "--date", DAY.isoformat())

    assert "sites fetched" not in under_cron.stderr
    assert "\r\x1b[KMatomo 3/3 and GSC 0/0 sites fetched, stored 3 records" in shown


# ---------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------


def test_the_demo_runs_the_real_aggregator_and_prints_the_table(database):
    demo = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "demo.py")], capture_output=True, text=True, timeout=120
    )

    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "exit status 4" in demo.stdout
    assert (
        "Processed 5 sites. Fetched Matomo data for 5. Fetched GSC data for 3. Stored 30 records."
        in demo.stderr
    )
    assert "Healed 15 Matomo and 9 Search Console site-days of earlier nights" in demo.stderr
    table = [line.split() for line in demo.stdout.splitlines() if line.startswith("20")]
    assert len(table) == 30 and ["shop.example.com", "40", "3", "90", "0.033", "4.0"] in [
        row[1:] for row in table
    ]


def test_the_demo_keeps_a_sandbox_where_the_commands_run_until_ctrl_c_or_a_kill(database):
    # one after the other: both sandboxes would write the one sandbox.env
    for stop in (signal.SIGINT, signal.SIGTERM):
        sandbox_tried_then_stopped(stop)
        assert not (ROOT / "sandbox.env").exists(), signal.Signals(stop).name


def sandbox_tried_then_stopped(stop: int) -> None:
    errors = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the demo runs
    demo = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "demo.py"), "--keep"],
        stdout=subprocess.PIPE,
        stderr=errors,
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
        demo.send_signal(stop)
        try:
            demo.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            demo.kill()
            errors.seek(0)
            said = f"{demo.communicate()[0][-2000:]} {errors.read()[-3000:]}"
            raise AssertionError(f"the demo did not stop on {signal.Signals(stop).name}: {said}") from None

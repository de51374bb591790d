"""The command line: each command and its own options, usage errors as one line with exit 2, and
the script installed as a command."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import DAY, ROOT, TODAY

# ---------------------------------------------------------------------------
# Commands and their options
# ---------------------------------------------------------------------------


def test_each_command_has_its_own_help(run_in_process):
    main, check, run = (
        run_in_process(*args) for args in (["--help"], ["check", "--help"], ["run", "--help"])
    )

    assert main.returncode == check.returncode == run.returncode == 0
    for command in ("run", "check", "authorize", "accounts"):
        assert command in main.stdout
    assert "--json" in check.stdout and "--site" not in check.stdout
    assert "--site" in run.stdout and "--dry-run" in run.stdout


def test_the_run_command_can_be_named_or_left_out(fleet, db, run_aggregator):
    fleet.visits(fleet.site("shop.example.com"), 4)

    named, implied = (
        run_aggregator("run", "--date", DAY.isoformat()),
        run_aggregator("--date", DAY.isoformat()),
    )

    assert named.returncode == implied.returncode == 0
    assert (
        named.summary
        == implied.summary
        == ("Processed 1 site. Fetched Matomo data for 1. Fetched GSC data for 0. Stored 1 record.")
    )


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
def test_bad_command_line_is_one_line_and_exit_2(args, message, gateway, matomo, google, run_in_process):
    result = run_in_process(*args)

    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert gateway.requests == matomo.requests == google.requests == []


@pytest.mark.parametrize(
    "args, text",
    [
        (["--account", "3"], "--account is for the authorize command"),
        (["check", "--site", "example.com"], "--site is for the run command"),
        (["authorize", "--date", "2026-11-01"], "--date is for the run command"),
    ],
)
def test_an_option_of_another_command_is_a_usage_error(args, text, db, gateway, run_in_process):
    result = run_in_process(*args)

    assert result.returncode == 2
    assert text in result.stderr
    assert gateway.requests == []


@pytest.mark.parametrize("args", [["--date", ""], ["--from", ""], ["--from", "2026-11-01", "--to", " "]])
def test_an_empty_date_option_is_a_usage_error_not_the_nightly_run(args, db, run_in_process):
    result = run_in_process(*args)

    assert result.returncode == 2
    assert "is empty (an empty shell variable?)" in result.stderr
    assert db.execute("select count(*) from aggregator_runs").fetchone() == (0,)


def test_today_is_not_over_and_is_refused(run_in_process):
    result = run_in_process("--date", TODAY.isoformat())

    assert result.returncode == 2
    assert "yesterday" in result.stderr


def test_an_account_id_that_is_not_a_number_is_a_usage_error(run_in_process):
    result = run_in_process("authorize", "--account", "abc")

    assert result.returncode == 2
    assert "--account takes a gsc_accounts id (a number), got 'abc'" in result.stderr


def test_a_site_that_matches_no_deployed_site_is_a_usage_error(fleet, db, run_aggregator):
    fleet.site("shop.example.com")

    result = run_aggregator("--site", "shp.example.com")

    assert result.returncode == 2
    assert "shp.example.com" in result.stderr
    assert db.execute("select count(*) from aggregator_runs").fetchone() == (0,)


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


def test_a_dry_run_piped_into_head_stops_without_a_traceback(fleet, matomo, config, launch):
    for n in range(400):
        fleet.site(f"s{n}.example.com")
    config.update(MATOMO_BULK_SIZE="10", MATOMO_WORKERS="1")
    matomo.site_day_cost = 0.01

    process = launch("--from", (DAY - dt.timedelta(days=4)).isoformat(), "--to", DAY.isoformat(), "--dry-run")
    assert process.stdout.readline().startswith("date")
    process.stdout.close()  # `| head -1` has what it wanted and exits
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 141  # 128 + SIGPIPE, as the shell's own tools end
    assert "Traceback" not in stderr and "Unexpected error" not in stderr, stderr[-2000:]
    assert len(matomo.report_requests()) < 10  # of 40: nothing more is asked once no one reads


def test_a_json_summary_nobody_reads_leaves_the_run_its_exit_status(fleet, launch):
    fleet.visits(fleet.site("shop.example.com"), 3)

    process = launch("--date", DAY.isoformat(), "--json")
    process.stdout.close()  # a monitoring wrapper that died
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 0
    assert "Traceback" not in stderr, stderr[-2000:]


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

    def installed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(target / "bin" / "analytics-aggregator"), *args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(target)},
        )

    done, wrong = installed("--version"), installed("--date", "")

    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"analytics-aggregator \d+\.\d+\.\d+\n", done.stdout)  # the name it was started as
    assert wrong.returncode == 2 and wrong.stderr.startswith("analytics-aggregator: error: "), wrong.stderr
    assert "aggregator.py" not in wrong.stderr
    assert os.access(ROOT / "aggregator.py", os.X_OK)  # ./aggregator.py runs too

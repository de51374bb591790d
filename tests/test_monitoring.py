"""The operator hears about a night that needs a person: the shipped cron line, a monitoring
check's pings, the systemd units."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AGGREGATOR, CONFIG_NAMES, ROOT, lines_with
from fakes.healthchecks import FakeHealthchecks
from fakes.settings import write_env_file

UUID = "5b4f3a5e-8d2c-4b7a-9c61-0e3f7d2a9b18"  # a check's ping URL is a secret of sorts


def cron_command(home: Path, logs: Path) -> str:
    """The command of crontab.example's job line, its paths moved under this test's directory."""
    line = next(
        line
        for line in (ROOT / "crontab.example").read_text().splitlines()
        if line and not line.startswith("#") and "=" not in line.split()[0]
    )
    command = line.split(None, 5)[5]
    return (
        command.replace("/opt/analytics-aggregator", str(home))
        .replace("/var/log/", f"{logs}/")
        .replace("/tmp/analytics-aggregator.lock", f"{logs}/aggregator.lock")
    )


@pytest.fixture
def cron(tmp_path, config):
    """Runs crontab.example's line through sh as cron does, the job installed as the README says
    (aggregator.py, .env and .venv in one directory); returns (exit status, what cron would mail)."""
    home = tmp_path / "analytics-aggregator"
    home.mkdir()
    shutil.copy(AGGREGATOR, home / "aggregator.py")
    (home / ".venv").symlink_to(Path(sys.prefix))

    def run() -> tuple[int, str]:
        write_env_file(home / ".env", config)
        environ = {k: v for k, v in os.environ.items() if k not in CONFIG_NAMES}
        done = subprocess.run(
            ["sh", "-c", cron_command(home, tmp_path)],
            capture_output=True,
            text=True,
            env=environ,
            timeout=120,
        )
        return done.returncode, done.stdout + done.stderr

    return run


def test_the_cron_line_is_silent_on_a_clean_night_and_mails_a_night_that_needs_a_person(
    cron, tmp_path, config, fleet
):
    fleet.visits(fleet.site("shop.example.com"), 12)

    status, mailed = cron()

    assert (status, mailed) == (0, "")
    log = (tmp_path / "analytics-aggregator.log").read_text()
    assert "Processed 1 site" in log and "Exit status 0" in log

    config["MATOMO_TOKEN_AUTH"] = "wrong-token-0123456789abcdef"
    status, mailed = cron()

    assert status == 4
    assert lines_with("MATOMO_TOKEN_AUTH", mailed) and lines_with("Exit status 4", mailed, verdict=True)
    assert "INFO" not in mailed
    assert (tmp_path / "analytics-aggregator.log").read_text().count("Processed 1 site") == 2


def test_the_cron_line_says_a_skipped_night(cron, tmp_path, fleet):
    fleet.site("shop.example.com")
    holder = subprocess.Popen(["flock", str(tmp_path / "aggregator.lock"), "sleep", "30"])
    try:
        for _ in range(50):  # until the holder has the lock
            if subprocess.run(["flock", "-n", str(tmp_path / "aggregator.lock"), "true"]).returncode:
                break
        status, mailed = cron()
    finally:
        holder.kill()

    assert status == 75
    assert "night skipped: the previous run still holds" in mailed


@pytest.fixture
def healthchecks():
    server = FakeHealthchecks(UUID).start()
    yield server
    server.stop()


def test_a_monitoring_check_is_pinged_at_the_start_and_with_the_exit_status(
    healthchecks, config, fleet, matomo, run_aggregator
):
    config["HEALTHCHECK_URL"] = healthchecks.ping_url()
    site = fleet.site("shop.example.com")
    fleet.visits(site, 3)

    clean = run_aggregator()
    matomo.error_slots[site.matomo_id] = "Archiving failed: General error"
    missing = run_aggregator()

    assert (clean.returncode, missing.returncode) == (0, 3)
    assert [what for what, _ in healthchecks.pings] == ["start", "0", "start", "3"]
    assert "Processed 1 site" in healthchecks.pings[1][1] and "Exit status 3" in healthchecks.pings[3][1]
    assert UUID not in clean.output + missing.output  # the ping URL is kept out of the log


def test_a_monitoring_check_that_fails_never_fails_the_run(healthchecks, config, fleet, run_aggregator):
    config["HEALTHCHECK_URL"] = healthchecks.ping_url()
    healthchecks.inject("/ping/", status=503, body="down", content_type="text/plain", times=100)
    fleet.visits(fleet.site("shop.example.com"), 3)

    result = run_aggregator()

    assert result.returncode == 0, result.stderr
    assert len(lines_with("HEALTHCHECK_URL could not be pinged", result.stderr)) == 2


def test_the_dry_run_pings_nothing(healthchecks, config, fleet, run_aggregator):
    config["HEALTHCHECK_URL"] = healthchecks.ping_url()
    fleet.site("shop.example.com")

    assert run_aggregator("--dry-run").returncode == 0
    assert healthchecks.pings == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_units_verify(tmp_path):
    for name in ("analytics-aggregator.service", "analytics-aggregator.timer"):
        text = (ROOT / name).read_text()
        text = text.replace("/opt/analytics-aggregator/.venv/bin/python", sys.executable)
        (tmp_path / name).write_text(text.replace("/opt/analytics-aggregator/aggregator.py", str(AGGREGATOR)))

    done = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            *(str(tmp_path / n) for n in ("analytics-aggregator.service", "analytics-aggregator.timer")),
        ],
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stderr

"""Configuration: every setting named when missing or malformed, never echoed; the .env file; each
command asks only for the settings it uses."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

from conftest import (
    AGGREGATOR,
    CONFIG_NAMES,
    DAY,
    SERVICE_KEY,
    lines_with,
    stored,
)
from fakes.settings import write_env_file

# ---------------------------------------------------------------------------
# Missing and malformed settings
# ---------------------------------------------------------------------------


def test_a_missing_variable_is_named_before_any_network_call(config, gateway, matomo, google, run_in_process):
    del config["MATOMO_TOKEN_AUTH"]
    del config["GOOGLE_CLIENT_SECRET"]

    result = run_in_process()

    assert result.returncode == 1
    assert "Missing configuration: MATOMO_TOKEN_AUTH, GOOGLE_CLIENT_SECRET" in result.stderr
    assert "Traceback" not in result.output
    assert gateway.requests == matomo.requests == google.requests == []


def test_malformed_settings_are_all_named_at_once(config, gateway, run_in_process):
    config.update(MATOMO_URL="matomo.example.com", HTTP_TIMEOUT="soon", GSC_QPM="0")

    result = run_in_process()

    assert result.returncode == 1
    (line,) = lines = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert "MATOMO_URL must be an http(s) URL" in line, lines
    assert "HTTP_TIMEOUT must be a whole number of at least 1" in line
    assert "GSC_QPM must be a whole number of at least 1" in line
    assert "matomo.example.com" not in line and "soon" not in line  # values are never echoed
    assert gateway.requests == []


def test_a_configuration_error_never_echoes_a_value(config, run_in_process):
    config["SUPABASE_URL"], config["SUPABASE_SERVICE_ROLE_KEY"] = (
        config["SUPABASE_SERVICE_ROLE_KEY"],
        config["SUPABASE_URL"],
    )
    config["HTTP_TIMEOUT"] = "²"

    result = run_in_process("--json")

    assert result.returncode == 1
    assert SERVICE_KEY not in result.output  # the runner checks every secret; this one first
    assert lines_with("SUPABASE_URL must be an http(s) URL", result.stderr)
    assert lines_with("HTTP_TIMEOUT must be a whole number", result.stderr)
    assert "Traceback" not in result.stderr


def test_a_bulk_size_past_phps_post_variable_limit_is_refused(config, run_in_process):
    config["MATOMO_BULK_SIZE"] = "1000"

    result = run_in_process()

    assert result.returncode == 1
    assert lines_with("MATOMO_BULK_SIZE must be at most 900", result.stderr)


def test_json_reports_a_run_that_could_not_start(config, run_in_process):
    del config["SUPABASE_URL"]

    result = run_in_process("--json")

    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["exit_status"] == 1
    assert "Missing configuration: SUPABASE_URL" in summary["problems"][0]


def test_a_mistyped_setting_is_a_warning_in_a_run_which_goes_on(fleet, config, run_aggregator):
    fleet.visits(fleet.site("shop.example.com"), 5)
    config["MATOMO_BULKSIZE"] = "50"

    result = run_aggregator("--date", DAY.isoformat())

    assert result.returncode == 0
    assert "MATOMO_BULKSIZE in" in result.stderr and "did you mean MATOMO_BULK_SIZE?" in result.stderr


def test_supabase_key_is_taken_for_the_service_role_key(config, fleet, run_aggregator):
    fleet.site("shop.example.com")
    config["SUPABASE_KEY"] = "sb_secret_pasted_under_another_name"

    result = run_aggregator("--date", DAY.isoformat())

    assert lines_with("SUPABASE_KEY in", result.stderr)
    assert "did you mean SUPABASE_SERVICE_ROLE_KEY?" in result.stderr


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


# ---------------------------------------------------------------------------
# The .env file
# ---------------------------------------------------------------------------


def test_an_env_file_that_is_not_utf8_is_one_line(tmp_path, config, run_in_process):
    env_file = tmp_path / "latin1.env"
    env_file.write_bytes("".join(f"{k}={v}\n" for k, v in config.items()).encode() + b"# caf\xe9\n")
    env_file.chmod(0o600)

    result = run_in_process("--env-file", str(env_file))

    assert result.returncode == 1
    assert lines_with("UTF-8", result.stderr)
    assert "Traceback" not in result.stderr


def test_an_env_file_readable_by_others_is_warned_about(fleet, tmp_path, run_aggregator):
    fleet.site("example.com")

    result = run_aggregator(env_mode=0o644)

    assert result.returncode == 0, result.stderr[-3000:]
    assert lines_with(f"{tmp_path / '.env'} is readable by other users; run: chmod 600", result.stderr)


# ---------------------------------------------------------------------------
# Each command asks only for the settings it uses
# ---------------------------------------------------------------------------


def test_accounts_and_status_need_only_supabase(config, fleet, run_aggregator):
    fleet.site("shop.example.com", fleet.account())  # status of an empty fleet is an error
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

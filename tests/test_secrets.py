"""No secret leaves the process by any door: the log, stdout, --json, check --json, and the rows
written to Supabase (aggregator_runs). The runner scans every run's stdout and stderr; these
scenarios make a service echo a secret back, and scan the other doors too."""

from __future__ import annotations

from conftest import assert_no_secret


def test_a_token_endpoint_that_echoes_the_refresh_token_leaks_it_through_no_door(
    fleet, db, google, run_aggregator
):
    revoked = fleet.account(revoked=True)
    fleet.site("example.com", revoked)
    google.echo_input = True  # its error description quotes the refresh token it was sent

    result = run_aggregator("--json")
    checked = run_aggregator("check", "--json")

    assert result.returncode == 4 and checked.returncode == 1
    assert '"exit_status": 4' in result.stdout and "re-authorize" in result.stdout
    recorded = db.execute("select summary::text from aggregator_runs").fetchone()[0]
    assert "re-authorize" in recorded
    assert_no_secret(recorded, google)
    assert revoked.refresh_token not in recorded + result.stdout + checked.stdout

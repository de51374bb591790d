"""Supabase's PostgREST gateway as unkind as it really is when storing: a statement timeout that
cancels every chunk above a size, and errors that every row of every chunk meets."""

from __future__ import annotations

import pytest

from conftest import lines_with, stored


def upserts(gateway) -> int:
    return gateway.count(lambda r: r.method == "POST" and r.path == "/rest/v1/daily_analytics")


def test_a_chunk_cancelled_by_the_statement_timeout_is_halved_and_stored(fleet, db, gateway, run_aggregator):
    sites = [fleet.site(f"s{n}.example.com") for n in range(30)]
    for site in sites:
        fleet.visits(site, 5)
    gateway.rows_within_timeout = 40  # the chunk of 90 rows is cancelled at that size, every time

    result = run_aggregator()

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.summary.endswith("Stored 90 records.")
    assert db.execute("select count(*), sum(matomo_visits) from daily_analytics").fetchone() == (90, 150)
    assert upserts(gateway) <= 7  # 90 -> 45 + 45 -> four of 22 or 23; never the same size again


@pytest.fixture
def refusing_trigger(db):
    """A trigger that refuses every row, as a project's own trigger may (P0001)."""
    db.execute(
        "create function refuse() returns trigger language plpgsql as "
        "$$ begin raise exception 'rows are frozen for the audit'; end $$"
    )
    db.execute(
        "create trigger refuse before insert or update on daily_analytics for each row execute function refuse()"
    )
    yield
    db.execute("drop trigger refuse on daily_analytics")
    db.execute("drop function refuse()")


@pytest.mark.parametrize("fault", ["read-only", "trigger"])
def test_an_error_every_row_meets_is_one_line_and_few_requests(
    fault, fleet, db, gateway, config, request, run_aggregator
):
    sites = [fleet.site(f"s{n}.example.com") for n in range(30)]
    for site in sites:
        fleet.visits(site, 5)
    fleet.store(sites[0], matomo_visits=9)
    if fault == "read-only":
        gateway.read_only = True  # Supabase's read-only mode: the disk at 95% of the quota
    else:
        request.getfixturevalue("refusing_trigger")
    config["UPSERT_CHUNK_SIZE"] = "10"  # nine chunks

    result = run_aggregator()

    assert result.returncode == 4
    assert upserts(gateway) <= 3 * 9
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line and "not stored" not in line]
    assert len(errors) == 1, "\n".join(errors)
    assert (
        ("read-only" in errors[0] and "disk" in errors[0]) if fault == "read-only" else "trigger" in errors[0]
    )
    assert stored(db)[sites[0].id]["matomo_visits"] == 9
    assert lines_with("records were not stored", result.stderr)

"""Search Console accounts reached with a service account's JSON key beside refresh tokens."""

from __future__ import annotations

import datetime as dt
import json

import psycopg
import pytest

from conftest import DAY, lines_with, service_account_key, stored

FINAL_DAY = DAY - dt.timedelta(days=1)  # a day Search Console has finalised in the stand-in


def test_a_fleet_mixing_both_kinds_of_account_runs_end_to_end(fleet, db, run_aggregator):
    user, robot = fleet.account(), fleet.service_account()
    sites = [fleet.site("user-a.example.com", user), fleet.site("robot-a.example.com", robot)]
    sites.append(fleet.site("robot-b.example.com", robot, prop="https://robot-b.example.com/"))
    for n, site in enumerate(sites, start=1):
        fleet.visits(site, 10 * n, day=FINAL_DAY)
        fleet.search(site, n, 100 * n, day=FINAL_DAY)

    result = run_aggregator("--date", FINAL_DAY.isoformat())

    assert result.returncode == 0, result.stderr
    assert (
        result.summary
        == "Processed 3 sites. Fetched Matomo data for 3. Fetched GSC data for 3. Stored 3 records."
    )
    rows = stored(db, FINAL_DAY)
    assert [
        (rows[s.id]["matomo_visits"], rows[s.id]["gsc_clicks"], rows[s.id]["gsc_impressions"]) for s in sites
    ] == [
        (10, 1, 100),
        (20, 2, 200),
        (30, 3, 300),
    ]


def test_a_wrong_key_costs_its_account_only_and_names_the_fix(fleet, db, run_aggregator):
    good, wrong = fleet.account(), fleet.service_account(wrong_key=True)
    fine, orphan = fleet.site("fine.example.com", good), fleet.site("orphan.example.com", wrong)
    for site in (fine, orphan):
        fleet.visits(site, 5, day=FINAL_DAY)
        fleet.search(site, 4, 40, day=FINAL_DAY)
    fleet.store(orphan, FINAL_DAY, gsc_clicks=9, gsc_impressions=90, gsc_final=True)

    result = run_aggregator("--date", FINAL_DAY.isoformat())

    assert result.returncode == 4
    (warning,) = lines_with(f"GSC account {wrong.id}:", result.stderr)
    assert f"Google refused service account {wrong.refresh_token}: its key was deleted" in warning
    assert f"authorize --service-account KEY.json --account {wrong.id}" in warning
    assert "Invalid JWT Signature." in warning
    rows = stored(db, FINAL_DAY)
    assert rows[fine.id]["gsc_clicks"] == 4
    assert (rows[orphan.id]["matomo_visits"], rows[orphan.id]["gsc_clicks"]) == (5, 9)  # kept

    check = run_aggregator("check")

    problems = [line for line in check.stdout.splitlines() if line.startswith("Problem: ")]
    assert len(problems) == 1 and f"GSC account {wrong.id}: Google refused service account" in problems[0]
    assert (
        f"Search Console account {wrong.id}: service account {wrong.refresh_token}; not connected"
        in check.stdout
    )


def test_a_property_not_shared_with_the_service_account_says_whom_to_add(fleet, db, google, run_aggregator):
    robot = fleet.service_account()
    shared, unshared = (
        fleet.site("shared.example.com", robot),
        fleet.site("unshared.example.com", robot, prop=None),
    )
    fleet.search(shared, 2, 20, day=FINAL_DAY)
    fleet.store(unshared, FINAL_DAY, gsc_clicks=7, gsc_impressions=70, gsc_final=True)

    result = run_aggregator("--date", FINAL_DAY.isoformat())

    assert result.returncode == 4
    (warning,) = lines_with(f"Site {unshared.id} (", result.stderr)
    assert f"add {robot.refresh_token} as a user of the property in Search Console" in warning
    assert stored(db, FINAL_DAY)[unshared.id]["gsc_clicks"] == 7
    assert stored(db, FINAL_DAY)[shared.id]["gsc_clicks"] == 2


def test_search_console_refuses_a_property_the_service_account_was_not_added_to(
    fleet, db, google, run_aggregator
):
    robot = fleet.service_account()
    site = fleet.site("listed.example.com", robot)
    fleet.search(site, 2, 20, day=FINAL_DAY)
    fleet.store(site, FINAL_DAY, gsc_clicks=8, gsc_impressions=80, gsc_final=True)
    # Listed by sites.list, but the owner removed the user since: queries answer 403.
    google.service_accounts[robot.refresh_token].account.properties[site.property] = "siteUnverifiedUser"

    result = run_aggregator("--date", FINAL_DAY.isoformat())

    assert result.returncode == 4
    assert stored(db, FINAL_DAY)[site.id]["gsc_clicks"] == 8


def test_accounts_shows_the_kind_and_the_service_accounts_email(fleet, gateway, run_aggregator):
    user, robot = fleet.account(), fleet.service_account()
    fleet.site("robot.example.com", robot)

    result = run_aggregator("accounts")

    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "refresh token" in lines[str(user.id)]
    assert "service account" in lines[str(robot.id)] and robot.refresh_token in lines[str(robot.id)]
    credentials_read = [
        r.query["select"]
        for r in gateway.requests
        if r.path == "/rest/v1/gsc_accounts"
        and any(c in ("oauth_refresh_token", "service_account_key") for c in r.query["select"].split(","))
    ]
    assert credentials_read == [], "listing the accounts reads no credential"


def test_only_one_kind_of_credential_per_account(db):
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "insert into gsc_accounts (oauth_refresh_token, service_account_key) values ('1//0x', '{}'::jsonb)"
        )
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("insert into gsc_accounts (label) values ('neither')")


# ---------------------------------------------------------------------------
# authorize --service-account
# ---------------------------------------------------------------------------

EMAIL = "nightly@fleet-analytics.iam.gserviceaccount.com"


@pytest.fixture
def key_file(tmp_path, google):
    """A key file as downloaded from Google Cloud, whose public half Google knows."""
    key, public_key = service_account_key(EMAIL)
    google.add_service_account(EMAIL, public_key, [key["private_key"], key["private_key_id"]])
    path = tmp_path / "fleet-analytics-3f2a.json"
    path.write_text(json.dumps(key, indent=2))
    return path


def test_authorize_stores_a_service_account_key_and_says_the_step_left(db, key_file, run_aggregator):
    result = run_aggregator("authorize", "--service-account", str(key_file))

    assert result.returncode == 0, result.stderr
    ((label, refresh_token, key),) = db.execute(
        "select label, oauth_refresh_token, service_account_key from gsc_accounts"
    ).fetchall()
    assert (label, refresh_token, key) == (EMAIL, None, json.loads(key_file.read_text()))
    assert f"add {EMAIL}" in result.stdout and "Users and permissions" in result.stdout
    assert f"delete {key_file}" in result.stdout


def test_authorizing_the_same_service_account_again_replaces_its_key_in_its_row(db, key_file, run_aggregator):
    first = run_aggregator("authorize", "--service-account", str(key_file))
    again = run_aggregator("authorize", "--service-account", str(key_file))

    assert first.returncode == again.returncode == 0, again.stderr
    (row_id,) = db.execute("select id from gsc_accounts").fetchone()
    assert db.execute("select count(*) from gsc_accounts").fetchone() == (1,)
    assert f"{EMAIL} already has gsc_accounts row {row_id}: its key is replaced there" in again.stdout


def test_authorize_replaces_a_refresh_token_with_a_service_account_key(fleet, db, key_file, run_aggregator):
    account = fleet.account(revoked=True)

    result = run_aggregator("authorize", "--service-account", str(key_file), "--account", str(account.id))

    assert result.returncode == 0, result.stderr
    assert db.execute("select id, oauth_refresh_token, label from gsc_accounts").fetchall() == [
        (account.id, None, EMAIL)
    ]


def test_authorize_refuses_a_key_google_does_not_know(db, google, key_file, run_aggregator):
    del google.service_accounts[EMAIL]  # the key was deleted in Google Cloud, or the account

    result = run_aggregator("authorize", "--service-account", str(key_file))

    assert result.returncode == 1
    (line,) = lines_with("ERROR", result.stderr)
    assert EMAIL in line and "nothing was stored" in line
    assert db.execute("select count(*) from gsc_accounts").fetchone() == (0,)


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"installed": {"client_id": "x", "client_secret": "y"}}', "is not a service account key"),
        ('{"type": "service_account", "client_email": "a@b.iam.gserviceaccount.com"}', "has no private_key"),
        ("not json at all", "is not a JSON key file"),
    ],
)
def test_authorize_with_a_file_that_is_not_a_key_is_one_line(content, says, tmp_path, db, run_aggregator):
    path = tmp_path / "client_secret.json"
    path.write_text(content)

    result = run_aggregator("authorize", "--service-account", str(path))

    assert result.returncode == 1
    assert "Traceback" not in result.output
    (line,) = lines_with("ERROR", result.stderr)
    assert says in line and "Keys > Add key > JSON" in line
    assert db.execute("select count(*) from gsc_accounts").fetchone() == (0,)


def test_a_key_pasted_as_json_text_is_used_as_a_key_and_never_sent_as_a_refresh_token(
    fleet, db, google, run_aggregator
):
    robot = fleet.service_account(as_text=True)  # the key file's text in the jsonb column
    site = fleet.site("robot.example.com", robot)
    fleet.search(site, 4, 40, day=FINAL_DAY)

    result = run_aggregator("--date", FINAL_DAY.isoformat())
    listed = run_aggregator("accounts")
    checked = run_aggregator("check")

    assert result.returncode == 0, result.stderr[-3000:]
    assert stored(db, FINAL_DAY)[site.id]["gsc_clicks"] == 4
    sent = [r.form for r in google.requests if r.path == "/token"]
    assert sent and not [form for form in sent if "PRIVATE KEY" in form.get("refresh_token", "")]
    assert "service account" in lines_with(str(robot.id), listed.stdout)[0]
    assert lines_with(f"Search Console account {robot.id}: service account", checked.stdout)


def test_a_key_whose_private_key_cannot_be_read_is_one_line_naming_authorize(
    fleet, db, google, run_aggregator
):
    robot = fleet.service_account(
        pem="-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
    )
    site = fleet.site("robot.example.com", robot)
    fleet.visits(site, 3)

    result = run_aggregator()

    assert result.returncode == 4
    assert stored(db)[site.id]["matomo_visits"] == 3
    named = lines_with(f"account {robot.id}", result.stderr)
    assert len([line for line in named if " WARNING " in line]) == 1
    assert "authorize --service-account" in named[-1], result.stderr[-2000:]
    assert not [r for r in google.requests if r.path == "/token"]


@pytest.mark.parametrize(
    "refusal, fix",
    [
        ("disabled", "enable it"),
        ("deleted", "create a new service account"),
        ("clock", "clock"),
    ],
)
def test_each_refusal_of_a_service_account_names_its_own_fix(refusal, fix, fleet, db, google, run_aggregator):
    robot = fleet.service_account()
    site = fleet.site("robot.example.com", robot)
    fleet.visits(site, 5)
    found = google.service_accounts[robot.refresh_token]
    if refusal == "clock":
        google.clock_offset = 2 * 3600  # this machine's clock is two hours behind
    else:
        setattr(found, refusal, True)

    result = run_aggregator()

    assert result.returncode == 4
    (warning,) = lines_with(f"GSC account {robot.id}:", result.stderr)
    assert fix in warning, warning
    assert "create a new JSON key" not in warning
    assert stored(db)[site.id]["matomo_visits"] == 5

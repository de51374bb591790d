"""The pure middle of aggregator.py: no server, no database."""

from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

import aggregator as ag

D1, D2, D3 = dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("example.com", "example.com"),
        ("  WWW.Example.COM ", "example.com"),
        ("https://www.example.com/", "example.com"),
        ("http://shop.example.co.uk", "shop.example.co.uk"),
        ("example.com.", "example.com"),
        ("bücher.de", "xn--bcher-kva.de"),  # as Search Console stores it
        ("example.com/blog", None),
        ("example.com:8080", None),
        ("localhost", None),
        ("", None),
        (None, None),
        (42, None),
        ("-bad-.example.com", None),
    ],
)
def test_normalised_domain(raw, expected):
    assert ag.normalised_domain(raw) == expected


def test_property_for_domain_prefers_the_domain_property_then_https_then_http():
    listing = {
        "siteEntry": [
            {"siteUrl": "http://example.com/", "permissionLevel": "siteOwner"},
            {"siteUrl": "https://www.example.com/", "permissionLevel": "siteFullUser"},
            {"siteUrl": "sc-domain:other.org", "permissionLevel": "siteUnverifiedUser"},
            {"siteUrl": "https://other.org/", "permissionLevel": "siteRestrictedUser"},
        ]
    }
    properties = ag.verified_properties(listing)
    assert ag.property_for_domain("example.com", properties) == "https://www.example.com/"
    assert ag.property_for_domain("other.org", properties) == "https://other.org/"
    properties["sc-domain:example.com"] = "sc-domain:example.com"
    assert ag.property_for_domain("example.com", properties) == "sc-domain:example.com"
    assert ag.property_for_domain("missing.net", properties) is None
    assert ag.verified_properties({}) == {}


def visits(*numbers):
    return (*numbers, True)  # a MatomoDay: the numbers, then their final flag


def matomo_days(slot, days):
    return ag.matomo_days(slot, [(day, day.isoformat()) for day in days])


def test_matomo_days_reads_every_matomo_shape():
    full = {
        "nb_uniq_visitors": 4,
        "nb_visits": 5,
        "nb_actions": 9,
        "bounce_count": 2,
        "sum_visit_length": 300,
    }
    assert matomo_days({**full, "bounce_rate": "40%"}, [D1]) == {D1: visits(5, 4, 9, 2, 300)}
    zero = {"nb_visits": 0, "nb_actions": 0, "bounce_count": 0, "sum_visit_length": 0, "bounce_rate": "0%"}
    assert matomo_days(zero, [D1]) == {D1: visits(0, None, 0, 0, 0)}  # no unique visitors: not 0
    assert matomo_days([], [D1]) == {D1: visits(0, 0, 0, 0, 0)}  # a day without visits
    ranged = {"2026-11-01": {"nb_visits": 2}, "2026-11-02": [], "2026-11-03": full}
    assert matomo_days(ranged, [D1, D2, D3]) == {
        D1: visits(2, None, None, None, None),
        D2: visits(0, 0, 0, 0, 0),
        D3: visits(5, 4, 9, 2, 300),
    }
    with pytest.raises(ValueError, match="website id"):
        matomo_days({"result": "error", "message": "website id was set to '99'"}, [D1])
    with pytest.raises(ValueError):
        matomo_days({"2026-11-01": []}, [D1, D2])  # a day missing from the answer is no value


def test_metrics_by_day_treats_absent_rows_on_final_days_as_no_traffic():
    answer = {
        "rows": [{"keys": ["2026-11-02"], "clicks": 3.0, "impressions": 40.0, "ctr": 0.075, "position": 5.5}]
    }
    D3 = dt.date(2026, 11, 8)  # newest final: D1 and D2 are older than Google's usual lag
    assert ag.metrics_by_day(answer, [D1, D2], newest_final=D3) == {
        D1: ag.NO_SEARCH_TRAFFIC,
        D2: ag.GscMetrics(3, 40, 0.075, 5.5),
    }
    assert ag.metrics_by_day({"responseAggregationType": "byProperty"}, [D1], D3) == {
        D1: ag.NO_SEARCH_TRAFFIC
    }
    with pytest.raises(ValueError):
        ag.metrics_by_day("<html>", [D1], D3)
    # A row whose key is not a date makes the answer unreadable: its days must not become 0
    with pytest.raises(ValueError):
        ag.metrics_by_day({"rows": [{**answer["rows"][0], "keys": ["Nov 2, 2026"]}]}, [D1, D2], D3)
    # A day outside the range asked for is skipped
    outside = {"rows": [{**answer["rows"][0], "keys": ["2026-10-31"]}]}
    assert ag.metrics_by_day(outside, [D1], D3) == {D1: ag.NO_SEARCH_TRAFFIC}


def test_days_from_the_first_incomplete_one_are_provisional_and_never_zero():
    answer = {
        "rows": [{"keys": ["2026-11-02"], "clicks": 3.0, "impressions": 40.0, "ctr": 0.075, "position": 5.5}],
        "metadata": {"firstIncompleteDate": "2026-11-02"},
    }
    assert ag.metrics_by_day(answer, [D1, D2, D3], newest_final=D3) == {
        D1: ag.NO_SEARCH_TRAFFIC,
        D2: ag.GscMetrics(3, 40, 0.075, 5.5, final=False),
    }
    # The clock wins over an answer that calls every day final
    every_day_final = {"metadata": {"firstIncompleteDate": "2026-11-09"}}
    assert ag.metrics_by_day(every_day_final, [D1, D2, D3], newest_final=D1) == {D1: ag.NO_SEARCH_TRAFFIC}
    # Without metadata every day of the range is final (Google sends it only for incomplete days),
    # as far as the clock allows
    assert ag.metrics_by_day({}, [D1, D2, D3], newest_final=D3) == dict.fromkeys(
        [D1, D2, D3], ag.NO_SEARCH_TRAFFIC
    )
    assert ag.metrics_by_day({}, [D1, D2, D3], newest_final=D1) == {D1: ag.NO_SEARCH_TRAFFIC}


def test_a_source_that_did_not_answer_leaves_its_part_of_the_row_empty():
    sites = [ag.Site(1, "a.com", 1, 1), ag.Site(2, "b.com", 2, 1), ag.Site(3, "c.com", 3, 1)]
    by_site = {1: {D1: visits(5, 4, 9, 2, 300)}, 2: {D1: (0, None, 0, 0, 0, False)}}
    gsc = {1: {D1: ag.GscMetrics(1, 10, 0.1, 2.0)}, 3: {D1: ag.NO_SEARCH_TRAFFIC}}
    rows = ag.analytics_rows(sites, [D1], by_site, gsc)
    no_matomo = dict.fromkeys([*ag.MATOMO_COLUMNS, "matomo_final"])  # store_analytics keeps what is stored
    no_gsc = dict.fromkeys([*ag.GSC_COLUMNS, "gsc_final"])
    assert [dict(zip(ag.STORED_COLUMNS, row)) for row in rows] == [
        {
            "date": "2026-11-01",
            "site_id": 1,
            "matomo_visits": 5,
            "matomo_unique_visitors": 4,
            "matomo_actions": 9,
            "matomo_bounces": 2,
            "matomo_visit_seconds": 300,
            "matomo_final": True,
            "gsc_clicks": 1,
            "gsc_impressions": 10,
            "gsc_ctr": 0.1,
            "gsc_position": 2.0,
            "gsc_final": True,
        },
        {
            "date": "2026-11-01",
            "site_id": 2,
            "matomo_visits": 0,
            "matomo_unique_visitors": None,
            "matomo_actions": 0,
            "matomo_bounces": 0,
            "matomo_visit_seconds": 0,
            "matomo_final": False,
            **no_gsc,
        },
        {
            "date": "2026-11-01",
            "site_id": 3,
            **no_matomo,
            "gsc_clicks": 0,
            "gsc_impressions": 0,
            "gsc_ctr": None,
            "gsc_position": None,
            "gsc_final": True,
        },
    ]
    assert ag.analytics_rows([ag.Site(4, "d.com", 4, 1)], [D1], {}, {}) == []


def test_target_days():
    today = dt.date(2026, 11, 25)

    def days(**kw):
        return ag.target_days(today, **kw)

    assert days() == [dt.date(2026, 11, 21), dt.date(2026, 11, 22), dt.date(2026, 11, 23)]
    assert days(lookback=1) == [dt.date(2026, 11, 23)]
    with pytest.raises(ag.UsageError, match="--lookback is for the nightly run"):
        days(lookback=2, date="2026-11-20")
    assert days(date="2026-11-20") == [dt.date(2026, 11, 20)]
    assert days(start="2026-11-21") == [dt.date(2026, 11, 21), dt.date(2026, 11, 22), dt.date(2026, 11, 23)]
    assert len(days(start="2026-10-01", end="2026-10-31")) == 31
    with pytest.raises(ag.UsageError, match="needs --from"):
        days(end="2026-10-31")
    with pytest.raises(ag.UsageError, match="in the future"):
        days(date="2026-11-26")
    with pytest.raises(ag.UsageError, match="today, which is not over.*yesterday"):
        days(start="2026-11-20", end="2026-11-25")
    assert days(date="2026-11-24") == [dt.date(2026, 11, 24)]


def test_the_secret_filter_redacts_messages_arguments_encodings_and_tracebacks():
    secret = "s3cr3t/token+with=chars"
    secret_filter = ag.SecretFilter()
    secret_filter.add(secret, None, "")
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(logging.Formatter().format(record))
    handler.addFilter(secret_filter)
    logger = logging.getLogger("test-secret-filter")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("plain %s and url-encoded %s", secret, "s3cr3t%2Ftoken%2Bwith%3Dchars")
        try:
            raise RuntimeError(f"token {secret} refused")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    logger.addHandler(handler)
    try:
        logger.debug("Obtained token {'access_token': 'ya29.a0', 'refresh_token': '1//0unknown-yet'}.")
        logger.debug("body grant_type=refresh_token&refresh_token=1%2F%2F0form&client_secret=GOCSPX-x")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert secret not in text and "s3cr3t%2F" not in text
    assert "1//0unknown-yet" not in text and "ya29.a0" not in text and "1%2F%2F0form" not in text
    assert "GOCSPX-x" not in text
    assert text.count("[redacted]") == 3 + 4
    assert "RuntimeError: token [redacted] refused" in text


def test_exit_status():
    def outcome(**counts):
        return ag.Outcome(sites=2, matomo=ag.SourceCount(2, 2), gsc=ag.SourceCount(1, 1), **counts)

    assert outcome(stored=2).exit_status() == 0
    assert ag.Outcome(sites=2, matomo=ag.SourceCount(2, 1), stored=2).exit_status() == 3
    assert outcome(stored=1, not_stored=1).exit_status() == 3
    assert outcome(stored=0, not_stored=2).exit_status() == 1


def test_the_window_lets_a_unit_in_only_with_room_and_none_once_a_part_of_the_flow_failed():
    window, deadline = ag.Window(10), ag.Deadline.after(60)
    assert window.enter(8, deadline)
    waiting = ThreadPoolExecutor(max_workers=1).submit(window.enter, 5, deadline)
    window.leave(8)
    assert waiting.result(timeout=5)  # room again

    waiting = ThreadPoolExecutor(max_workers=1).submit(window.enter, 8, deadline)
    window.close()  # a part of the flow failed: its units would never leave
    assert waiting.result(timeout=5) is False
    assert window.enter(1, deadline) is False


def test_status_dates_only_a_source_with_days_not_final():
    cells = {"oldest_hole": "2026-01-01"}
    assert ag.FleetStatus.oldest_not_final({**cells, "overall": {"missing": 0, "provisional": 0}}) == "-"
    assert (
        ag.FleetStatus.oldest_not_final({**cells, "overall": {"missing": 0, "provisional": 2}})
        == "2026-01-01"
    )


def test_whether_a_person_must_act_is_the_reasons_value_not_its_words():
    worded_like_a_fix = ag.Reason("re-authorize when it answers (authorize, enable it)", person=False)
    plain = ag.Reason("the token was revoked")
    assert not ag.needs_person(worded_like_a_fix) and ag.needs_person(plain)
    assert not ag.needs_person("connected") and not ag.is_shared(plain)
    assert ag.is_shared(ag.NO_CLIENT) and ag.needs_person(ag.NO_CLIENT)

"""Operator input for rollouts: stage lists, amounts, durations, selectors, cron windows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import pytest

from server.errors import InvalidInputError
from server.rollout.core.cron import parse_cron, parse_window
from server.rollout.core.options import build_spec
from server.rollout.core.spec import (
    ReleaseRef,
    RolloutSpec,
    parse_release,
    parse_selector,
    parse_stage_sizes,
)
from server.rollout.core.units import (
    Amount,
    format_duration,
    parse_amount,
    parse_duration,
    parse_fraction,
    parse_percent,
)

UTC = timezone.utc


def P(value: int | str) -> Amount:  # noqa: N802 - reads like a unit in the tables
    return Amount(Fraction(value), percent=True)


def C(value: int | str) -> Amount:  # noqa: N802
    return Amount(Fraction(value), percent=False)


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("1%,10%,50%,100%", (P(1), P(10), P(50), P(100))),
        ("100%", (P(100),)),
        (" 1% , 100% ", (P(1), P(100))),
        ("0.5%,100%", (P("0.5"), P(100))),
        ("5,50,25%,100%", (C(5), C(50), P(25), P(100))),
        ("1,100%", (C(1), P(100))),
    ],
)
def test_stage_lists_that_parse(text: str, sizes: tuple[Amount, ...]) -> None:
    assert parse_stage_sizes(text) == sizes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1%,10%,50%", "last stage must be 100%"),
        ("10,100,1000", "last stage must be 100%"),
        ("10%,5%,100%", "must increase"),
        ("10%,10%,100%", "must increase"),
        ("5,3,100%", "must increase"),
        ("10%,50,100%", "count after a percentage"),
        ("0%,100%", "more than zero"),
        ("0,100%", "more than zero"),
        ("1%,,100%", "comma-separated"),
        ("", "comma-separated"),
        ("abc", "stage 1 size 'abc' is not valid"),
        ("150%", "more than 100%"),
        ("1.5,100%", "whole number"),
        ("-1%,100%", "is not valid"),
        ("1e3,100%", "is not valid"),
        (",".join(f"{i}%" for i in range(1, 22)), "at most 20 stages"),
    ],
)
def test_bad_stage_lists_are_clear(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_stage_sizes(text)


@pytest.mark.parametrize("garbage", [None, ["1%"], 1.5, True, {"a": 1}])
def test_stage_list_garbage_types(garbage: Any) -> None:
    with pytest.raises(InvalidInputError, match="must be text"):
        parse_stage_sizes(garbage)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("45s", timedelta(seconds=45)),
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(minutes=90)),
        ("90m", timedelta(minutes=90)),
        ("2H", timedelta(hours=2)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text, "soak") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("30", "use a number with a unit"),
        ("m", "use a number with a unit"),
        ("", "use a number with a unit"),
        ("1x", "use a number with a unit"),
        ("-5m", "use a number with a unit"),
        ("1.5h", "use a number with a unit"),
        ("30m1h", "use a number with a unit"),
        ("0s", "longer than zero"),
        ("31d", "longer than 30d"),
    ],
)
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_duration(text, "timeout")


def test_zero_soak_is_allowed_and_formats_back() -> None:
    assert parse_duration("0s", "soak", allow_zero=True) == timedelta(0)
    assert format_duration(timedelta(hours=1, minutes=30, seconds=5)) == "1h30m5s"
    assert format_duration(timedelta(0)) == "0s"


@pytest.mark.parametrize(
    ("text", "total", "at_most", "at_least", "shown"),
    [
        ("2%", 100, 2, 2, "2%"),
        ("2%", 149, 2, 3, "2%"),
        ("3", 100, 3, 3, "3"),
        ("3", 2, 2, 2, "3"),
        ("0.1%", 1000, 1, 1, "0.1%"),  # exact: 0.1% of 1000 is one device, not 1.0000001
        ("0.1%", 1001, 1, 2, "0.1%"),
        ("0", 50, 0, 0, "0"),
    ],
)
def test_amounts(text: str, total: int, at_most: int, at_least: int, shown: str) -> None:
    amount = parse_amount(text, "max-failure")
    assert (amount.at_most(total), amount.at_least(total), str(amount)) == (
        at_most, at_least, shown)


@pytest.mark.parametrize(
    ("count", "total", "exceeded"),
    [(2, 100, False), (3, 100, True), (0, 0, False), (1, 0, True)],
)
def test_amount_limit_is_inclusive(count: int, total: int, exceeded: bool) -> None:
    assert parse_amount("2%", "max-failure").exceeded_by(count, total) is exceeded


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_amount("2.5", "max-failure"), "whole number"),
        (lambda: parse_amount("two", "max-failure"), "percentage like 2%"),
        (lambda: parse_percent("10", "max-latency-regression"), "must be a percentage"),
        (lambda: parse_percent("ten%", "max-latency-regression"), "not valid"),
        (lambda: parse_fraction("1.5", "min-golden-accuracy"), "at most 100%"),
        (lambda: parse_fraction("120%", "min-golden-accuracy"), "at most 100%"),
    ],
)
def test_bad_limits(call: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        call()


def test_accuracy_as_percent_or_fraction() -> None:
    assert parse_fraction("90%", "a") == parse_fraction("0.9", "a") == Fraction(9, 10)


@pytest.mark.parametrize(
    ("text", "ok"),
    [("digits@2", True), ("mobilenet-v2@17", True), ("digits", False), ("digits@", False),
     ("digits@0", False), ("Digits@2", False), ("a b@1", False), ("digits@x", False),
     ("@2", False)],
)
def test_release_refs(text: str, ok: bool) -> None:
    if ok:
        ref = parse_release(text)
        assert str(ref) == text and isinstance(ref, ReleaseRef)
    else:
        with pytest.raises(InvalidInputError, match="release"):
            parse_release(text)


def test_selector_groups_same_key_as_alternatives() -> None:
    sel = parse_selector(["store=1", "store=2", "region=eu"], profiles=["rpi4"])
    assert sel.tags == (("region", ("eu",)), ("store", ("1", "2")))
    cases = [
        ("a", "rpi4", {"store": "1", "region": "eu"}, True),
        ("a", "rpi4", {"store": "2", "region": "eu"}, True),
        ("a", "rpi4", {"store": "3", "region": "eu"}, False),
        ("a", "rpi4", {"store": "1"}, False),
        ("a", "jetson", {"store": "1", "region": "eu"}, False),
    ]
    for device, profile, tags, expected in cases:
        assert sel.matches(device, profile, tags) is expected


def test_selector_device_list() -> None:
    sel = parse_selector(devices=["cam-2", "cam-1", "cam-1"])
    assert sel.devices == ("cam-1", "cam-2")
    assert sel.matches("cam-1", "x", {}) and not sel.matches("cam-3", "x", {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "selects no devices"),
        ({"tags": ["store"]}, "key=value"),
        ({"tags": ["=x"]}, "key=value"),
        ({"tags": ["store=a b"]}, "key=value"),
        ({"devices": ["../etc"]}, "invalid device id"),
        ({"profiles": ["bad profile"]}, "not a valid profile"),
    ],
)
def test_bad_selectors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_selector(**kwargs)


# --- cron ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "when", "matches"),
    [
        ("0 2 * * *", datetime(2026, 3, 4, 2, 0), True),
        ("0 2 * * *", datetime(2026, 3, 4, 2, 1), False),
        ("*/15 * * * *", datetime(2026, 3, 4, 7, 45), True),
        ("*/15 * * * *", datetime(2026, 3, 4, 7, 50), False),
        ("0 22 * * mon-fri", datetime(2026, 3, 6, 22, 0), True),  # a Friday
        ("0 22 * * mon-fri", datetime(2026, 3, 7, 22, 0), False),  # a Saturday
        ("0 0 * * 7", datetime(2026, 3, 8, 0, 0), True),  # 7 is Sunday
        ("0 0 * * sun", datetime(2026, 3, 8, 0, 0), True),
        ("0 0 1 jan *", datetime(2027, 1, 1, 0, 0), True),
        ("0 0 1,15 * *", datetime(2026, 3, 15, 0, 0), True),
        ("0 0 13 * fri", datetime(2026, 3, 6, 0, 0), True),  # Vixie: day OR weekday
        ("0 0 13 * fri", datetime(2026, 3, 13, 0, 0), True),
        ("0 0 13 * fri", datetime(2026, 3, 12, 0, 0), False),
        ("30 1-3/2 * * *", datetime(2026, 3, 4, 3, 30), True),
        ("30 1-3/2 * * *", datetime(2026, 3, 4, 2, 30), False),
        ("@daily", datetime(2026, 3, 4, 0, 0), True),
    ],
)
def test_cron_matches(text: str, when: datetime, matches: bool) -> None:
    expr = parse_cron(text)
    hit = expr.matches_day(when.date()) and (when.hour, when.minute) in expr.times()
    assert hit is matches


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 2 * *", "must have 5 fields"),
        ("60 * * * *", "minute '60'"),
        ("* 24 * * *", "hour '24'"),
        ("* * 0 * *", "day-of-month '0'"),
        ("* * * 13 *", "month '13'"),
        ("* * * * 8", "day-of-week '8'"),
        ("5-1 * * * *", "runs backwards"),
        ("*/0 * * * *", "step '0'"),
        ("1,,2 * * * *", "minute ''"),
        ("0 0 31 2 *", "never matches"),
        ("a b c d e", "minute 'a'"),
    ],
)
def test_bad_cron(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_cron(text)


def window(cron: str, hours: float, tz: str) -> Any:
    return parse_window(cron, timedelta(hours=hours), tz, timedelta(days=7))


@pytest.mark.parametrize(
    ("cron", "hours", "tz", "now", "open_"),
    [
        ("0 2 * * *", 2, "UTC", datetime(2026, 3, 4, 2, 0), True),  # at the start
        ("0 2 * * *", 2, "UTC", datetime(2026, 3, 4, 3, 59), True),
        ("0 2 * * *", 2, "UTC", datetime(2026, 3, 4, 4, 0), False),  # at the end
        ("0 2 * * *", 2, "UTC", datetime(2026, 3, 4, 1, 59), False),
        # Across midnight: 22:00 for 4 hours.
        ("0 22 * * *", 4, "UTC", datetime(2026, 3, 4, 23, 30), True),
        ("0 22 * * *", 4, "UTC", datetime(2026, 3, 5, 1, 30), True),
        ("0 22 * * *", 4, "UTC", datetime(2026, 3, 5, 2, 0), False),
        ("0 22 * * *", 4, "UTC", datetime(2026, 3, 5, 21, 59), False),
        # Friday night only: still open after midnight on Saturday, not on Saturday night.
        ("0 22 * * fri", 4, "UTC", datetime(2026, 3, 7, 1, 0), True),
        ("0 22 * * fri", 4, "UTC", datetime(2026, 3, 7, 23, 0), False),
        # Berlin 02:00 is 01:00 UTC in winter and 00:00 UTC in summer.
        ("0 2 * * *", 1, "Europe/Berlin", datetime(2026, 1, 10, 1, 30), True),
        ("0 2 * * *", 1, "Europe/Berlin", datetime(2026, 1, 10, 0, 30), False),
        ("0 2 * * *", 1, "Europe/Berlin", datetime(2026, 7, 10, 0, 30), True),
        ("0 2 * * *", 1, "Europe/Berlin", datetime(2026, 7, 10, 1, 30), False),
        # 02:30 does not exist in New York on 2026-03-08 (clocks jump 02:00 -> 03:00).
        ("30 2 * * *", 1, "America/New_York", datetime(2026, 3, 8, 7, 45), False),
        ("30 2 * * *", 1, "America/New_York", datetime(2026, 3, 9, 6, 45), True),
        ("0 3 * * *", 48, "UTC", datetime(2026, 3, 6, 2, 0), True),  # longer than a day
    ],
)
def test_window_open(cron: str, hours: float, tz: str, now: datetime, open_: bool) -> None:
    assert window(cron, hours, tz).is_open(now.replace(tzinfo=UTC)) is open_


def test_window_next_open_and_closes_at() -> None:
    w = window("0 22 * * *", 4, "Europe/Berlin")
    closed = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
    assert w.next_open(closed) == datetime(2026, 1, 10, 21, 0, tzinfo=UTC)
    assert w.closes_at(closed) is None
    inside = datetime(2026, 1, 10, 23, 0, tzinfo=UTC)
    assert w.next_open(inside) == inside
    assert w.closes_at(inside) == datetime(2026, 1, 11, 1, 0, tzinfo=UTC)
    leap = window("0 0 29 2 *", 1, "UTC")
    assert leap.next_open(closed) == datetime(2028, 2, 29, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("tz", "hours", "message"),
    [("Mars/Olympus", 1, "not a known IANA"), ("", 1, "IANA name"), ("UTC", 0, "above zero"),
     ("UTC", 24 * 8, "at most"), ("../../etc/passwd", 1, "not a known IANA")],
)
def test_bad_windows(tz: str, hours: float, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        window("0 2 * * *", hours, tz)


# --- whole spec ----------------------------------------------------------------------------


def test_build_spec_defaults_and_round_trip() -> None:
    spec = build_spec(
        release="digits@2", select=["region=eu"], stages="1%,10%,50%,100%", soak="30m",
        max_failure="2%", max_latency_regression="10%", min_golden_accuracy="0.9",
        window_cron="0 22 * * *", window_duration="4h", window_timezone="Europe/Berlin",
        approval=True, variants={"rpi4": "int8-cpu", "coral": "edgetpu"},
    )
    assert len(spec.stages) == 4
    first = spec.stages[0]
    assert first.soak == timedelta(minutes=30) and first.timeout == timedelta(hours=1)
    assert first.max_failures == P(2) and first.success is None and first.approval
    assert first.gates.max_latency_regression == 10
    assert first.gates.min_golden_accuracy == Fraction(9, 10)
    assert spec.window is not None and spec.window.zone.key == "Europe/Berlin"
    assert dict(spec.variants) == {"coral": "edgetpu", "rpi4": "int8-cpu"}
    assert RolloutSpec.from_json(spec.to_json()) == spec


def test_stages_may_differ_when_given_one_by_one() -> None:
    stored = {
        "release": "digits@3",
        "selector": {"profiles": ["rpi4"]},
        "stages": [
            {"size": "5", "soak": "2h", "timeout": "30m", "approval": True,
             "gates": {"max_latency_regression": "5%", "min_sample": 3}},
            {"size": "100%", "success": "90%", "max_failures": "10"},
        ],
        "max_concurrent_downloads": 20,
    }
    spec = RolloutSpec.from_json(stored)
    first, last = spec.stages
    assert (first.size, first.soak, first.timeout, first.approval) == (
        C(5), timedelta(hours=2), timedelta(minutes=30), True)
    assert (first.gates.max_latency_regression, first.gates.min_sample) == (Fraction(5), 3)
    assert first.gates.max_power_regression == 10  # defaults fill what is not given
    assert (last.success, last.max_failures, last.approval) == (P(90), C(10), False)
    assert spec.window is None and spec.max_concurrent_downloads == 20
    assert RolloutSpec.from_json(spec.to_json()) == spec


def test_gates_can_be_switched_off() -> None:
    spec = build_spec(release="digits@2", all_devices=True, max_latency_regression=None,
                      max_power_regression="off", max_install_failure=None)
    gates = spec.stages[0].gates
    assert (gates.max_latency_regression, gates.max_power_regression,
            gates.max_install_failure) == (None, None, None)
    assert RolloutSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": "1%,10%"}, "last stage must be 100%"),
        ({"release": "digits"}, "NAME@RELEASE"),
        ({"soak": "forever"}, "stage 1 soak"),
        ({"timeout": "0s"}, "stage 1 timeout"),
        ({"max_failure": "x"}, "stage 1 max-failures"),
        ({"success": "0%"}, "more than zero"),
        ({"max_latency_regression": "10"}, "must be a percentage"),
        ({"min_sample": 0}, "min-sample"),
        ({"max_concurrent_downloads": 0}, "max-concurrent-downloads"),
        ({"window_cron": "0 2 * * *"}, "both a cron line and a duration"),
        ({"window_cron": "0 2 * *", "window_duration": "1h"}, "5 fields"),
        ({"variants": {"rpi4": "int4"}}, "variant 'int4'"),
    ],
)
def test_bad_operator_options(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"release": "digits@2", "all_devices": True}
    with pytest.raises(InvalidInputError, match=message):
        build_spec(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: "not a dict", "must be an object"),
        (lambda d: {**d, "stages": "1%,100%"}, "list of stages"),
        (lambda d: {**d, "stages": ["1%"]}, "stage 1 must be an object"),
        (lambda d: {**d, "stages": []}, "at least one stage"),
        (lambda d: {**d, "selector": []}, "selector object"),
        (lambda d: {**d, "selector": {"tags": "store=1"}}, "must be lists"),
        (lambda d: {**d, "selector": {"all": "yes"}}, "true or false"),
        (lambda d: {**d, "stages": [{**d["stages"][0], "approval": "no"}]}, "approval"),
        (lambda d: {**d, "stages": [{**d["stages"][0], "gates": [1]}]}, "gates must be"),
        (lambda d: {**d, "window": "0 2 * * *"}, "window must be an object"),
        (lambda d: {**d, "variants": ["rpi4"]}, "variants must map"),
        (lambda d: {**d, "release": 7}, "NAME@RELEASE"),
    ],
)
def test_stored_spec_garbage(mutate: Any, message: str) -> None:
    good = build_spec(release="digits@2", all_devices=True, stages="100%").to_json()
    with pytest.raises(InvalidInputError, match=message):
        RolloutSpec.from_json(mutate(good))

"""The pure rules at the API's edge: JSON parsing limits, strict path and query values, bearer
tokens, roles, and the cluster settings' bounds and rules."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dsm_node import roles, settings_store
from dsm_node.api import inputs
from dsm_node.api.common import ClientError


def refused(fn: Any, *args: Any) -> str:
    with pytest.raises(ClientError) as e:
        fn(*args)
    assert 400 <= e.value.status < 500
    return str(e.value)


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[", "]]]]"]', 1),  # brackets inside strings do not count
        ('["\\"[[["]', 1),  # nor after an escaped quote
        ("[" * 32 + "]" * 32, 32),
    ],
)
def test_depth_within_the_bound_passes(text: str, depth: int) -> None:
    inputs.check_depth(text, max_depth=depth)
    if depth:
        assert "nested deeper" in refused(inputs.check_depth, text, depth - 1)


@pytest.mark.parametrize(
    "text",
    ["[" * 33 + "]" * 33, '{"a":' * 40 + "1" + "}" * 40, "[{" * 20 + "}]" * 20],
)
def test_depth_beyond_the_bound_is_refused_before_parsing(text: str) -> None:
    assert "nested deeper" in refused(inputs.parse_json, text.encode())


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e309}',
        b'{"a": ' + b"9" * 101 + b"}",
        b'{"a": "\\u0000"}',
        b'{"\\u0000": 1}',
        b'{"a": ["x", {"b": "\\ud800"}]}',
        b'{"a": "\xff"}',
        b"[" * 50 + b"}",
        b"[" * 100_000,
        b"",
        b"   ",
        b'{"a": 1} trailing',
    ],
)
def test_hostile_json_is_refused(body: bytes) -> None:
    refused(inputs.parse_json, body)


def test_valid_json_passes_unchanged() -> None:
    doc = {"a": [1, 2.5, -0.0, 1e308, "é\U0001f600", None, True], "b": {"c": "d"}}
    assert inputs.parse_json(json.dumps(doc).encode()) == doc
    assert inputs.parse_json(b'{"pair": "\\ud83d\\ude00"}') == {"pair": "\U0001f600"}


@pytest.mark.parametrize(
    "raw", ["\u00b2", "\u00b3", "\u0661", "\uff11", "-1", "+1", " 1", "1 ", "1e3", "0x1", "", "1.0"]
)
def test_integers_are_ascii_digits(raw: str) -> None:
    refused(inputs.ascii_integer, raw, "n", 0, 1000)


@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "1e3", "1_0", "²", "0", ".5", "5."])
def test_decimals_are_plain(raw: str) -> None:
    refused(inputs.ascii_decimal, raw, "w", 0, 100)


def test_numbers_within_bounds_pass() -> None:
    assert inputs.ascii_integer("0042", "n", 1, 100) == 42
    assert inputs.ascii_decimal("0.5", "w", 0, 1) == 0.5


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("Bearer  abc", "abc"),
        ("Bearer a b", None),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer \udcff\udcfe", None),  # undecodable header bytes arrive as surrogates
        ("Bearer abc\x00", None),
        ("Bearer " + "a" * 513, None),
        (None, None),
    ],
)
def test_bearer_tokens(header: str | None, token: str | None) -> None:
    assert inputs.bearer_token(header) == token


def test_roles_rank() -> None:
    assert roles.allows("administrator", "auditor")
    assert roles.allows("auditor", "auditor")
    assert not roles.allows("auditor", "administrator")
    assert not roles.allows("root", "auditor")
    with pytest.raises(ValueError):
        roles.allows("administrator", "root")


@pytest.mark.parametrize(
    "host",
    ["lb.example.com", "lb", "10.0.0.1", "2001:db8::1", "a-b.c", "xn--bcher-kva.example"],
)
def test_valid_hosts(host: str) -> None:
    assert settings_store.check_host(host) == host


@pytest.mark.parametrize(
    "host",
    [
        "",
        " lb",
        "lb.example.com\n",
        "a\x00b",
        "-a.com",
        "a-.com",
        "a..b",
        "999.1.1.1",
        "1.2.3",
        "bücher.example",
        "[::1]",
        "a_b.com",
        "x" * 254,
        "lb example",
    ],
)
def test_invalid_hosts(host: str) -> None:
    with pytest.raises(ValueError):
        settings_store.check_host(host)


def test_threshold_rule_and_orphans() -> None:
    base = settings_store.ClusterSettings().model_dump()
    assert settings_store.rule_problems(base) == []
    bad = settings_store.rule_problems({**base, "heartbeat_interval_seconds": 61})
    assert bad and "3 times" in bad[0][0]
    orphan = settings_store.rule_problems({**base, "relay_port": 4122})
    assert orphan and orphan[0][1] == ("relay_port",)


def test_stored_values_that_break_rules_fall_back_to_defaults() -> None:
    s = settings_store.from_stored(
        {"offline_threshold_seconds": 1e308, "heartbeat_interval_seconds": 2, "bogus": 1}
    )
    assert (s.heartbeat_interval_seconds, s.offline_threshold_seconds) == (2, 180)
    s = settings_store.from_stored(
        {"offline_threshold_seconds": 4, "heartbeat_interval_seconds": 2}
    )
    assert (s.heartbeat_interval_seconds, s.offline_threshold_seconds) == (10, 180)
    s = settings_store.from_stored({"heartbeat_interval_seconds": True})
    assert s.heartbeat_interval_seconds == 10

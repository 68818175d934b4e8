"""jsonio writes and reads exactly what the json module does, for the types the state uses."""
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbs_chroot import accounting, jsonio

SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text())
PLAIN = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.tuples(inner, inner)
                     | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(PLAIN)
def test_dumps_is_json_dumps_sorted(value: Any) -> None:
    assert jsonio.dumps(value) == json.dumps(value, sort_keys=True)


@settings(max_examples=500, deadline=None)
@given(PLAIN)
def test_loads_is_json_loads(value: Any) -> None:
    text = json.dumps(value, sort_keys=True)
    for spaced in (text, f" \n{text}\t\r\n"):
        got, want = jsonio.loads(spaced), json.loads(spaced)
        assert repr(got) == repr(want)  # repr: NaN != NaN, and 1 == 1.0 == True


@pytest.mark.parametrize("value", [
    {1: "int key"}, {"a": {None: 1}}, [{"x": object}], {"s": {1, 2}}, b"bytes",
])
def test_other_values_are_left_to_json(value: Any) -> None:
    try:
        want = json.dumps(value, sort_keys=True)
    except TypeError as e:
        with pytest.raises(TypeError, match=str(e).split(" ")[0]):
            jsonio.dumps(value)
    else:
        assert jsonio.dumps(value) == want


@pytest.mark.parametrize("text", [
    "", " ", "x", "{", '{"a": 1} x', "[1,]", "\ufeff{}", '{"a": "\x01"}', "NaN x", '"\\ud800',
    "01", "[1] [2]", "{'a': 1}",
])
def test_errors_are_json_errors(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        jsonio.loads(text)
    assert str(got.value) == str(want.value)


def test_constants() -> None:
    assert math.isnan(jsonio.loads("NaN"))
    assert jsonio.loads("[Infinity, -Infinity]") == [math.inf, -math.inf]
    assert jsonio.dumps([math.inf, -math.inf, 1e300, -0.0, 2**70]) == \
        json.dumps([math.inf, -math.inf, 1e300, -0.0, 2**70])


def test_accounting_line_is_valid_json(tmp_path: Any) -> None:
    log = tmp_path / "acct" / "accounting.jsonl"
    record = {"job_id": "1.vm", "user": "us\u00e9r", "image": None, "start": 1700000000.25,
              "versions": ["/v1", "/v2"], "exit": -2, "recovered": True,
              "mem_peak_bytes": 2**40, "note": 'quote " and \\ and \n'}
    accounting.append(str(log), record)
    accounting.append(str(log), record)
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert json.loads(line) == {"schema": accounting.SCHEMA, **record}
        assert line == json.dumps({"schema": accounting.SCHEMA, **record}, sort_keys=True)

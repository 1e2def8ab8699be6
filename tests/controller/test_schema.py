"""Request parsing and validation: the numpy fast path must agree with the JSON parser."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstacks_controller.openapi import components
from kvstacks_controller.schema import TokenList, Validator, parse_body
from kvstacks_controller.settings import Settings

big_ints = st.lists(st.integers(0, 2**31 - 1), min_size=900, max_size=1500)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10**12)
    | st.text(max_size=8)
    | st.sampled_from(["[1,2]", "a[", "]", "[" + "1," * 3000 + "1]"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


def _parse(raw: bytes):
    try:
        return ("ok", parse_body(raw, orjson.loads))
    except ValueError:
        return ("error", None)


@settings(max_examples=50, deadline=None)
@given(
    tokens=big_ints,
    extra=st.dictionaries(st.text(max_size=6), values, max_size=3),
    first=st.booleans(),
    indent=st.sampled_from([None, 1]),
)
def test_fast_path_agrees_with_the_json_parser(tokens, extra, first, indent):
    body = {"tokens": tokens, **{k: v for k, v in extra.items() if k != "tokens"}}
    if not first:
        body = {**{k: v for k, v in extra.items() if k != "tokens"}, "tokens": tokens}
    raw = json.dumps(body, indent=indent).encode()
    status, parsed = _parse(raw)
    assert status == "ok" and parsed == json.loads(raw)


@pytest.mark.parametrize("inner", [b"1,2,", b"1,,2", b"1 2", b",1", b"1,2]", b"1,-2"])
def test_what_json_rejects_the_fast_path_rejects(inner):
    raw = b'{"tokens": [' + b"7," * 3000 + inner + b"]}"
    try:
        expected = ("ok", json.loads(raw))
    except ValueError:
        expected = ("error", None)
    assert _parse(raw) == expected


def test_brackets_inside_strings_and_nested_lists_fall_back():
    digits = ",".join(["5"] * 3000)
    for raw in [
        f'{{"salt": "[{digits}]", "tokens": [1]}}',
        f'{{"tokens_list": [[{digits}], [1]]}}',
        f"[{digits}]",
        f'{{"a": {{"b": [{digits}]}}}}',
    ]:
        assert parse_body(raw.encode(), orjson.loads) == json.loads(raw)


def test_fast_parsed_tokens_are_validated_like_any_list():
    validator = Validator(components(Settings(max_tokens=10_000)))
    schema = {"type": "object", "properties": {"tokens": {"$ref": "#/components/schemas/Tokens"}}}
    ok = parse_body(b'{"tokens": [' + b"12," * 2000 + b"13]}", orjson.loads)
    assert isinstance(ok["tokens"], TokenList)
    out = validator.validate(ok, schema)
    assert out["tokens"].array.dtype.str == "<i4" and out["tokens"][-1] == 13
    huge = parse_body(b'{"tokens": [' + b"12," * 2000 + b"99999999999999999999999]}", orjson.loads)
    with pytest.raises(Exception, match=r"tokens\[2000\]: .* above the maximum"):
        validator.validate(huge, schema)

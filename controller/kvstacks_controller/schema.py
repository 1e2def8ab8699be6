"""Request validation against the JSON Schema subset commands declare.

Supported keywords: type, properties, required, additionalProperties (bool),
items, minItems, maxItems, minLength, maxLength, minimum, exclusiveMinimum (true/false, as in OpenAPI 3.0), maximum, enum,
nullable and local ``$ref``. Errors name the field (``tokens[3]``) and the fix.
"""

from __future__ import annotations

import json
import secrets
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from kvstacks_controller.command import CommandError

INT32_MAX = 2**31 - 1

_TYPES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
}


class TokenList(list):
    """A validated list of token ids that also carries them as a little-endian int32 array.

    It is a plain list to commands (and JSON); the lookup path hashes ``.array``
    without converting a 32K-item list to numpy a second time.
    """

    array: np.ndarray
    #: int64 values parsed straight from the body by parse_body, not yet range-checked.
    parsed: np.ndarray | None = None


_TOKEN_BYTES = b"0123456789, \t\n\r"
_FAST_MIN_BYTES = 4096
_DIGITS = b"0123456789"
_INT64_MAX = np.iinfo(np.int64).max
_POWERS_OF_TEN = 10 ** np.arange(1, 19, dtype=np.int64)


def _digits(values: np.ndarray) -> int:
    """Decimal digits needed to write non-negative ``values`` without leading zeros.

    Counted instead of searching the body for a leading zero: a regular expression over a
    32K-token body took 8 ms, most of a /lookup.
    """
    return int(values.size + np.searchsorted(_POWERS_OF_TEN, values, side="right").sum())


def parse_body(raw: bytes, loads: Callable[[bytes], Any]) -> Any:
    """Parse a JSON body; a big flat list of plain integers is parsed by numpy, not as 32K objects.

    The fast path applies only when the first ``[...]`` of the body holds nothing
    but digits, commas and blanks and is the value of a top-level key; anything
    else (or anything it cannot vouch for) goes through ``loads`` unchanged.
    """
    start = raw.find(b"[")
    end = raw.find(b"]", start + 1) if start >= 0 else -1
    if end - start < _FAST_MIN_BYTES:
        return loads(raw)
    inner = raw[start + 1 : end]
    if inner.translate(None, _TOKEN_BYTES):
        return loads(raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            array = np.fromstring(inner, dtype=np.int64, sep=",")
    except (ValueError, Warning):
        return loads(raw)
    if inner.count(b",") != max(array.size - 1, 0):
        return loads(raw)  # "1,,2", "1,2,", "1 2": not JSON; let the parser say so
    if len(inner) - len(inner.translate(None, _DIGITS)) != _digits(array) and array.max() < _INT64_MAX:
        # More digits than the numbers need: "007" is not JSON, though numpy reads it. (A number
        # past int64 is saturated, not padded: the validator refuses it as above the maximum.)
        return loads(raw)
    # A placeholder no client can predict, so it cannot be smuggled in elsewhere in the body.
    placeholder = "\u0000" + secrets.token_hex(8)
    try:
        body = loads(raw[:start] + json.dumps(placeholder).encode() + raw[end + 1 :])
    except ValueError:
        return loads(raw)  # the bracket was inside a string
    if not isinstance(body, dict):
        return loads(raw)
    keys = [k for k, v in body.items() if v == placeholder]
    if len(keys) != 1:
        return loads(raw)
    tokens = TokenList(array.tolist())
    tokens.parsed = array
    body[keys[0]] = tokens
    return body


def tokens_schema(max_tokens: int) -> dict[str, Any]:
    return {
        "type": "array",
        "maxItems": max_tokens,
        "description": "token ids",
        "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
    }


def _is(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return True


def _fail(path: str, message: str) -> CommandError:
    return CommandError(400, f"{path or 'body'}: {message}")


class Validator:
    def __init__(self, components: Mapping[str, Any]) -> None:
        self.components = components

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        while "$ref" in schema:
            ref = schema["$ref"]
            prefix = "#/components/schemas/"
            if not ref.startswith(prefix) or ref[len(prefix) :] not in self.components:
                raise ValueError(f"unresolvable $ref {ref!r}")
            schema = self.components[ref[len(prefix) :]]
        return schema

    def validate(self, value: Any, schema: Mapping[str, Any], path: str = "") -> Any:
        """Check ``value``; return it (integer lists come back as :class:`TokenList`)."""
        schema = self.resolve(schema)
        if value is None and schema.get("nullable"):
            return value
        kind = schema.get("type")
        if kind is not None and not _is(value, kind):
            raise _fail(path, f"expected {_TYPES.get(kind, kind)}, got {_describe(value)}")
        if "enum" in schema and value not in schema["enum"]:
            allowed = ", ".join(repr(v) for v in schema["enum"])
            raise _fail(path, f"{value!r} is not one of {allowed}")
        if kind == "object":
            self._object(value, schema, path)
        elif kind == "array":
            return self._array(value, schema, path)
        elif kind == "string":
            if len(value) > schema.get("maxLength", len(value)):
                raise _fail(path, f"longer than {schema['maxLength']} characters")
            if len(value) < schema.get("minLength", 0):
                raise _fail(path, f"shorter than {schema['minLength']} characters")
        elif kind in ("integer", "number"):
            if schema.get("exclusiveMinimum") and value <= schema["minimum"]:  # OpenAPI 3.0's boolean form
                raise _fail(path, f"{value} must be greater than {schema['minimum']}")
            if "minimum" in schema and value < schema["minimum"]:
                raise _fail(path, f"{value} is below the minimum {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                raise _fail(path, f"{value} is above the maximum {schema['maximum']}")
        return value

    def _object(self, value: dict, schema: Mapping[str, Any], path: str) -> None:
        props = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                raise _fail(f"{path}.{name}" if path else name, "is required")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                allowed = ", ".join(sorted(props)) or "none"
                raise _fail(f"{path}.{extra[0]}" if path else extra[0], f"unknown field; allowed: {allowed}")
        for name, sub in props.items():
            if name in value:
                value[name] = self.validate(value[name], sub, f"{path}.{name}" if path else name)

    def _array(self, value: list, schema: Mapping[str, Any], path: str) -> list:
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise CommandError(
                413 if len(value) > 1000 else 400,
                f"{path or 'body'}: {len(value)} items, more than the limit of {schema['maxItems']}",
            )
        if len(value) < schema.get("minItems", 0):
            raise _fail(path, f"needs at least {schema['minItems']} items, got {len(value)}")
        items = schema.get("items")
        if items is None:
            return value
        items = self.resolve(items)
        if items.get("type") == "integer" and set(items) <= {"type", "minimum", "maximum", "description"}:
            return self._int_list(value, items, path)
        for i, item in enumerate(value):
            value[i] = self.validate(item, items, f"{path}[{i}]")
        return value

    def _int_list(self, value: list, items: Mapping[str, Any], path: str) -> list:
        # Token lists run to hundreds of thousands of items: check them in C-level passes.
        parsed = getattr(value, "parsed", None)
        if parsed is not None:
            return self._int_array(value, parsed, items, path)
        if not set(map(type, value)) <= {int}:
            i = next(i for i, v in enumerate(value) if type(v) is not int)
            raise _fail(f"{path}[{i}]", f"expected an integer, got {_describe(value[i])}")
        try:
            array = np.fromiter(value, dtype=np.int64, count=len(value))  # all ints: checked above
        except OverflowError:
            i = next(i for i, v in enumerate(value) if not -(2**63) <= v < 2**63)
            raise _fail(f"{path}[{i}]", f"{value[i]} is out of range") from None
        return self._int_array(value, array, items, path)

    def _int_array(self, value: list, array: np.ndarray, items: Mapping[str, Any], path: str) -> list:
        if array.size:
            low, high = int(array.min()), int(array.max())
            if "minimum" in items and low < items["minimum"]:
                i = int(array.argmin())
                raise _fail(f"{path}[{i}]", f"{low} is below the minimum {items['minimum']}")
            if "maximum" in items and high > items["maximum"]:
                i = int(array.argmax())
                raise _fail(f"{path}[{i}]", f"{high} is above the maximum {items['maximum']}")
            if low < 0 or high > INT32_MAX:
                return value
        tokens = value if isinstance(value, TokenList) else TokenList(value)
        tokens.array = array.astype("<i4")
        return tokens


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"

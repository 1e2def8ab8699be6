"""Request validation against the JSON Schema subset commands declare.

Supported keywords: type, properties, required, additionalProperties (bool),
items, minItems, maxItems, minLength, maxLength, minimum, maximum, enum,
nullable and local ``$ref``. Errors name the field (``tokens[3]``) and the fix.
"""

from __future__ import annotations

from typing import Any, Mapping

from kvstacks_controller.command import CommandError

INT32_MAX = 2**31 - 1

_TYPES = {
    "object": "an object", "array": "a list", "string": "a string",
    "integer": "an integer", "number": "a number", "boolean": "true or false",
}


def tokens_schema(max_tokens: int) -> dict[str, Any]:
    return {"type": "array", "maxItems": max_tokens, "description": "token ids",
            "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}}


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
            if not ref.startswith(prefix) or ref[len(prefix):] not in self.components:
                raise ValueError(f"unresolvable $ref {ref!r}")
            schema = self.components[ref[len(prefix):]]
        return schema

    def validate(self, value: Any, schema: Mapping[str, Any], path: str = "") -> None:
        schema = self.resolve(schema)
        if value is None and schema.get("nullable"):
            return
        kind = schema.get("type")
        if kind is not None and not _is(value, kind):
            raise _fail(path, f"expected {_TYPES.get(kind, kind)}, got {_describe(value)}")
        if "enum" in schema and value not in schema["enum"]:
            allowed = ", ".join(repr(v) for v in schema["enum"])
            raise _fail(path, f"{value!r} is not one of {allowed}")
        if kind == "object":
            self._object(value, schema, path)
        elif kind == "array":
            self._array(value, schema, path)
        elif kind == "string":
            if len(value) > schema.get("maxLength", len(value)):
                raise _fail(path, f"longer than {schema['maxLength']} characters")
            if len(value) < schema.get("minLength", 0):
                raise _fail(path, f"shorter than {schema['minLength']} characters")
        elif kind in ("integer", "number"):
            if "minimum" in schema and value < schema["minimum"]:
                raise _fail(path, f"{value} is below the minimum {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                raise _fail(path, f"{value} is above the maximum {schema['maximum']}")

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
                self.validate(value[name], sub, f"{path}.{name}" if path else name)

    def _array(self, value: list, schema: Mapping[str, Any], path: str) -> None:
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise CommandError(413 if len(value) > 1000 else 400,
                               f"{path or 'body'}: {len(value)} items, more than the limit of {schema['maxItems']}")
        if len(value) < schema.get("minItems", 0):
            raise _fail(path, f"needs at least {schema['minItems']} items, got {len(value)}")
        items = schema.get("items")
        if items is None:
            return
        items = self.resolve(items)
        if items.get("type") == "integer" and set(items) <= {"type", "minimum", "maximum", "description"}:
            # Token lists run to hundreds of thousands of items: check them in bulk.
            if any(type(v) is not int for v in value):
                i = next(i for i, v in enumerate(value) if type(v) is not int)
                raise _fail(f"{path}[{i}]", f"expected an integer, got {_describe(value[i])}")
            if value:
                low, high = min(value), max(value)
                if "minimum" in items and low < items["minimum"]:
                    i = value.index(low)
                    raise _fail(f"{path}[{i}]", f"{low} is below the minimum {items['minimum']}")
                if "maximum" in items and high > items["maximum"]:
                    i = value.index(high)
                    raise _fail(f"{path}[{i}]", f"{high} is above the maximum {items['maximum']}")
            return
        for i, item in enumerate(value):
            self.validate(item, items, f"{path}[{i}]")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"

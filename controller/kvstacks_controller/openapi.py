"""The OpenAPI 3.0 document, built from whatever commands are registered."""

from __future__ import annotations

import copy
from typing import Any

from kvstacks_controller.command import auth_for
from kvstacks_controller.schema import tokens_schema
from kvstacks_controller.settings import Settings

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "event_id": {"type": "string"}},
}

_ERRORS = {
    "400": "Malformed JSON, a wrong type or a missing field; the reason names the field",
    "401": "Missing or wrong bearer token",
    "404": "Unknown instance, location, worker or event id",
    "409": "The target is unhealthy or the worker must register again",
    "413": "Body or token list above the limit",
    "502": "A worker could not be reached or failed",
    "504": "A worker did not answer in time",
}


def components(settings: Settings) -> dict[str, Any]:
    return {
        "Tokens": tokens_schema(settings.max_tokens),
        "TokensBatch": {
            "type": "array",
            "maxItems": settings.max_batch,
            "items": {"$ref": "#/components/schemas/Tokens"},
        },
        "Error": ERROR_SCHEMA,
    }


def build(commands: dict[str, type], settings: Settings, version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for name, cls in sorted(commands.items()):
        item: dict[str, Any] = {}
        for method in getattr(cls, "methods", ("POST",)):
            op: dict[str, Any] = {
                "operationId": f"{name.replace('/', '_')}_{method.lower()}",
                "summary": getattr(cls, "summary", "") or (cls.__doc__ or name).strip().splitlines()[0],
                "x-mutating": bool(getattr(cls, "mutating", True)),
                "responses": {
                    "200": {
                        "description": "Done",
                        "content": {
                            "application/json": {
                                "schema": copy.deepcopy(
                                    getattr(cls, "response_schema", None) or {"type": "object"}
                                )
                            }
                        },
                    }
                },
            }
            for code, text in _ERRORS.items():
                op["responses"][code] = {
                    "description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            if name in ("move", "clear", "pin", "unpin", "compress", "decompress"):
                op["responses"]["202"] = {
                    "description": "Still running: poll /check_finish with the event_id",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            level = auth_for(cls, method)
            op["security"] = [] if level == "public" else [{level: []}]
            schema = getattr(cls, "request_schema", None)
            if method == "POST" and schema is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": copy.deepcopy(schema)}},
                }
            item[method.lower()] = op
        paths[f"/{name}"] = item
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "kvstacks controller",
            "version": version,
            "description": "LMCache-compatible operator API over a fleet of kvstacks workers.",
        },
        "paths": paths,
        "components": {
            "schemas": components(settings),
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer", "description": "KVSTACKS_ADMIN_TOKEN"},
                "worker": {"type": "http", "scheme": "bearer", "description": "KVSTACKS_WORKER_TOKEN"},
            },
        },
    }

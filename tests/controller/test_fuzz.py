"""Fuzz the controller against its own OpenAPI document: no input may make it answer 5xx.

No worker is registered, so every command that names an instance must be
refused with a 4xx (LMCache answers 500 to an unknown instance or event id, and
to a clear with no workers). Worker-protocol routes are fuzzed too.
"""

from __future__ import annotations

import json

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from kvstacks_controller.app import create_app
from kvstacks_controller.settings import Settings
from starlette.testclient import TestClient

app = create_app(Settings(max_tokens=4096, max_batch=16, max_body_bytes=1 << 20, worker_timeout=0.5))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@hypothesis.settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
def test_no_input_gets_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, (
        f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}"
    )
    if 400 <= response.status_code < 500 and response.status_code not in (404, 405):
        assert json.loads(response.text)["error"]  # a reason, not a bare status


@hypothesis.settings(max_examples=100, deadline=None, derandomize=True)
@hypothesis.given(
    path=hypothesis.strategies.sampled_from(sorted(r.path for r in app.routes)),
    raw=hypothesis.strategies.binary(max_size=200)
    | hypothesis.strategies.recursive(
        hypothesis.strategies.none()
        | hypothesis.strategies.booleans()
        | hypothesis.strategies.integers()
        | hypothesis.strategies.floats(allow_nan=False)
        | hypothesis.strategies.text(max_size=20),
        lambda inner: (
            hypothesis.strategies.lists(inner, max_size=5)
            | hypothesis.strategies.dictionaries(hypothesis.strategies.text(max_size=12), inner, max_size=5)
        ),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode()),
)
def test_arbitrary_bytes_and_json_get_a_4xx_not_a_crash(path, raw):
    with TestClient(app) as client:
        response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500, f"{path} {raw!r} -> {response.status_code} {response.text}"


def test_deeply_nested_json_is_a_4xx():
    with TestClient(app) as client:
        response = client.post("/lookup", content=b"[" * 100_000 + b"]" * 100_000)
    assert 400 <= response.status_code < 500


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

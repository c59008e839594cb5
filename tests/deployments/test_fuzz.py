"""A schema-driven fuzz of the served API: schemathesis generates requests for every operation in
the app's own /openapi.json, bodies that fit the schema and bodies that break it, and none may be
answered with a 5xx. Bodies carry the served model's name (a random one is a plain 404), so they
reach validation and the engine. Bounded: a fixed number of examples per operation and mode,
derandomized, each request with a timeout."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.deployments.served_app import AUTH

EXAMPLES = 20  # per operation and mode


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_operation_answers_5xx(served, mode):
    schema = schemathesis.openapi.from_url(served.http + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    statuses = []
    for operation in operations:
        if mode == "negative" and not len(operation.body):
            continue  # nothing to break: no parameters, no body

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
        def fuzz(case):
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "tiny"
            response = case.call(headers=AUTH, timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}"
            )

        fuzz()
    assert 200 in statuses or mode == "negative"  # some generated requests were served, not all refused

"""schemathesis against the live gateway, from its own /openapi.json: requests generated
for every operation, valid and invalid. None may get a 5xx, and every error must be the
OpenAI envelope. Half the cases name a model that exists, so that generation runs too."""
from __future__ import annotations

from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import API_KEY, Stack

MODELS = ["fake-model", "vicuna-stock"]
EXAMPLES = 60  # per operation and mode: 12 operations x 2 modes x 60 = 1,440 cases


def test_generated_requests_never_fail_the_server(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(stack.gateway.url + "/openapi.json")
    session = requests.Session()
    counts = {"cases": 0, "errors": 0}
    operations = []
    for result in schema.get_all_operations():
        operations.append(result.ok())  # type: ignore[union-attr]
    assert len(operations) == 12
    for operation in operations:
        for mode in schemathesis.GenerationMode:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                counts["cases"] += 1
                _aim_at_real_models(case, counts["cases"])
                response = case.call(base_url=stack.gateway.url, session=session,
                                     headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=30)
                assert response.status_code < 500, (case.body, response.text)
                if response.status_code >= 400:
                    counts["errors"] += 1
                    error = response.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}
                    assert isinstance(error["message"], str) and error["message"]
            check()
    session.close()
    print(f"\nschemathesis: {counts['cases']} generated requests, {counts['errors']} "
          "answered with an error envelope, none with a 5xx")
    assert counts["cases"] >= 1000


def _aim_at_real_models(case: Any, number: int) -> None:
    if number % 2:
        return
    if isinstance(case.body, dict):
        if "model" in case.body:
            case.body["model"] = MODELS[number % 4 // 2]
        if case.body.get("stream") is True:
            case.body["stream"] = False  # streams are covered elsewhere; keep cases quick
    if case.path_parameters and "model" in case.path_parameters:
        case.path_parameters["model"] = "fake-model"

"""The admin router documents itself: paths, response models, error bodies and the bearer lock."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
from fastapi import FastAPI

from tokengate_fastapi import admin_router


def test_openapi_lists_admin_paths_models_and_the_bearer_scheme(make_app: Callable[..., FastAPI]) -> None:
    schema: dict[str, Any] = make_app().openapi()
    paths = schema["paths"]
    for path, methods in {
        "/tokengate/stats": ["get"], "/tokengate/affinity": ["get"], "/tokengate/workers": ["get"],
        "/tokengate/history": ["get"], "/tokengate/tokens/{token_id}": ["get"],
        "/tokengate/tokens/{token_id}/kill": ["post"], "/tokengate/operations": ["get"],
        "/tokengate/operations/{operation_type}/pause": ["post"],
        "/tokengate/operations/{operation_type}/kill": ["post"], "/tokengate/quarantine": ["get"],
        "/tokengate/quarantine/{quarantine_id}": ["get", "delete"],
        "/tokengate/quarantine/{quarantine_id}/release": ["post"], "/tokengate/drain": ["post"],
        "/tokengate/pause": ["post"], "/tokengate/resume": ["post"], "/tokengate/metrics": ["get"],
        "/tokengate/health": ["get"], "/tokengate/ready": ["get"], "/tokengate/events": ["get"],
        "/tokengate/dashboard": ["get"],
    }.items():
        assert path in paths, path
        assert set(methods) <= set(paths[path]), path

    # the lock: a bearer security scheme, required on protected routes, absent on public probes
    schemes = schema["components"]["securitySchemes"]
    assert schemes["TokengateAdminToken"] == {
        "type": "http", "scheme": "bearer",
        "description": "The tokengate admin token (admin_router(token=...) or $TOKENGATE_ADMIN_TOKEN)."}
    assert paths["/tokengate/stats"]["get"]["security"] == [{"TokengateAdminToken": []}]
    assert "security" not in paths["/tokengate/health"]["get"]
    assert "security" not in paths["/tokengate/dashboard"]["get"]

    # response models and documented error bodies
    components = schema["components"]["schemas"]
    for model in ("StatsResponse", "AffinityResponse", "KillResult", "DrainReport", "ExecutionRecord",
                  "QuarantineRecord", "OperationReputation", "Health", "Ready", "ErrorBody"):
        assert model in components, model
    stats_200 = paths["/tokengate/stats"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert stats_200["$ref"].endswith("/StatsResponse")
    kill = paths["/tokengate/tokens/{token_id}/kill"]["post"]["responses"]
    assert {"200", "401", "404", "409", "422", "503"} <= set(kill)
    assert kill["409"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "unauthorized" in components["ErrorCode"]["enum"]
    # the event stream documents its query token
    event_params = {p["name"] for p in paths["/tokengate/events"]["get"]["parameters"]}
    assert {"access_token", "max_events"} <= event_params


def test_include_in_schema_false_hides_the_router() -> None:
    app = FastAPI()
    app.include_router(admin_router(token="t" * 32, include_in_schema=False), prefix="/admin")
    assert not any(path.startswith("/admin") for path in app.openapi()["paths"])


def test_public_exports() -> None:
    import tokengate_fastapi

    for name in tokengate_fastapi.__all__:
        assert getattr(tokengate_fastapi, name) is not None, name
    assert {"tokengate_lifespan", "get_coordinator", "CoordinatorDep", "admin_router", "add_exception_handlers",
            "ErrorCode", "TokengateCollector", "CancelOnDisconnectMiddleware"} <= set(tokengate_fastapi.__all__)


def _ref(response: dict[str, Any], media_type: str = "application/json") -> str:
    ref: str = response["content"][media_type]["schema"]["$ref"]
    return ref.rsplit("/", 1)[-1]


def test_tokengate_responses_documents_refusals_timeouts_and_malformed_input() -> None:
    from tokengate import ConfigurationError
    from tokengate_fastapi import tokengate_responses

    # Given a route documented with the helper
    app = FastAPI()

    @app.get("/work", responses=tokengate_responses())
    async def work(n: int) -> dict[str, int]:
        return {"n": n}

    @app.get("/fails", responses=tokengate_responses(function_failed=True, validation=False))
    async def fails(n: int) -> dict[str, int]:
        return {"n": n}

    # Then its OpenAPI entry has the error bodies add_exception_handlers gives, as ErrorBody
    schema: dict[str, Any] = app.openapi()
    work_responses = schema["paths"]["/work"]["get"]["responses"]
    assert set(work_responses) == {"200", "409", "422", "503", "504"}
    for status in ("409", "422", "503", "504"):
        assert _ref(work_responses[status]) == "ErrorBody", status
    assert "Retry-After" in work_responses["503"]["headers"]
    assert "HTTPValidationError" not in json.dumps(work_responses)
    # function_failed adds 500; validation=False leaves FastAPI's own 422
    fails_responses = schema["paths"]["/fails"]["get"]["responses"]
    assert _ref(fails_responses["500"]) == "ErrorBody" and _ref(fails_responses["422"]) == "HTTPValidationError"
    assert "function_failed" in schema["components"]["schemas"]["ErrorCode"]["enum"]
    # each call is a fresh dict, and bad options are refused
    assert tokengate_responses() is not tokengate_responses()
    with pytest.raises(ConfigurationError):
        tokengate_responses(validation="yes")  # type: ignore[arg-type]


def test_admin_routes_document_404_422_and_json_errors_on_the_event_stream(make_app: Callable[..., FastAPI]) -> None:
    paths: dict[str, Any] = make_app().openapi()["paths"]
    # a path parameter: an unaddressable value (a line break) matches no route, 404
    for path in ("/tokengate/operations/{operation_type}/kill", "/tokengate/operations/{operation_type}/pause",
                 "/tokengate/tokens/{token_id}"):
        operation = next(iter(paths[path].values()))
        assert _ref(operation["responses"]["404"]) == "ErrorBody", path
        assert _ref(operation["responses"]["422"]) == "ErrorBody", path
    # /events streams text/event-stream, but its error answers are JSON, and its stream is a list of events
    events = paths["/tokengate/events"]["get"]["responses"]
    for status in ("401", "422", "503"):
        assert list(events[status]["content"]) == ["application/json"], status
        assert _ref(events[status]) == "ErrorBody", status
    stream = events["200"]["content"]["text/event-stream"]
    assert stream["schema"] == {"type": "array", "items": stream["itemSchema"]}


def test_example_app_documents_every_error_it_answers() -> None:
    from example_app.app import create_app

    schema: dict[str, Any] = create_app(admin_token="t" * 32, quarantine_path=":memory:").openapi()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    awaiting = ["/light", "/medium", "/heavy", "/io", "/sticky/{user_id}", "/ordered/{account}", "/chain",
                "/process", "/flaky", "/fail", "/slow", "/jobs/slow"]
    for path in awaiting:
        responses = next(iter(schema["paths"][path].values()))["responses"]
        assert {"409", "422", "503", "504"} <= set(responses), path
        assert all(_ref(responses[s]) == "ErrorBody" for s in ("409", "422", "503", "504")), path
    for path in ("/fail", "/flaky"):
        assert _ref(schema["paths"][path]["get"]["responses"]["500"]) == "ErrorBody"
    assert _ref(schema["paths"]["/"]["get"]["responses"]["503"]) == "ErrorBody"

"""The admin router documents itself: paths, response models, error bodies and the bearer lock."""

from __future__ import annotations

from typing import Any, Callable

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

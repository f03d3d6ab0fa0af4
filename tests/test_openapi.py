"""The server's OpenAPI document is exact, and a stock fuzzer (schemathesis, every check) finds nothing against it.

Chapter: "Serving predictions" (the interface). In-process (ASGI), loopback only, bounded: ~100 generated cases per
route and method, positive and negative, plus schemathesis' own coverage and unsupported-method probes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from reference_impl.serving import ServingConfig, create_app
from reference_impl.settings import Settings

ADMIN_KEY = "fuzz-admin-key"
# The one allowance: a body can match the schema (any bytes are a "binary" image) and still not be a readable
# image, or name a shape larger than the pixel limit; those are the client's mistakes, answered 400 / 413.
CONFIG = """
[generation]
mode = "all"

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "413"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
"""


@pytest.fixture(scope="module")
def app(profile_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """The app itself: schemathesis' ASGI transport runs its lifespan (the model loads) around the calls."""
    config = ServingConfig(bundle_path=str(profile_bundle), admin_key=ADMIN_KEY, device="cpu")
    return create_app(Settings(state_dir=tmp_path_factory.mktemp("openapi-state")), config)


def test_the_document_names_bodies_and_statuses(app) -> None:
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    predict = paths["/v1/predict"]["post"]
    assert {"image/png", "multipart/form-data"} <= set(predict["requestBody"]["content"])
    assert set(predict["responses"]) == {"200", "400", "401", "413", "415", "503"}
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert set(infer["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    rollout = paths["/v1/admin/rollout"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert rollout["additionalProperties"] is False and set(rollout["properties"]) == {"canary_fraction", "shadow"}
    everything = [op for methods in paths.values() for op in methods.values()]
    assert not [op for op in everything if "422" in op["responses"]], "this server answers 400, never FastAPI's 422"
    assert not [op for op in everything for p in op.get("parameters", []) if p["in"] == "query"]
    versioned = paths["/v2/models/{name}/versions/{version}"]["get"]["parameters"]
    assert {p["name"] for p in versioned} == {"name", "version"}


@pytest.fixture(scope="module")
def api_schema(app):
    import schemathesis
    from schemathesis.config import SchemathesisConfig

    return schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_str(CONFIG))


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _nodeid_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's lazy schema renames the running test through `node._nodeid`, an attribute pytest 9
    # no longer has; give it one (harmless for the other tests of this module)
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_failure(case) -> None:
    """One test per route and method; each runs schemathesis' phases with every check enabled."""
    case.call_and_validate(headers={"X-API-Key": ADMIN_KEY} if "/admin/" in case.path else None)

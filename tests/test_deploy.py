"""Deployment artifacts: they cannot be built here (no Docker engine, no cluster), so check what can be checked:
well-formed, consistent with the code's routes and pins, and that the slim image's dependency set really suffices."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()


def _constraint(name: str) -> str:
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{name} not pinned in constraints.txt")


def test_dockerfile_is_multi_stage_non_root_with_readiness_healthcheck() -> None:
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", DOCKERFILE, flags=re.M)
    assert stages == ["builder", "runtime"]
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    assert re.search(r"^USER\s+(?!root)\w+", runtime, flags=re.M), "the runtime stage must drop root"
    assert "HEALTHCHECK" in runtime and "/v2/health/ready" in runtime
    assert "pip" not in runtime.split("USER", 1)[1], "no installs after dropping privileges"
    assert '"reference_impl", "serve"' in runtime


def test_dockerfile_torch_pins_match_the_project() -> None:
    assert f"torch=={_constraint('torch')}" in DOCKERFILE
    assert f"torchvision=={_constraint('torchvision')}" in DOCKERFILE


def test_k8s_manifest_probes_and_ports_match_the_server(tmp_path: Path) -> None:
    from reference_impl.serving import ServingConfig, create_app
    from reference_impl.settings import Settings

    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "weld-inference.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    paths = {container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]}
    assert paths == {"/v2/health/ready", "/v2/health/live"}
    app = create_app(Settings(state_dir=tmp_path), ServingConfig(bundle_path="unused"))
    routes = set(app.openapi()["paths"])  # included routers may not appear as plain routes in app.routes
    assert paths <= routes and "/metrics" in routes
    exposed = re.search(r"^EXPOSE\s+(\d+)", DOCKERFILE, flags=re.M)
    assert exposed and container["ports"][0]["containerPort"] == int(exposed.group(1))
    env_names = {e["name"] for e in container.get("env", [])}
    assert "MLOPS_ADMIN_KEY" in env_names and "secretKeyRef" in str(container["env"]), "keys come from a Secret"


def test_serving_a_bundle_needs_only_the_slim_image_dependencies(bundle_dir: Path, tmp_path: Path) -> None:
    """The image installs torch, torchvision, numpy, pillow, fastapi, uvicorn, multipart and prometheus-client only:
    serving a bundle must not import mlflow, pandas, evidently or training-only modules."""
    code = f"""
import sys
from fastapi.testclient import TestClient
from reference_impl.serving import ServingConfig, create_app
from reference_impl.settings import Settings
app = create_app(Settings(state_dir={str(tmp_path)!r}), ServingConfig(bundle_path={str(bundle_dir)!r}))
with TestClient(app) as client:
    assert client.get("/v2/health/ready").status_code == 200
heavy = sorted(m for m in ("mlflow", "pandas", "evidently", "matplotlib", "onnx", "scipy") if m in sys.modules)
print(",".join(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"serving imported {out.stdout.strip()}, which the slim image does not have"

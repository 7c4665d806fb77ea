"""deploy/kubernetes/, checked offline: every built-in kind against the Kubernetes JSON schemas
(kubernetes-validate, strict: unknown fields are errors), and the references between the files and
sizewise itself (probes on /ready and /health, the port, the config the pods read, the metric the
autoscaler scales on, the pods the Service and the InferencePool select)."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sizewise.metrics import Metrics
from sizewise.orchestrator.deployment import DeploymentConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
VERSION = kubernetes_validate.latest_version()


def _docs() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return _docs()


def test_the_manifests_are_there(docs):
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "InferencePool"}


@pytest.mark.parametrize("kind", ["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"])
def test_valid_against_the_kubernetes_schema(docs, kind):
    kubernetes_validate.validate(docs[kind], VERSION, strict=True)


def test_the_validator_rejects_a_broken_deployment(docs):
    broken = yaml.safe_load(yaml.safe_dump(docs["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/health"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def _container(docs) -> dict:
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_probes_port_and_config_match_the_server(docs):
    c = _container(docs)
    pod = docs["Deployment"]["spec"]["template"]
    (port,) = c["ports"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert c["startupProbe"]["httpGet"]["path"] == "/health", "loading models must not trip liveness"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["models"] == "/models"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_file = Path(c["args"][c["args"].index("--config") + 1])
    assert str(config_file.parent) == mounts["config"]
    assert volumes["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    cfg = DeploymentConfig.model_validate(yaml.safe_load(docs["ConfigMap"]["data"][config_file.name]))
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == port["containerPort"]
    assert all(m.path.startswith(mounts["models"] + "/") for m in cfg.models)
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert pod["spec"]["securityContext"]["runAsUser"] == int(uid), "the image's non-root user"
    assert "limits" in c["resources"] and "requests" in c["resources"]


def test_service_and_inference_pool_select_the_pods(docs):
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    c = _container(docs)
    (port,) = c["ports"]
    svc = docs["Service"]["spec"]
    assert svc["selector"].items() <= labels.items()
    assert svc["ports"][0]["targetPort"] == port["name"]
    pool = docs["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": port["containerPort"]}]
    assert pool["spec"]["endpointPickerRef"]["name"] and pool["spec"]["endpointPickerRef"]["port"]["number"]


def test_autoscaler_scales_the_deployment_on_a_metric_sizewise_exports(docs):
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    dep = docs["Deployment"]
    assert hpa["scaleTargetRef"] == {"apiVersion": dep["apiVersion"], "kind": dep["kind"], "name": dep["metadata"]["name"]}
    (metric,) = hpa["metrics"]
    families = {m.name for m in Metrics().registry.collect()}
    assert metric["pods"]["metric"]["name"] in families, sorted(families)

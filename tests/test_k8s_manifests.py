"""deploy/ manifests against the Kubernetes schemas, with no cluster.

Core kinds (Deployment, Service, HorizontalPodAutoscaler) are checked against the official
``kubernetes`` Python client's models: every key must be a field of the model at that place
(the client itself ignores unknown keys, so the walk here is strict), every value of the
model's type, and the model constructors then enforce required fields. The KServe
InferenceService (a CRD the client does not model) is checked against the fields KServe
documents for ``serving.kserve.io/v1beta1`` PredictorSpec: its inlined PodSpec goes through
the same strict V1PodSpec walk, the rest must be a ComponentExtensionSpec field.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client import models

from kanmoe.paths import PROJECT_ROOT
from kanmoe.service.settings import ServeSettings

DEPLOY = PROJECT_ROOT / "deploy"
KSERVE_FILE = DEPLOY / "kserve" / "inferenceservice.yaml"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
MODEL_OF = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}
# KServe v1beta1 PredictorSpec = framework specs (one-of) + inlined PodSpec + inlined
# ComponentExtensionSpec (pkg/apis/serving/v1beta1/predictor.go and component.go).
KSERVE_FRAMEWORKS = {
    "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
    "lightgbm", "paddle", "model", "storageUris", "workerSpec",
}  # fmt: skip
KSERVE_EXTENSION = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy", "autoScaling",
}  # fmt: skip
KSERVE_SCALE_METRICS = {"cpu", "memory", "concurrency", "rps"}
KSERVE_CONTAINER = "kserve-container"  # constants.InferenceServiceContainerName
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
LIST = re.compile(r"^(?:List\[|list\[)(.+)\]$")
DICT = re.compile(r"^(?:Dict\[str, |dict\(str, )(.+)[\])]$")


def strict(value: Any, type_name: str, where: str) -> list[str]:
    """Problems with ``value`` as the client's ``type_name`` (empty list: it conforms)."""
    if m := LIST.match(type_name):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, v in enumerate(value) for p in strict(v, m[1], f"{where}[{i}]")]
    if m := DICT.match(type_name):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        return [p for k, v in value.items() for p in strict(v, m[1], f"{where}.{k}")]
    if type_name in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[type_name]) and not (
            type_name in ("int", "float") and isinstance(value, bool)
        )
        return [] if ok else [f"{where}: {value!r} is not {type_name}"]
    if type_name == "datetime":
        return [] if isinstance(value, str) else [f"{where}: expected a timestamp"]
    cls = getattr(models, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping"]
    by_json = {j: attr for attr, j in cls.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in by_json:
            problems.append(f"{where}.{key}: not a field of {type_name}")
        else:
            problems += strict(item, cls.openapi_types[by_json[key]], f"{where}.{key}")
    return problems


class _Response:  # what ApiClient.deserialize reads before kubernetes 35
    def __init__(self, doc: dict) -> None:
        self.data = json.dumps(doc)


def deserialize(doc: dict, type_name: str) -> Any:
    """The kubernetes client's own deserializer (its signature changed across versions)."""
    api = client.ApiClient()
    if "content_type" in inspect.signature(api.deserialize).parameters:
        return api.deserialize(json.dumps(doc), type_name, "application/json")
    return api.deserialize(_Response(doc), type_name)


def load_model(doc: dict) -> Any:
    """The client model for ``doc``: strict key walk, then the client's own deserializer."""
    type_name = MODEL_OF[(doc["apiVersion"], doc["kind"])]
    problems = strict(doc, type_name, doc["kind"])
    assert not problems, "\n".join(problems)
    return deserialize(doc, type_name)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def k8s() -> dict[str, Any]:
    loaded = {}
    for path in K8S_FILES:
        for doc in docs(path):
            loaded[doc["kind"]] = load_model(doc)
    return loaded


def _env(container: Any) -> dict[str, str]:
    return {e.name: e.value for e in container.env or []}


def check_kanmoe_container(container: Any, port: int) -> None:
    """Settings are real ServeSettings fields with valid values; probes hit the server."""
    env = _env(container)
    values = {k[len("KANMOE_") :].lower(): v for k, v in env.items() if k.startswith("KANMOE_")}
    unknown = set(values) - set(ServeSettings.model_fields)
    assert not unknown, f"not kanmoe settings: {unknown}"
    settings = ServeSettings(**values)  # validates every value as `kanmoe serve` would
    assert settings.host == "0.0.0.0" and settings.port == port
    ports = {p.container_port for p in container.ports}
    names = {p.name: p.container_port for p in container.ports}
    assert port in ports
    for probe, path in ((container.readiness_probe, "/v2/health/ready"),
                        (container.liveness_probe, "/v2/health/live")):  # fmt: skip
        assert probe is not None and probe.http_get.path == path
        assert names.get(probe.http_get.port, probe.http_get.port) == port
    gpu = "nvidia.com/gpu"
    assert container.resources.limits[gpu] == container.resources.requests[gpu] == "1"


def test_every_core_manifest_is_a_valid_kubernetes_object(k8s):
    assert set(k8s) == {"Deployment", "Service", "HorizontalPodAutoscaler"}


def test_deployment_runs_kanmoe_with_gpu_and_health_probes(k8s):
    dep = k8s["Deployment"]
    assert dep.spec.selector.match_labels.items() <= dep.spec.template.metadata.labels.items()
    (container,) = dep.spec.template.spec.containers
    check_kanmoe_container(container, port=8000)
    drain = float(_env(container)["KANMOE_DRAIN_TIMEOUT_S"])
    assert dep.spec.template.spec.termination_grace_period_seconds > drain


def test_service_and_hpa_point_at_the_deployment(k8s):
    dep, svc, hpa = k8s["Deployment"], k8s["Service"], k8s["HorizontalPodAutoscaler"]
    labels = dep.spec.template.metadata.labels
    assert svc.spec.selector.items() <= labels.items()
    (container,) = dep.spec.template.spec.containers
    port_names = {p.name for p in container.ports}
    assert all(p.target_port in port_names for p in svc.spec.ports)
    ref = hpa.spec.scale_target_ref
    assert (ref.api_version, ref.kind, ref.name) == ("apps/v1", "Deployment", dep.metadata.name)
    assert 1 <= hpa.spec.min_replicas <= hpa.spec.max_replicas


def test_kserve_inference_service_uses_only_documented_fields():
    (doc,) = docs(KSERVE_FILE)
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    assert not strict(doc["metadata"], "V1ObjectMeta", "metadata")
    assert set(doc["spec"]) <= {"predictor", "transformer", "explainer"}
    predictor = doc["spec"]["predictor"]
    pod_fields = set(models.V1PodSpec.attribute_map.values())
    unknown = set(predictor) - pod_fields - KSERVE_EXTENSION - KSERVE_FRAMEWORKS
    assert not unknown, f"not PredictorSpec fields: {unknown}"
    assert not set(predictor) & KSERVE_FRAMEWORKS, "a custom predictor sets containers only"
    pod = {k: v for k, v in predictor.items() if k in pod_fields}
    problems = strict(pod, "V1PodSpec", "predictor")
    assert not problems, "\n".join(problems)
    spec = deserialize(pod, "V1PodSpec")
    assert predictor["scaleMetric"] in KSERVE_SCALE_METRICS
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] > 0
    assert 0 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["containerConcurrency"] >= predictor["scaleTarget"]
    (container,) = spec.containers
    assert container.name == KSERVE_CONTAINER
    assert _env(container)["PROTOCOL"] == "v2"  # KServe's custom-predictor protocol switch
    check_kanmoe_container(container, port=8080)


def test_the_strict_walk_catches_what_the_client_would_ignore():
    (doc,) = [d for d in docs(DEPLOY / "k8s" / "deployment.yaml") if d["kind"] == "Deployment"]
    bad = copy.deepcopy(doc)
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"path": "/x"}
    assert strict(bad, "V1Deployment", "D") == [
        "D.spec.template.spec.containers[0].readinesProbe: not a field of V1Container"
    ]
    bad = copy.deepcopy(doc)
    bad["spec"]["replicas"] = "2"
    assert strict(bad, "V1Deployment", "D") == ["D.spec.replicas: '2' is not int"]
    bad = copy.deepcopy(doc)
    del bad["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        load_model(bad)

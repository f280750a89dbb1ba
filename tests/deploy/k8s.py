"""The manifests of deploy/k8s as Kubernetes reads them (PyYAML), and small helpers over them."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MONITORING = K8S / "monitoring"
PLACEHOLDER = "CHANGE_ME"

Doc = dict[str, Any]


@cache
def load(path: Path) -> tuple[Doc, ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def docs(path: Path, kind: str) -> list[Doc]:
    return [doc for doc in load(path) if doc["kind"] == kind]


def one(path: Path, kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs(path, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, (path, kind, name, len(found))
    return found[0]


def kustomization() -> Doc:
    return one(K8S / "kustomization.yaml", "Kustomization")


def resources() -> list[Doc]:
    """Every object `kubectl apply -k deploy/k8s` creates, in the kustomization's order."""
    return [doc for name in kustomization()["resources"] for doc in load(K8S / name)]


def deployment() -> Doc:
    return one(K8S / "deployment.yaml", "Deployment")


def job() -> Doc:
    return one(K8S / "migrate-job.yaml", "Job")


def configmap() -> Doc:
    return one(K8S / "configmap.yaml", "ConfigMap")


def secret_example() -> Doc:
    return one(K8S / "secret.example.yaml", "Secret")


def service(name: str) -> Doc:
    return one(K8S / "service.yaml", "Service", name)


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc) -> dict[str, Doc]:
    return {c["name"]: c for c in pod_spec(workload)["containers"]}


def container_ports(container: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def filled_secret() -> dict[str, str]:
    """The example Secret with its placeholders replaced by values of the right shape."""
    values: dict[str, str] = {}
    for name, value in secret_example()["stringData"].items():
        if name == "SWITCHBOARD_ENCRYPTION_KEYS":
            value = "k1:" + base64.b64encode(bytes(range(32))).decode()
        elif name.endswith("_APP_ID"):
            value = "1234567890"
        values[name] = value.replace(PLACEHOLDER, "example")
    return values


def environment(workload: Doc, container: Doc) -> dict[str, str]:
    """The environment Kubernetes gives the container: envFrom sources in order, then env."""
    sources = {("ConfigMap", configmap()["metadata"]["name"]): configmap()["data"]}
    sources[("Secret", secret_example()["metadata"]["name"])] = filled_secret()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind, ref = (
            ("ConfigMap", source["configMapRef"])
            if "configMapRef" in source
            else ("Secret", source["secretRef"])
        )
        assert (kind, ref["name"]) in sources, f"{ref['name']} is no {kind} of the manifests"
        env.update(sources[kind, ref["name"]])
    for var in container.get("env", []):
        assert "value" in var, f"{var['name']}: only literal values are expected here"
        env[var["name"]] = var["value"]
    return env


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?")
_UNITS = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


def quantity(value: str | int | float) -> float:
    match = _QUANTITY.fullmatch(str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match[1]) * _UNITS[match[2]]

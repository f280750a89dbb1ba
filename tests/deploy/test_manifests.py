"""The Kubernetes manifests and the Dockerfile agree with the code they deploy.

The manifests are written in a plain subset (block mappings, one-line JSON-style lists for
commands) that these checks read line by line; the last one parses every document with PyYAML
(a dev dependency). test_consistency.py reads them as Kubernetes does, and test_alert_rules.py
checks the alert rules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gateway.cli import build_parser
from gateway.security.keyring import validate_key_ring_spec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
PLACEHOLDER = "CHANGE_ME"

# What the deployment may run: the two front doors of the pod and the pre-deploy migration.
DEPLOY_COMMANDS = {("serve", "grpc"), ("serve", "http"), ("migrate",)}
ENV_PREFIXES = ("SWITCHBOARD_", "INSTAGRAM_", "FACEBOOK_")


def _text(name: str) -> str:
    return (K8S / name).read_text()


def _block(text: str, key: str) -> list[str]:
    """The lines nested under a top-level ``key:`` (up to the next top-level key)."""
    lines = text.splitlines()
    start = lines.index(f"{key}:") + 1
    out = []
    for line in lines[start:]:
        if line and not line.startswith((" ", "#")):
            break
        out.append(line)
    return out


def _mapping_keys(text: str, key: str) -> dict[str, str]:
    """``NAME: "value"`` pairs directly under a top-level ``key:`` (ConfigMap, Secret)."""
    pairs = {}
    for line in _block(text, key):
        match = re.fullmatch(r"  ([A-Za-z0-9_]+): \"(.*)\"", line)
        if match:
            pairs[match[1]] = match[2]
    return pairs


def _listed_resources() -> list[str]:
    return [
        re.fullmatch(r"  - (\S+)", line)[1]  # type: ignore[index]
        for line in _block(_text("kustomization.yaml"), "resources")
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _containers(text: str) -> list[dict[str, object]]:
    """name, command, args of every container (the lines that sit beside ``image:``)."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = re.fullmatch(r"( +)image: \S+", line)
        if not match:
            continue
        indent = match[1]
        fields: dict[str, object] = {"name": re.sub(r"^ *- name: ", "", lines[i - 1])}
        for sibling in lines[i + 1 :]:
            if sibling.strip() and not sibling.startswith(indent):
                break
            field = re.fullmatch(indent + r"(command|args): (\[.*\])", sibling)
            if field:
                fields[field[1]] = json.loads(field[2])
        found.append(fields)
    return found


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"^ *- name: ([A-Z][A-Z0-9_]*)$", text, flags=re.MULTILINE))


def _int(text: str, pattern: str) -> int:
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, pattern
    return int(match[1])


def test_kustomization_lists_every_manifest_and_no_secret() -> None:
    listed = _listed_resources()
    assert listed, "kustomization.yaml lists no resources"
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", SECRET_EXAMPLE.name}
    assert on_disk == set(listed), "every manifest beside kustomization.yaml is listed"
    assert SECRET_EXAMPLE.is_file()
    assert (K8S / "monitoring" / "servicemonitor.yaml").is_file()
    assert not any(name.startswith("monitoring") for name in listed), "monitoring is optional"


def test_containers_run_real_switchboard_subcommands() -> None:
    parser = build_parser()
    ran: dict[str, set[tuple[str, ...]]] = {}
    for manifest in ("deployment.yaml", "migrate-job.yaml"):
        containers = _containers(_text(manifest))
        assert containers, manifest
        for container in containers:
            assert container.get("command") == ["switchboard"], (manifest, container)
            args = container.get("args")
            assert isinstance(args, list), (manifest, container)
            parser.parse_args(args)  # exits (status 2) on anything the CLI does not know
            assert tuple(args) in DEPLOY_COMMANDS, (manifest, args)
            ran.setdefault(manifest, set()).add(tuple(args))
    assert ran["deployment.yaml"] == {("serve", "grpc"), ("serve", "http")}
    assert ran["migrate-job.yaml"] == {("migrate",)}


def test_dockerfile_entrypoint_is_the_cli() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)[1])  # type: ignore[index]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M)[1])  # type: ignore[index]
    assert entrypoint == ["switchboard"]
    assert cmd == ["serve", "all"]
    build_parser().parse_args(cmd)
    assert "FROM python:3.11-slim" in dockerfile or "PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert re.search(r"^USER (?!0\b|root\b)\S+", dockerfile, re.M), "runs as a non-root user"


def test_environment_names_are_ones_the_gateway_reads() -> None:
    sources = "\n".join(
        p.read_text() for d in ("gateway", "channels") for p in (ROOT / d).rglob("*.py")
    )
    names = (
        set(_mapping_keys(_text("configmap.yaml"), "data"))
        | set(_mapping_keys(SECRET_EXAMPLE.read_text(), "stringData"))
        | _env_names(_text("deployment.yaml"))
        | _env_names(_text("migrate-job.yaml"))
    )
    assert "SWITCHBOARD_DATABASE_URL" in names
    for name in sorted(names):
        assert name.startswith(ENV_PREFIXES), name
        suffix = name.removeprefix("SWITCHBOARD_")
        assert name in sources or f'"{suffix}"' in sources, f"nothing reads {name}"


def test_secret_example_holds_placeholders_only() -> None:
    text = SECRET_EXAMPLE.read_text()
    assert text.startswith("# EXAMPLE ONLY - PLACEHOLDERS"), "clearly marked as an example"
    assert "kind: Secret" in text
    assert "\ndata:" not in text, "placeholders go in stringData, never base64 data"
    values = _mapping_keys(text, "stringData")
    assert {"SWITCHBOARD_DATABASE_URL", "SWITCHBOARD_ENCRYPTION_KEYS"} <= set(values)
    for name, value in values.items():
        assert PLACEHOLDER in value, f"{name} must be a {PLACEHOLDER} placeholder"
        assert not re.search(r"[A-Za-z0-9+/]{32,}={0,2}", value), f"{name} looks like a real key"
    # The gateway itself refuses the key ring placeholder, so it can never go live by mistake.
    assert validate_key_ring_spec(values["SWITCHBOARD_ENCRYPTION_KEYS"])


def test_ports_probes_and_shutdown_agree() -> None:
    deployment = _text("deployment.yaml")
    config = _mapping_keys(_text("configmap.yaml"), "data")
    ports = dict(re.findall(r"- name: ([a-z-]+)\n +containerPort: (\d+)", deployment, flags=re.M))
    assert ports == {
        "grpc": "50051",
        "metrics-grpc": "9464",
        "http": "8080",
        "metrics-http": "9465",
    }
    assert config["SWITCHBOARD_GRPC_ADDR"] == "0.0.0.0:" + ports["grpc"]
    assert config["SWITCHBOARD_HTTP_ADDR"] == "0.0.0.0:" + ports["http"]
    metrics = re.findall(r'SWITCHBOARD_METRICS_ADDR\n +value: "0\.0\.0\.0:(\d+)"', deployment)
    assert metrics == [ports["metrics-grpc"], ports["metrics-http"]]
    assert re.search(r"grpc:\n +port: 50051", deployment), "native gRPC probe"
    assert "path: /readyz" in deployment
    assert "path: /healthz" in deployment

    # Every Service targetPort names a container port.
    targets = set(re.findall(r"targetPort: (\S+)", _text("service.yaml")))
    assert targets <= set(ports), targets - set(ports)

    grace = float(config["SWITCHBOARD_SHUTDOWN_GRACE_SECONDS"])
    pre_stop = _int(deployment, r'command: \["sleep", "(\d+)"\]')
    termination = _int(deployment, r"terminationGracePeriodSeconds: (\d+)")
    assert termination > pre_stop + grace, "Kubernetes must not kill the pod mid-drain"


def test_every_document_parses() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc, path
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] == "Kustomization":
                continue
            assert doc["metadata"]["name"], path
            assert "namespace" not in doc["metadata"], f"{path} must stay namespace-agnostic"
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec")
            if pod:
                assert pod["securityContext"]["runAsNonRoot"] is True, path
                for container in pod["containers"]:
                    ctx = container["securityContext"]
                    assert ctx["readOnlyRootFilesystem"] is True, path
                    assert ctx["capabilities"]["drop"] == ["ALL"], path
                    assert {"requests", "limits"} <= set(container["resources"]), path


def test_the_kustomization_leaves_the_operator_resources_out() -> None:
    # The ServiceMonitor and the alert rules need the Prometheus Operator's CRDs: applied on
    # their own, so that `kubectl apply -k` works on a cluster without them.
    assert not any(r.startswith("monitoring/") for r in _listed_resources())

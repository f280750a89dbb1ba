"""The manifests agree with each other and with the gateway, read as Kubernetes reads them.

What a platform team checks before applying them: every container's configuration is one the
gateway accepts and binds the ports the pod declares; Services, probes, the NetworkPolicy, the
HorizontalPodAutoscaler, the PodDisruptionBudget and the ServiceMonitor all point at those
ports and pods; pods are locked down; shutdown fits in the grace period; the migrate Job runs
after what it needs and before the Deployment.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import fields
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.app import Role
from gateway.config import Config
from gateway.domain.channel import ChannelContext
from gateway.observability.metrics import create_metrics_app
from gateway.plugins import ChannelRegistry, load_channels
from gateway.web.app import WebDeps, create_web_app
from tests.deploy import k8s

# The ports a `switchboard serve ROLE` process binds, by the Config address that sets each.
BINDS = {
    Role.GRPC: {"grpc_addr", "metrics_addr"},
    Role.HTTP: {"http_addr", "metrics_addr"},
}
# The container port each of those addresses must be (by the port names of deployment.yaml).
PORT_NAMES = {"grpc_addr": "grpc", "http_addr": "http", "metrics_addr": "metrics-"}
# Argo CD puts a resource without a sync-wave annotation in wave 0.
WAVE = "argocd.argoproj.io/sync-wave"


def _role(container: k8s.Doc) -> Role:
    args = container["args"]
    assert args[0] == "serve", container["name"]
    return Role(args[1])


def _sidecar_routes() -> set[str]:
    app = create_web_app(WebDeps(store=None, channels=ChannelRegistry(()), max_body_bytes=1024))  # type: ignore[arg-type]
    return {resource.canonical for resource in app.router.resources()}


def _metrics_routes() -> set[str]:
    return {resource.canonical for resource in create_metrics_app().router.resources()}


def _wave(doc: k8s.Doc) -> int:
    return int(doc["metadata"].get("annotations", {}).get(WAVE, "0"))


def test_every_container_configuration_is_one_the_gateway_accepts() -> None:
    for workload in (k8s.deployment(), k8s.job()):
        for name, container in k8s.containers(workload).items():
            env = k8s.environment(workload, container)
            config = Config.from_environ(env)  # raises ConfigError on any problem
            assert config.ignored == (), f"{name}: variables the gateway does not read"
            assert config.database_backend == "postgres", name
            assert config.redis_url, f"{name}: replicas share the bus only through Redis"
            assert not config.embedded, name
            assert config.public_url.startswith("https://"), "Meta refuses plain HTTP"
            # The channels validate their own variables (INSTAGRAM_*, FACEBOOK_*).
            channels = load_channels(ChannelContext(environ=env, public_url=config.public_url))
            for channel in channels:
                info = channels[channel].info()
                assert info.configured, f"{name}: {channel} is not configured"
                assert not info.sandbox, f"{name}: {channel} runs a sandbox"


def test_each_process_binds_the_ports_its_container_declares() -> None:
    for name, container in k8s.containers(k8s.deployment()).items():
        role = _role(container)
        config = Config.from_environ(k8s.environment(k8s.deployment(), container))
        declared = k8s.container_ports(container)
        bound = {}
        for setting in BINDS[role]:
            address = getattr(config, setting)
            assert address.host in ("0.0.0.0", "::"), f"{name}: {setting} is loopback only"
            port_name = PORT_NAMES[setting]
            if port_name.endswith("-"):
                port_name += name  # metrics-grpc, metrics-http: one metrics port per container
            bound[port_name] = address.port
        assert bound == declared, f"{name} binds {bound}, declares {declared}"
    all_ports = [p for c in k8s.containers(k8s.deployment()).values() for p in c.get("ports", [])]
    numbers = [p["containerPort"] for p in all_ports]
    assert len(numbers) == len(set(numbers)), "the containers share one network namespace"
    assert all(len(p["name"]) <= 15 for p in all_ports), "port names are IANA service names"


def test_probes_ask_what_each_process_serves() -> None:
    sidecar, metrics = _sidecar_routes(), _metrics_routes()
    for name, container in k8s.containers(k8s.deployment()).items():
        ports = k8s.container_ports(container)
        metrics_port = ports[f"metrics-{name}"]
        probes = {
            kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        for kind, probe in probes.items():
            if "grpc" in probe:
                assert _role(container) is Role.GRPC, f"{name}: gRPC probe on a non-gRPC process"
                assert probe["grpc"]["port"] == ports["grpc"], (name, kind)
                # The overall status (service ""), which the server keeps with the store and bus.
                assert probe["grpc"].get("service", "") == "", (name, kind)
            else:
                get = probe["httpGet"]
                port = get["port"] if isinstance(get["port"], int) else ports[get["port"]]
                routes = metrics if port == metrics_port else sidecar
                if port != metrics_port:
                    assert _role(container) is Role.HTTP, (name, kind)
                    assert port == ports["http"], (name, kind)
                assert get["path"] in routes, f"{name} {kind}: nothing serves {get['path']}"
        # Liveness must not depend on PostgreSQL or Redis: an outage would restart every pod.
        live = probes["livenessProbe"]
        assert "grpc" not in live, name
        assert live["httpGet"]["path"] != "/readyz", name
        assert probes["readinessProbe"] != live, f"{name}: readiness is liveness"


def test_services_target_the_gateway_pods_and_their_ports() -> None:
    deployment = k8s.deployment()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert k8s.matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    ports = {
        name: number
        for c in k8s.containers(deployment).values()
        for name, number in k8s.container_ports(c).items()
    }
    job_labels = k8s.job()["spec"]["template"]["metadata"]["labels"]
    for svc in k8s.docs(k8s.K8S / "service.yaml", "Service"):
        name = svc["metadata"]["name"]
        assert k8s.matches(svc["spec"]["selector"], pod_labels), name
        assert not k8s.matches(svc["spec"]["selector"], job_labels), f"{name} selects the Job"
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports, f"{name}: no container port {target}"
            assert port["port"] == ports[target], f"{name}: {port['name']} renumbers {target}"
            assert port["protocol"] == "TCP"
    assert k8s.service("switchboard-grpc")["spec"]["clusterIP"] == "None", "headless"


def test_pdb_and_hpa_govern_the_deployment() -> None:
    deployment = k8s.deployment()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = k8s.one(k8s.K8S / "pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert k8s.matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = k8s.one(k8s.K8S / "hpa.yaml", "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a drain keeps one pod"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # CPU utilization is measured against requests: every container needs one.
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    for name, container in k8s.containers(deployment).items():
        assert resources <= set(container["resources"]["requests"]), name


def test_network_policy_admits_every_port_and_reaches_the_backends() -> None:
    policy = k8s.one(k8s.K8S / "networkpolicy.yaml", "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for workload in (k8s.deployment(), k8s.job()):
        assert k8s.matches(selector, workload["spec"]["template"]["metadata"]["labels"])
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    admitted = {
        (p["protocol"], p["port"]) for rule in policy["spec"]["ingress"] for p in rule["ports"]
    }
    for name, container in k8s.containers(k8s.deployment()).items():
        for port in container["ports"]:
            assert ("TCP", port["containerPort"]) in admitted, f"{name}: {port['name']} unreachable"
    egress = {
        (p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]
    }
    secret = k8s.filled_secret()
    needed = {("UDP", 53), ("TCP", 53), ("TCP", 443)}  # DNS, Meta's APIs
    for name, default in (("SWITCHBOARD_DATABASE_URL", 5432), ("SWITCHBOARD_REDIS_URL", 6379)):
        needed.add(("TCP", urlsplit(secret[name]).port or default))
    assert needed <= egress, needed - egress


def test_service_monitor_scrapes_both_metrics_ports_once() -> None:
    monitor = k8s.one(k8s.MONITORING / "servicemonitor.yaml", "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        svc
        for svc in k8s.docs(k8s.K8S / "service.yaml", "Service")
        if k8s.matches(selector, svc["metadata"]["labels"])
    ]
    # One Service only: the headless twin too would scrape every pod twice.
    assert [svc["metadata"]["name"] for svc in selected] == ["switchboard"]
    service_ports = {p["name"]: p for p in selected[0]["spec"]["ports"]}
    scraped = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    metrics_ports = {
        name
        for c in k8s.containers(k8s.deployment()).values()
        for name in k8s.container_ports(c)
        if name.startswith("metrics-")
    }
    assert scraped == metrics_ports
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint.get("path", "/metrics") in _metrics_routes()
    # Annotation-based scrapers get the gRPC container's port (the one with background work).
    annotations = k8s.deployment()["spec"]["template"]["metadata"]["annotations"]
    grpc = k8s.containers(k8s.deployment())["grpc"]
    assert int(annotations["prometheus.io/port"]) == k8s.container_ports(grpc)["metrics-grpc"]
    assert annotations["prometheus.io/path"] in _metrics_routes()


def test_pods_run_locked_down_and_write_only_to_their_volumes() -> None:
    dockerfile = (k8s.ROOT / "Dockerfile").read_text()
    image_user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert image_user, "the image runs as a numeric non-root user"
    for workload in (k8s.deployment(), k8s.job()):
        pod = k8s.pod_spec(workload)
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert (ctx["runAsUser"], ctx["runAsGroup"]) == tuple(map(int, image_user.groups()))
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False, "the gateway calls no Kubernetes API"
        # A Service named switchboard would inject SWITCHBOARD_SERVICE_HOST, SWITCHBOARD_PORT...
        assert pod["enableServiceLinks"] is False
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for name, container in k8s.containers(workload).items():
            c = container["securityContext"]
            assert c["allowPrivilegeEscalation"] is False, name
            assert c["readOnlyRootFilesystem"] is True, name
            assert c["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in c["capabilities"], name
            for resource in ("cpu", "memory"):
                request = k8s.quantity(container["resources"]["requests"][resource])
                limit = k8s.quantity(container["resources"]["limits"][resource])
                assert 0 < request <= limit, (name, resource)
            # The only place the gateway writes (the embedded default's keys, database and dev
            # token) is its data dir: it must sit on a writable volume, not the root fs.
            data_dir = Config.from_environ(k8s.environment(workload, container)).data_dir
            mounts = [
                m
                for m in container.get("volumeMounts", [])
                if data_dir == m["mountPath"]
                or data_dir.startswith(m["mountPath"].rstrip("/") + "/")
            ]
            assert mounts, f"{name}: {data_dir} is on the read-only root filesystem"
            for mount in mounts:
                assert not mount.get("readOnly", False), name
                assert "emptyDir" in volumes[mount["name"]], name


def test_shutdown_fits_in_the_grace_period() -> None:
    pod = k8s.pod_spec(k8s.deployment())
    for name, container in k8s.containers(k8s.deployment()).items():
        config = Config.from_environ(k8s.environment(k8s.deployment(), container))
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep", name
        # preStop, then SIGTERM: gRPC calls get SHUTDOWN_GRACE_SECONDS, then the process closes
        # its workers, bus and store (aiohttp's runner takes up to 5 s of its own).
        needed = float(sleep[1]) + config.shutdown_grace_s + 5
        assert pod["terminationGracePeriodSeconds"] >= needed + 5, f"{name}: killed mid-drain"


def test_the_migrate_job_runs_after_what_it_reads_and_before_the_deployment() -> None:
    job = k8s.job()
    [container] = k8s.containers(job).values()
    assert container["args"] == ["migrate"]
    annotations = job["metadata"]["annotations"]
    # PreSync hooks run before any other resource exists: the Job would wait for its ConfigMap.
    assert annotations["argocd.argoproj.io/hook"] == "Sync"
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    needs = [k8s.configmap()] + [
        doc
        for doc in k8s.resources()
        if doc["kind"] == "NetworkPolicy"
        and k8s.matches(doc["spec"]["podSelector"]["matchLabels"], job_labels)
    ]
    for doc in needs:
        assert _wave(doc) < _wave(job), f"{doc['kind']} after the Job in Argo CD"
    for doc in k8s.resources():
        if doc["kind"] not in ("Job", "ConfigMap", "NetworkPolicy"):
            assert _wave(doc) > _wave(job), f"{doc['kind']} before the migrations"
    # The README's first kubectl step applies the same set.
    readme = (k8s.K8S / "README.md").read_text()
    step = re.search(r"-l 'app\.kubernetes\.io/component in \(([^)]*)\)'", readme)
    assert step, "README.md: the pre-deploy kubectl step"
    components = {
        doc["metadata"]["labels"].get("app.kubernetes.io/component") for doc in [job, *needs]
    }
    assert components <= set(step[1].split(",")), components
    deadline = job["spec"]["activeDeadlineSeconds"]
    wait = re.search(r"wait --for=condition=complete job/\S+ --timeout=(\d+)m", readme)
    assert wait, "README.md: waiting for the migrate Job"
    assert int(wait[1]) * 60 >= deadline, "README.md waits less than the Job may run"


def test_secrets_stay_out_of_the_configmap() -> None:
    data = k8s.configmap()["data"]
    secret_settings = {
        "SWITCHBOARD_" + f.name.upper() for f in fields(Config) if f.type == "Secret"
    }
    assert "SWITCHBOARD_DATABASE_URL" in secret_settings
    for name, value in data.items():
        assert name not in secret_settings, f"{name} belongs in the Secret"
        assert not re.search(r"SECRET|TOKEN|PASSWORD|KEY", name), f"{name} belongs in the Secret"
        assert urlsplit(value).password is None, f"{name} carries a password"
    assert secret_settings - {"SWITCHBOARD_API_TOKENS"} <= set(k8s.secret_example()["stringData"])


def test_every_resource_is_namespace_agnostic_and_labelled() -> None:
    for doc in [
        *k8s.resources(),
        k8s.secret_example(),
        *k8s.load(k8s.MONITORING / "servicemonitor.yaml"),
        *k8s.load(k8s.MONITORING / "prometheusrule.yaml"),
    ]:
        meta = doc["metadata"]
        assert "namespace" not in meta, meta["name"]
        assert meta["labels"]["app.kubernetes.io/name"] == "switchboard", meta["name"]
        assert "app.kubernetes.io/component" in meta["labels"], meta["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) not installed")
def test_kubectl_kustomize_renders_the_listed_resources_with_the_image() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(k8s.K8S)], check=True, capture_output=True, text=True
    ).stdout
    out = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in out) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in k8s.resources()
    )
    image = k8s.kustomization()["images"][0]
    for doc in out:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "switchboard"
        if doc["kind"] in ("Deployment", "Job"):
            for container in k8s.pod_spec(doc)["containers"]:
                assert container["image"] == f"{image['newName']}:{image['newTag']}"
            # Selectors are immutable: the common label must stay out of them.
            if "selector" in doc["spec"]:
                assert "app.kubernetes.io/part-of" not in doc["spec"]["selector"]["matchLabels"]

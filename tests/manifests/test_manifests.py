"""The rendered kustomize overlays: valid Kubernetes objects (offline schemas, strict) and what
the schemas miss (selectors, probes, limits, pinned images, non-root, least privilege, the
Jetson runtime, PDBs, scrape targets, the dashboard's metrics).

No API server runs here: ``kubectl kustomize`` renders offline and kubernetes-validate checks
against its bundled OpenAPI schemas.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest

from . import checks
from .dashboard import dashboard_exprs, exported_metric_names, metric_names_in
from .render import OVERLAYS, PROMETHEUS_COMPONENT, Obj, name_of, render_overlay
from .render import render_with_component as render_with

KUBERNETES_VERSION = "1.33"
"""The schemas the objects must satisfy (k3s 1.33 and any conformant 1.33 cluster)."""


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {overlay: render_overlay(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def with_monitors(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    return render_with("cloud", PROMETHEUS_COMPONENT, tmp_path_factory.mktemp("kustomize"))


def by_kind(objs: list[Obj]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o["metadata"]["name"])
    return {k: sorted(v) for k, v in sorted(out.items())}


# --------------------------------------------------------------------------- what is rendered


def test_the_cloud_overlay_holds_controller_broker_and_the_default_worker_pool(
    rendered: dict[str, list[Obj]],
) -> None:
    kinds = by_kind(rendered["cloud"])
    assert kinds["Namespace"] == ["edgefed"]
    assert kinds["Deployment"] == [
        "edgefed-controller",
        "edgefed-mosquitto",
        "edgefed-worker-default",
    ]
    assert kinds["Service"] == ["edgefed-controller", "edgefed-mosquitto"]
    assert kinds["PodDisruptionBudget"] == [
        "edgefed-controller",
        "edgefed-mosquitto",
        "edgefed-worker-default",
    ]
    assert "ClusterRole" not in kinds  # nothing cluster-scoped: node labels are an admin's act
    assert "ClusterRoleBinding" not in kinds
    assert "edgefed-grafana-dashboard" in kinds["ConfigMap"]


@pytest.mark.parametrize(
    ("overlay", "name"), [("edge-cpu", "edgefed-agent"), ("edge-jetson", "edgefed-agent-jetson")]
)
def test_the_edge_overlays_hold_the_agent_daemonset_on_labelled_nodes(
    rendered: dict[str, list[Obj]], overlay: str, name: str
) -> None:
    (agent,) = [o for o in rendered[overlay] if o["kind"] == "DaemonSet"]
    spec = checks.pod_spec(agent)
    assert agent["metadata"]["name"] == name
    assert spec["nodeSelector"]["edgefed.io/agent"] == "true"
    (state,) = [v for v in spec["volumes"] if v["name"] == "state"]
    assert state["hostPath"] == {"path": "/var/lib/edgefed", "type": "Directory"}
    (container,) = spec["containers"]
    assert container["args"] == ["edge", "run", "--state-dir", "/var/lib/edgefed"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_the_jetson_overlay_runs_the_l4t_image_with_the_nvidia_runtime_on_jetson_nodes(
    rendered: dict[str, list[Obj]],
) -> None:
    problems = checks.runtime_class_problems(
        rendered["edge-jetson"], "edgefed-agent-jetson", "nvidia"
    )
    assert problems == []
    (agent,) = [o for o in rendered["edge-jetson"] if o["kind"] == "DaemonSet"]
    spec = checks.pod_spec(agent)
    assert spec["nodeSelector"]["edgefed.io/accelerator"] == "jetson"
    assert spec["nodeSelector"]["kubernetes.io/arch"] == "arm64"
    images = {c["image"] for _, c, _ in checks.containers(agent)}
    assert images == {"ghcr.io/edgefed/edgefed-agent-jetson:0.1.0"}


def test_a_mixed_fleet_applies_both_edge_overlays_without_a_clash(
    rendered: dict[str, list[Obj]],
) -> None:
    """CPU and Jetson agents side by side: no object of one overlay replaces one of the other
    (but the shared Namespace), the DaemonSets select disjoint pods, and a Jetson node
    (edgefed.io/accelerator=jetson) gets only the Jetson agent."""
    cpu, jetson = rendered["edge-cpu"], rendered["edge-jetson"]
    shared = {name_of(o) for o in cpu} & {name_of(o) for o in jetson}
    assert shared == {"Namespace/edgefed"}
    (cpu_agent,) = [o for o in cpu if o["kind"] == "DaemonSet"]
    (jetson_agent,) = [o for o in jetson if o["kind"] == "DaemonSet"]
    assert not checks.selects(cpu_agent["spec"]["selector"], checks.template_labels(jetson_agent))
    assert not checks.selects(jetson_agent["spec"]["selector"], checks.template_labels(cpu_agent))
    terms = checks.pod_spec(cpu_agent)["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    jetson_node = checks.pod_spec(jetson_agent)["nodeSelector"]
    assert not any(
        checks.selects({"matchExpressions": t["matchExpressions"]}, jetson_node) for t in terms
    )
    assert "affinity" not in checks.pod_spec(jetson_agent)


def test_the_cpu_overlay_asks_for_no_special_runtime(rendered: dict[str, list[Obj]]) -> None:
    problems = checks.runtime_class_problems(rendered["edge-cpu"], "edgefed-agent", "nvidia")
    assert problems == ["DaemonSet/edgefed-agent: runtimeClassName None, not 'nvidia'"]


def test_the_controller_runs_edgefed_cloud_serve_as_its_settings_read_it(
    rendered: dict[str, list[Obj]],
) -> None:
    """Every EDGEFED_* variable the controller gets is a real setting (the settings refuse
    unknown fields, so a typo here would stop the controller at start-up)."""
    from edgefed.cloud.settings import load_cloud_settings

    (ctl,) = [
        o
        for o in rendered["cloud"]
        if o["metadata"]["name"] == "edgefed-controller" and o["kind"] == "Deployment"
    ]
    (container,) = checks.pod_spec(ctl)["containers"]
    assert container["args"][:2] == ["cloud", "serve"]
    (common,) = [o for o in rendered["cloud"] if o["metadata"]["name"] == "edgefed-common"]
    env = {e["name"]: e.get("value", "secret") for e in container["env"]}
    env.update(common["data"])
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        settings = load_cloud_settings()
    ctl_settings = settings.controller
    assert ctl_settings.data_dir == Path("/var/lib/edgefed-controller")
    assert ctl_settings.resolved_artifact_store == Path("/var/lib/edgefed-artifacts")
    assert ctl_settings.resolved_public_url.startswith("https://")
    assert settings.broker_address().tls
    # Each autoscaled pool's Deployment exists and the controller's Role may scale it.
    assert ctl_settings.kubernetes.enabled
    assert sorted(ctl_settings.autoscaler) == ["default"]
    (role,) = [o for o in rendered["cloud"] if o["kind"] == "Role"]
    scalable = {n for r in role["rules"] if "patch" in r["verbs"] for n in r["resourceNames"]}
    deployments = {o["metadata"]["name"] for o in rendered["cloud"] if o["kind"] == "Deployment"}
    for pool in ctl_settings.autoscaler:
        name = ctl_settings.kubernetes.deployment_for(pool)
        assert name in scalable
        assert name in deployments


def test_the_worker_serves_its_pool_from_the_shared_store_read_only(
    rendered: dict[str, list[Obj]],
) -> None:
    from edgefed.cloud.settings import load_cloud_settings

    (worker,) = [
        o
        for o in rendered["cloud"]
        if o["metadata"]["name"] == "edgefed-worker-default" and o["kind"] == "Deployment"
    ]
    assert checks.template_labels(worker)["edgefed.io/pool"] == "default"
    spec = checks.pod_spec(worker)
    (container,) = spec["containers"]
    assert container["args"][:4] == ["cloud", "worker", "--pool", "default"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "artifacts"]
    assert mount["readOnly"] is True
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert {"containerPort": 9465, "name": "metrics"} in container["ports"]
    env = {e["name"]: e.get("value", "secret") for e in container["env"]}
    for o in rendered["cloud"]:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] in (
            "edgefed-common",
            "edgefed-worker-default",
        ):
            env.update(o["data"])
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        settings = load_cloud_settings()
    assert settings.worker.trusted_keys == [Path("/etc/edgefed/signing/signing.pub")]


def test_the_controller_role_only_gets_and_patches_the_worker_deployments(
    rendered: dict[str, list[Obj]],
) -> None:
    roles = {o["kind"]: o for o in rendered["cloud"] if o["kind"] in ("Role", "ClusterRole")}
    write = [r for r in roles["Role"]["rules"] if "patch" in r["verbs"]]
    assert write == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments", "deployments/scale"],
            "resourceNames": ["edgefed-worker-default"],
            "verbs": ["get", "patch"],
        }
    ]
    assert "ClusterRole" not in roles
    verbs = {v for r in roles["Role"]["rules"] for v in r["verbs"]}
    assert verbs.isdisjoint({"create", "update", "delete", "deletecollection"})


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_strictly_against_the_kubernetes_schemas(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    errors = []
    for obj in rendered[overlay]:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{name_of(obj)} at {path}: {exc.message}")
    assert errors == []


def test_strict_validation_catches_an_unknown_field(rendered: dict[str, list[Obj]]) -> None:
    deployment = copy.deepcopy(next(o for o in rendered["cloud"] if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------- our own checks


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("check", checks.ALL_CHECKS, ids=lambda c: c.__name__)
def test_every_overlay_passes_the_checks_schemas_miss(
    rendered: dict[str, list[Obj]], overlay: str, check: Callable[[list[Obj]], list[str]]
) -> None:
    assert check(rendered[overlay]) == []


@pytest.mark.parametrize("check", checks.ALL_CHECKS, ids=lambda c: c.__name__)
def test_the_prometheus_operator_component_passes_the_checks(
    with_monitors: list[Obj], check: Callable[[list[Obj]], list[str]]
) -> None:
    assert check(with_monitors) == []


def test_the_component_adds_a_servicemonitor_and_podmonitors(with_monitors: list[Obj]) -> None:
    kinds = by_kind(with_monitors)
    assert kinds["ServiceMonitor"] == ["edgefed-controller"]
    assert kinds["PodMonitor"] == ["edgefed-pods"]


# --------------------------------------------------------------------------- broken copies


def first(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    return next(o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"]))


def broken(
    rendered: dict[str, list[Obj]], overlay: str, edit: Callable[[list[Obj]], None]
) -> list[Obj]:
    objs = copy.deepcopy(rendered[overlay])
    edit(objs)
    return objs


def _container(objs: list[Obj], kind: str = "Deployment", name: str | None = None) -> Obj:
    spec = first(objs, kind, name)["spec"]["template"]["spec"]
    return dict(spec["containers"][0]) and spec["containers"][0]


BREAKAGES: dict[str, tuple[str, Callable[[list[Obj]], None], Callable[[list[Obj]], list[str]], str]]
BREAKAGES = {
    "selector off its template": (
        "cloud",
        lambda o: first(o, "Deployment", "edgefed-controller")["spec"]["selector"][
            "matchLabels"
        ].update({"app.kubernetes.io/component": "ctl"}),
        checks.selector_problems,
        "does not match its template labels",
    ),
    "service selecting nothing": (
        "cloud",
        lambda o: first(o, "Service", "edgefed-mosquitto")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "mqtt"}
        ),
        checks.service_problems,
        "selects no pod template",
    ),
    "service target port unknown": (
        "cloud",
        lambda o: first(o, "Service", "edgefed-controller")["spec"]["ports"][0].update(
            {"targetPort": "http"}
        ),
        checks.service_problems,
        "no container port name",
    ),
    "no memory limit": (
        "cloud",
        lambda o: _container(o, name="edgefed-worker-default")["resources"]["limits"].pop("memory"),
        checks.resource_problems,
        "no limits for memory",
    ),
    "init container without requests": (
        "edge-cpu",
        lambda o: first(o, "DaemonSet")["spec"]["template"]["spec"]["initContainers"][0][
            "resources"
        ].pop("requests"),
        checks.resource_problems,
        "init container join: no requests for cpu, memory",
    ),
    "no readiness probe": (
        "edge-jetson",
        lambda o: _container(o, "DaemonSet").pop("readinessProbe"),
        checks.probe_problems,
        "no readinessProbe",
    ),
    "probe on an undeclared port": (
        "cloud",
        lambda o: _container(o, name="edgefed-controller")["livenessProbe"]["httpGet"].update(
            {"port": "metrics"}
        ),
        checks.probe_problems,
        "not one it declares",
    ),
    "latest image": (
        "cloud",
        lambda o: _container(o, name="edgefed-mosquitto").update(
            {"image": "eclipse-mosquitto:latest"}
        ),
        checks.image_problems,
        "is not pinned (latest)",
    ),
    "untagged image": (
        "edge-cpu",
        lambda o: _container(o, "DaemonSet").update({"image": "registry:5000/edgefed-agent"}),
        checks.image_problems,
        "has no tag",
    ),
    "runs as root": (
        "cloud",
        lambda o: _container(o, name="edgefed-worker-default")["securityContext"].update(
            {"runAsUser": 0}
        ),
        checks.security_problems,
        "runAsUser 0 is not a non-zero UID",
    ),
    "privilege escalation": (
        "edge-cpu",
        lambda o: first(o, "DaemonSet")["spec"]["template"]["spec"]["initContainers"][0][
            "securityContext"
        ].pop("allowPrivilegeEscalation"),
        checks.security_problems,
        "allowPrivilegeEscalation is not false",
    ),
    "runAsNonRoot off at pod level": (
        "cloud",
        lambda o: first(o, "Deployment", "edgefed-controller")["spec"]["template"]["spec"][
            "securityContext"
        ].update({"runAsNonRoot": False}),
        checks.security_problems,
        "runAsNonRoot is not true",
    ),
    "wildcard verb": (
        "cloud",
        lambda o: first(o, "Role")["rules"][0].update({"verbs": ["*"]}),
        checks.rbac_problems,
        "wildcard in verbs",
    ),
    "wildcard resource": (
        "cloud",
        lambda o: first(o, "Role")["rules"][1].update({"resources": ["*"]}),
        checks.rbac_problems,
        "wildcard in resources",
    ),
    "pdb selecting nothing": (
        "cloud",
        lambda o: first(o, "PodDisruptionBudget", "edgefed-worker-default")["spec"]["selector"][
            "matchLabels"
        ].update({"edgefed.io/pool": "gpu"}),
        checks.pdb_problems,
        "matches no workload",
    ),
    "scrape port not declared": (
        "edge-cpu",
        lambda o: first(o, "DaemonSet")["spec"]["template"]["metadata"]["annotations"].update(
            {"prometheus.io/port": "9999"}
        ),
        checks.scrape_problems,
        "is no container port",
    ),
    "jetson agent without the nvidia runtime": (
        "edge-jetson",
        lambda o: first(o, "DaemonSet")["spec"]["template"]["spec"].pop("runtimeClassName"),
        lambda objs: checks.runtime_class_problems(objs, "edgefed-agent-jetson", "nvidia"),
        "runtimeClassName None",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_deliberately_broken_copy_is_caught(
    rendered: dict[str, list[Obj]], breakage: str
) -> None:
    overlay, edit, check, message = BREAKAGES[breakage]
    assert check(rendered[overlay]) == []
    problems = check(broken(rendered, overlay, edit))
    assert len(problems) == 1
    assert message in problems[0]


def test_a_monitor_on_an_undeclared_port_or_unknown_field_is_caught(
    with_monitors: list[Obj],
) -> None:
    objs = copy.deepcopy(with_monitors)
    first(objs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] = "metrics"
    first(objs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["tls"] = {}
    problems = checks.monitor_problems(objs)
    assert sorted(problems) == [
        "PodMonitor/edgefed-pods: unknown endpoint field tls",
        "ServiceMonitor/edgefed-controller: endpoint port 'metrics' is not declared",
    ]


def test_a_selector_with_expressions_follows_kubernetes_semantics() -> None:
    labels = {"app": "edgefed", "tier": "edge"}
    assert checks.selects(
        {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["edge"]}]}, labels
    )
    assert not checks.selects(
        {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["edge"]}]}, labels
    )
    assert checks.selects(
        {"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, labels
    )
    assert not checks.selects({}, labels)


# --------------------------------------------------------------------------- dashboard


def dashboard_of(objs: list[Obj]) -> dict[str, object]:
    config_map = first(objs, "ConfigMap", "edgefed-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = config_map["data"].values()
    parsed: dict[str, object] = json.loads(text)
    return parsed


def test_every_metric_the_dashboard_queries_is_one_the_code_exports(
    rendered: dict[str, list[Obj]],
) -> None:
    exported = exported_metric_names()
    queried = {
        (title, name)
        for title, expr in dashboard_exprs(dashboard_of(rendered["cloud"]))
        for name in metric_names_in(expr)
    }
    assert len(queried) >= 10
    assert sorted((t, n) for t, n in queried if n not in exported) == []


def test_the_dashboard_shows_the_figures_an_operator_looks_for(
    rendered: dict[str, list[Obj]],
) -> None:
    exprs = " ".join(e for _, e in dashboard_exprs(dashboard_of(rendered["cloud"])))
    for needed in (
        "rate(edgefed_agent_requests_total",  # requests/s
        "histogram_quantile(0.95",  # p95 latency
        "edgefed_worker_queue_depth",  # queue depth
        'edgefed_agents{state="online"}',  # agents online
        "edgefed_autoscaler_desired_replicas",  # worker replicas
        "edgefed_worker_ready",
    ):
        assert needed in exprs


def test_a_made_up_metric_in_a_query_is_caught() -> None:
    exported = exported_metric_names()
    expr = 'sum by (pool) (rate(edgefed_worker_requests_totl{pool="default"}[5m])) / on(pool) up'
    assert metric_names_in(expr) - exported == {"edgefed_worker_requests_totl", "up"}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("histogram_quantile(0.95, sum by (le) (rate(a_bucket[$__rate_interval])))", {"a_bucket"}),
        ('sum(b{state="online", x=~"rate(c)"}) / count(d) > bool 0', {"b", "d"}),
        ("increase(e_total[1h] offset 1d) unless on(x) f", {"e_total", "f"}),
    ],
)
def test_metric_names_are_found_in_promql(expr: str, names: set[str]) -> None:
    assert metric_names_in(expr) == names

"""What the Kubernetes schemas do not check, as functions over rendered objects.

Each ``*_problems`` function takes the objects of one rendered overlay and returns one readable
line per problem (empty: none), so a test can assert on it and a failure says what to fix. The
tests in this folder also feed deliberately broken objects to each function.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from .render import Obj, name_of

WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job")


# --------------------------------------------------------------------------- traversal


def workloads(objs: list[Obj]) -> Iterator[Obj]:
    return (o for o in objs if o.get("kind") in WORKLOADS)


def pod_spec(workload: Obj) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"].get("spec", {})
    return spec


def template_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"].get("metadata", {}).get("labels") or {}
    return labels


def namespace_of(obj: Obj) -> str | None:
    ns: str | None = obj.get("metadata", {}).get("namespace")
    return ns


def containers(workload: Obj) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(where, container, is_init) for every container and init container of a workload."""
    spec = pod_spec(workload)
    for c in spec.get("initContainers") or []:
        yield f"{name_of(workload)} init container {c.get('name')}", c, True
    for c in spec.get("containers") or []:
        yield f"{name_of(workload)} container {c.get('name')}", c, False


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions); an empty or
    missing selector selects nothing here (for our objects that is always a mistake)."""
    if not selector:
        return False
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not match_labels and not expressions:
        return False
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in expressions:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op, False)
        if not ok:
            return False
    return True


def _pod_templates_in(objs: list[Obj], namespace: str | None) -> Iterator[Obj]:
    return (w for w in workloads(objs) if namespace_of(w) == namespace)


def _port_names(workload: Obj) -> set[str]:
    return {
        p["name"]
        for _, c, init in containers(workload)
        if not init
        for p in c.get("ports") or []
        if "name" in p
    }


def _port_numbers(workload: Obj) -> set[int]:
    return {
        int(p["containerPort"])
        for _, c, _init in containers(workload)
        for p in c.get("ports") or []
    }


# --------------------------------------------------------------------------- checks


def selector_problems(objs: list[Obj]) -> list[str]:
    """Each workload's selector selects its own pod template."""
    return [
        f"{name_of(w)}: selector {w['spec'].get('selector')} does not match its template "
        f"labels {template_labels(w)}"
        for w in workloads(objs)
        if not selects(w["spec"].get("selector"), template_labels(w))
    ]


def service_problems(objs: list[Obj]) -> list[str]:
    """Each Service selects some pod template of its namespace, and its named target ports
    exist on the pods it selects."""
    problems: list[str] = []
    for svc in (o for o in objs if o.get("kind") == "Service"):
        selector = svc["spec"].get("selector")
        chosen = [
            w
            for w in _pod_templates_in(objs, namespace_of(svc))
            if selects({"matchLabels": selector} if selector else None, template_labels(w))
        ]
        if not chosen:
            problems.append(f"{name_of(svc)}: selector {selector} selects no pod template")
            continue
        for port in svc["spec"].get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            if isinstance(target, str) and not all(target in _port_names(w) for w in chosen):
                problems.append(f"{name_of(svc)}: targetPort {target!r} is no container port name")
    return problems


def resource_problems(objs: list[Obj]) -> list[str]:
    """cpu and memory requests and limits on every container and init container."""
    problems: list[str] = []
    for w in workloads(objs):
        for where, c, _init in containers(w):
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in (res.get(kind) or {})]
                if missing:
                    problems.append(f"{where}: no {kind} for {', '.join(missing)}")
    return problems


def probe_problems(objs: list[Obj]) -> list[str]:
    """Liveness and readiness probes on every container, on ports it declares. Init
    containers cannot have them (the API server refuses probes on an init container that is
    not a sidecar), so sidecar init containers (restartPolicy Always) are held to it too."""
    problems: list[str] = []
    for w in workloads(objs):
        for where, c, init in containers(w):
            if init and c.get("restartPolicy") != "Always":
                continue
            names = {p["name"] for p in c.get("ports") or [] if "name" in p}
            for probe in ("livenessProbe", "readinessProbe"):
                spec = c.get(probe)
                if not spec:
                    problems.append(f"{where}: no {probe}")
                    continue
                action = spec.get("httpGet") or spec.get("tcpSocket") or spec.get("grpc") or {}
                port = action.get("port")
                if isinstance(port, str) and port not in names:
                    problems.append(f"{where}: {probe} uses port {port!r}, not one it declares")
    return problems


_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def image_problems(objs: list[Obj]) -> list[str]:
    """Every image pinned: a version tag that is not ``latest`` (a digest also pins)."""
    problems: list[str] = []
    for w in workloads(objs):
        for where, c, _init in containers(w):
            image = str(c.get("image", ""))
            if _DIGEST.search(image):
                continue
            last = image.rsplit("/", 1)[-1]
            tag = last.split(":", 1)[1] if ":" in last else None
            if not tag:
                problems.append(f"{where}: image {image!r} has no tag")
            elif tag == "latest":
                problems.append(f"{where}: image {image!r} is not pinned (latest)")
    return problems


def _effective(container_sc: dict[str, Any], pod_sc: dict[str, Any]) -> Callable[[str], Any]:
    """A security setting as Kubernetes applies it: the container's, else the pod's."""

    def get(key: str) -> Any:
        return container_sc[key] if key in container_sc else pod_sc.get(key)

    return get


def security_problems(objs: list[Obj]) -> list[str]:
    """No container runs as root or can gain privileges: runAsNonRoot and a non-zero
    runAsUser (pod or container level), allowPrivilegeEscalation false, every capability
    dropped, the runtime's default seccomp profile, no host namespaces, not privileged."""
    problems: list[str] = []
    for w in workloads(objs):
        pod = pod_spec(w)
        pod_sc = pod.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{name_of(w)}: {flag} is on")
        for where, c, _init in containers(w):
            sc = c.get("securityContext") or {}
            effective = _effective(sc, pod_sc)
            if effective("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            user = effective("runAsUser")
            if not isinstance(user, int) or user == 0:
                problems.append(f"{where}: runAsUser {user!r} is not a non-zero UID")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities are not all dropped")
            seccomp = (effective("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: seccompProfile {seccomp!r} is not RuntimeDefault")
    return problems


def rbac_problems(objs: list[Obj]) -> list[str]:
    """Least privilege: no wildcard in any rule, and no access to Secrets."""
    problems: list[str] = []
    for role in (o for o in objs if o.get("kind") in ("Role", "ClusterRole")):
        for i, rule in enumerate(role.get("rules") or []):
            for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                if "*" in (rule.get(field) or []):
                    problems.append(f"{name_of(role)} rule {i}: wildcard in {field}")
            if "secrets" in (rule.get("resources") or []):
                problems.append(f"{name_of(role)} rule {i}: grants access to secrets")
            if not rule.get("verbs"):
                problems.append(f"{name_of(role)} rule {i}: no verbs")
    return problems


def pdb_problems(objs: list[Obj]) -> list[str]:
    """Each PodDisruptionBudget selects the pods of some workload of its namespace."""
    return [
        f"{name_of(pdb)}: selector {pdb['spec'].get('selector')} matches no workload"
        for pdb in (o for o in objs if o.get("kind") == "PodDisruptionBudget")
        if not any(
            selects(pdb["spec"].get("selector"), template_labels(w))
            for w in _pod_templates_in(objs, namespace_of(pdb))
        )
    ]


def scrape_problems(objs: list[Obj]) -> list[str]:
    """A pod annotated for Prometheus names a port one of its containers declares."""
    problems: list[str] = []
    for w in workloads(objs):
        notes = w["spec"]["template"].get("metadata", {}).get("annotations") or {}
        if notes.get("prometheus.io/scrape") != "true":
            continue
        port = notes.get("prometheus.io/port")
        if port is None or not str(port).isdigit() or int(port) not in _port_numbers(w):
            problems.append(f"{name_of(w)}: prometheus.io/port {port!r} is no container port")
    return problems


def runtime_class_problems(objs: list[Obj], daemonset: str, runtime_class: str) -> list[str]:
    """The named DaemonSet's pods ask for ``runtime_class``."""
    found = [o for o in objs if o.get("kind") == "DaemonSet" and o["metadata"]["name"] == daemonset]
    if not found:
        return [f"no DaemonSet {daemonset}"]
    actual = pod_spec(found[0]).get("runtimeClassName")
    if actual != runtime_class:
        return [f"DaemonSet/{daemonset}: runtimeClassName {actual!r}, not {runtime_class!r}"]
    return []


# --------------------------------------------------------------------------- monitors (CRDs)

# The Prometheus Operator's CRDs have no schema in kubernetes-validate: the fields used here are
# checked against the ones monitoring.coreos.com/v1 defines for them (a subset).
_MONITOR_SPEC = {
    "ServiceMonitor": {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"},
    "PodMonitor": {"selector", "podMetricsEndpoints", "namespaceSelector", "podTargetLabels"},
}
_ENDPOINT_FIELDS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "tlsConfig",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}
_TLS_FIELDS = {"ca", "cert", "keySecret", "serverName", "insecureSkipVerify"}
_CA_FIELDS = {"configMap", "secret"}


def monitor_problems(objs: list[Obj]) -> list[str]:
    """ServiceMonitor/PodMonitor: known fields only, a selector that matches a Service (or pod
    template) of their namespace, and endpoints on port names that object declares."""
    problems: list[str] = []
    for mon in (o for o in objs if o.get("kind") in _MONITOR_SPEC):
        kind, where = mon["kind"], name_of(mon)
        if mon.get("apiVersion") != "monitoring.coreos.com/v1":
            problems.append(f"{where}: apiVersion {mon.get('apiVersion')!r}")
        spec = mon.get("spec") or {}
        problems += [f"{where}: unknown field spec.{k}" for k in set(spec) - _MONITOR_SPEC[kind]]
        key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
        endpoints = spec.get(key) or []
        if not endpoints:
            problems.append(f"{where}: no {key}")
        if kind == "ServiceMonitor":
            targets = [
                o
                for o in objs
                if o.get("kind") == "Service"
                and namespace_of(o) == namespace_of(mon)
                and selects(spec.get("selector"), o.get("metadata", {}).get("labels") or {})
            ]
            names = {p.get("name") for t in targets for p in t["spec"].get("ports") or []}
        else:
            targets = [
                w
                for w in _pod_templates_in(objs, namespace_of(mon))
                if selects(spec.get("selector"), template_labels(w))
            ]
            names = set().union(*(_port_names(w) for w in targets)) if targets else set()
        if not targets:
            problems.append(f"{where}: selector {spec.get('selector')} matches nothing")
        for ep in endpoints:
            problems += [f"{where}: unknown endpoint field {k}" for k in set(ep) - _ENDPOINT_FIELDS]
            if ep.get("port") not in names:
                problems.append(f"{where}: endpoint port {ep.get('port')!r} is not declared")
            tls = ep.get("tlsConfig") or {}
            problems += [f"{where}: unknown tlsConfig field {k}" for k in set(tls) - _TLS_FIELDS]
            ca = tls.get("ca") or {}
            problems += [f"{where}: unknown tlsConfig.ca field {k}" for k in set(ca) - _CA_FIELDS]
    return problems


ALL_CHECKS = (
    selector_problems,
    service_problems,
    resource_problems,
    probe_problems,
    image_problems,
    security_problems,
    rbac_problems,
    pdb_problems,
    scrape_problems,
    monitor_problems,
)

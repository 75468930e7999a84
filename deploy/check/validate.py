#!/usr/bin/env python3
"""Offline checks of deploy/: what schemas can tell, what they cannot, and proof that both can fail.

Run by `cargo xtask check-deploy` inside a venv holding deploy/check/requirements.txt:

  (a) deploy/ecs/task-definition.json against botocore's ECS RegisterTaskDefinition input shape;
  (b) cfn-lint on deploy/ecs/cloudformation.yaml (errors and warnings both fail);
  (c) every Kubernetes manifest against kubernetes-validate's newest strict schemas
      (unknown fields fail);
  (d) the deploy contract (docs: /work/notes/deploy-contract.md, deploy/*/README.md) that no
      schema knows: image reference, privileges, mounts, ports, probes, environment, RBAC, and
      that the CloudFormation task definition is the JSON one;
  (e) mutations: a few broken copies of the files, each of which the checks above must reject.

Prints one line per check and exits 1 if any check fails.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import subprocess
import sys
import time
import tomllib
from typing import Any, Callable

import botocore.session
import kubernetes_validate
import yaml
from botocore.validate import ParamValidator
from cfnlint.api import ManualArgs, lint
from cfnlint.decode.decode import decode_str
from kubernetes_validate import utils as kv_utils

ROOT = pathlib.Path(__file__).resolve().parents[2]
ECS_DIR = ROOT / "deploy" / "ecs"
K8S_DIR = ROOT / "deploy" / "kubernetes"
TASK_DEFINITION = ECS_DIR / "task-definition.json"
TEMPLATE = ECS_DIR / "cloudformation.yaml"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"

REGISTRY_REPO = "registry.example.com/observer/observer"
NAMESPACE = "observer"
METRICS_PORT = 9435

# Environment variables observer does not declare as flags but reads (or its logger does).
ENV_EXTRAS = {"NODE_NAME", "NODE_IP", "MACKEREL_APIKEY", "MACKEREL_ROLES", "RUST_LOG"}

# The capability names ECS documents for linuxParameters.capabilities (ALL .. WAKE_ALARM).
# botocore types them as plain strings, so this list is the only thing here that catches a name
# ECS would refuse, such as BPF or PERFMON.
ECS_CAPABILITIES = {
    "ALL", "AUDIT_CONTROL", "AUDIT_WRITE", "BLOCK_SUSPEND", "CHOWN", "DAC_OVERRIDE",
    "DAC_READ_SEARCH", "FOWNER", "FSETID", "IPC_LOCK", "IPC_OWNER", "KILL", "LEASE",
    "LINUX_IMMUTABLE", "MAC_ADMIN", "MAC_OVERRIDE", "MKNOD", "NET_ADMIN", "NET_BIND_SERVICE",
    "NET_BROADCAST", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_ADMIN", "SYS_BOOT",
    "SYS_CHROOT", "SYS_MODULE", "SYS_NICE", "SYS_PACCT", "SYS_PTRACE", "SYS_RAWIO",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "SYSLOG", "WAKE_ALARM",
}

# The host directory the manifests give observer for its state (the Mackerel hosts, unsent
# values and open minute), mounted at the same path in the container.
STATE_HOST_DIR = "/var/lib/observer"
# Host trees that are no place for observer's state: API filesystems, or shared by every node.
NOT_NODE_STATE = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/run", "/mnt", "/home")

# containerPath -> (host path, read-only), per platform.
HOST_MOUNTS = {
    "/host/sys/fs/cgroup": ("/sys/fs/cgroup", True),
    "/host/proc": ("/proc", True),
    "/sys/fs/bpf": ("/sys/fs/bpf", False),
    STATE_HOST_DIR: (STATE_HOST_DIR, False),
}
ECS_MOUNTS = {**HOST_MOUNTS, "/var/run/docker.sock": ("/var/run/docker.sock", True)}

COMMON_ENV = {
    "OBSERVER_HOST_ROOT": "/host",
    "OBSERVER_PROMETHEUS_LISTEN": f"0.0.0.0:{METRICS_PORT}",
    "OBSERVER_OUTPUT": "json",
}


def image_reference() -> str:
    """The contract's image: the placeholder registry, tagged with the workspace version."""
    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
    return f"{REGISTRY_REPO}:{manifest['workspace']['package']['version']}"


# ---------------------------------------------------------------------------------------------
# What observer knows


def known_env_vars() -> tuple[set[str], str]:
    """Env names observer declares (`env = "..."` in its clap arguments), and where from."""
    src = ROOT / "observer" / "src"
    names: set[str] = set()
    if src.is_dir():
        for path in src.rglob("*.rs"):
            names |= set(re.findall(r'\benv\s*=\s*"([A-Z0-9_]+)"', path.read_text()))
        if names:
            return names, "observer/src (env = \"...\")"
    binary = ROOT / "target" / "debug" / "observer"
    if binary.exists():
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=False)
        names = set(re.findall(r"\[env: ([A-Z0-9_]+)=", out.stdout))
        return names, "target/debug/observer --help"
    return names, "nothing (no observer/src, no target/debug/observer)"


def observer_state_dir() -> tuple[str | None, str]:
    """observer's default --state-dir (observer/src/defaults.rs), and where it was found."""
    defaults = ROOT / "observer" / "src" / "defaults.rs"
    if defaults.exists():
        m = re.search(r'\bSTATE_DIR:\s*&str\s*=\s*"([^"]+)"', defaults.read_text())
        if m:
            return m.group(1), "observer/src/defaults.rs"
    binary = ROOT / "target" / "debug" / "observer"
    if binary.exists():
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=False)
        m = re.search(r"--state-dir <[A-Z_]+>.*?\[default: ([^\]]+)\]", out.stdout, re.DOTALL)
        if m:
            return m.group(1), "target/debug/observer --help"
    return None, "nothing (no observer/src/defaults.rs STATE_DIR, no target/debug/observer)"


def state_mount(default: str | None, env: dict[str, Any], mounts: list[tuple[str, str | None, bool]],
                what: str) -> list[str]:
    """The directory observer keeps its state in (OBSERVER_STATE_DIR, else the default) is a
    read-write mount of a node-local host directory. `mounts`: (container path, host path,
    read-only)."""
    path = env.get("OBSERVER_STATE_DIR") or default
    if not path:
        return [f"{what}: observer's default --state-dir is unknown"]
    path = path.rstrip("/") or "/"
    exact = [m for m in mounts if m[0].rstrip("/") == path]
    if not exact:
        return [f"{what}: nothing is mounted at {path}, observer's state dir: on a read-only root "
                "filesystem the Mackerel state cannot be written, and a restart loses and reposts"]
    p: list[str] = []
    for _, host, read_only in exact:
        if read_only:
            p.append(f"{what}: the state dir {path} is mounted read-only; observer writes its state there")
        if not host:
            p.append(f"{what}: the state dir {path} is not a host directory (it would not outlive the container)")
        elif any(host == d or host.startswith(d + "/") for d in NOT_NODE_STATE) or host == "/":
            p.append(f"{what}: the state dir {path} comes from host path {host}, not a node-local directory")
    return p


def knows_health_subcommand() -> bool:
    """True iff observer has the `health` subcommand that the ECS health check runs."""
    binary = ROOT / "target" / "debug" / "observer"
    src = ROOT / "observer" / "src"
    if src.is_dir():
        text = "\n".join(p.read_text() for p in src.rglob("*.rs"))
        # A clap Subcommand enum with a Health variant, or a hand-matched "health" argument.
        for m in re.finditer(r"derive\([^)]*\bSubcommand\b[^)]*\)\][^{]*\{", text):
            body = text[m.end(): text.find("\n}", m.end())]
            if re.search(r"^\s*Health\b", body, re.MULTILINE):
                return True
        return bool(re.search(r'"health"\s*=>', text))
    if binary.exists():
        out = subprocess.run([binary, "health", "--help"], capture_output=True, check=False)
        return out.returncode == 0
    return False


# ---------------------------------------------------------------------------------------------
# (a) ECS schema and (d) ECS contract


_ECS_MODEL = None


def ecs_model():
    global _ECS_MODEL
    if _ECS_MODEL is None:
        _ECS_MODEL = botocore.session.get_session().get_service_model("ecs")
    return _ECS_MODEL


def ecs_schema(td: dict) -> list[str]:
    shape = ecs_model().operation_model("RegisterTaskDefinition").input_shape
    report = ParamValidator().validate(td, shape)
    return report.generate_report().splitlines() if report.has_errors() else []


def volume_problems(mount_sources: list[str], volumes: list[str], what: str) -> list[str]:
    problems = [f"{what} mounts volume {s!r}, which is not defined"
                for s in mount_sources if s not in volumes]
    problems += [f"volume {v!r} is defined but never mounted" for v in volumes
                 if v not in mount_sources]
    dupes = {v for v in volumes if volumes.count(v) > 1}
    problems += [f"volume {v!r} is defined twice" for v in sorted(dupes)]
    return problems


def ecs_contract(td: dict, image: str) -> list[str]:
    p: list[str] = []

    def want(path: str, got: Any, expected: Any) -> None:
        if got != expected:
            p.append(f"{path} is {got!r}, want {expected!r}")

    want("family", td.get("family"), "observer")
    want("networkMode", td.get("networkMode"), "host")
    want("pidMode", td.get("pidMode"), "host")
    want("requiresCompatibilities", td.get("requiresCompatibilities"), ["EC2"])
    containers = td.get("containerDefinitions") or []
    if len(containers) != 1:
        return p + [f"{len(containers)} containers, want exactly one"]
    c = containers[0]
    want("name", c.get("name"), "observer")
    want("image", c.get("image"), image)
    want("essential", c.get("essential"), True)
    want("cpu", c.get("cpu"), 64)
    want("memoryReservation", c.get("memoryReservation"), 64)
    want("memory", c.get("memory"), 256)
    want("user", c.get("user"), "0")
    want("readonlyRootFilesystem", c.get("readonlyRootFilesystem"), True)
    if c.get("privileged"):
        p.append("privileged is true; the contract runs with capabilities instead")
    caps = (c.get("linuxParameters") or {}).get("capabilities") or {}
    add, drop = caps.get("add") or [], caps.get("drop") or []
    want("capabilities.add", sorted(add), ["NET_ADMIN", "SYS_ADMIN"])
    want("capabilities.drop", drop, ["ALL"])
    for name in add + drop:
        if name not in ECS_CAPABILITIES:
            p.append(f"capability {name!r} is not one ECS documents "
                     f"(botocore would not notice; ECS may refuse it)")
    # Mounts: every mountPoint has a volume, and host paths are the contract's.
    volumes = {v.get("name"): (v.get("host") or {}).get("sourcePath") for v in td.get("volumes") or []}
    mounts = c.get("mountPoints") or []
    p += volume_problems([m.get("sourceVolume") for m in mounts],
                         [v.get("name") for v in td.get("volumes") or []], "a mountPoint")
    got_mounts = {m.get("containerPath"): (volumes.get(m.get("sourceVolume")), bool(m.get("readOnly")))
                  for m in mounts}
    want("mounts (containerPath -> host path, read-only)", got_mounts, ECS_MOUNTS)
    # Environment and secrets.
    env = {e.get("name"): e.get("value") for e in c.get("environment") or []}
    want("environment", env, {**COMMON_ENV, "OBSERVER_PLATFORM": "ecs", "RUST_LOG": "info"})
    secrets = {s.get("name"): s.get("valueFrom") for s in c.get("secrets") or []}
    if set(secrets) != {"MACKEREL_APIKEY"}:
        p.append(f"secrets are {sorted(secrets)}, want MACKEREL_APIKEY only")
    elif not re.match(r"^arn:aws[a-z-]*:secretsmanager:", str(secrets["MACKEREL_APIKEY"])):
        p.append("MACKEREL_APIKEY valueFrom is not a Secrets Manager ARN")
    # Port: host networking needs hostPort == containerPort; it must be the listen port.
    ports = c.get("portMappings") or []
    want("portMappings", [(m.get("containerPort"), m.get("hostPort"), m.get("protocol")) for m in ports],
         [(METRICS_PORT, METRICS_PORT, "tcp")])
    # Health check: exec form (the image has no shell), within ECS's documented ranges.
    hc = c.get("healthCheck") or {}
    want("healthCheck.command", hc.get("command"), ["CMD", "/observer", "health"])
    for key, lo, hi in (("interval", 5, 300), ("timeout", 2, 60), ("retries", 1, 10),
                        ("startPeriod", 0, 300)):
        value = hc.get(key)
        if not isinstance(value, int) or not lo <= value <= hi:
            p.append(f"healthCheck.{key} is {value!r}, want an integer in {lo}..{hi}")
    if not isinstance(c.get("stopTimeout"), int) or not 2 <= c["stopTimeout"] <= 120:
        p.append(f"stopTimeout is {c.get('stopTimeout')!r}, want 2..120 seconds")
    want("logConfiguration.logDriver", (c.get("logConfiguration") or {}).get("logDriver"), "awslogs")
    return p


# ---------------------------------------------------------------------------------------------
# (b) cfn-lint and (d) the template against the JSON


def load_template(text: str) -> dict:
    template, errors = decode_str(text)
    if errors or template is None:
        raise SystemExit(f"cannot parse {TEMPLATE}: {errors}")
    # Plain dicts and strings (cfn-lint's nodes carry line marks).
    return json.loads(json.dumps(template))


def cfn_lint(template: dict | str) -> list[str]:
    """cfn-lint on the template's text (line numbers then point into the file) or on a dict."""
    text = template if isinstance(template, str) else json.dumps(template)
    matches = lint(text, config=ManualArgs(regions=["us-east-1"]))
    # Errors (E) and warnings (W) fail; informational (I) rules are not run by default.
    return [f"{m.rule.id} {m.message} (line {m.linenumber})" for m in matches
            if m.rule.id[:1] in ("E", "W")]


class Unresolved:
    """A CloudFormation intrinsic whose value exists only in a deployed stack."""

    def __init__(self, node: dict):
        self.node = node

    def __repr__(self) -> str:
        return json.dumps(self.node)


def is_intrinsic(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and (
        "Ref" in node or next(iter(node)).startswith("Fn::"))


def camel(node: Any, parameters: dict, keep_keys: bool = False) -> Any:
    """CloudFormation's PascalCase properties as the ECS API's camelCase, intrinsics resolved
    where a parameter default gives a value, else left Unresolved."""
    if is_intrinsic(node):
        ref = node.get("Ref")
        if isinstance(ref, str) and "Default" in parameters.get(ref, {}):
            return parameters[ref]["Default"]
        return Unresolved(node)
    if isinstance(node, dict):
        # Log driver options are the driver's own keys (awslogs-group): keep them as written.
        return {(k if keep_keys else k[:1].lower() + k[1:]): camel(v, parameters, k == "Options")
                for k, v in node.items()}
    if isinstance(node, list):
        return [camel(v, parameters) for v in node]
    return node


def diff(cfn: Any, js: Any, path: str, out: list[str], unresolved: list[str]) -> None:
    if isinstance(cfn, Unresolved):
        unresolved.append(path or ".")
        return
    if isinstance(cfn, dict) and isinstance(js, dict):
        for k in sorted(set(cfn) | set(js)):
            if k not in js:
                out.append(f"{path}.{k} only in the template")
            elif k not in cfn:
                out.append(f"{path}.{k} only in task-definition.json")
            else:
                diff(cfn[k], js[k], f"{path}.{k}", out, unresolved)
        return
    if isinstance(cfn, list) and isinstance(js, list):
        if len(cfn) != len(js):
            out.append(f"{path} has {len(cfn)} items in the template, {len(js)} in the JSON")
        for i, (a, b) in enumerate(zip(cfn, js)):
            diff(a, b, f"{path}[{i}]", out, unresolved)
        return
    if cfn != js:
        out.append(f"{path}: template {cfn!r}, JSON {js!r}")


def resources_of(template: dict, kind: str) -> list[dict]:
    return [r for r in (template.get("Resources") or {}).values() if r.get("Type") == kind]


def cfn_matches_json(template: dict, td: dict, unresolved: list[str] | None = None) -> list[str]:
    defs = resources_of(template, "AWS::ECS::TaskDefinition")
    if len(defs) != 1:
        return [f"{len(defs)} AWS::ECS::TaskDefinition resources, want one"]
    props = camel(defs[0].get("Properties") or {}, template.get("Parameters") or {})
    out: list[str] = []
    diff(props, td, "", out, unresolved if unresolved is not None else [])
    return out


def cfn_contract(template: dict) -> list[str]:
    p: list[str] = []
    services = resources_of(template, "AWS::ECS::Service")
    if len(services) != 1:
        return [f"{len(services)} AWS::ECS::Service resources, want one"]
    s = services[0].get("Properties") or {}
    for key, want in (("SchedulingStrategy", "DAEMON"), ("LaunchType", "EC2")):
        if s.get(key) != want:
            p.append(f"Service {key} is {s.get(key)!r}, want {want!r}")
    dc = s.get("DeploymentConfiguration") or {}
    if dc.get("MinimumHealthyPercent") != 50 or dc.get("MaximumPercent") != 100:
        p.append(f"Service deployment {dc.get('MinimumHealthyPercent')!r}/{dc.get('MaximumPercent')!r} %,"
                 " want 50/100 (a daemon rollout must not take every instance's observer down)")
    if (dc.get("DeploymentCircuitBreaker") or {}) != {"Enable": True, "Rollback": True}:
        p.append("Service DeploymentCircuitBreaker is not Enable + Rollback")
    params = template.get("Parameters") or {}
    for name in ("ClusterName", "Image", "MackerelApiKey"):
        if name not in params:
            p.append(f"parameter {name} is missing")
    if not (params.get("MackerelApiKey") or {}).get("NoEcho"):
        p.append("parameter MackerelApiKey is not NoEcho")
    if not resources_of(template, "AWS::SecretsManager::Secret"):
        p.append("no AWS::SecretsManager::Secret")
    roles = resources_of(template, "AWS::IAM::Role")
    text = json.dumps(roles)
    if "AmazonECSTaskExecutionRolePolicy" not in text or "secretsmanager:GetSecretValue" not in text:
        p.append("no execution role with AmazonECSTaskExecutionRolePolicy and secretsmanager:GetSecretValue")
    if not resources_of(template, "AWS::Logs::LogGroup"):
        p.append("no AWS::Logs::LogGroup")
    return p


# ---------------------------------------------------------------------------------------------
# (c) Kubernetes schemas and (d) Kubernetes contract


def load_manifests() -> dict[str, list[dict]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            for path in sorted(K8S_DIR.glob("*.yaml")) if path != KUSTOMIZATION}


def k8s_schema(manifests: dict[str, list[dict]], version: str) -> list[str]:
    p: list[str] = []
    for name, docs in manifests.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(x) for x in e.path)
                p.append(f"{name}: {doc.get('kind')} {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                p.append(f"{name}: {e.message}")
    return p


def only(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def k8s_contract(manifests: dict[str, list[dict]], kustomization: dict, image: str) -> list[str]:
    p: list[str] = []
    docs = [d for ds in manifests.values() for d in ds]

    def want(path: str, got: Any, expected: Any) -> None:
        if got != expected:
            p.append(f"{path} is {got!r}, want {expected!r}")

    # Kustomization: lists every manifest, sets the namespace, rewrites the image.
    want("kustomization resources", sorted(kustomization.get("resources") or []), sorted(manifests))
    want("kustomization namespace", kustomization.get("namespace"), NAMESPACE)
    images = kustomization.get("images") or []
    want("kustomization images", [(i.get("name"), f"{i.get('newName', i.get('name'))}:{i.get('newTag')}")
                                  for i in images], [(REGISTRY_REPO, image)])

    for d in docs:
        if d.get("kind") not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            want(f"{d.get('kind')} {d['metadata'].get('name')} namespace",
                 d["metadata"].get("namespace"), NAMESPACE)
    want("Namespaces", [d["metadata"]["name"] for d in only(docs, "Namespace")], [NAMESPACE])

    # RBAC: exactly get on nodes/pods and nodes/proxy, bound to the DaemonSet's ServiceAccount.
    roles = only(docs, "ClusterRole")
    if len(roles) != 1:
        p.append(f"{len(roles)} ClusterRoles, want one")
    else:
        grants = sorted((g, r, v) for rule in roles[0].get("rules") or []
                        for g in rule.get("apiGroups") or [] for r in rule.get("resources") or []
                        for v in rule.get("verbs") or [])
        want("ClusterRole grants", grants, [("", "nodes/pods", "get"), ("", "nodes/proxy", "get")])
    sets = only(docs, "DaemonSet")
    if len(sets) != 1:
        return p + [f"{len(sets)} DaemonSets, want one"]
    ds = sets[0]
    pod = ds["spec"]["template"]["spec"]
    sa = pod.get("serviceAccountName")
    if sa not in [d["metadata"]["name"] for d in only(docs, "ServiceAccount")]:
        p.append(f"serviceAccountName {sa!r} has no ServiceAccount")
    bindings = only(docs, "ClusterRoleBinding")
    bound = [(b["roleRef"].get("name"), s.get("kind"), s.get("name"), s.get("namespace"))
             for b in bindings for s in b.get("subjects") or []]
    role_name = roles[0]["metadata"]["name"] if len(roles) == 1 else None
    want("ClusterRoleBinding subjects", bound, [(role_name, "ServiceAccount", sa, NAMESPACE)])

    # DaemonSet shape.
    labels = ds["spec"]["template"]["metadata"].get("labels") or {}
    selector = ds["spec"]["selector"].get("matchLabels") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        p.append("selector does not match the pod template's labels")
    want("pod label app.kubernetes.io/name", labels.get("app.kubernetes.io/name"), "observer")
    want("updateStrategy", ds["spec"].get("updateStrategy"),
         {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}})
    if {"operator": "Exists"} not in (pod.get("tolerations") or []):
        p.append("no toleration {operator: Exists}")
    want("priorityClassName", pod.get("priorityClassName"), "system-node-critical")
    want("automountServiceAccountToken", pod.get("automountServiceAccountToken"), True)
    want("terminationGracePeriodSeconds", pod.get("terminationGracePeriodSeconds"), 30)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            p.append(f"{key} is true; the contract runs without it")
    containers = pod.get("containers") or []
    if len(containers) != 1:
        return p + [f"{len(containers)} containers, want one"]
    c = containers[0]
    want("image", c.get("image"), image)
    if images and c.get("image", "").rsplit(":", 1)[0] != images[0].get("name"):
        p.append("the kustomization's images entry does not name the DaemonSet's image")

    sc = c.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    want("capabilities.add", sorted(caps.get("add") or []), ["BPF", "NET_ADMIN", "PERFMON"])
    want("capabilities.drop", caps.get("drop"), ["ALL"])
    want("runAsUser", sc.get("runAsUser"), 0)
    want("runAsNonRoot", sc.get("runAsNonRoot"), False)
    want("readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem"), True)
    want("allowPrivilegeEscalation", sc.get("allowPrivilegeEscalation"), False)
    if sc.get("privileged"):
        p.append("privileged is true; the contract runs with capabilities instead")
    want("seccompProfile", sc.get("seccompProfile"), {"type": "RuntimeDefault"})
    want("resources", c.get("resources"),
         {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})

    # Ports and probes: the probes use the named port, which is the port observer listens on.
    ports = {port.get("name"): port for port in c.get("ports") or []}
    metrics = ports.get("metrics") or {}
    want("port metrics", (metrics.get("containerPort"), metrics.get("protocol", "TCP")),
         (METRICS_PORT, "TCP"))
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        want(f"{probe} path", get.get("path"), path)
        if get.get("port") != "metrics":
            p.append(f"{probe} port is {get.get('port')!r}, want the named port 'metrics'")
        if isinstance(get.get("port"), str) and get["port"] not in ports:
            p.append(f"{probe} names port {get['port']!r}, which the container does not declare")
    annotations = ds["spec"]["template"]["metadata"].get("annotations") or {}
    want("annotation prometheus.io/scrape", annotations.get("prometheus.io/scrape"), "true")
    want("annotation prometheus.io/port", annotations.get("prometheus.io/port"), str(METRICS_PORT))

    # Environment.
    env = {e.get("name"): e for e in c.get("env") or []}
    for name, value in {**COMMON_ENV, "OBSERVER_PLATFORM": "kubernetes"}.items():
        want(f"env {name}", (env.get(name) or {}).get("value"), value)
    for name, field in (("NODE_NAME", "spec.nodeName"), ("NODE_IP", "status.hostIP")):
        got = (((env.get(name) or {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        want(f"env {name} fieldRef", got, field)
    ref = (((env.get("MACKEREL_APIKEY") or {}).get("valueFrom") or {}).get("secretKeyRef")) or {}
    want("env MACKEREL_APIKEY secretKeyRef", ref,
         {"name": "observer-mackerel", "key": "apikey", "optional": True})

    # Volumes: every mount has a volume, and the host paths are the contract's.
    volumes = pod.get("volumes") or []
    mounts = c.get("volumeMounts") or []
    p += volume_problems([m.get("name") for m in mounts], [v.get("name") for v in volumes],
                         "a volumeMount")
    host = {v.get("name"): (v.get("hostPath") or {}).get("path") for v in volumes}
    got_mounts = {m.get("mountPath"): (host.get(m.get("name")), bool(m.get("readOnly")))
                  for m in mounts}
    want("mounts (mountPath -> host path, read-only)", got_mounts, HOST_MOUNTS)
    # The state dir may be missing on a new node (the kubelet makes it); every other host path is
    # a filesystem the kubelet cannot create, so it must be there already.
    state_volumes = {m.get("name") for m in mounts if m.get("mountPath") in (STATE_HOST_DIR,)}
    for v in volumes:
        want_type = "DirectoryOrCreate" if v.get("name") in state_volumes else "Directory"
        if "hostPath" in v and v["hostPath"].get("type") != want_type:
            p.append(f"volume {v.get('name')} hostPath type is {v['hostPath'].get('type')!r}, want {want_type}")
    return p


def ecs_state(td: dict, default: str | None) -> list[str]:
    p: list[str] = []
    volumes = {v.get("name"): (v.get("host") or {}).get("sourcePath") for v in td.get("volumes") or []}
    for c in td.get("containerDefinitions") or []:
        env = {e.get("name"): e.get("value") for e in c.get("environment") or []}
        mounts = [(m.get("containerPath", ""), volumes.get(m.get("sourceVolume")), bool(m.get("readOnly")))
                  for m in c.get("mountPoints") or []]
        p += state_mount(default, env, mounts, f"task-definition.json container {c.get('name')}")
    return p


def cfn_state(template: dict, default: str | None) -> list[str]:
    p: list[str] = []
    for r in resources_of(template, "AWS::ECS::TaskDefinition"):
        props = r.get("Properties") or {}
        volumes = {v.get("Name"): (v.get("Host") or {}).get("SourcePath") for v in props.get("Volumes") or []}
        for c in props.get("ContainerDefinitions") or []:
            env = {e.get("Name"): e.get("Value") for e in c.get("Environment") or []}
            mounts = [(m.get("ContainerPath", ""), volumes.get(m.get("SourceVolume")), bool(m.get("ReadOnly")))
                      for m in c.get("MountPoints") or []]
            p += state_mount(default, env, mounts, f"cloudformation.yaml container {c.get('Name')}")
    return p


def k8s_state(manifests: dict[str, list[dict]], default: str | None) -> list[str]:
    p: list[str] = []
    for d in (d for ds in manifests.values() for d in ds if d.get("kind") == "DaemonSet"):
        pod = d["spec"]["template"]["spec"]
        volumes = {v.get("name"): v.get("hostPath") for v in pod.get("volumes") or []}
        for c in pod.get("containers") or []:
            env = {e.get("name"): e.get("value") for e in c.get("env") or []}
            mounts = [(m.get("mountPath", ""), (volumes.get(m.get("name")) or {}).get("path"),
                       bool(m.get("readOnly"))) for m in c.get("volumeMounts") or []]
            what = f"DaemonSet container {c.get('name')}"
            p += state_mount(default, env, mounts, what)
            path = (env.get("OBSERVER_STATE_DIR") or default or "").rstrip("/")
            for m in c.get("volumeMounts") or []:
                hp = volumes.get(m.get("name")) or {}
                if m.get("mountPath", "").rstrip("/") == path and hp.get("type") != "DirectoryOrCreate":
                    p.append(f"{what}: the state dir's hostPath type is {hp.get('type')!r}, want "
                             "DirectoryOrCreate (a new node has no such directory yet)")
    return p


# ---------------------------------------------------------------------------------------------
# Environment names, across both platforms


def env_names(td: dict, template: dict, manifests: dict[str, list[dict]]) -> dict[str, set[str]]:
    """Every environment variable name a manifest sets, with where it is set."""
    where: dict[str, set[str]] = {}
    for c in td.get("containerDefinitions") or []:
        for e in (c.get("environment") or []) + (c.get("secrets") or []):
            where.setdefault(e.get("name"), set()).add("task-definition.json")
    for r in resources_of(template, "AWS::ECS::TaskDefinition"):
        for c in (r.get("Properties") or {}).get("ContainerDefinitions") or []:
            for e in (c.get("Environment") or []) + (c.get("Secrets") or []):
                where.setdefault(e.get("Name"), set()).add("cloudformation.yaml")
    for name, docs in manifests.items():
        for d in docs:
            spec = ((d.get("spec") or {}).get("template") or {}).get("spec") or {}
            for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                for e in c.get("env") or []:
                    where.setdefault(e.get("name"), set()).add(name)
    return where


def env_known(td: dict, template: dict, manifests: dict[str, list[dict]], known: set[str]) -> list[str]:
    return [f"{name} (set in {', '.join(sorted(files))}) is no flag of observer's and no known extra"
            for name, files in sorted(env_names(td, template, manifests).items())
            if name not in known | ENV_EXTRAS]


# ---------------------------------------------------------------------------------------------
# Running


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, problems: list[str], detail: str = "") -> None:
        if problems:
            self.failed += 1
            print(f"  FAIL  {name}")
            for problem in problems:
                print(f"          {problem}")
        else:
            self.passed += 1
            print(f"  ok    {name}{f' ({detail})' if detail else ''}")

    def must_reject(self, name: str, problems: list[str]) -> None:
        if problems:
            self.passed += 1
            print(f"  ok    rejects {name}: {problems[0][:110]}")
        else:
            self.failed += 1
            print(f"  FAIL  accepts {name}: the check that should catch it passed")


def set_path(node: Any, path: list, value: Any) -> None:
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def main() -> int:
    started = time.monotonic()
    image = image_reference()
    td = json.loads(TASK_DEFINITION.read_text())
    template = load_template(TEMPLATE.read_text())
    manifests = load_manifests()
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    k8s_version = kv_utils.latest_version()
    known, known_from = known_env_vars()
    state_dir, state_from = observer_state_dir()
    r = Report()

    print(f"deploy check: image {image}; Kubernetes schemas {k8s_version} (strict); "
          f"observer's env names from {known_from}; its state dir {state_dir} from {state_from}")

    print("(a) ECS schema")
    r.check("task-definition.json is a valid RegisterTaskDefinition input (botocore ecs model)",
            ecs_schema(td))
    print("(b) CloudFormation")
    r.check("cloudformation.yaml passes cfn-lint (no errors, no warnings)",
            cfn_lint(TEMPLATE.read_text()))
    print("(c) Kubernetes schemas")
    r.check(f"{len(manifests)} manifests ({sum(map(len, manifests.values()))} objects) valid "
            f"against Kubernetes {k8s_version}, unknown fields refused", k8s_schema(manifests, k8s_version))

    print("(d) contract")
    r.check("task-definition.json: image, privileges, mounts, ports, health check, environment",
            ecs_contract(td, image))
    unresolved: list[str] = []
    r.check("cloudformation.yaml task definition equals task-definition.json",
            cfn_matches_json(template, td, unresolved),
            f"left to the stack: {', '.join(unresolved)}")
    r.check("cloudformation.yaml: DAEMON service, 50/100 rollout, circuit breaker, secret, role",
            cfn_contract(template))
    r.check("kubernetes: image, RBAC, privileges, probes on the named port, volumes, environment",
            k8s_contract(manifests, kustomization, image))
    r.check("every environment variable set is one observer knows",
            env_known(td, template, manifests, known) if known else ["found no env names of observer's"],
            f"{len(env_names(td, template, manifests))} names")
    r.check("the state dir observer uses is a read-write mount of a node-local host directory "
            "(task-definition.json, cloudformation.yaml, DaemonSet with DirectoryOrCreate)",
            ecs_state(td, state_dir) + cfn_state(template, state_dir) + k8s_state(manifests, state_dir),
            f"{state_dir}")
    r.check("observer has the `health` subcommand the ECS health check runs",
            [] if knows_health_subcommand() else ["no `health` subcommand found in observer/src"])

    print("(e) mutations the checks must reject")

    def mutated(data: Any, change: Callable[[Any], None]) -> Any:
        data = copy.deepcopy(data)
        change(data)
        return data

    def td_misspelled(t: dict) -> None:
        c = t["containerDefinitions"][0]
        c["readOnlyRootFilesystem"] = c.pop("readonlyRootFilesystem")

    r.must_reject("task definition with a misspelled field (readOnlyRootFilesystem)",
                  ecs_schema(mutated(td, td_misspelled)))
    r.must_reject("task definition with a wrong type (cpu \"64\")",
                  ecs_schema(mutated(td, lambda t: set_path(t, ["containerDefinitions", 0, "cpu"], "64"))))
    r.must_reject("task definition adding BPF (schema-valid, not an ECS capability name)",
                  ecs_contract(mutated(td, lambda t: t["containerDefinitions"][0]["linuxParameters"]
                                       ["capabilities"]["add"].append("BPF")), image))
    r.must_reject("task definition with a mountPoint whose volume is missing",
                  ecs_contract(mutated(td, lambda t: t["volumes"].pop()), image))

    def cfn_task(t: dict) -> dict:
        return next(v for v in t["Resources"].values() if v["Type"] == "AWS::ECS::TaskDefinition")

    def cfn_misspelled(t: dict) -> None:
        c = cfn_task(t)["Properties"]["ContainerDefinitions"][0]
        c["ReadOnlyRootFilesystem"] = c.pop("ReadonlyRootFilesystem")

    r.must_reject("template with a misspelled TaskDefinition property (cfn-lint)",
                  cfn_lint(mutated(template, cfn_misspelled)))
    r.must_reject("template whose container lost a mount the JSON has",
                  cfn_matches_json(mutated(template, lambda t: cfn_task(t)["Properties"]
                                           ["ContainerDefinitions"][0]["MountPoints"].pop()), td))
    r.must_reject("template whose health check differs from the JSON",
                  cfn_matches_json(mutated(template, lambda t: set_path(
                      cfn_task(t)["Properties"]["ContainerDefinitions"][0]["HealthCheck"],
                      ["Retries"], 5)), td))

    def service(t: dict) -> dict:
        return next(v for v in t["Resources"].values() if v["Type"] == "AWS::ECS::Service")

    r.must_reject("template with a daemon rollout at 0 % minimum healthy",
                  cfn_contract(mutated(template, lambda t: set_path(
                      service(t)["Properties"]["DeploymentConfiguration"], ["MinimumHealthyPercent"], 0))))

    def ds_container(m: dict) -> dict:
        return next(d for d in m["daemonset.yaml"] if d["kind"] == "DaemonSet")[
            "spec"]["template"]["spec"]["containers"][0]

    def ds_pod(m: dict) -> dict:
        return next(d for d in m["daemonset.yaml"] if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]

    r.must_reject("DaemonSet with an unknown field (securityContext.capabilitie)",
                  k8s_schema(mutated(manifests, lambda m: set_path(
                      ds_container(m), ["securityContext", "capabilitie"], {"add": ["BPF"]})), k8s_version))
    r.must_reject("DaemonSet with a wrong type (containerPort \"9435\")",
                  k8s_schema(mutated(manifests, lambda m: set_path(
                      ds_container(m), ["ports", 0, "containerPort"], "9435")), k8s_version))
    r.must_reject("DaemonSet without NET_ADMIN",
                  k8s_contract(mutated(manifests, lambda m: ds_container(m)["securityContext"]
                                       ["capabilities"]["add"].remove("NET_ADMIN")), kustomization, image))
    r.must_reject("DaemonSet with a volumeMount that has no volume",
                  k8s_contract(mutated(manifests, lambda m: ds_container(m)["volumeMounts"].append(
                      {"name": "host-sys", "mountPath": "/host/sys", "readOnly": True})),
                      kustomization, image))
    r.must_reject("DaemonSet whose liveness probe names an undeclared port",
                  k8s_contract(mutated(manifests, lambda m: set_path(
                      ds_container(m), ["livenessProbe", "httpGet", "port"], "http")), kustomization, image))
    r.must_reject("DaemonSet with hostNetwork: true",
                  k8s_contract(mutated(manifests, lambda m: set_path(ds_pod(m), ["hostNetwork"], True)),
                               kustomization, image))
    r.must_reject("DaemonSet setting an env var observer does not know (OBSERVER_HOSTROOT)",
                  env_known(td, template, mutated(manifests, lambda m: ds_container(m)["env"].append(
                      {"name": "OBSERVER_HOSTROOT", "value": "/host"})), known))
    # The state dir: gone, read-only, elsewhere, or not creatable on a new node.
    def td_state_mount(t: dict) -> dict:
        return next(m for m in t["containerDefinitions"][0]["mountPoints"]
                    if m["containerPath"] == STATE_HOST_DIR)

    def td_without_state(t: dict) -> None:
        c = t["containerDefinitions"][0]
        c["mountPoints"].remove(td_state_mount(t))
        t["volumes"] = [v for v in t["volumes"] if v["host"]["sourcePath"] != STATE_HOST_DIR]

    r.must_reject("task definition without the state volume (mount and volume both removed)",
                  ecs_state(mutated(td, td_without_state), state_dir))
    r.must_reject("task definition without the state volume (the contract's mounts)",
                  ecs_contract(mutated(td, td_without_state), image))
    r.must_reject("task definition with the state volume read-only",
                  ecs_state(mutated(td, lambda t: set_path(td_state_mount(t), ["readOnly"], True)), state_dir))
    r.must_reject("task definition pointing OBSERVER_STATE_DIR where nothing is mounted",
                  ecs_state(mutated(td, lambda t: t["containerDefinitions"][0]["environment"].append(
                      {"name": "OBSERVER_STATE_DIR", "value": "/var/lib/observer-state"})), state_dir))
    r.must_reject("task definition whose state volume is the host's /tmp",
                  ecs_state(mutated(td, lambda t: set_path(
                      next(v for v in t["volumes"] if v["host"]["sourcePath"] == STATE_HOST_DIR),
                      ["host", "sourcePath"], "/tmp/observer")), state_dir))

    def cfn_state_mount(t: dict) -> dict:
        return next(m for m in cfn_task(t)["Properties"]["ContainerDefinitions"][0]["MountPoints"]
                    if m["ContainerPath"] == STATE_HOST_DIR)

    r.must_reject("template with the state volume read-only (the check)",
                  cfn_state(mutated(template, lambda t: set_path(cfn_state_mount(t), ["ReadOnly"], True)),
                            state_dir))
    r.must_reject("template with the state volume read-only (drift from the JSON)",
                  cfn_matches_json(mutated(template, lambda t: set_path(cfn_state_mount(t), ["ReadOnly"], True)),
                                   td))

    def ds_state_mount(m: dict) -> dict:
        return next(v for v in ds_container(m)["volumeMounts"] if v["mountPath"] == STATE_HOST_DIR)

    def ds_state_volume(m: dict) -> dict:
        name = ds_state_mount(m)["name"]
        return next(v for v in ds_pod(m)["volumes"] if v["name"] == name)

    def ds_without_state(m: dict) -> None:
        name = ds_state_mount(m)["name"]
        ds_container(m)["volumeMounts"].remove(ds_state_mount(m))
        ds_pod(m)["volumes"] = [v for v in ds_pod(m)["volumes"] if v["name"] != name]

    r.must_reject("DaemonSet without the state volume",
                  k8s_state(mutated(manifests, ds_without_state), state_dir))
    r.must_reject("DaemonSet with the state volume read-only",
                  k8s_state(mutated(manifests, lambda m: set_path(ds_state_mount(m), ["readOnly"], True)),
                            state_dir))
    r.must_reject("DaemonSet with the state dir's hostPath type Directory (fails on a new node)",
                  k8s_state(mutated(manifests, lambda m: set_path(ds_state_volume(m), ["hostPath", "type"],
                                                                   "Directory")), state_dir))
    r.must_reject("DaemonSet mounting the state volume beside observer's state dir",
                  k8s_state(mutated(manifests, lambda m: set_path(ds_state_mount(m), ["mountPath"],
                                                                   "/var/lib/observer-state")), state_dir))
    r.must_reject("DaemonSet with the state volume under the host's /run (not kept per node)",
                  k8s_state(mutated(manifests, lambda m: set_path(ds_state_volume(m), ["hostPath", "path"],
                                                                   "/run/observer")), state_dir))

    r.must_reject("kustomization missing a manifest",
                  k8s_contract(manifests, mutated(kustomization, lambda k: k["resources"].pop()), image))

    elapsed = time.monotonic() - started
    print(f"deploy check: {r.passed} ok, {r.failed} failing, in {elapsed:.1f}s")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())

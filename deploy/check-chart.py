#!/usr/bin/env python3
"""Checks the Helm chart (helm/defuse) and the plain manifests (deploy/k8s) offline.

No cluster and no `helm` binary: Helm 4 runs as a library (PyPI `helm-python-sdk`), and
every rendered manifest is validated strictly (an unknown field fails) against the
Kubernetes OpenAPI schemas bundled in PyPI `kubernetes-validate`. deploy/setup-test.sh
installs both, pinned, into ~/.cache/defuse/chart-env (this script finds them there).

    python3 deploy/check-chart.py                    # check everything; exit 1 on a problem
    python3 deploy/check-chart.py --write-manifests  # re-render deploy/k8s/ from the chart

What it checks:
  1. `helm lint --strict` and a render (release "defuse", namespace "defuse") with each
     values file in helm/defuse/ci/; every document parses as YAML without duplicate
     keys and validates strictly against Kubernetes KUBE_VERSIONS (the CRDs it renders,
     ServiceMonitor, PodMonitor and HTTPRoute, against CRD_SCHEMAS here); and a few
     properties the chart promises (GPU limits, security contexts, Secret references,
     ports, routes, disruption budgets, ...).
  2. Each values file in helm/defuse/ci/broken/ is refused, with a message that
     contains its `# expect-error:` line.
  3. The validator can fail: a manifest with a misspelled field name, and one with a
     wrong type, must be rejected.
  4. deploy/k8s/*.yaml equal a fresh render of the chart with ci/cpu-values.yaml.
  5. What can be checked of deploy/docker/ without a Docker engine: libtorch pins agree
     with deploy/setup.sh, COPY sources exist and are in the build context, bases are
     pinned, uid and entrypoint match the chart, the CUDA image builds `--features cuda`
     (and cli/Cargo.toml has it); and the flags and variables the chart passes are read
     by the Rust sources.
"""
import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "defuse"
CI = CHART / "ci"
MANIFESTS = ROOT / "deploy" / "k8s"
MANIFEST_VALUES = CI / "cpu-values.yaml"
RELEASE, NAMESPACE = "defuse", "defuse"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# whose schemas kubernetes-validate 1.37.0 bundles.
KUBE_VERSIONS = ("1.29.0", "1.37.0")
PYENV_HINT = "run deploy/setup-test.sh: it installs them into ~/.cache/defuse/chart-env"


def _import_tools():
    """helm_python, kubernetes_validate and yaml, from the set-up's folder first."""
    cache = Path(os.environ.get("DEFUSE_CACHE", Path.home() / ".cache" / "defuse"))
    env = cache / "chart-env"
    if env.is_dir() and str(env) not in sys.path:
        sys.path.insert(0, str(env))
    try:
        import helm_python
        import kubernetes_validate
        import yaml
    except ImportError as e:
        sys.exit(f"check-chart: cannot import {e.name} ({PYENV_HINT})")
    return helm_python, kubernetes_validate, yaml


helm, kv, yaml = _import_tools()


# --- YAML that refuses duplicate keys (a template bug PyYAML would silently hide) ---
class StrictLoader(yaml.SafeLoader):
    pass


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@contextlib.contextmanager
def captured_stderr():
    """Helm's Go code logs to fd 2; keep that out of the report unless a step fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        box = {}
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode(errors="replace")


class Report:
    def __init__(self):
        self.passed, self.failed = 0, []

    def ok(self, what):
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what, why):
        self.failed.append(what)
        print(f"  FAIL  {what}\n        {why.strip().replace(chr(10), chr(10) + '        ')}")

    def check(self, cond, what, why=""):
        if cond:
            self.ok(what)
        else:
            self.fail(what, why or "not so")
        return cond


def load_values(path):
    with open(path) as f:
        return yaml.load(f, Loader=StrictLoader) or {}


def render(values):
    """Renders the chart: {template path: text}. Raises helm.HelmError."""
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(rendered, with_hooks=True):
    """[(template path, manifest)] of the non-empty YAML documents."""
    out = []
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        if not with_hooks and "/templates/tests/" in path:
            continue
        for doc in yaml.load_all(rendered[path], Loader=StrictLoader):
            if doc:
                out.append((path, doc))
    return out


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# The Prometheus Operator's CRDs are not in kubernetes-validate: the fields the chart
# uses, from monitoring.coreos.com/v1 (prometheus-operator 0.80), each object closed so
# a misspelled field fails as it would on a cluster with the CRDs.
_SELECTOR = {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
             "properties": {"matchLabels": {"type": "object",
                                            "additionalProperties": {"type": "string"}}}}
_SECRET_KEY = {"type": "object", "additionalProperties": False, "required": ["name", "key"],
               "properties": {"name": {"type": "string", "minLength": 1},
                              "key": {"type": "string", "minLength": 1}}}
_ENDPOINT = {"type": "object", "additionalProperties": False, "required": ["port"],
             "properties": {
                 "port": {"type": "string"}, "path": {"type": "string"},
                 "scheme": {"enum": ["http", "https"]},
                 "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                 "authorization": {"type": "object", "additionalProperties": False,
                                   "properties": {"type": {"type": "string"},
                                                  "credentials": _SECRET_KEY}}}}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string"}, "labels": {"type": "object"}}}
# Nor are the Gateway API's: the fields of an HTTPRoute the chart uses, from
# gateway.networking.k8s.io/v1 (Gateway API 1.2), closed the same way.
_DNS = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_PARENT_REF = {"type": "object", "additionalProperties": False, "required": ["name"],
               "properties": {"group": {"type": "string"}, "kind": {"type": "string"},
                              "namespace": {"type": "string"}, "sectionName": {"type": "string"},
                              "name": {"type": "string", "minLength": 1, "maxLength": 253},
                              "port": _PORT}}
# port is optional in the schema but required (a CEL rule) when the backend is a Service
_BACKEND_REF = {"type": "object", "additionalProperties": False, "required": ["name", "port"],
                "properties": {"group": {"type": "string"}, "kind": {"type": "string"},
                               "namespace": {"type": "string"},
                               "name": {"type": "string", "minLength": 1, "maxLength": 253},
                               "port": _PORT,
                               "weight": {"type": "integer", "minimum": 0, "maximum": 1000000}}}
_HTTP_MATCH = {"type": "object", "additionalProperties": False, "properties": {
    "path": {"type": "object", "additionalProperties": False,
             "properties": {"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                            "value": {"type": "string", "pattern": "^/", "maxLength": 1024}}}}}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _METADATA, "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {"selector": _SELECTOR,
                           "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}}},
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _METADATA, "spec": {
            "type": "object", "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {"selector": _SELECTOR,
                           "podMetricsEndpoints": {"type": "array", "minItems": 1,
                                                   "items": _ENDPOINT}}}}},
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _METADATA, "spec": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "parentRefs": {"type": "array", "maxItems": 32, "items": _PARENT_REF},
                "hostnames": {"type": "array", "maxItems": 16,
                              "items": {"type": "string", "pattern": r"^(\*\.)?" + _DNS[1:]}},
                "rules": {"type": "array", "maxItems": 16, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "matches": {"type": "array", "maxItems": 64, "items": _HTTP_MATCH},
                        "backendRefs": {"type": "array", "maxItems": 16,
                                        "items": _BACKEND_REF}}}}}}}},
}


def validate_strict(doc, version):
    """None when the manifest is valid, else the reason."""
    crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        import jsonschema
        errors = sorted(jsonschema.Draft7Validator(crd).iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            return f"{'.'.join(str(p) for p in e.path) or '(top)'}: {e.message}"
        return None
    try:
        kv.validate(doc, version, strict=True)
        return None
    except kv.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "(top)"
        return f"{where}: {e.message}"
    except kv.SchemaNotFoundError as e:
        return e.message
    except kv.VersionNotSupportedError as e:
        return e.message


# --- properties the chart promises, beyond the schemas ---
def pod_specs(docs):
    """[(workload doc, pod template spec, pod labels)] of Deployments, Jobs and Pods."""
    out = []
    for _, d in docs:
        if d["kind"] in ("Deployment", "Job"):
            t = d["spec"]["template"]
            out.append((d, t["spec"], t["metadata"].get("labels", {})))
        elif d["kind"] == "Pod":
            out.append((d, d["spec"], d["metadata"].get("labels", {})))
    return out


def chart_properties(docs, values):
    """[(what, ok, why)] for one render."""
    res = []
    by_kind = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    configmaps = {d["metadata"]["name"] for d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"] for d in by_kind.get("Secret", [])}
    existing = {values.get(k, {}).get("existingSecret") for k in ("auth", "redis", "s3")} - {None, ""}
    secret_keys = {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
                   for d in by_kind.get("Secret", [])}

    problems = []
    for d, spec, _ in pod_specs(docs):
        n = name_of(d)
        psc = spec.get("securityContext", {})
        if not psc.get("runAsNonRoot"):
            problems.append(f"{n}: pod securityContext.runAsNonRoot is not true")
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem"):
                problems.append(f"{n}/{c['name']}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{n}/{c['name']}: allowPrivilegeEscalation is not false")
            if not c.get("resources"):
                problems.append(f"{n}/{c['name']}: no resources")
            for ref in c.get("envFrom", []):
                cm = ref.get("configMapRef", {}).get("name")
                if cm and cm not in configmaps:
                    problems.append(f"{n}/{c['name']}: envFrom ConfigMap {cm} is not rendered")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if not ref:
                    continue
                if ref["name"] in secret_keys:
                    if ref["key"] not in secret_keys[ref["name"]]:
                        problems.append(f"{n}/{c['name']}: {e['name']} wants key {ref['key']} "
                                        f"that Secret {ref['name']} does not have")
                elif ref["name"] not in existing:
                    problems.append(f"{n}/{c['name']}: {e['name']} names Secret {ref['name']}, "
                                    f"neither rendered nor an existingSecret value")
        for v in spec.get("volumes", []):
            cm = v.get("configMap", {}).get("name")
            if cm and cm not in configmaps:
                problems.append(f"{n}: volume {v['name']} names ConfigMap {cm}, not rendered")
    res.append(("pods: non-root, read-only root, no privilege escalation, resources, "
                "references resolve", not problems, "\n".join(problems)))

    # Services select a pod and target ports that it names
    problems = []
    pods = pod_specs(docs)
    for s in by_kind.get("Service", []):
        sel = s["spec"].get("selector", {})
        match = [(d, spec) for d, spec, labels in pods
                 if sel and all(labels.get(k) == v for k, v in sel.items())]
        if not match:
            problems.append(f"{name_of(s)} selects no pod")
            continue
        names = {p.get("name") for _, spec in match for c in spec["containers"]
                 for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            t = p.get("targetPort")
            if isinstance(t, str) and t not in names:
                problems.append(f"{name_of(s)} port {p['name']}: targetPort {t} is not a container port")
    res.append(("services select the coordinator and target its named ports",
                not problems, "\n".join(problems)))

    reg = [s for s in by_kind.get("Service", []) if s["spec"].get("publishNotReadyAddresses")]
    res.append(("a headless registration Service publishes not-ready addresses",
                len(reg) == 1 and reg[0]["spec"].get("clusterIP") == "None",
                f"registration services: {[name_of(s) for s in reg]}"))

    coord = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"].endswith("-coordinator")]
    if len(coord) == 1:
        c = coord[0]["spec"]["template"]["spec"]["containers"][0]
        live = c.get("livenessProbe", {}).get("httpGet", {}).get("path")
        ready = c.get("readinessProbe", {}).get("httpGet", {}).get("path")
        res.append(("coordinator: liveness /healthz and readiness /readyz are separate probes",
                    (live, ready) == ("/healthz", "/readyz"), f"liveness {live}, readiness {ready}"))
    else:
        res.append(("one coordinator Deployment", False, f"found {len(coord)}"))

    # roles: the workers get only the worker token; the coordinator both, and the
    # folders jobs may read
    if values.get("auth", {}).get("enabled", True):
        env_names = lambda spec: {e["name"] for c in spec["containers"] for e in c.get("env", [])}
        worker_env = [env_names(spec) for d, spec, _ in pod_specs(docs)
                      if d["metadata"]["name"].endswith("-worker")]
        coord_env = [env_names(d["spec"]["template"]["spec"]) for d in coord]
        res.append(("roles: workers hold only DEFUSE_WORKER_TOKEN, the coordinator both tokens",
                    bool(worker_env) and all("DEFUSE_WORKER_TOKEN" in e and "DEFUSE_TOKEN" not in e
                                             for e in worker_env)
                    and all({"DEFUSE_TOKEN", "DEFUSE_WORKER_TOKEN"} <= e for e in coord_env),
                    f"workers: {worker_env}, coordinator: {coord_env}"))
    if values.get("data", {}).get("type", "none") != "none" and len(coord) == 1:
        env = {e["name"]: e.get("value") for e in coord[0]["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        mount = values.get("data", {}).get("mountPath", "/data")
        res.append(("coordinator: jobs may read the data volume (DEFUSE_ALLOW_PATHS)",
                    mount in (env.get("DEFUSE_ALLOW_PATHS") or "").split(":"),
                    f"DEFUSE_ALLOW_PATHS={env.get('DEFUSE_ALLOW_PATHS')!r}, data.mountPath={mount}"))

    w = values.get("worker", {})
    kind = w.get("kind", "Deployment")
    workers = [d for d in by_kind.get(kind, []) if d["metadata"]["name"].endswith("-worker")]
    if len(workers) == 1:
        spec = workers[0]["spec"]
        pod = spec["template"]["spec"]
        limits = pod["containers"][0].get("resources", {}).get("limits", {})
        gpus = w.get("gpu", {}).get("count", 0)
        gpu_name = w.get("gpu", {}).get("resourceName", "nvidia.com/gpu")
        why = f"limits {limits}"
        ok = (limits.get(gpu_name) == gpus) if gpus else (gpu_name not in limits)
        if gpus:
            ok = ok and pod.get("nodeSelector") == w.get("nodeSelector") \
                and pod.get("tolerations") == w.get("tolerations")
            why += f", nodeSelector {pod.get('nodeSelector')}, tolerations {pod.get('tolerations')}"
        res.append((f"workers: {kind}, {gpus or 'no'} {gpu_name} per pod, node selection as given",
                    ok, why))
        if kind == "Job":
            res.append(("workers: an Indexed Job of `replicas` pods",
                        spec.get("completionMode") == "Indexed"
                        and spec.get("completions") == spec.get("parallelism") == w.get("replicas"),
                        f"completionMode {spec.get('completionMode')}, completions "
                        f"{spec.get('completions')}, parallelism {spec.get('parallelism')}"))
            queue = w.get("job", {}).get("queueName", "")
            label = workers[0]["metadata"]["labels"].get("kueue.x-k8s.io/queue-name", "")
            res.append(("workers: the Job carries the Kueue queue label when a queue is named",
                        label == queue, f"label {label!r}, queueName {queue!r}"))
            idle = w.get("job", {}).get("exitWhenIdleSeconds", 300)
            args = pod["containers"][0].get("args", [])
            res.append(("workers: the Job's workers exit when the coordinator is idle, so it completes",
                        f"--exit-when-idle={idle}" in args, f"args {args}"))
            budget = w.get("maxUnavailable", 1)
            want = max(0, w.get("replicas", 2) - budget) if budget else 0
            pdbs = [d for d in by_kind.get("PodDisruptionBudget", [])
                    if d["metadata"]["name"].endswith("-worker")]
            got = pdbs[0]["spec"] if pdbs else None
            res.append(("workers: the Job's PodDisruptionBudget is an integer minAvailable, replicas - "
                        "maxUnavailable (none when that or maxUnavailable is 0)",
                        (len(pdbs) == 1 and type(got.get("minAvailable")) is int
                         and got["minAvailable"] == want and "maxUnavailable" not in got)
                        if want else not pdbs, f"budget {got}, wanted minAvailable {want}"))
        if kind == "Deployment":
            budget = w.get("maxUnavailable", 1)
            pdbs = [d for d in by_kind.get("PodDisruptionBudget", [])
                    if d["metadata"]["name"].endswith("-worker")]
            got = pdbs[0]["spec"].get("maxUnavailable") if pdbs else None
            res.append(("workers: a PodDisruptionBudget bounds evictions (none when maxUnavailable is 0)",
                        (got == budget) if budget else not pdbs, f"maxUnavailable {got}, wanted {budget}"))
        res.append(("workers: the scheduler named in schedulerName",
                    pod.get("schedulerName") == (w.get("schedulerName") or None),
                    f"schedulerName {pod.get('schedulerName')!r}"))
    else:
        res.append((f"one worker {kind}", False, f"found {len(workers)}"))

    ing = values.get("ingress", {})
    ingresses = by_kind.get("Ingress", [])
    if ing.get("enabled"):
        ok, why = False, f"found {len(ingresses)} Ingresses"
        if len(ingresses) == 1:
            rule = ingresses[0]["spec"]["rules"][0]
            backend = rule["http"]["paths"][0]["backend"]["service"]
            ok = (rule["host"] == ing.get("host") and backend["port"] == {"name": "http"}
                  and backend["name"].endswith("-coordinator"))
            why = f"host {rule['host']}, backend {backend}"
        res.append(("ingress: the host routes to the coordinator's HTTP port", ok, why))
    else:
        res.append(("no Ingress unless ingress.enabled", not ingresses, f"found {len(ingresses)}"))

    # the HTTPRoute: on the Gateways given, to the coordinator's client Service, HTTP port
    hr = values.get("httpRoute", {})
    routes = by_kind.get("HTTPRoute", [])
    if hr.get("enabled"):
        client = [s for s in by_kind.get("Service", []) if s["metadata"]["name"].endswith("-coordinator")
                  and not s["spec"].get("publishNotReadyAddresses")]
        ok, why = False, f"found {len(routes)} HTTPRoutes, {len(client)} client Services"
        if len(routes) == 1 and len(client) == 1:
            spec = routes[0]["spec"]
            service = client[0]["metadata"]["name"]
            http = {p["name"]: p["port"] for p in client[0]["spec"]["ports"]}.get("http")
            backends = [b for r in spec.get("rules", []) for b in r.get("backendRefs", [])]
            ok = (spec.get("parentRefs") == hr.get("parentRefs")
                  and spec.get("hostnames", []) == hr.get("hostnames", [])
                  and bool(backends) and http is not None
                  and all(b.get("name") == service and b.get("port") == http
                          and b.get("group", "") == "" and b.get("kind", "Service") == "Service"
                          for b in backends))
            why = (f"parentRefs {spec.get('parentRefs')}, hostnames {spec.get('hostnames')}, "
                   f"backendRefs {backends}; Service {service} port http {http}")
        res.append(("httpRoute: the hostnames route, on the Gateways given, to the coordinator "
                    "Service's HTTP port", ok, why))
    else:
        res.append(("no HTTPRoute unless httpRoute.enabled", not routes, f"found {len(routes)}"))

    # disruption budgets: each covers the pods of one workload, no pod has two (its
    # eviction would fail), and the pods of a Job (no scale subresource) get an integer
    # minAvailable (with maxUnavailable or a percentage every eviction is refused)
    pdbs = by_kind.get("PodDisruptionBudget", [])
    problems, covered = [], {}
    for b in pdbs:
        sel = b["spec"]["selector"]["matchLabels"]
        hit = [d for d, _, labels in pods if sel and all(labels.get(k) == v for k, v in sel.items())]
        if len(hit) != 1:
            problems.append(f"{name_of(b)} selects the pods of {len(hit)} workloads: "
                            f"{[name_of(d) for d in hit]}")
        for d in hit:
            covered.setdefault(name_of(d), []).append(name_of(b))
            m = b["spec"].get("minAvailable")
            if d["kind"] != "Deployment" and ("maxUnavailable" in b["spec"] or type(m) is not int):
                problems.append(f"{name_of(b)} covers {name_of(d)} (no scale subresource) without an "
                                f"integer minAvailable: {b['spec']}")
    problems += [f"{w}: pods under {len(bs)} budgets ({', '.join(bs)})"
                 for w, bs in covered.items() if len(bs) > 1]
    res.append(("disruption budgets: each covers one workload's pods, none twice, a Job's pods "
                "with an integer minAvailable", not problems, "\n".join(problems)))

    budget = values.get("coordinator", {}).get("maxUnavailable", 1)
    cpdbs = [b for b in pdbs if b["metadata"]["name"].endswith("-coordinator")]
    if budget and len(coord) == 1:
        ok, why = False, f"found {len(cpdbs)} coordinator PodDisruptionBudgets"
        if len(cpdbs) == 1:
            spec = cpdbs[0]["spec"]
            want = coord[0]["spec"]["selector"]["matchLabels"]
            sel = spec["selector"]["matchLabels"]
            hit = [name_of(d) for d, _, labels in pods if all(labels.get(k) == v for k, v in sel.items())]
            ok = (spec.get("maxUnavailable") == budget and "minAvailable" not in spec
                  and sel == want and hit == [name_of(coord[0])])
            why = f"maxUnavailable {spec.get('maxUnavailable')}, wanted {budget}; selector {sel}, " \
                  f"the Deployment's {want}; selects the pods of {hit}"
        res.append(("coordinator: a PodDisruptionBudget with maxUnavailable selects exactly the "
                    "coordinator Deployment's pods", ok, why))
    elif not budget:
        res.append(("coordinator: no PodDisruptionBudget when maxUnavailable is 0", not cpdbs,
                     f"found {len(cpdbs)}"))

    # the Prometheus Operator's monitors find the coordinator's Service and the worker
    # pods, on ports they name, with a token key the Secret has
    sm = values.get("metrics", {}).get("serviceMonitor", {})
    monitors = by_kind.get("ServiceMonitor", []) + by_kind.get("PodMonitor", [])
    if sm.get("enabled"):
        problems = []
        services = [s for s in by_kind.get("Service", []) if not s["spec"].get("publishNotReadyAddresses")]
        for m in by_kind.get("ServiceMonitor", []):
            sel = m["spec"]["selector"]["matchLabels"]
            hit = [s for s in services if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())]
            if len(hit) != 1:
                problems.append(f"{name_of(m)} selects {len(hit)} client Services")
                continue
            ports = {p["name"] for p in hit[0]["spec"]["ports"]}
            for e in m["spec"]["endpoints"]:
                if e["port"] not in ports:
                    problems.append(f"{name_of(m)}: port {e['port']} not in {sorted(ports)}")
                cred = e.get("authorization", {}).get("credentials")
                if values.get("auth", {}).get("enabled", True):
                    if not cred:
                        problems.append(f"{name_of(m)}: no token with auth on")
                    elif cred["name"] in secret_keys and cred["key"] not in secret_keys[cred["name"]]:
                        problems.append(f"{name_of(m)}: Secret {cred['name']} has no key {cred['key']}")
                    elif cred and cred["key"] in ("token", "worker-token"):
                        problems.append(f"{name_of(m)}: scrapes with the {cred['key']} (it opens more than /metrics)")
        for m in by_kind.get("PodMonitor", []):
            sel = m["spec"]["selector"]["matchLabels"]
            hit = [spec for d, spec, labels in pods if all(labels.get(k) == v for k, v in sel.items())]
            names = {p.get("name") for spec in hit for c in spec["containers"] for p in c.get("ports", [])}
            if not hit:
                problems.append(f"{name_of(m)} selects no pod")
            for e in m["spec"]["podMetricsEndpoints"]:
                if e["port"] not in names:
                    problems.append(f"{name_of(m)}: port {e['port']} not a port of the pods it selects")
        for m in monitors:
            for k, v in sm.get("labels", {}).items():
                if m["metadata"]["labels"].get(k) != v:
                    problems.append(f"{name_of(m)} lacks the label {k}={v}")
        res.append(("monitors: a ServiceMonitor on the coordinator's http port with the metrics "
                    "token, a PodMonitor on the workers' metrics port",
                    len(by_kind.get("ServiceMonitor", [])) == 1 and len(by_kind.get("PodMonitor", [])) == 1
                    and not problems, "\n".join(problems) or f"found {[name_of(m) for m in monitors]}"))
    else:
        res.append(("no monitors unless metrics.serviceMonitor.enabled", not monitors,
                    f"found {len(monitors)}"))

    # the runner Job: submits one of `jobs`, follows it, and its exit code is final
    run = values.get("runner", {})
    runners = [d for d in by_kind.get("Job", []) if d["metadata"]["labels"].get("app.kubernetes.io/component") == "runner"]
    if run.get("enabled"):
        ok, why = False, f"found {len(runners)} runner Jobs"
        if len(runners) == 1:
            spec = runners[0]["spec"]
            pod = spec["template"]["spec"]
            c = pod["containers"][0]
            args = c.get("args", [])
            env = {e["name"] for e in c.get("env", [])}
            rules = spec.get("podFailurePolicy", {}).get("rules", [])
            final = [r for r in rules if r.get("action") == "FailJob"
                     and sorted(r.get("onExitCodes", {}).get("values", [])) == [2, 3, 4]
                     and r["onExitCodes"].get("containerName") == c["name"]]
            jobs_cm = [d for d in by_kind.get("ConfigMap", []) if d["metadata"]["name"].endswith("-jobs")]
            ok = (args[:3] == ["submit", f"/etc/defuse/jobs/{run.get('job')}", "--wait"]
                  and any(a.startswith("--job-id=") for a in args)
                  and pod.get("restartPolicy") == "Never" and bool(final)
                  and "DEFUSE_TOKEN" in env and "DEFUSE_WORKER_TOKEN" not in env
                  and bool(jobs_cm) and run.get("job") in jobs_cm[0]["data"])
            why = (f"args {args}, restartPolicy {pod.get('restartPolicy')}, FailJob rules {final}, "
                   f"env {sorted(env)}, jobs ConfigMap keys {[sorted(d['data']) for d in jobs_cm]}")
        res.append(("runner: a Job that submits its job with --wait, holds only the user token, "
                    "and fails for good on the job's own outcome (exit 2, 3, 4)", ok, why))
    else:
        res.append(("no runner Job unless runner.enabled", not runners, f"found {len(runners)}"))

    if existing:
        res.append(("secrets from existingSecret: the chart renders no Secret of its own",
                     not secrets, f"rendered Secrets: {sorted(secrets)}"))

    hooks = [d for _, d in docs if d["kind"] == "Pod"
             and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    res.append(("a `helm test` hook pod", len(hooks) == 1, f"found {len(hooks)}"))
    return res


def check_values_file(report, path):
    rel = path.relative_to(ROOT)
    print(f"\n{rel}")
    values = load_values(path)
    with captured_stderr() as log:
        lint = helm.lint(str(CHART), values, strict=True, kube_version="v" + KUBE_VERSIONS[0])
    bad = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
    report.check(not bad and not lint.get("errors"), "helm lint --strict",
                 "\n".join(f"{m['path']}: {m['error']}" for m in bad) + "".join(lint.get("errors", []))
                 + log.get("text", ""))
    try:
        with captured_stderr() as log:
            rendered = render(values)
    except helm.HelmError as e:
        report.fail("render", f"{type(e).__name__}: {e}\n{log.get('text', '')}")
        return None
    try:
        docs = documents(rendered)
    except yaml.YAMLError as e:
        report.fail("rendered YAML parses without duplicate keys", str(e))
        return None
    kinds = sorted(name_of(d) for _, d in docs)
    report.ok(f"render: {len(docs)} manifests ({', '.join(kinds)})")
    for version in KUBE_VERSIONS:
        errors = [f"{p}: {name_of(d)}: {why}" for p, d in docs
                  if (why := validate_strict(d, version))]
        report.check(not errors, f"strict schema validation, Kubernetes {version}", "\n".join(errors))
    for what, ok, why in chart_properties(docs, values):
        report.check(ok, what, why)
    return rendered


def check_broken_file(report, path):
    rel = path.relative_to(ROOT)
    expect = None
    for line in path.read_text().splitlines():
        if line.startswith("# expect-error:"):
            expect = line.split(":", 1)[1].strip()
    if not expect:
        report.fail(str(rel), "has no '# expect-error: <text>' line")
        return
    values = load_values(path)
    try:
        with captured_stderr():
            render(values)
    except helm.HelmError as e:
        msg = str(e).strip()
        report.check(expect in msg, f"{rel} is refused: {msg.splitlines()[-1].strip()}",
                     f"refused, but the message lacks {expect!r}:\n{msg}")
        return
    report.fail(f"{rel} is refused", "it rendered without an error")


def check_validator_fails(report, rendered):
    """The validator is shown to fail: a misspelled field and a wrong type."""
    docs = documents(rendered)
    dep = next((d for _, d in docs if d["kind"] == "Deployment"), None)
    svc = next((d for _, d in docs if d["kind"] == "Service"), None)
    if not (dep and svc):
        report.fail("the validator can fail", "the render has no Deployment or no Service to spoil")
        return
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    why = validate_strict(typo, KUBE_VERSIONS[0])
    report.check(why is not None and "imagePullPolcy" in why,
                 f"a misspelled field (imagePullPolcy) fails validation: {why}",
                 f"validator said: {why}")
    wrong = copy.deepcopy(dep)
    wrong["spec"]["replicas"] = "one"
    why = validate_strict(wrong, KUBE_VERSIONS[0])
    report.check(why is not None and "replicas" in why,
                 f"a wrong type (replicas: \"one\") fails validation: {why}",
                 f"validator said: {why}")
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "m"},
               "spec": {"selector": {"matchLabels": {"a": "b"}},
                        "endpoints": [{"port": "http", "bearerTokenSecrett": {"name": "s", "key": "k"}}]}}
    why = validate_strict(monitor, KUBE_VERSIONS[0])
    report.check(why is not None and "bearerTokenSecrett" in why,
                 f"a misspelled ServiceMonitor field fails validation: {why}", f"validator said: {why}")
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "r"},
             "spec": {"parentRefs": [{"name": "g"}], "hostname": ["defuse.example.com"],
                      "rules": [{"backendRefs": [{"name": "s", "port": 8080}]}]}}
    why = validate_strict(route, KUBE_VERSIONS[0])
    report.check(why is not None and "hostname" in why,
                 f"a misspelled HTTPRoute field fails validation: {why}", f"validator said: {why}")
    typo = copy.deepcopy(svc)
    typo["spec"]["publishNotReadyAdresses"] = True
    why = validate_strict(typo, KUBE_VERSIONS[0])
    report.check(why is not None, f"a misspelled Service field fails validation: {why}",
                 f"validator said: {why}")


HEADER = """\
# Rendered from the Helm chart helm/defuse (template {template}) with
# helm/defuse/ci/cpu-values.yaml, release "{release}", namespace "{namespace}", by
# `python3 deploy/check-chart.py --write-manifests`; the test suite checks that these
# files equal a fresh render, so change the chart, not them. They carry that file's
# placeholders (image registry.example.com/defuse, the Secret's token and MinIO keys,
# the Redis and MinIO addresses, the PVC defuse-data): edit a copy, then
#   kubectl create namespace {namespace}; kubectl -n {namespace} apply -f <the copy>/
"""


def plain_manifests(rendered):
    """{file name: text} of deploy/k8s/, one file per chart template (no test hook)."""
    files = {}
    for path in sorted(rendered):
        if not path.endswith(".yaml") or "/templates/tests/" in path:
            continue
        body = rendered[path].strip()
        if not body:
            continue
        template = path.split("/templates/", 1)[1]
        head = HEADER.format(template=template, release=RELEASE, namespace=NAMESPACE)
        files[Path(template).name] = head + "---\n" + body + "\n"
    return files


def check_manifests(report, rendered, write):
    print(f"\n{MANIFESTS.relative_to(ROOT)}/ (plain manifests)")
    want = plain_manifests(rendered)
    if write:
        MANIFESTS.mkdir(parents=True, exist_ok=True)
        for old in MANIFESTS.glob("*.yaml"):
            if old.name not in want:
                old.unlink()
        for name, text in want.items():
            (MANIFESTS / name).write_text(text)
        report.ok(f"wrote {len(want)} files: {', '.join(sorted(want))}")
    have = {p.name: p.read_text() for p in MANIFESTS.glob("*.yaml")}
    stale = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
    report.check(not stale, f"{len(have)} files equal a fresh render of the chart (cpu-values)",
                 f"differ or missing: {', '.join(stale)}; run "
                 f"`python3 deploy/check-chart.py --write-manifests` and review the diff")
    errors = []
    for name, text in sorted(have.items()):
        for doc in yaml.load_all(text, Loader=StrictLoader):
            if doc:
                for version in KUBE_VERSIONS:
                    if why := validate_strict(doc, version):
                        errors.append(f"{name}: {name_of(doc)} (Kubernetes {version}): {why}")
    report.check(not errors, "they validate strictly", "\n".join(errors))


def _dockerfile_instructions(text):
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def _ignored(path, patterns):
    """Whether .dockerignore drops `path` (the simple patterns used there)."""
    import fnmatch
    parts = Path(path).parts
    for pat in patterns:
        pat = pat.strip("/")
        for i in range(1, len(parts) + 1):
            if fnmatch.fnmatch("/".join(parts[:i]), pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                return True
    return False


def check_container_files(report, rendered):
    """What can be checked of the images without a Docker engine."""
    print("\ndeploy/docker/ (read, not built: there is no Docker engine here)")
    docker = ROOT / "deploy" / "docker"
    setup = (ROOT / "deploy" / "setup.sh").read_text()
    libtorch = (docker / "libtorch.sh").read_text()
    import re
    pins = {}
    for name in ("TORCH_VERSION", "CUDART_VERSION", "CUPTI_VERSION"):
        a = re.search(rf"^{name}=(\S+)$", setup, re.M)
        b = re.search(rf"^{name}=(\S+)$", libtorch, re.M)
        pins[name] = (a and a.group(1), b and b.group(1))
    report.check(all(a and a == b for a, b in pins.values()),
                 "libtorch.sh pins the libtorch of deploy/setup.sh ("
                 + ", ".join(f"{k}={v[1]}" for k, v in pins.items()) + ")",
                 f"setup.sh vs libtorch.sh: {pins}")
    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    uid = str(load_values(CHART / "values.yaml")["podSecurityContext"]["runAsUser"])
    cargo_toml = (ROOT / "cli" / "Cargo.toml").read_text()
    for name, flavour in (("Dockerfile", "cpu"), ("Dockerfile.cuda", "cuda")):
        ins = _dockerfile_instructions((docker / name).read_text())
        args = {}
        problems = []
        for word, rest in ins:
            if word == "ARG" and "=" in rest:
                k, v = rest.split("=", 1)
                args[k] = v
            elif word == "FROM":
                image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), "?"), rest.split()[0])
                tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else None
                if not tag or tag == "latest":
                    problems.append(f"FROM {image}: no pinned tag")
            elif word == "COPY" and not rest.startswith("--from"):
                for src in rest.split()[:-1]:
                    if src.startswith("--"):
                        continue
                    if not (ROOT / src).exists():
                        problems.append(f"COPY {src}: no such path in the repository")
                    elif _ignored(src, ignore):
                        problems.append(f"COPY {src}: excluded by .dockerignore")
        runs = " ".join(r for w, r in ins if w == "RUN")
        if f"libtorch.sh /opt/libtorch {flavour}" not in runs:
            problems.append(f"does not install libtorch with `libtorch.sh /opt/libtorch {flavour}`")
        build = re.search(r"cargo build [^&]*", runs)
        if not build or "--locked" not in build.group(0) or "-p defuse" not in build.group(0):
            problems.append("no `cargo build --release --locked -p defuse`")
        elif (flavour == "cuda") != ("--features cuda" in build.group(0)):
            problems.append(f"{flavour} image {'without' if flavour == 'cuda' else 'with'} --features cuda")
        if ("USER", f"{uid}:{uid}") not in ins:
            problems.append(f"does not run as uid {uid} (the chart's podSecurityContext.runAsUser)")
        if ("ENTRYPOINT", '["defuse"]') not in ins:
            problems.append('ENTRYPOINT is not ["defuse"]')
        report.check(not problems, f"{name}: pinned bases, COPY sources in the context, libtorch "
                     f"{flavour}, cargo build --locked{' --features cuda' if flavour == 'cuda' else ''}, "
                     f"uid {uid}, ENTRYPOINT defuse", "\n".join(problems))
    has_feature = re.search(r"^\[features\][^\[]*^cuda\s*=", cargo_toml, re.M | re.S)
    report.check(bool(has_feature), "cli/Cargo.toml declares the feature `cuda` that Dockerfile.cuda builds with",
                 "no `cuda = [...]` under [features] in cli/Cargo.toml")

    # The chart passes flags and variables that the binary really reads.
    main_rs = (ROOT / "cli" / "src" / "main.rs").read_text()
    sources = "\n".join(p.read_text() for p in ROOT.glob("*/src/**/*.rs"))
    flags, names = set(), set()
    for _, d in documents(rendered):
        for _, spec, _ in pod_specs([(None, d)]):
            for c in spec["containers"]:
                if c["name"] not in ("coordinator", "worker", "submit"):
                    continue  # the test hook's curl
                flags |= {a.split("=", 1)[0] for a in c.get("args", []) if a.startswith("--")}
                names |= {e["name"] for e in c.get("env", [])}
        if d["kind"] == "ConfigMap" and not d["metadata"]["name"].endswith("-jobs"):
            names |= set(d["data"])
    missing = sorted(f for f in flags if not re.search(rf"\b{f[2:].replace('-', '_')}\b", main_rs))
    report.check(not missing, f"cli/src/main.rs has the flags the chart passes ({', '.join(sorted(flags))})",
                 f"not in cli/src/main.rs: {', '.join(missing)}")
    # AWS_* are read by the AWS SDK, RUST_LOG by tracing's EnvFilter
    ours = sorted(n for n in names if not n.startswith("AWS_") and n != "RUST_LOG")
    missing = sorted(n for n in ours if f'"{n}"' not in sources)
    report.check(not missing, f"the Rust sources read the variables the chart sets ({', '.join(ours)})",
                 f"no \"NAME\" in any */src/**/*.rs for: {', '.join(missing)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-manifests", action="store_true",
                    help="re-render deploy/k8s/ from the chart with ci/cpu-values.yaml")
    args = ap.parse_args()
    started = time.monotonic()
    print(f"check-chart: Helm SDK {helm.helm_sdk_version()} (helm-python-sdk), "
          f"kubernetes-validate {kv.__version__}, Kubernetes {' and '.join(KUBE_VERSIONS)}")
    report = Report()
    good = sorted(CI.glob("*.yaml"))
    if not good:
        report.fail("values files", f"none in {CI}")
    renders = {p.name: check_values_file(report, p) for p in good}

    print("\nvalues that must be refused (helm/defuse/ci/broken/)")
    broken = sorted((CI / "broken").glob("*.yaml"))
    report.check(bool(broken), f"{len(broken)} broken values files")
    for p in broken:
        check_broken_file(report, p)

    print("\nthe validator can fail")
    base = renders.get(MANIFEST_VALUES.name)
    if base:
        check_validator_fails(report, base)
        check_manifests(report, base, args.write_manifests)
        check_container_files(report, base)
    else:
        report.fail(MANIFEST_VALUES.name, "did not render; validator and manifest checks skipped")

    took = time.monotonic() - started
    print(f"\ncheck-chart: {report.passed} passed, {len(report.failed)} failed ({took:.1f} s)")
    if report.failed:
        print("failed:\n  " + "\n  ".join(report.failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

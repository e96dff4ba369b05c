"""Checks the deployment files under deploy/ and docker/ without a cloud or a cluster.

- Every Azure ML YAML under deploy/azureml names its $schema and loads with the official azure-ai-ml SDK's offline
  loader for that schema (load_online_endpoint / load_online_deployment / load_environment / load_model); the SDK
  rejects unknown or mistyped fields. Then the values that must agree across files and with amlserve are compared:
  routes and port, probe timings, request settings vs the engine's batch size and request timeout, names and
  versions that reference each other.
- Every Kubernetes manifest under deploy/kubernetes validates, strictly (unknown fields are errors), against the
  Kubernetes JSON schemas of the kubernetes-validate package, for the oldest supported and the newest version; the
  custom resources (KEDA ScaledObject, prometheus-operator ServiceMonitor), which that package has no schemas for,
  against the subset of their CRDs' schemas that the manifests use (CRD_SCHEMAS, strict too). Then probes, ports,
  grace periods, drain delay, token limit, selectors and the scaling setup are compared.
- No release identity is written into a file: no environment version, no image tag or digest in the YAMLs, and
  deploy.sh derives them from the commit (no `--version 1` / `--version 2`).
- A few facts of docker/Dockerfile that the manifests rely on (port, non-root user, exec-form entrypoint, OCI labels,
  no model needed to build it).

The metric names the scaling setup reads are printed as `scaling metric: NAME` lines; tests/deploy_manifests.rs
checks each against a real /metrics scrape.

Usage: python tests/python/deploy_manifests.py [REPO_ROOT]   (prints "deploy manifest checks passed")
"""

import copy
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from azure.ai.ml import load_environment, load_model, load_online_deployment, load_online_endpoint

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2])
AZ = ROOT / "deploy" / "azureml"
K8S = ROOT / "deploy" / "kubernetes"
SCHEMA_BASE = "https://azuremlschemas.azureedge.net/latest/"
LOADERS = {
    "managedOnlineEndpoint.schema.json": load_online_endpoint,
    "managedOnlineDeployment.schema.json": load_online_deployment,
    "environment.schema.json": load_environment,
    "model.schema.json": load_model,
}
# Kubernetes versions to validate against: the oldest with the preStop sleep action, and the newest the package has.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
PORT = 5001
SERVER_SHUTDOWN_GRACE_SECS = 30
GATEWAY_MAX_TIMEOUT_MS = 180000
# The slowest per-stream decode speed measured with SmolLM2 on 2 cores: 766 tok/s over a full batch of 16 streams
# (README "Performance"). AMLSERVE_MAX_TOKENS_LIMIT / this is the longest generation a deployment allows; it must fit
# the shutdown grace (streams finish at SIGTERM) and the request timeouts.
PER_STREAM_TOKENS_PER_SEC = 766 / 16
# amlserve's liveness path, and the readiness path every startup and readiness probe must use (GET / is 200 before
# the model is loaded, so a startup probe on it protects nothing).
LIVENESS_PATH = "/"
READINESS_PATH = "/health"

# The parts of the custom resources' CRD schemas (KEDA 2.x keda.sh_scaledobjects, prometheus-operator
# monitoring.coreos.com_servicemonitors) that deploy/kubernetes uses, written out from those CRDs, strict
# (additionalProperties: false) like kubernetes-validate's mode. A typo or a field of the wrong type fails here.


def _obj(props, required=()):
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_INT = {"type": "integer"}
_STR = {"type": "string"}
_METADATA = _obj({"name": _STR, "namespace": _STR, "labels": {"type": "object", "additionalProperties": _STR},
                  "annotations": {"type": "object", "additionalProperties": _STR}}, ["name"])
_HPA_RULES = _obj({"stabilizationWindowSeconds": _INT, "selectPolicy": _STR,
                   "policies": {"type": "array", "items": _obj({"type": {"enum": ["Pods", "Percent"]}, "value": _INT,
                                                                "periodSeconds": _INT},
                                                               ["type", "value", "periodSeconds"])}})
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): _obj({
        "apiVersion": _STR, "kind": _STR, "metadata": _METADATA,
        "spec": _obj({
            "scaleTargetRef": _obj({"apiVersion": _STR, "kind": _STR, "name": _STR, "envSourceContainerName": _STR},
                                   ["name"]),
            "pollingInterval": _INT, "cooldownPeriod": _INT, "idleReplicaCount": _INT,
            "minReplicaCount": _INT, "maxReplicaCount": _INT,
            "advanced": _obj({"restoreToOriginalReplicaCount": {"type": "boolean"},
                              "horizontalPodAutoscalerConfig": _obj({"name": _STR, "behavior": _obj(
                                  {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES})})}),
            "fallback": _obj({"failureThreshold": _INT, "replicas": _INT}, ["failureThreshold", "replicas"]),
            "triggers": {"type": "array", "minItems": 1, "items": _obj({
                "type": _STR, "name": _STR, "useCachedMetrics": {"type": "boolean"},
                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                # trigger metadata is a map of strings: an unquoted threshold (a YAML number) is refused by the CRD
                "metadata": {"type": "object", "additionalProperties": _STR},
                "authenticationRef": _obj({"name": _STR, "kind": _STR}, ["name"])}, ["type", "metadata"])},
        }, ["scaleTargetRef", "triggers"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _obj({
        "apiVersion": _STR, "kind": _STR, "metadata": _METADATA,
        "spec": _obj({
            "jobLabel": _STR,
            "selector": _obj({"matchLabels": {"type": "object", "additionalProperties": _STR},
                              "matchExpressions": {"type": "array"}}),
            "namespaceSelector": _obj({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}}),
            "endpoints": {"type": "array", "minItems": 1, "items": _obj({
                "port": _STR, "targetPort": {"type": ["string", "integer"]}, "path": _STR, "scheme": _STR,
                "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                "honorLabels": {"type": "boolean"}})},
        }, ["selector", "endpoints"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
}

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
    return cond


def load_azureml():
    loaded = {}
    files = sorted(AZ.glob("*.yml")) + sorted(AZ.glob("*.yaml"))
    check(len(files) >= 4, f"expected endpoint, deployment(s), environment and model YAMLs in {AZ}, found {files}")
    for f in files:
        raw = yaml.safe_load(f.read_text())
        schema = raw.get("$schema", "")
        if not check(schema.startswith(SCHEMA_BASE), f"{f.name}: $schema missing or not an Azure ML schema: {schema!r}"):
            continue
        loader = LOADERS.get(schema[len(SCHEMA_BASE):])
        if not check(loader is not None, f"{f.name}: no offline loader for {schema}"):
            continue
        try:
            entity = loader(source=f)
        except Exception as e:  # the SDK raises ValidationException / marshmallow errors
            why = " ".join(str(e).split())[:400]
            check(False, f"{f.name}: {loader.__name__} failed: {type(e).__name__}: {why}")
            continue
        loaded[f.name] = (raw, entity)
        print(f"ok  {f.relative_to(ROOT)}: {loader.__name__} -> {type(entity).__name__} {entity.name}")
    return loaded


def check_azureml(loaded):
    by_type = {}
    for name, (_, e) in loaded.items():
        by_type.setdefault(type(e).__name__, []).append((name, e))
    endpoints = by_type.get("ManagedOnlineEndpoint", [])
    deployments = by_type.get("ManagedOnlineDeployment", [])
    environments = by_type.get("Environment", [])
    models = by_type.get("Model", [])
    for kind, items in [("endpoint", endpoints), ("deployment", deployments), ("environment", environments),
                        ("model", models)]:
        check(items, f"no {kind} YAML loaded")
    check(len(deployments) == 1, f"one deployment template for every slot (deploy.sh names it), got {len(deployments)}")

    for name, env in environments:
        check(env.image and "amlserve" in env.image, f"{name}: image should be the amlserve image: {env.image}")
        ic = env.inference_config
        if not check(ic is not None, f"{name}: inference_config missing"):
            continue

        def route(k):
            r = getattr(ic, k, None)
            return {"port": getattr(r, "port", None), "path": getattr(r, "path", None)}

        routes = {k: route(k) for k in ("liveness_route", "readiness_route", "scoring_route")}
        check(routes["liveness_route"].get("path") == LIVENESS_PATH, f"{name}: liveness_route.path must be {LIVENESS_PATH}")
        check(routes["readiness_route"].get("path") == READINESS_PATH,
              f"{name}: readiness_route.path must be {READINESS_PATH}")
        check(routes["scoring_route"].get("path") == "/",
              f"{name}: scoring_route.path must be / so /score and /v1/* are both reachable")
        for r, v in routes.items():
            check(v.get("port") == PORT, f"{name}: {r}.port must be {PORT}, got {v.get('port')}")

    for name, env in environments:
        raw = loaded[name][0]
        check("version" not in raw, f"{name}: no version: deploy.sh registers one per release (the commit)")
        check("@sha256:" not in str(env.image), f"{name}: the image digest is the release's; deploy.sh sets it")
    endpoint_names = {e.name for _, e in endpoints}
    env_refs = {f"azureml:{e.name}@latest" for _, e in environments}
    model_refs = {f"azureml:{m.name}:{m.version}" for _, m in models}
    for name, m in models:
        check(m.type == "custom_model", f"{name}: a GGUF file is a custom_model, got {m.type}")
        check(str(m.path).endswith(".gguf"), f"{name}: path should be a .gguf file: {m.path}")

    for name, d in deployments:
        raw = loaded[name][0]
        check(d.endpoint_name in endpoint_names, f"{name}: endpoint_name {d.endpoint_name} is not {endpoint_names}")
        check(raw.get("environment") in env_refs,
              f"{name}: environment {raw.get('environment')} should be a placeholder, one of {env_refs}: a fixed "
              "version is a release identity (deploy.sh sets the release's)")
        check(raw.get("model") in model_refs, f"{name}: model {raw.get('model')} is not one of {model_refs}")
        check(d.instance_type and d.instance_count and d.instance_count >= 1, f"{name}: instance type and count")
        envs = d.environment_variables or {}
        if check(d.model_mount_path, f"{name}: set model_mount_path (a fixed folder for AMLSERVE_MODEL)"):
            check(envs.get("AMLSERVE_MODEL") == d.model_mount_path,
                  f"{name}: AMLSERVE_MODEL {envs.get('AMLSERVE_MODEL')} != model_mount_path {d.model_mount_path}")
        rs = d.request_settings
        if check(rs is not None, f"{name}: request_settings missing"):
            batch = int(envs.get("AMLSERVE_MAX_BATCH_SIZE", 16))
            check(rs.max_concurrent_requests_per_instance == batch,
                  f"{name}: max_concurrent_requests_per_instance {rs.max_concurrent_requests_per_instance} "
                  f"should equal the engine batch size {batch}")
            check(rs.request_timeout_ms and 60000 <= rs.request_timeout_ms <= GATEWAY_MAX_TIMEOUT_MS,
                  f"{name}: request_timeout_ms {rs.request_timeout_ms} should be sized for LLM latency (60..180 s)")
            server_ms = int(envs.get("AMLSERVE_REQUEST_TIMEOUT_MS", 3600000))
            check(server_ms < (rs.request_timeout_ms or 0),
                  f"{name}: AMLSERVE_REQUEST_TIMEOUT_MS {server_ms} must be below the gateway's "
                  f"{rs.request_timeout_ms} so amlserve cancels (and frees the KV cache) first")
        grace = int(envs.get("AMLSERVE_SHUTDOWN_GRACE_SECS", SERVER_SHUTDOWN_GRACE_SECS))
        check(grace == SERVER_SHUTDOWN_GRACE_SECS, f"{name}: shutdown grace should be {SERVER_SHUTDOWN_GRACE_SECS} s")
        check_token_limit(name, envs, grace, rs.request_timeout_ms if rs else None)
        for probe_name in ("liveness_probe", "readiness_probe"):
            p = getattr(d, probe_name)
            if not check(p is not None, f"{name}: {probe_name} missing"):
                continue
            check(p.timeout < p.period, f"{name}: {probe_name}.timeout must be below its period")
        if d.liveness_probe:
            p = d.liveness_probe
            window = p.initial_delay + p.period * p.failure_threshold
            check(window >= 60, f"{name}: liveness restarts after {window} s of failures; allow a minute")
        if d.readiness_probe:
            check_drain(name, envs, d.readiness_probe.period, d.readiness_probe.failure_threshold,
                        d.readiness_probe.timeout)


def check_token_limit(name, envs, grace, gateway_timeout_ms):
    """AMLSERVE_MAX_TOKENS_LIMIT bounds a generation; it must fit the grace and the request timeouts."""
    limit = envs.get("AMLSERVE_MAX_TOKENS_LIMIT")
    if not check(limit, f"{name}: set AMLSERVE_MAX_TOKENS_LIMIT so a generation always fits the timeouts"):
        return
    longest = int(limit) / PER_STREAM_TOKENS_PER_SEC
    check(longest <= grace, f"{name}: {limit} tokens take ~{longest:.0f} s at {PER_STREAM_TOKENS_PER_SEC:.0f} tok/s per "
                            f"stream, more than the {grace} s shutdown grace")
    server_ms = int(envs.get("AMLSERVE_REQUEST_TIMEOUT_MS", 3600000))
    for what, ms in (("AMLSERVE_REQUEST_TIMEOUT_MS", server_ms), ("request_timeout_ms", gateway_timeout_ms)):
        if ms is not None:
            check(longest * 1000 < ms, f"{name}: {limit} tokens take ~{longest:.0f} s, over {what} {ms} ms")


def check_drain(name, envs, period, failure_threshold, timeout):
    """The readiness probe must take the instance out of rotation within the drain delay."""
    delay = int(envs.get("AMLSERVE_DRAIN_DELAY_SECS", 0))
    out_after = period * failure_threshold + timeout
    check(delay > 0, f"{name}: set AMLSERVE_DRAIN_DELAY_SECS so new requests are served while rotation drops the instance")
    check(out_after < delay, f"{name}: readiness takes up to {out_after} s to fail ({failure_threshold} x {period} s "
                             f"+ {timeout} s), not within the {delay} s drain delay")


def load_k8s():
    docs = []
    files = sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            if doc.get("apiVersion", "").startswith("kustomize.config.k8s.io/"):
                listed = set(doc.get("resources", []))
                others = {g.name for g in files if g.name != f.name}
                check(listed == others, f"{f.name}: resources {sorted(listed)} != manifests {sorted(others)}")
                continue
            crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
            against = [f"CRD {doc.get('apiVersion')}"] if crd else K8S_VERSIONS
            for version in against:
                try:
                    if crd:
                        jsonschema.validate(doc, crd)
                    else:
                        kubernetes_validate.validate(doc, version, strict=True)
                except Exception as e:
                    # a jsonschema error: say where and what, not the whole schema
                    path = ".".join(map(str, getattr(e, "absolute_path", [])))
                    why = f"{path}: {e.message}" if hasattr(e, "message") else str(e)
                    check(False, f"{f.name} {doc.get('kind')}/{doc['metadata'].get('name')} against {version}: {why}")
            docs.append((f.name, doc))
            print(f"ok  {f.relative_to(ROOT)}: {doc['kind']}/{doc['metadata']['name']} valid for {against}")
    return docs


def check_k8s(docs):
    kinds = {d["kind"]: (n, d) for n, d in docs}
    needed = ("Deployment", "Service", "ScaledObject", "ServiceMonitor", "PodDisruptionBudget")
    for k in needed:
        check(k in kinds, f"no {k} manifest")
    if not set(needed) <= kinds.keys():
        return
    check("HorizontalPodAutoscaler" not in kinds, "an HPA beside the KEDA ScaledObject (which runs its own HPA)")
    _, dep = kinds["Deployment"]
    _, svc = kinds["Service"]
    _, so = kinds["ScaledObject"]
    _, sm = kinds["ServiceMonitor"]
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    check("replicas" not in dep["spec"], "Deployment sets replicas: the autoscaler owns the count (apply would reset it)")
    check(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "Deployment selector vs pod labels")
    check(svc["spec"]["selector"].items() <= labels.items(), "Service selector does not match the pods")
    spread = pod.get("topologySpreadConstraints", [])
    check({t.get("topologyKey") for t in spread} >= {"topology.kubernetes.io/zone", "kubernetes.io/hostname"},
          "spread the pods over zones and nodes (topologySpreadConstraints)")
    for t in spread:
        check(t.get("labelSelector", {}).get("matchLabels", {}).items() <= labels.items(),
              f"topology spread on {t.get('topologyKey')} does not select the pods")
    c = pod["containers"][0]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    check(PORT in ports.values(), f"container port {PORT} not declared: {ports}")
    for sp in svc["spec"]["ports"]:
        t = sp.get("targetPort")
        check(t in ports or t == PORT, f"Service targetPort {t} is not the container's port {ports}")

    def probe_path(p):
        return p and p.get("httpGet", {}).get("path")

    def probe_port_ok(p):
        port = p and p.get("httpGet", {}).get("port")
        return port in ports or port == PORT

    check(probe_path(c.get("livenessProbe")) == LIVENESS_PATH, f"livenessProbe must GET {LIVENESS_PATH}")
    check(probe_path(c.get("readinessProbe")) == READINESS_PATH, f"readinessProbe must GET {READINESS_PATH}")
    check(probe_path(c.get("startupProbe")) == READINESS_PATH,
          f"startupProbe must GET {READINESS_PATH}: {LIVENESS_PATH} is 200 before the model is loaded")
    for p in ("livenessProbe", "readinessProbe", "startupProbe"):
        if c.get(p):
            check(probe_port_ok(c[p]), f"{p} port is not the container port")
            check(c[p].get("timeoutSeconds", 1) < c[p].get("periodSeconds", 10), f"{p}: timeout >= period")
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    env_from = {e["name"]: e.get("valueFrom") for e in c.get("env", [])}
    key_ref = (env_from.get("AMLSERVE_API_KEY") or {}).get("secretKeyRef")
    check(key_ref and key_ref.get("name") and key_ref.get("key"),
          "AMLSERVE_API_KEY must come from a Secret (valueFrom.secretKeyRef), never a literal")
    if check(env.get("AMLSERVE_METRICS_PORT"), "set AMLSERVE_METRICS_PORT: the scaling metrics are scraped there"):
        # The metrics listener binds loopback unless AMLSERVE_METRICS_HOST says otherwise; Prometheus scrapes the pod IP.
        host = env.get("AMLSERVE_METRICS_HOST", "127.0.0.1")
        check(host not in ("127.0.0.1", "::1", "localhost"),
              f"AMLSERVE_METRICS_PORT is set but the metrics listener binds {host}: set AMLSERVE_METRICS_HOST=0.0.0.0 "
              "so Prometheus can scrape the pod IP")
        mport = int(env["AMLSERVE_METRICS_PORT"])
        check(mport in ports.values(), f"AMLSERVE_METRICS_PORT {mport} is not a declared container port: {ports}")
        metric_port_names = {n for n, v in ports.items() if v == mport}
        svc_metrics = [sp for sp in svc["spec"]["ports"] if sp.get("targetPort") in metric_port_names | {mport}]
        if check(svc_metrics, f"the Service has no port for the metrics port {mport}"):
            scraped = {e.get("port") for e in sm["spec"]["endpoints"]}
            check(scraped <= {sp.get("name") for sp in svc_metrics},
                  f"ServiceMonitor scrapes ports {scraped}, not the Service's metrics port")
    check(sm["spec"]["selector"].get("matchLabels", {}).items() <= svc["metadata"].get("labels", {}).items(),
          "ServiceMonitor selector does not match the Service's labels")
    grace = int(env.get("AMLSERVE_SHUTDOWN_GRACE_SECS", SERVER_SHUTDOWN_GRACE_SECS))
    drain = int(env.get("AMLSERVE_DRAIN_DELAY_SECS", 0))
    tgp = pod.get("terminationGracePeriodSeconds", 30)
    check(tgp > pre_stop + drain + grace,
          f"terminationGracePeriodSeconds {tgp} must exceed preStop {pre_stop} s + drain delay {drain} s "
          f"+ amlserve grace {grace} s")
    rp = c.get("readinessProbe", {})
    check_drain("deployment.yaml", env, rp.get("periodSeconds", 10), rp.get("failureThreshold", 3),
                rp.get("timeoutSeconds", 1))
    check_token_limit("deployment.yaml", env, grace, None)
    sec = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    check(sec.get("runAsNonRoot") is True, "pods should run as non-root")
    res = c.get("resources", {})
    check(res.get("requests", {}).get("cpu") and res.get("limits", {}).get("memory"),
          "cpu requests and a memory limit are required")
    ref = so["spec"]["scaleTargetRef"]
    check(ref.get("kind", "Deployment") == "Deployment" and ref["name"] == dep["metadata"]["name"],
          "ScaledObject does not target the Deployment")
    check(so["spec"].get("minReplicaCount", 0) >= 2, "ScaledObject minReplicaCount should keep 2 replicas")
    names = set()
    for t in so["spec"]["triggers"]:
        check(t["type"] == "prometheus", f"trigger {t.get('name')}: expected a prometheus trigger, got {t['type']}")
        query = t["metadata"].get("query", "")
        found = re.findall(r"\b(amlserve_[a-z_]+)\b", query)
        check(found, f"trigger {t.get('name')}: the query reads no amlserve metric: {query}")
        names.update(found)
        # The series carry the ServiceMonitor's `service` label: select on this Service's name.
        check(f'service="{svc["metadata"]["name"]}"' in query, f"trigger {t.get('name')}: select service= in {query}")
    check({"amlserve_num_requests_waiting", "amlserve_kv_cache_usage_perc"} <= names,
          f"scale on requests waiting and KV cache use, got {sorted(names)}")
    for n in sorted(names):
        print(f"scaling metric: {n}")


def check_release_identity():
    """Nothing under deploy/ names a release: versions and digests come from the commit at deploy time."""
    script = (AZ / "deploy.sh").read_text()
    code = "\n".join(l for l in script.splitlines() if not l.lstrip().startswith("#"))
    check(not re.search(r"--version\s+['\"]?\d", code), "deploy.sh passes a literal --version: derive it from the commit")
    check(not re.search(r"amlserve-cpu:\d", code), "deploy.sh names a literal environment version")
    check(re.search(r"rev-parse", code), "deploy.sh should derive the release from the commit (git rev-parse)")
    check(re.search(r'--version "\$rel"', code), "deploy.sh should register the environment under the release")
    check("@$digest" in code, "deploy.sh should reference the image by digest")
    for f in sorted(AZ.glob("*.yml")) + sorted(K8S.glob("*.yaml")):
        text = f.read_text()
        check(not re.search(r"@sha256:[0-9a-f]{8,}", text), f"{f.name}: a hard-coded image digest")
        check(not re.search(r"amlserve-cpu:\d", text), f"{f.name}: a hard-coded environment version")


def check_validators_bite():
    """The checks above are only worth something if the validators reject bad files: feed them one each."""
    bad = yaml.safe_load((K8S / "deployment.yaml").read_text())
    bad = copy.deepcopy(bad)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/"
    try:
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
        check(False, "kubernetes-validate accepted an unknown field (strict mode not working)")
    except kubernetes_validate.ValidationError:
        pass
    bad_so = yaml.safe_load((K8S / "scaledobject.yaml").read_text())
    bad_so["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # the CRD wants strings
    try:
        jsonschema.validate(bad_so, CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
        check(False, "the ScaledObject schema accepted a number as trigger metadata")
    except jsonschema.ValidationError:
        pass
    tmp = AZ / ".bad-deployment.yml.tmp"
    raw = yaml.safe_load((AZ / "deployment.yml").read_text())
    raw["request_settings"]["max_concurrent_requests_per_instance"] = "sixteen"
    tmp.write_text(yaml.safe_dump(raw))
    try:
        load_online_deployment(source=tmp)
        check(False, "load_online_deployment accepted a string for max_concurrent_requests_per_instance")
    except Exception:
        pass
    finally:
        tmp.unlink()


def check_dockerfile():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    final = text[text.rfind("\nFROM "):]  # the runtime stage
    check(re.search(rf"^EXPOSE {PORT}\b", final, re.M), f"Dockerfile: runtime stage must EXPOSE {PORT}")
    check(re.search(r'^ENTRYPOINT \["/', final, re.M), "Dockerfile: ENTRYPOINT must be exec form (SIGTERM reaches it)")
    user = re.findall(r"^USER (\S+)", final, re.M)
    check(user and not user[-1].startswith(("root", "0")), f"Dockerfile: runtime must run as non-root, USER {user}")
    uid = re.search(r"^ARG UID=(\d+)", final, re.M)
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    run_as = dep["spec"]["template"]["spec"]["securityContext"].get("runAsUser")
    check(uid and int(uid.group(1)) == run_as, f"Dockerfile UID {uid and uid.group(1)} != Kubernetes runAsUser {run_as}")
    check("org.opencontainers.image.revision" in final and "org.opencontainers.image.source" in final,
          "Dockerfile: the runtime stage should carry OCI labels (source, revision)")
    check(not re.search(r"^COPY\s+(--\S+\s+)*models/", text, re.M),
          "Dockerfile: copies a model: it must build from a fresh clone (bake models in Dockerfile.model)")
    for f in ("Dockerfile", "Dockerfile.cuda"):
        t = (ROOT / "docker" / f).read_text()
        for img in re.findall(r"^ARG \w+_IMAGE=(\S+)", t, re.M):
            check(":" in img and not img.endswith(":latest"), f"{f}: base image {img} must be pinned to a tag")


def main():
    loaded = load_azureml()
    check_azureml(loaded)
    check_k8s(load_k8s())
    check_release_identity()
    check_validators_bite()
    check_dockerfile()
    if failures:
        print("\n".join(["FAILED:"] + [f"  - {f}" for f in failures]))
        sys.exit(1)
    print("deploy manifest checks passed")


if __name__ == "__main__":
    main()

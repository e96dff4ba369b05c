"""Checks the deployment files under deploy/ and docker/ without a cloud or a cluster.

- Every Azure ML YAML under deploy/azureml names its $schema and loads with the official azure-ai-ml SDK's offline
  loader for that schema (load_online_endpoint / load_online_deployment / load_environment / load_model); the SDK
  rejects unknown or mistyped fields. Then the values that must agree across files and with amlserve are compared:
  routes and port, probe timings, request settings vs the engine's batch size and request timeout, names and
  versions that reference each other.
- Every Kubernetes manifest under deploy/kubernetes validates, strictly (unknown fields are errors), against the
  Kubernetes JSON schemas of the kubernetes-validate package, for the oldest supported and the newest version;
  then probes, ports, grace periods and selectors are compared.
- A few facts of docker/Dockerfile that the manifests rely on (port, non-root user, exec-form entrypoint).

Usage: python tests/python/deploy_manifests.py [REPO_ROOT]   (prints "deploy manifest checks passed")
"""

import copy
import re
import sys
from pathlib import Path

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

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
    return cond


def load_azureml():
    loaded = {}
    files = sorted(AZ.glob("*.yml")) + sorted(AZ.glob("*.yaml"))
    check(len(files) >= 5, f"expected endpoint, deployment(s), environment and model YAMLs in {AZ}, found {files}")
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
    check({e.name for _, e in deployments} >= {"blue", "green"}, "blue/green: need deployments named blue and green")

    for name, env in environments:
        check(env.image and "amlserve" in env.image, f"{name}: image should be the amlserve image: {env.image}")
        ic = env.inference_config
        if not check(ic is not None, f"{name}: inference_config missing"):
            continue

        def route(k):
            r = getattr(ic, k, None)
            return {"port": getattr(r, "port", None), "path": getattr(r, "path", None)}

        routes = {k: route(k) for k in ("liveness_route", "readiness_route", "scoring_route")}
        check(routes["liveness_route"].get("path") == "/", f"{name}: liveness_route.path must be / (200 once listening)")
        check(routes["readiness_route"].get("path") == "/health", f"{name}: readiness_route.path must be /health")
        check(routes["scoring_route"].get("path") == "/",
              f"{name}: scoring_route.path must be / so /score and /v1/* are both reachable")
        for r, v in routes.items():
            check(v.get("port") == PORT, f"{name}: {r}.port must be {PORT}, got {v.get('port')}")

    endpoint_names = {e.name for _, e in endpoints}
    env_refs = {f"azureml:{e.name}:" for _, e in environments}
    model_refs = {f"azureml:{m.name}:{m.version}" for _, m in models}
    for name, m in models:
        check(m.type == "custom_model", f"{name}: a GGUF file is a custom_model, got {m.type}")
        check(str(m.path).endswith(".gguf"), f"{name}: path should be a .gguf file: {m.path}")

    for name, d in deployments:
        raw = loaded[name][0]
        check(d.endpoint_name in endpoint_names, f"{name}: endpoint_name {d.endpoint_name} is not {endpoint_names}")
        check(any(str(raw.get("environment", "")).startswith(p) for p in env_refs),
              f"{name}: environment {raw.get('environment')} does not reference {env_refs}")
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
        check(int(envs.get("AMLSERVE_SHUTDOWN_GRACE_SECS", SERVER_SHUTDOWN_GRACE_SECS)) == SERVER_SHUTDOWN_GRACE_SECS,
              f"{name}: shutdown grace should be {SERVER_SHUTDOWN_GRACE_SECS} s")
        for probe_name in ("liveness_probe", "readiness_probe"):
            p = getattr(d, probe_name)
            if not check(p is not None, f"{name}: {probe_name} missing"):
                continue
            check(p.timeout < p.period, f"{name}: {probe_name}.timeout must be below its period")
            window = p.initial_delay + p.period * p.failure_threshold
            check(window >= 60, f"{name}: {probe_name} gives up after {window} s; the model needs time to load")
        if d.readiness_probe:
            check(d.readiness_probe.period <= 10, f"{name}: readiness period should be short to leave rotation fast")


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
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except Exception as e:
                    # a jsonschema error: say where and what, not the whole schema
                    path = ".".join(map(str, getattr(e, "absolute_path", [])))
                    why = f"{path}: {e.message}" if hasattr(e, "message") else str(e)
                    check(False, f"{f.name} {doc.get('kind')}/{doc['metadata'].get('name')} against {version}: {why}")
            docs.append((f.name, doc))
            print(f"ok  {f.relative_to(ROOT)}: {doc['kind']}/{doc['metadata']['name']} valid for {K8S_VERSIONS}")
    return docs


def check_k8s(docs):
    kinds = {d["kind"]: (n, d) for n, d in docs}
    for k in ("Deployment", "Service", "HorizontalPodAutoscaler"):
        check(k in kinds, f"no {k} manifest")
    if not {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds.keys():
        return
    _, dep = kinds["Deployment"]
    _, svc = kinds["Service"]
    _, hpa = kinds["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    check(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "Deployment selector vs pod labels")
    check(svc["spec"]["selector"].items() <= labels.items(), "Service selector does not match the pods")
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

    check(probe_path(c.get("livenessProbe")) == "/", "livenessProbe must GET /")
    check(probe_path(c.get("readinessProbe")) == "/health", "readinessProbe must GET /health")
    for p in ("livenessProbe", "readinessProbe", "startupProbe"):
        if c.get(p):
            check(probe_port_ok(c[p]), f"{p} port is not the container port")
            check(c[p].get("timeoutSeconds", 1) < c[p].get("periodSeconds", 10), f"{p}: timeout >= period")
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if env.get("AMLSERVE_METRICS_PORT"):
        # The metrics listener binds loopback unless AMLSERVE_METRICS_HOST says otherwise; Prometheus scrapes the pod IP.
        host = env.get("AMLSERVE_METRICS_HOST", "127.0.0.1")
        check(host not in ("127.0.0.1", "::1", "localhost"),
              f"AMLSERVE_METRICS_PORT is set but the metrics listener binds {host}: set AMLSERVE_METRICS_HOST=0.0.0.0 "
              "so Prometheus can scrape the pod IP")
        mport = int(env["AMLSERVE_METRICS_PORT"])
        check(mport in ports.values(), f"AMLSERVE_METRICS_PORT {mport} is not a declared container port: {ports}")
        annotated = dep["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/port")
        check(annotated is None or int(annotated) == mport,
              f"prometheus.io/port {annotated} is not AMLSERVE_METRICS_PORT {mport}")
    grace = int(env.get("AMLSERVE_SHUTDOWN_GRACE_SECS", SERVER_SHUTDOWN_GRACE_SECS))
    tgp = pod.get("terminationGracePeriodSeconds", 30)
    check(tgp > pre_stop + grace,
          f"terminationGracePeriodSeconds {tgp} must exceed preStop {pre_stop} s + amlserve grace {grace} s")
    sec = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    check(sec.get("runAsNonRoot") is True, "pods should run as non-root")
    res = c.get("resources", {})
    check(res.get("requests", {}).get("cpu") and res.get("limits", {}).get("memory"),
          "cpu requests (the HPA's denominator) and a memory limit are required")
    ref = hpa["spec"]["scaleTargetRef"]
    check(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"], "HPA does not target the Deployment")
    check(hpa["spec"].get("minReplicas", 1) >= 2, "HPA minReplicas should keep 2 replicas for availability")


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
    for f in ("Dockerfile", "Dockerfile.cuda"):
        t = (ROOT / "docker" / f).read_text()
        for img in re.findall(r"^ARG \w+_IMAGE=(\S+)", t, re.M):
            check(":" in img and not img.endswith(":latest"), f"{f}: base image {img} must be pinned to a tag")


def main():
    loaded = load_azureml()
    check_azureml(loaded)
    check_k8s(load_k8s())
    check_validators_bite()
    check_dockerfile()
    if failures:
        print("\n".join(["FAILED:"] + [f"  - {f}" for f in failures]))
        sys.exit(1)
    print("deploy manifest checks passed")


if __name__ == "__main__":
    main()

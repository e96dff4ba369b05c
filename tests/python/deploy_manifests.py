"""Checks the deployment files under deploy/ and docker/ without a cloud or a cluster.

- Every Azure ML YAML under deploy/azureml names its $schema and loads with the official azure-ai-ml SDK's offline
  loader for that schema (load_online_endpoint / load_online_deployment / load_environment / load_model); the SDK
  rejects unknown or mistyped fields. Then the values that must agree across files and with amlserve are compared:
  routes and port, probe timings, request settings vs the engine's batch size and request timeout, names and
  versions that reference each other.
- Every Kubernetes manifest under deploy/kubernetes/base validates, strictly (unknown fields are errors), against the
  Kubernetes JSON schemas of the kubernetes-validate package, for the oldest supported and the newest version; the
  custom resources (KEDA ScaledObject, prometheus-operator ServiceMonitor), which that package has no schemas for,
  against the subset of their CRDs' schemas that the manifests use (CRD_SCHEMAS, strict too). Then probes, ports,
  grace periods, drain delay, token limit, selectors and the scaling setup are compared.
- The GPU overlay (deploy/kubernetes/gpu) is rendered here, as kustomize renders it: its strategic merge patches are
  applied with the merge keys and strategies the Kubernetes schemas declare (x-kubernetes-patch-merge-key /
  -patch-strategy), its image override applied, and anything else in it refused. When `kustomize` or `kubectl` is on
  PATH, its own rendering must be the same objects. The rendered objects get every check the base gets, plus the
  GPU ones: CUDA image, AMLSERVE_DEVICE=cuda, one nvidia.com/gpu, a toleration and a node affinity for GPUs of the
  compute capability the image supports, the base's probes, KV cache and batch sized for the GPU.
- The GPU variant on Azure ML (environment-gpu.yml, deployment-gpu.yml): a SKU whose GPU the CUDA image supports,
  AMLSERVE_DEVICE=cuda, the CPU environment's routes and the CPU deployment's probe timings, batch = concurrency.
- No release identity is written into a file: no environment version, no image tag or digest in the YAMLs, and
  deploy.sh derives them from the commit (no `--version 1` / `--version 2`). deploy.sh is also run, for both
  variants, against a stand-in `az` that records its calls: the files, environment names, images (by digest) and
  release it passes must be the variant's.
- A few facts of docker/Dockerfile and docker/Dockerfile.cuda that the manifests rely on (port, non-root user, exec-form
  entrypoint, OCI labels, no model needed to build it).

- deploy/azureml/autoscale.sh, run through deploy.sh against the same stand-in: every rule reads one slot's metrics,
  the gateway's endpoint metrics by the names and dimensions Azure Monitor lists for online endpoints, or, with
  APP_INSIGHTS_ID, amlserve's queue depth as an Application Insights custom metric (azure.applicationinsights) on the
  `deployment` dimension deploy.sh gives the slot.

The metric names the scaling setup reads are printed as `scaling metric: NAME` lines (Kubernetes) and
`exported metric: NAME` lines (the Azure ML rules on Application Insights); tests/deploy_manifests.rs checks each
against a real /metrics scrape, and the latter against what amlserve exports.

Usage: python tests/python/deploy_manifests.py [REPO_ROOT]   (prints "deploy manifest checks passed")
"""

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from azure.ai.ml import load_environment, load_model, load_online_deployment, load_online_endpoint

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]).resolve()
AZ = ROOT / "deploy" / "azureml"
K8S_ROOT = ROOT / "deploy" / "kubernetes"
K8S = K8S_ROOT / "base"
K8S_GPU = K8S_ROOT / "gpu"
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
# The metrics of an online endpoint (Microsoft.MachineLearningServices/workspaces/onlineEndpoints) the autoscale rules
# may read, with their dimensions, as Azure Monitor's "Supported metrics" reference lists them.
ENDPOINT_METRICS = {
    "RequestLatency_P90": {"deployment"},
    "RequestsPerMinute": {"deployment", "statusCode", "statusCodeClass", "modelStatusCode"},
}
# The namespace of Application Insights custom metrics, the only one (with Standard) autoscale reads them from.
APP_INSIGHTS_NAMESPACE = "azure.applicationinsights"
# amlserve's liveness path, and the readiness path every startup and readiness probe must use (GET / is 200 before
# the model is loaded, so a startup probe on it protects nothing).
LIVENESS_PATH = "/"
READINESS_PATH = "/health"

# The two variants: which files each uses, and the image it runs. deploy.sh picks the same (checked by running it).
VARIANTS = {
    "cpu": {"environment": "environment.yml", "deployment": "deployment.yml", "dockerfile": "docker/Dockerfile",
            "env_name": "amlserve-cpu", "image_repo": "amlserve"},
    "gpu": {"environment": "environment-gpu.yml", "deployment": "deployment-gpu.yml",
            "dockerfile": "docker/Dockerfile.cuda", "env_name": "amlserve-cuda", "image_repo": "amlserve-cuda"},
}
# Single-GPU Azure VM sizes: GPU, compute capability, GPU memory (GB). The deployment's SKU must be one whose compute
# capability the CUDA image supports (its CUDA_COMPUTE_CAP: candle's kernels are PTX for that capability, which the
# driver compiles for newer GPUs and older ones cannot load). The older ones are listed so that the test says why.
GPU_SKUS = {
    "Standard_NC24ads_A100_v4": ("A100 80GB", 80, 80),
    "Standard_NC40ads_H100_v5": ("H100 NVL", 90, 94),
    "Standard_NV36ads_A10_v5": ("A10", 86, 24),
    "Standard_NC4as_T4_v3": ("T4", 75, 16),
    "Standard_NC8as_T4_v3": ("T4", 75, 16),
    "Standard_NC6s_v3": ("V100", 70, 16),
    "Standard_NC6": ("K80", 37, 12),
}
# The smallest GPU memory among the GPUs the image supports that a Kubernetes pod may land on (A10, L4: 24 GB): the
# overlay does not know which it gets.
K8S_MIN_GPU_GB = 24
# What the GPU was measured at (README "GPU": --max-batch-size 64 --max-batch-tokens 2048, 64 concurrent streams).
GPU_MEASURED_BATCH = 64
# SmolLM2-135M (the model both deployments serve): KV bytes per token in the bf16 cache (2 x 30 layers x 3 KV heads
# x 64 x 2 bytes) and its context length. A deployment's KV cache must hold a full batch of full-context sequences.
MODEL_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2
MODEL_CONTEXT = 8192
# GPU memory the process needs besides the KV cache (CUDA context, cuBLAS workspace, weights, activations): measured
# ~3,000 MiB on an H200 with SmolLM2, batch 64 and 2,048-token steps (19,379 MiB used with a 16 GiB cache); 4 GiB kept.
GPU_HEADROOM_MB = 4096

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
    # One template per variant for every slot (deploy.sh names the slot), each with its variant's environment.
    files = {v: (c["environment"], c["deployment"]) for v, c in VARIANTS.items()}
    check({n for n, _ in deployments} == {d for _, d in files.values()},
          f"one deployment template per variant {files}, got {[n for n, _ in deployments]}")
    check({n for n, _ in environments} == {e for e, _ in files.values()},
          f"one environment per variant {files}, got {[n for n, _ in environments]}")
    for variant, (env_file, dep_file) in files.items():
        if env_file in loaded and dep_file in loaded:
            env_name = loaded[env_file][1].name
            check(env_name == VARIANTS[variant]["env_name"],
                  f"{env_file}: environment name {env_name}, deploy.sh registers {VARIANTS[variant]['env_name']}")
            check(loaded[dep_file][0].get("environment") == f"azureml:{env_name}@latest",
                  f"{dep_file}: environment {loaded[dep_file][0].get('environment')} is not its variant's "
                  f"({env_file}: azureml:{env_name}@latest)")

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


def image_compute_cap():
    """The compute capability docker/Dockerfile.cuda builds candle's kernels for (ARG CUDA_COMPUTE_CAP), e.g. 80."""
    m = re.search(r"^ARG CUDA_COMPUTE_CAP=(\d+)", (ROOT / "docker" / "Dockerfile.cuda").read_text(), re.M)
    check(m, "docker/Dockerfile.cuda: no ARG CUDA_COMPUTE_CAP=<default>")
    return int(m.group(1)) if m else 80


def readme_gpu_skus():
    """The Azure SKUs README.md's GPU section names for the CUDA image."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## GPU\n(.*?)(?=^## )", text, re.M | re.S)
    check(m, "README.md has no '## GPU' section")
    return set(re.findall(r"\bStandard_\w+", m.group(1))) if m else set()


def check_kv_for_gpu(name, envs, gpu_gb):
    """The KV cache holds a full batch of full-context sequences and fits the GPU beside the rest of the process."""
    batch = int(envs.get("AMLSERVE_MAX_BATCH_SIZE", 16))
    kv_mb = int(envs.get("AMLSERVE_KV_CACHE_MB", 2048))
    need_mb = batch * MODEL_CONTEXT * MODEL_KV_BYTES_PER_TOKEN / 2**20
    check(kv_mb >= need_mb, f"{name}: AMLSERVE_KV_CACHE_MB {kv_mb} holds fewer than {batch} sequences of "
                            f"{MODEL_CONTEXT} tokens ({need_mb:.0f} MiB)")
    gpu_mb = gpu_gb * 10**9 / 2**20
    check(kv_mb + GPU_HEADROOM_MB <= gpu_mb, f"{name}: AMLSERVE_KV_CACHE_MB {kv_mb} + {GPU_HEADROOM_MB} MiB headroom "
                                             f"does not fit a {gpu_gb} GB GPU")
    tokens = int(envs.get("AMLSERVE_MAX_BATCH_TOKENS", 64))
    check(tokens >= batch, f"{name}: AMLSERVE_MAX_BATCH_TOKENS {tokens} below the batch size {batch}")
    prefix = int(envs.get("AMLSERVE_PREFIX_CACHE_MB", 256))
    check(prefix < kv_mb, f"{name}: AMLSERVE_PREFIX_CACHE_MB {prefix} is the whole KV budget {kv_mb}")


def check_gpu_azureml(loaded):
    """The GPU deployment: a SKU the CUDA image runs on, the GPU forced, the CPU variant's routes and probes."""
    gpu, cpu = VARIANTS["gpu"], VARIANTS["cpu"]
    if not all(check(f in loaded, f"{f} not loaded") for f in (gpu["deployment"], gpu["environment"],
                                                                 cpu["deployment"], cpu["environment"])):
        return
    name = gpu["deployment"]
    raw, d = loaded[name]
    envs = d.environment_variables or {}
    cap = image_compute_cap()
    sku = d.instance_type
    gpu_name, sku_cap, gpu_gb = GPU_SKUS.get(sku, (None, 0, 0))
    if check(gpu_name, f"{name}: instance_type {sku} is not a single-GPU SKU this test knows: {sorted(GPU_SKUS)}"):
        check(sku_cap >= cap, f"{name}: {sku} has a {gpu_name}, compute capability {sku_cap / 10}; the CUDA image "
                              f"needs {cap / 10} or newer (Dockerfile.cuda CUDA_COMPUTE_CAP={cap})")
        check_kv_for_gpu(name, envs, gpu_gb)
    check(sku in readme_gpu_skus(), f"{name}: {sku} is not among README.md's GPU SKUs {sorted(readme_gpu_skus())}")
    for s in readme_gpu_skus():
        check(GPU_SKUS.get(s, (None, 0))[1] >= cap, f"README.md GPU section names {s}, which the CUDA image cannot run")
    check(envs.get("AMLSERVE_DEVICE") == "cuda",
          f"{name}: AMLSERVE_DEVICE must be cuda (a GPU that cannot be opened fails the load, never falls back to the "
          f"CPU), got {envs.get('AMLSERVE_DEVICE')!r}")
    check(int(envs.get("AMLSERVE_MAX_BATCH_SIZE", 16)) == GPU_MEASURED_BATCH,
          f"{name}: AMLSERVE_MAX_BATCH_SIZE should be the measured {GPU_MEASURED_BATCH}")
    check(d.request_settings and d.request_settings.max_concurrent_requests_per_instance
          == int(envs.get("AMLSERVE_MAX_BATCH_SIZE", 16)),
          f"{name}: max_concurrent_requests_per_instance must equal AMLSERVE_MAX_BATCH_SIZE")
    cpu_raw = loaded[cpu["deployment"]][0]
    for probe in ("liveness_probe", "readiness_probe"):
        check(raw.get(probe) == cpu_raw.get(probe), f"{name}: {probe} {raw.get(probe)} differs from the CPU "
                                                    f"deployment's {cpu_raw.get(probe)}")
    for k in ("model", "model_mount_path", "endpoint_name"):
        check(raw.get(k) == cpu_raw.get(k), f"{name}: {k} differs from the CPU deployment's")
    gpu_env, cpu_env = loaded[gpu["environment"]][0], loaded[cpu["environment"]][0]
    check(gpu_env.get("inference_config") == cpu_env.get("inference_config"),
          f"{gpu['environment']}: inference_config differs from {cpu['environment']}'s (same server, same routes)")
    print(f"gpu sku: {sku} ({gpu_name}, compute capability {sku_cap / 10}, image needs {cap / 10}+)")


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
            against = validate_k8s_doc(f.name, doc)
            docs.append((f.name, doc))
            print(f"ok  {f.relative_to(ROOT)}: {doc['kind']}/{doc['metadata']['name']} valid for {against}")
    top = yaml.safe_load((K8S_ROOT / "kustomization.yaml").read_text())
    check(top.get("resources") == [K8S.name], f"deploy/kubernetes/kustomization.yaml should be the base as it is "
                                              f"(resources: [{K8S.name}]), got {top.get('resources')}")
    return docs


def validate_k8s_doc(where, doc):
    """Strict Kubernetes schema validation (both versions), or the CRD subset for KEDA / prometheus-operator."""
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
            check(False, f"{where} {doc.get('kind')}/{doc['metadata'].get('name')} against {version}: {why}")
    return against


def check_k8s(docs, label="deployment.yaml"):
    kinds = {d["kind"]: (n, d) for n, d in docs}
    needed = ("Deployment", "Service", "ScaledObject", "ServiceMonitor", "PodDisruptionBudget")
    for k in needed:
        check(k in kinds, f"{label}: no {k} manifest")
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
    check_drain(label, env, rp.get("periodSeconds", 10), rp.get("failureThreshold", 3),
                rp.get("timeoutSeconds", 1))
    check_token_limit(label, env, grace, None)
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
          f"{label}: scale on requests waiting and KV cache use, got {sorted(names)}")
    for n in sorted(names):
        print(f"scaling metric: {n}")


# ---- the Kubernetes overlay, rendered as kustomize renders it ------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}


class _Schemas:
    """The Kubernetes JSON schemas (kubernetes-validate's, newest version), for the strategic merge keys."""

    def __init__(self):
        base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSIONS[-1]}-local"
        self.base = base
        self.defs = json.loads((base / "_definitions.json").read_text())["$defs"]

    def top(self, doc):
        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
        f = self.base / f"{doc['kind'].lower()}-{api}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def resolve(self, schema):
        while schema and "$ref" in schema:
            schema = self.defs[schema["$ref"].rsplit("/", 1)[-1]]
        return schema or {}


def strategic_merge(base, patch, schema, schemas, where):
    """A strategic merge patch as kustomize applies one: maps merge key by key; a list whose schema says
    x-kubernetes-patch-strategy merge is merged element by element on its x-kubernetes-patch-merge-key (the patch's
    elements first, in the patch's order, then the base's others, as kustomize orders them); any other list and any
    scalar is replaced. Directives ($patch, $retainKeys, ...) are refused rather than ignored."""
    schema = schemas.resolve(schema)
    if isinstance(patch, dict) and isinstance(base, dict):
        out = dict(base)
        for k, v in patch.items():
            if k.startswith("$"):
                raise ValueError(f"{where}: patch directive {k} is not supported by this renderer")
            sub = schema.get("properties", {}).get(k) or schema.get("additionalProperties")
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, sub if isinstance(sub, dict) else {}, schemas, f"{where}.{k}")
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list):
        key = schema.get("x-kubernetes-patch-merge-key")
        if key and "merge" in schema.get("x-kubernetes-patch-strategy", "").split(","):
            if "retainKeys" in schema.get("x-kubernetes-patch-strategy", ""):
                raise ValueError(f"{where}: retainKeys lists (volumes) are not supported by this renderer")
            items = schema.get("items", {})
            by_key = {b.get(key): b for b in base}
            merged = [strategic_merge(by_key[p[key]], p, items, schemas, f"{where}[{p[key]}]") if p.get(key) in by_key
                      else copy.deepcopy(p) for p in patch]
            patched = {p.get(key) for p in patch}
            return merged + [copy.deepcopy(b) for b in base if b.get(key) not in patched]
    return copy.deepcopy(patch)


def set_image(image, override):
    """kustomize's `images:` transformer for one image reference."""
    name = re.sub(r"@.*$", "", image)
    name = re.sub(r":[^/:]*$", "", name)
    if name != override["name"]:
        return image
    new = override.get("newName", name)
    if override.get("digest"):
        return f"{new}@{override['digest']}"
    if override.get("newTag"):
        return f"{new}:{override['newTag']}"
    return new + image[len(name):]


def render_kustomization(folder, schemas):
    """The objects `kustomize build folder` makes, for the features deploy/kubernetes uses (resources: files and
    folders; images; patches: strategic merge patch files). Anything else is an error, never skipped."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml: {sorted(unknown)} not supported by this renderer")
    docs = []
    for r in k.get("resources", []):
        path = (folder / r).resolve()
        if path.is_dir():
            docs += render_kustomization(path, schemas)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for p in k.get("patches", []):
        if set(p) != {"path"}:
            raise ValueError(f"{folder}: patch {p}: only `path:` strategic merge patches are supported")
        patch_file = folder / p["path"]
        for patch in yaml.safe_load_all(patch_file.read_text()):
            ident = (patch["apiVersion"], patch["kind"], patch["metadata"]["name"])
            targets = [i for i, d in enumerate(docs) if (d["apiVersion"], d["kind"], d["metadata"]["name"]) == ident]
            if len(targets) != 1:
                raise ValueError(f"{patch_file}: {ident} matches {len(targets)} objects")
            i = targets[0]
            docs[i] = strategic_merge(docs[i], patch, schemas.top(docs[i]) or {}, schemas, patch["kind"])
            print(f"ok  {patch_file.relative_to(ROOT)}: patch applied to {patch['kind']}/{patch['metadata']['name']}")
    for override in k.get("images", []):
        for d in docs:
            pod = d.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                c["image"] = set_image(c["image"], override)
    return docs


def kustomize_build(folder):
    """`kustomize build` (or `kubectl kustomize`) of folder, when either is installed; (tool, docs) or (None, None)."""
    for cmd in (["kustomize", "build"], ["kubectl", "kustomize"]):
        if shutil.which(cmd[0]):
            out = subprocess.run(cmd + [str(folder)], capture_output=True, text=True, timeout=120)
            if not check(out.returncode == 0, f"{' '.join(cmd)} {folder} failed: {out.stderr.strip()[:400]}"):
                return " ".join(cmd), []
            return " ".join(cmd), [d for d in yaml.safe_load_all(out.stdout) if d]
    return None, None


def render_overlay(folder):
    """Renders an overlay, cross-checks it against kustomize when available, validates every object like the base's
    files, and returns them."""
    schemas = _Schemas()
    try:
        docs = render_kustomization(folder, schemas)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        check(False, f"{folder.relative_to(ROOT)}: cannot render: {e}")
        return []
    tool, theirs = kustomize_build(folder)
    ident = lambda d: (d["apiVersion"], d["kind"], d["metadata"]["name"])  # noqa: E731
    if tool is None:
        print(f"kustomize: neither kustomize nor kubectl is installed; {folder.relative_to(ROOT)} was rendered by "
              "this test's strategic merge alone")
    elif theirs:
        mine = {ident(d): d for d in docs}
        other = {ident(d): d for d in theirs}
        check(mine.keys() == other.keys(), f"{tool}: objects {sorted(other)} != rendered {sorted(mine)}")
        for i in mine.keys() & other.keys():
            check(mine[i] == other[i], f"{tool} renders {i} differently:\n{yaml.safe_dump(other[i])}\n"
                                       f"this test:\n{yaml.safe_dump(mine[i])}")
        print(f"kustomize: `{tool}` renders the same {len(other)} objects")
    for doc in docs:
        validate_k8s_doc(f"{folder.relative_to(ROOT)} (rendered)", doc)
    print(f"ok  {folder.relative_to(ROOT)}: overlay rendered, {len(docs)} objects validated")
    return docs


def check_gpu_k8s(gpu_docs, cpu_docs):
    """The GPU overlay: CUDA image, the GPU forced and requested, scheduled only on GPUs the image supports, sized
    for the GPU; everything else as on CPU."""
    gpu = {d["kind"]: d for d in gpu_docs}
    cpu = {d["kind"]: d for d in cpu_docs}
    if not check("Deployment" in gpu and "Deployment" in cpu, "no Deployment in the GPU overlay or the base"):
        return
    for kind in cpu:
        if kind != "Deployment":
            check(gpu.get(kind) == cpu[kind], f"gpu overlay: {kind} differs from the base's (only the Deployment "
                                              "should change; the ScaledObject, Service, monitor and PDB apply as they are)")
    pod = gpu["Deployment"]["spec"]["template"]["spec"]
    cpu_pod = cpu["Deployment"]["spec"]["template"]["spec"]
    c, cpu_c = pod["containers"][0], cpu_pod["containers"][0]
    check("cuda" in c["image"] and c["image"] != cpu_c["image"],
          f"gpu overlay: image {c['image']} should be the CUDA image, not the base's {cpu_c['image']}")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    check(env.get("AMLSERVE_DEVICE") == "cuda", f"gpu overlay: AMLSERVE_DEVICE must be cuda, got {env.get('AMLSERVE_DEVICE')!r}")
    check(int(env.get("AMLSERVE_MAX_BATCH_SIZE", 16)) == GPU_MEASURED_BATCH,
          f"gpu overlay: AMLSERVE_MAX_BATCH_SIZE should be the measured {GPU_MEASURED_BATCH}")
    check_kv_for_gpu("gpu overlay", env, K8S_MIN_GPU_GB)
    res = c.get("resources", {})
    check(str(res.get("limits", {}).get("nvidia.com/gpu")) == "1",
          f"gpu overlay: resources.limits[nvidia.com/gpu] must be 1, got {res.get('limits', {}).get('nvidia.com/gpu')!r}")
    check(str(res.get("requests", {}).get("nvidia.com/gpu", "1")) == "1",
          "gpu overlay: a GPU request other than the limit (extended resources cannot be overcommitted)")
    check(any(t.get("key") == "nvidia.com/gpu" and t.get("operator") == "Exists" and t.get("effect") in (None, "NoSchedule")
              for t in pod.get("tolerations", [])),
          f"gpu overlay: no toleration for the nvidia.com/gpu taint: {pod.get('tolerations')}")
    terms = (pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
             .get("nodeSelectorTerms", []))
    cap = image_compute_cap()
    check(terms, "gpu overlay: no required node affinity for GPU nodes")
    for t in terms:  # terms are ORed: each must keep the pod on a GPU node the image supports
        exprs = {e["key"]: e for e in t.get("matchExpressions", [])}
        present = exprs.get("nvidia.com/gpu.present", {})
        check(present.get("operator") == "In" and present.get("values") == ["true"],
              f"gpu overlay: a node affinity term without nvidia.com/gpu.present In [true]: {t}")
        major = exprs.get("nvidia.com/gpu.compute.major", {})
        check(major.get("operator") == "Gt" and int(major.get("values", ["-1"])[0]) + 1 >= cap // 10,
              f"gpu overlay: a node affinity term that admits GPUs below compute capability {cap / 10}: {t}")
    for p in ("livenessProbe", "readinessProbe", "startupProbe"):
        check(c.get(p) == cpu_c.get(p), f"gpu overlay: {p} differs from the base's")
    for k in ("terminationGracePeriodSeconds", "securityContext", "topologySpreadConstraints"):
        check(pod.get(k) == cpu_pod.get(k), f"gpu overlay: {k} differs from the base's")
    cpu_env = {e["name"]: e for e in cpu_c.get("env", [])}
    for n in ("AMLSERVE_API_KEY", "AMLSERVE_DRAIN_DELAY_SECS", "AMLSERVE_SHUTDOWN_GRACE_SECS", "AMLSERVE_MAX_TOKENS_LIMIT",
              "AMLSERVE_METRICS_PORT", "AMLSERVE_METRICS_HOST"):
        check(any(e == cpu_env.get(n) for e in c.get("env", [])), f"gpu overlay: {n} lost or changed by the patch")


def check_release_identity():
    """Nothing under deploy/ names a release: versions and digests come from the commit at deploy time."""
    script = (AZ / "deploy.sh").read_text()
    code = "\n".join(l for l in script.splitlines() if not l.lstrip().startswith("#"))
    check(not re.search(r"--version\s+['\"]?\d", code), "deploy.sh passes a literal --version: derive it from the commit")
    check(not re.search(r"amlserve-(cpu|cuda):\d", code), "deploy.sh names a literal environment version")
    check(re.search(r"rev-parse", code), "deploy.sh should derive the release from the commit (git rev-parse)")
    check(re.search(r'--version "\$rel"', code), "deploy.sh should register the environment under the release")
    check("@$digest" in code, "deploy.sh should reference the image by digest")
    for f in sorted(AZ.glob("*.yml")) + sorted(K8S_ROOT.glob("**/*.yaml")):
        text = f.read_text()
        check(not re.search(r"@sha256:[0-9a-f]{8,}", text), f"{f.name}: a hard-coded image digest")
        check(not re.search(r"amlserve-(cpu|cuda):\d", text), f"{f.name}: a hard-coded environment version")
    check_deploy_script()


# What the stand-in az answers for an Application Insights resource's connection string.
STUB_CONNECTION_STRING = "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=https://stub.invalid/"
STUB_AZ = f"STUB_CONNECTION_STRING = {STUB_CONNECTION_STRING!r}\n" + r'''
import hashlib, json, os, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\n")
if os.path.basename(sys.argv[0]) != "az":
    sys.exit(0)
line = " ".join(args)
query = args[args.index("--query") + 1] if "--query" in args else ""
def out(s):
    print(s)
    sys.exit(0)
if line.startswith("ml workspace show"):
    out("/subscriptions/s/resourceGroups/rg/providers/Microsoft.ContainerRegistry/registries/stubacr")
if line.startswith("acr repository show"):
    out("sha256:" + hashlib.sha256(args[args.index("--image") + 1].encode()).hexdigest())
if line.startswith("ml environment show"):
    sys.exit(1)  # not registered yet
if line.startswith("resource show"):
    out({"properties.ConnectionString": STUB_CONNECTION_STRING}.get(query, ""))
if line.startswith("ml online-deployment show"):
    if query == "instance_count":
        out("2")
    if query.startswith("environment_variables."):
        out(os.environ.get("STUB_EXPORTS", "False"))  # does the slot export its metrics?
    sys.exit(0 if args[args.index("--name") + 1] == "blue" else 1)  # blue exists, green does not
if line.startswith("ml online-endpoint show"):
    out({"scoring_uri": "https://stub.invalid/score", "tags.live": "blue", "id": "/subscriptions/s/ep"}.get(query, ""))
if line.startswith("ml online-endpoint get-credentials"):
    out("stub-key")
sys.exit(0)
'''


def run_deploy_script(*args, env=None):
    """Runs deploy.sh with a stand-in `az` (and `curl`) that records every call; returns (exit code, calls, stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "calls.jsonl"
        for tool in ("az", "curl"):
            stub = Path(tmp) / tool
            stub.write_text(f"#!{sys.executable}\n" + STUB_AZ)
            stub.chmod(0o755)
        e = {"PATH": f"{tmp}:{os.environ['PATH']}", "HOME": tmp, "STUB_LOG": str(log), "RESOURCE_GROUP": "rg",
             "WORKSPACE": "ws", "ENDPOINT_NAME": "ep", **(env or {})}
        r = subprocess.run(["bash", str(AZ / "deploy.sh"), *args], env=e, capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return r.returncode, calls, r.stderr


def call_with(calls, *words):
    """The az calls that contain every word (in order, as a command prefix for the first ones)."""
    return [c for c in calls if c[0] == "az" and all(w in c for w in words)]


def flag(call, name):
    """Every value passed to --name in one recorded call."""
    return [call[i + 1] for i, a in enumerate(call) if a == name and i + 1 < len(call)]


def check_deploy_script():
    """deploy.sh, run against a stand-in az: each variant releases its own files, names and image, by digest, under
    the commit; only the variant flag differs between the two paths."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    rel = "0123456789ab"
    digest = lambda image: "sha256:" + hashlib.sha256(image.encode()).hexdigest()  # noqa: E731 (the stub's)
    for variant, how in (("cpu", ([], {})), ("gpu", (["--gpu"], {})), ("gpu", ([], {"AMLSERVE_VARIANT": "gpu"}))):
        v = VARIANTS[variant]
        args, extra = how
        label = f"deploy.sh {' '.join(args + ['...'])} {' '.join(f'{k}={x}' for k, x in extra.items())}".strip()
        if head.returncode == 0:
            code, calls, err = run_deploy_script(*args, "image", env={**extra, "ALLOW_DIRTY": "1"})
            build = call_with(calls, "acr", "build")
            if check(code == 0 and len(build) == 1, f"{label} image: exit {code}, builds {build}: {err[-400:]}"):
                b = build[0]
                tag = head.stdout.strip()
                check(flag(b, "--image") == [f"{v['image_repo']}:{tag}"] and flag(b, "--file") == [str(ROOT / v["dockerfile"])],
                      f"{label} image: expected {v['dockerfile']} as {v['image_repo']}:{tag} (the commit), got {b}")
                check(f"VCS_REF={subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()}"
                      in flag(b, "--build-arg"), f"{label} image: the image should carry the commit (VCS_REF)")
        code, calls, err = run_deploy_script(*args, "create", env={**extra, "RELEASE": rel})
        envs, deps = call_with(calls, "environment", "create"), call_with(calls, "online-deployment", "create")
        if check(code == 0 and len(envs) == 1 and len(deps) == 1, f"{label} create: exit {code}, {calls}: {err[-400:]}"):
            image = f"stubacr.azurecr.io/{v['image_repo']}@{digest(v['image_repo'] + ':' + rel)}"
            check(flag(envs[0], "--file") == [str(AZ / v["environment"])] and flag(envs[0], "--version") == [rel]
                  and flag(envs[0], "--set") == [f"image={image}"],
                  f"{label} create: environment should be {v['environment']} version {rel} with {image}: {envs[0]}")
            check(flag(deps[0], "--file") == [str(AZ / v["deployment"])] and flag(deps[0], "--name") == ["blue"]
                  and f"environment=azureml:{v['env_name']}:{rel}" in flag(deps[0], "--set"),
                  f"{label} create: deployment should be {v['deployment']} on blue with {v['env_name']}:{rel}: {deps[0]}")
    # A release onto the free slot, the variant flag after the step, another GPU SKU from the environment.
    code, calls, err = run_deploy_script("release", "--gpu", env={"RELEASE": rel,
                                                                  "INSTANCE_TYPE": "Standard_NC40ads_H100_v5"})
    deps = call_with(calls, "online-deployment", "create")
    if check(code == 0 and len(deps) == 1, f"deploy.sh release --gpu: exit {code}, {calls}: {err[-400:]}"):
        sets = flag(deps[0], "--set")
        check(flag(deps[0], "--name") == ["green"] and flag(deps[0], "--file") == [str(AZ / "deployment-gpu.yml")]
              and {"environment=azureml:amlserve-cuda:" + rel, "instance_type=Standard_NC40ads_H100_v5",
                   "instance_count=1"} <= set(sets),
              f"deploy.sh release --gpu: expected deployment-gpu.yml on green, 1 instance, the H100 SKU: {deps[0]}")
    code, calls, err = run_deploy_script("image", env={"AMLSERVE_VARIANT": "tpu", "RELEASE": rel})
    check(code != 0 and not call_with(calls, "acr", "build") and "cpu or gpu" in err,
          f"deploy.sh with AMLSERVE_VARIANT=tpu should refuse before doing anything: exit {code}, {calls}, {err}")
    print("ok  deploy/azureml/deploy.sh: image, create and release of both variants against a stand-in az")


def autoscale_rules(calls):
    """The autoscale rules created, as (source resource, namespace, metric, operator, aggregation, period, dimensions,
    direction): what az reads from --resource and --condition ("[\"NAMESPACE\"] METRIC OP THRESHOLD AGG PERIOD
    [where DIM == VALUE [and ...]]")."""
    rules = []
    for c in call_with(calls, "monitor", "autoscale", "rule", "create"):
        cond = " ".join(flag(c, "--condition"))
        m = re.fullmatch(r'(?:"([^"]+)" )?(\S+) (==|!=|>=|<=|>|<) (\S+) (avg|min|max|total|count) (\S+)(?: where (.*))?', cond)
        if not check(m, f"autoscale.sh: a condition az cannot read: {cond!r}"):
            continue
        ns, metric, op, threshold, agg, period, where = m.groups()
        dims = dict(d.split(" == ") for d in where.split(" and ")) if where else {}
        by_name = any(a in c for a in ("--resource-namespace", "--resource-type"))
        rules.append({"resource": flag(c, "--resource"), "namespace": ns, "metric": metric, "op": op,
                      "threshold": float(threshold), "agg": agg, "period": period, "dims": dims,
                      "scale": flag(c, "--scale"), "by_name": by_name})
    return rules


def check_autoscale_script():
    """autoscale.sh (through deploy.sh autoscale), against the stand-in az: every rule reads one slot's metrics; without
    APP_INSIGHTS_ID the gateway's (names and dimensions the endpoint has), with it amlserve's queue depth from
    Application Insights (the custom-metric namespace, the same `deployment` dimension deploy.sh gives the slot)
    beside the gateway's 429s and latency; a slot that does not export keeps the gateway's rules. Prints the amlserve
    metrics the rules read as `exported metric: NAME`."""
    ai_id = "/subscriptions/s/resourceGroups/rg/providers/microsoft.insights/components/ai"
    cases = {"gateway": {}, "app insights": {"APP_INSIGHTS_ID": ai_id, "STUB_EXPORTS": "True"},
             "not exporting": {"APP_INSIGHTS_ID": ai_id, "STUB_EXPORTS": "False"}}
    exported = set()
    for case, env in cases.items():
        code, calls, err = run_deploy_script("autoscale", "blue", env=env)
        label = f"deploy.sh autoscale ({case})"
        if not check(code == 0, f"{label}: exit {code}: {err[-400:]}"):
            continue
        rules = autoscale_rules(calls)
        outs = [r for r in rules if r["scale"][:1] == ["out"]]
        ins = [r for r in rules if r["scale"][:1] == ["in"]]
        check(outs and ins, f"{label}: scale-out and scale-in rules, got {rules}")
        for r in rules:
            check(r["dims"].get("deployment") == "blue", f"{label}: a rule not filtered on deployment == blue: {r}")
            check(not r["by_name"], f"{label}: --resource-namespace/--resource-type beside a resource id: az refuses it")
            if r["namespace"] is None:
                known = ENDPOINT_METRICS.get(r["metric"])
                check(known is not None and set(r["dims"]) <= known and r["resource"] == ["/subscriptions/s/ep"],
                      f"{label}: {r['metric']} {sorted(r['dims'])} is not an endpoint metric/dimension the docs list")
            else:
                check(r["namespace"] == APP_INSIGHTS_NAMESPACE and r["resource"] == [ai_id],
                      f"{label}: a custom metric must be read from {APP_INSIGHTS_NAMESPACE} on APP_INSIGHTS_ID: {r}")
                exported.add(r["metric"])
        queue = [r for r in rules if r["metric"] == "amlserve_num_requests_waiting"]
        if case == "app insights":
            check({(r["scale"][0], r["op"], r["threshold"], r["agg"], r["period"]) for r in queue}
                  == {("out", ">", 4.0, "avg", "5m"), ("in", "<", 1.0, "avg", "15m")},
                  f"{label}: out on waiting > 4 avg 5m, in on waiting < 1 avg 15m, got {queue}")
            check(any(r["metric"] == "RequestLatency_P90" for r in ins),
                  f"{label}: the latency rule must stay beside the queue for scale-in (all in-rules must hold)")
        else:
            check(not queue, f"{label}: reads amlserve's queue, which this slot does not export: {queue}")
        check(any(r["dims"].get("statusCode") == "429" for r in outs), f"{label}: the gateway's 429s must scale out")
        if case == "not exporting":
            check("does not export" in err, f"{label}: say why the gateway's metrics drive the rules: {err}")
    code, calls, err = run_deploy_script("autoscale", env={"APP_INSIGHTS_ID": "ai"})
    check(code != 0 and not autoscale_rules(calls) and "resource id" in err,
          f"deploy.sh autoscale with APP_INSIGHTS_ID=ai (a name) should refuse: exit {code}: {err[-300:]}")
    # The slot deploy.sh creates exports to APP_INSIGHTS_ID under the dimension the rules filter on.
    for env, want_cs in (({"RELEASE": "0123456789ab"}, False),
                         ({"RELEASE": "0123456789ab", "APP_INSIGHTS_ID": ai_id}, True)):
        code, calls, err = run_deploy_script("release", env=env)
        deps = call_with(calls, "online-deployment", "create")
        if check(code == 0 and len(deps) == 1, f"deploy.sh release {env}: exit {code}: {err[-400:]}"):
            sets = flag(deps[0], "--set")
            check("environment_variables.OTEL_RESOURCE_ATTRIBUTES=deployment=green" in sets,
                  f"deploy.sh release: the slot should be its `deployment` resource attribute: {sets}")
            cs = f"environment_variables.APPLICATIONINSIGHTS_CONNECTION_STRING={STUB_CONNECTION_STRING}"
            check((cs in sets) == want_cs, f"deploy.sh release {env}: connection string set: {cs in sets}, want {want_cs}")
            check(STUB_CONNECTION_STRING not in err, "deploy.sh printed the connection string")
    for n in sorted(exported):
        print(f"exported metric: {n}")
    print("ok  deploy/azureml/autoscale.sh: per-slot rules, gateway and Application Insights, against a stand-in az")


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
    # The overlay renderer merges lists by their schema's merge key and replaces the others, as kustomize does (the
    # comparison with kustomize's own output runs only where kustomize or kubectl is installed), and refuses what it
    # does not implement rather than dropping it.
    schemas = _Schemas()
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {"spec": {
        "tolerations": [{"key": "a", "operator": "Exists"}],
        "containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}]}}}}
    patch = {"spec": {"template": {"spec": {"tolerations": [{"key": "b", "operator": "Exists"}],
                                            "containers": [{"name": "c", "env": [{"name": "B", "value": "3"},
                                                                                 {"name": "C", "value": "4"}]}]}}}}
    out = strategic_merge(dep, patch, schemas.top(dep), schemas, "test")["spec"]["template"]["spec"]
    check(out["containers"][0]["env"] == [{"name": "B", "value": "3"}, {"name": "C", "value": "4"},
                                         {"name": "A", "value": "1"}] and out["containers"][0]["image"] == "i",
          f"strategic merge: env should merge by name, got {out['containers']}")
    check(out["tolerations"] == [{"key": "b", "operator": "Exists"}],
          f"strategic merge: tolerations (no merge key) should be replaced, got {out['tolerations']}")
    try:
        strategic_merge(dep, {"spec": {"$patch": "delete"}}, schemas.top(dep), schemas, "test")
        check(False, "strategic merge: a $patch directive was ignored instead of refused")
    except ValueError:
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
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    run_as = dep["spec"]["template"]["spec"]["securityContext"].get("runAsUser")
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "docker" / name).read_text()
        final = text[text.rfind("\nFROM "):]  # the runtime stage
        check(re.search(rf"^EXPOSE {PORT}\b", final, re.M), f"{name}: runtime stage must EXPOSE {PORT}")
        check(re.search(r'^ENTRYPOINT \["/', final, re.M), f"{name}: ENTRYPOINT must be exec form (SIGTERM reaches it)")
        user = re.findall(r"^USER (\S+)", final, re.M)
        check(user and not user[-1].startswith(("root", "0")), f"{name}: runtime must run as non-root, USER {user}")
        uid = re.search(r"^ARG UID=(\d+)", final, re.M)
        check(uid and int(uid.group(1)) == run_as, f"{name} UID {uid and uid.group(1)} != Kubernetes runAsUser {run_as}")
        check("org.opencontainers.image.revision" in final and "org.opencontainers.image.source" in final,
              f"{name}: the runtime stage should carry OCI labels (source, revision)")
        check(not re.search(r"^COPY\s+(--\S+\s+)*models/", text, re.M),
              f"{name}: copies a model: it must build from a fresh clone (bake models in Dockerfile.model)")
    for f in ("Dockerfile", "Dockerfile.cuda"):
        t = (ROOT / "docker" / f).read_text()
        for img in re.findall(r"^ARG \w+_IMAGE=(\S+)", t, re.M):
            check(":" in img and not img.endswith(":latest"), f"{f}: base image {img} must be pinned to a tag")


def labelled(label, fn, *args):
    """Runs a check function, naming `label` in the failures it adds."""
    n = len(failures)
    result = fn(*args)
    failures[n:] = [f"{label}: {f}" for f in failures[n:]]
    return result


def main():
    loaded = load_azureml()
    check_azureml(loaded)
    check_gpu_azureml(loaded)
    base = load_k8s()
    labelled("deploy/kubernetes/base", check_k8s, base, "deploy/kubernetes/base")
    gpu = render_overlay(K8S_GPU)
    if gpu:
        labelled("deploy/kubernetes/gpu", check_k8s, [("gpu (rendered)", d) for d in gpu], "deploy/kubernetes/gpu")
        check_gpu_k8s(gpu, [d for _, d in base])
    check_release_identity()
    check_autoscale_script()
    check_validators_bite()
    check_dockerfile()
    if failures:
        print("\n".join(["FAILED:"] + [f"  - {f}" for f in failures]))
        sys.exit(1)
    print("deploy manifest checks passed")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Builds the CPU images (docker/Dockerfile: plain, no model; docker/Dockerfile.model: SmolLM2 baked in on top) and
# checks what Azure ML and Kubernetes rely on, in two shapes:
#
#   baked      the demo image as docker / Kubernetes runs it
#     1. GET / liveness 200 "Healthy"; GET /health readiness 200 once the model is loaded (container start -> ready)
#     2. POST /score (an Azure ML chat payload) and a streamed POST /v1/chat/completions (SSE ending in [DONE])
#     3. SIGTERM with streams in flight and a drain delay (DRAIN_SECS): readiness 503 at once, liveness still 200,
#        new requests during the delay succeed, after it 503; every stream delivers all its tokens; exit 0
#   azureml    the plain image as an Azure ML managed online endpoint runs it
#     4. the model mounted read-only under a nested AZUREML_MODEL_DIR (<mount>/<name>/<version>/model/*.gguf), found
#        by amlserve's search; an arbitrary non-root UID with no passwd entry; a read-only root filesystem;
#        ready, /score answers
#     5. a model that fails to load: readiness and liveness 503 with the reason (the platform's liveness probe
#        restarts the container)
# Then removes the containers it started (and the images too with SMOKE_RM_IMAGE=1) and prints sizes and timings.
#
# Engine: docker when a daemon answers; otherwise buildah + podman (apt-get install -y buildah podman debootstrap
# runc), storage driver vfs, chroot isolation for the build. When a FROM image is missing and cannot be pulled,
# docker/build-base-images.sh makes it with debootstrap (+ this machine's Rust toolchain for the builder).
# The first build compiles every dependency (10-20 min on 2 cores); later builds reuse that layer.
#
# Usage: docker/smoke-test.sh    Env: IMAGE (localhost/amlserve:smoke; the demo is IMAGE-smollm2), ENGINE
#                                     (docker|podman), GRACE_SECS (30), DRAIN_SECS (4), NICE (19), SMOKE_RM_IMAGE (0)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/amlserve:smoke}
DEMO=$IMAGE-smollm2
GRACE_SECS=${GRACE_SECS:-30}
DRAIN_SECS=${DRAIN_SECS:-4}
NICE=${NICE:-19}
NAME=amlserve-smoke-$$
GGUF=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
STORAGE=(--storage-driver vfs)
started=$(date +%s)
pass=() fail=() timings=()
log() { printf '[smoke %3ss] %s\n' "$(($(date +%s) - started))" "$*" >&2; }
ok() { pass+=("$1"); log "PASS $1"; }
bad() { fail+=("$1"); log "FAIL $1"; }
expect() { if [ "$1" = "$2" ]; then ok "$3"; else bad "$3 (got '$1', want '$2')"; fi; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }

# ---- engine --------------------------------------------------------------------------------------------------
if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v buildah >/dev/null && command -v podman >/dev/null; then ENGINE=podman
  else
    echo "smoke-test: no container engine: start docker, or apt-get install -y buildah podman debootstrap runc" >&2
    exit 1
  fi
fi
if [ "$ENGINE" = docker ]; then
  ctr() { docker "$@"; }
else
  ctr() { podman "${STORAGE[@]}" ${RUNTIME:+--runtime "$RUNTIME"} "$@"; }
fi
log "engine: $ENGINE"

stream_pids=()
cleanup() {
  local n pid
  for n in "$NAME" "$NAME-aml" "$NAME-bad"; do ctr rm -f "$n" >/dev/null 2>&1 || true; done
  for pid in "${stream_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -n "${tmp:-}" ]; then rm -rf "$tmp"; fi
  if [ "${SMOKE_RM_IMAGE:-0}" = 1 ]; then ctr rmi -f "$DEMO" "$IMAGE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
tmp=$(mktemp -d)
chmod 755 "$tmp" # the azureml shape's arbitrary UID reads the model mounted from here

# ---- build ---------------------------------------------------------------------------------------------------
[ -f "$GGUF" ] || scripts/fetch-models.sh
# The demo layer's context is just the model (a tiny context; and models/ may be a link out of the tree).
mkdir -p "$tmp/demo-ctx/models/smollm2"
cp -L "$GGUF" "$tmp/demo-ctx/$GGUF"
build() { # build LOG DOCKERFILE CONTEXT ARGS...
  local out=$1 file=$2 context=$3
  shift 3
  if [ "$ENGINE" = docker ]; then
    nice -n "$NICE" docker build -f "$file" "$@" "$context" >"$out" 2>&1
  else
    nice -n "$NICE" buildah "${STORAGE[@]}" bud --isolation chroot --layers --pull=never -f "$file" "$@" "$context" >"$out" 2>&1
  fi || { tail -40 "$out" >&2; exit 1; }
}
if [ "$ENGINE" = podman ]; then
  # Pull what can be pulled; make the rest from Debian packages.
  missing=0
  for img in docker.io/library/rust:1.95.0-slim-bookworm docker.io/library/debian:bookworm-slim; do
    grep -q "$img" docker/Dockerfile || { echo "smoke-test: docker/Dockerfile no longer uses $img: update this list" >&2; exit 1; }
    podman "${STORAGE[@]}" image exists "$img" || timeout 60 podman "${STORAGE[@]}" pull -q "$img" >/dev/null 2>&1 || missing=1
  done
  if [ "$missing" = 1 ]; then
    log "base images cannot be pulled: making them (docker/build-base-images.sh)"
    STORAGE_DRIVER=vfs nice -n "$NICE" docker/build-base-images.sh docker/Dockerfile
  fi
fi
build_start=$(date +%s)
log "building docker/Dockerfile (no model) -> $IMAGE (output in $tmp/build.log)"
build "$tmp/build.log" docker/Dockerfile . --build-arg VCS_REF="$(git rev-parse HEAD 2>/dev/null || echo unknown)" -t "$IMAGE"
build_secs=$(($(date +%s) - build_start))
log "build steps: $(grep -c 'STEP' "$tmp/build.log" || true), from cache: $(grep -c 'Using cache\|CACHED' "$tmp/build.log" || true); ${build_secs}s"
build "$tmp/build-demo.log" docker/Dockerfile.model "$tmp/demo-ctx" --build-arg BASE_IMAGE="$IMAGE" -t "$DEMO"
revision=$(ctr image inspect -f '{{index .Labels "org.opencontainers.image.revision"}}' "$IMAGE" 2>/dev/null || true)
expect "$revision" "$(git rev-parse HEAD 2>/dev/null || echo unknown)" "OCI label org.opencontainers.image.revision"

# ---- run -----------------------------------------------------------------------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
if [ "$ENGINE" = docker ]; then
  run_opts=(-p "127.0.0.1:$port:5001")
else
  # Host network (no CNI here) on a free port. Podman asks for high file/process limits by default, which fails
  # without CAP_SYS_RESOURCE, and crun cannot run on a hybrid cgroup v1/v2 host while runc can: try the default
  # runtime, then runc, each with limits at or below ours, and keep the first that starts the image.
  nofile=$(ulimit -n); { [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; } && nofile=65536
  started_ok=""
  for rt in "" runc; do
    [ -z "$rt" ] || command -v "$rt" >/dev/null || continue
    for nproc in 32768 8192 4096; do
      RUNTIME=$rt
      run_opts=(--network host -e "AMLSERVE_PORT=$port" --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
      if ctr run --rm "${run_opts[@]}" "$IMAGE" --version >/dev/null 2>"$tmp/run.err"; then started_ok=1; break 2; fi
      log "podman run with runtime ${rt:-default}, nproc $nproc failed: $(tail -1 "$tmp/run.err" | cut -c1-120)"
    done
  done
  if [ -z "$started_ok" ]; then
    cat "$tmp/run.err" >&2
    echo "smoke-test: podman cannot start containers here (apt-get install -y runc may help)" >&2
    exit 1
  fi
  log "podman run: runtime ${RUNTIME:-default}, ${run_opts[*]:2}"
fi
if ctr run --rm "${run_opts[@]}" "$IMAGE" --version >/dev/null; then ok "entrypoint runs (amlserve --version)"; else bad "entrypoint runs"; fi

code() { curl -s -o "$tmp/body" -w '%{http_code}' --max-time "${2:-5}" "$base$1" || true; }
running() { [ "$(ctr inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }

# Starts container NAME from IMAGE with extra run options (up to --) and server flags; waits for /health 200.
# Sets ready_secs; returns 1 when it never got ready.
start() {
  local name=$1 image=$2 t0 live=""
  shift 2
  local opts=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  log "starting $name ($image) on $base"
  t0=$(now)
  ctr run -d --name "$name" "${run_opts[@]}" "${opts[@]}" -e AMLSERVE_LOG_FORMAT=text "$image" "$@" >/dev/null
  ready_secs=""
  for _ in $(seq 1 600); do # up to 120 s
    if [ -z "$live" ] && [ "$(code /)" = 200 ]; then live=$(cat "$tmp/body"); fi
    if [ "$(code /health)" = 200 ]; then ready_secs=$(since "$t0"); break; fi
    running "$name" || break
    sleep 0.2
  done
  if [ -z "$ready_secs" ]; then
    ctr logs "$name" 2>&1 | tail -30 >&2
    return 1
  fi
  if [ -z "$live" ] && [ "$(code /)" = 200 ]; then live=$(cat "$tmp/body"); fi
  expect "$live" Healthy "$name: GET / liveness 200 Healthy"
  ok "$name: GET /health 200 after ${ready_secs}s ($(cat "$tmp/body"))"
  timings+=("$name: container start -> ready ${ready_secs}s")
}

# Waits for container NAME to exit within SECS; prints its exit code (empty when still running).
wait_exit() {
  local name=$1 secs=$2
  for _ in $(seq 1 $((secs * 5))); do
    if ! running "$name"; then ctr inspect -f '{{.State.ExitCode}}' "$name"; return; fi
    sleep 0.2
  done
}

score() {
  curl -s -o "$tmp/score" -w '%{http_code}' --max-time 60 "$base/score" -H 'content-type: application/json' -d '{
    "input_data": {"input_string": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                   "parameters": {"max_new_tokens": 24, "do_sample": false}}}' || true
}
score_ok() { # score_ok WHAT
  local st
  st=$(score)
  if [ "$st" = 200 ] && python3 -c 'import json,sys; o=json.load(open(sys.argv[1]))["output"]; assert o.strip(); print(o)' "$tmp/score" >"$tmp/score.out" 2>/dev/null; then
    ok "$1: POST /score 200: $(head -c 60 "$tmp/score.out" | tr '\n' ' ')"
  else
    bad "$1: POST /score ($st): $(head -c 300 "$tmp/score")"
  fi
}

# Completion tokens of a finished stream (0 unless it ended with usage and [DONE]).
stream_tokens() {
  python3 -c '
import json, sys
lines = open(sys.argv[1]).read().splitlines()
usage = [json.loads(l[6:]).get("usage") for l in lines if l.startswith("data: {")]
usage = [u for u in usage if u]
print(usage[-1].get("completion_tokens", 0) if usage and "data: [DONE]" in lines else 0)' "$1" 2>/dev/null || echo 0
}

# ==== shape 1: baked model =======================================================================================
start "$NAME" "$DEMO" -e "AMLSERVE_DRAIN_DELAY_SECS=$DRAIN_SECS" -e "AMLSERVE_SHUTDOWN_GRACE_SECS=$GRACE_SECS" \
  || { bad "baked: never ready"; exit 1; }
score_ok baked
read -r stream_code stream_secs < <(curl -sN -o "$tmp/sse" -w '%{http_code} %{time_total}\n' --max-time 60 "$base/v1/chat/completions" -H 'content-type: application/json' -d '{
  "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 24, "temperature": 0,
  "stream": true, "stream_options": {"include_usage": true}}' || echo "000 0")
chunks=$(grep -c '^data: {' "$tmp/sse" || true)
if [ "$stream_code" = 200 ] && [ "$chunks" -ge 3 ] && [ "$(grep '^data: ' "$tmp/sse" | tail -1)" = "data: [DONE]" ]; then
  ok "baked: streamed chat: $chunks chunks in ${stream_secs}s, [DONE]"
else
  bad "baked: streamed chat ($stream_code, $chunks chunks): $(head -c 300 "$tmp/sse")"
fi

# SIGTERM with 3 streams in flight, each sized to outlast the drain delay at the speed just measured (24 tokens in
# stream_secs, one stream alone; three share the batch), and well inside the grace on a loaded machine.
streams=3
inflight_tokens=$(python3 -c "print(max(32, min(400, int(24 / max(float('$stream_secs'), 0.01) * ($DRAIN_SECS + 4)))))")
for i in $(seq 1 $streams); do
  curl -sN -o "$tmp/inflight-$i" --max-time 120 "$base/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Write a long story about a lighthouse, part '"$i"'."}],
         "max_tokens": '"$inflight_tokens"', "temperature": 0, "ignore_eos": true, "stream": true,
         "stream_options": {"include_usage": true}}' &
  stream_pids+=($!)
done
for _ in $(seq 1 300); do
  n=0
  for i in $(seq 1 $streams); do grep -q '"content":"[^"]' "$tmp/inflight-$i" 2>/dev/null && n=$((n + 1)); done
  [ "$n" = "$streams" ] && break
  sleep 0.1
done
log "SIGTERM -> $NAME with $streams ${inflight_tokens}-token streams in flight, drain delay ${DRAIN_SECS}s"
t_term=$(now)
ctr kill --signal TERM "$NAME" >/dev/null
sleep 0.5
expect "$(code /health 2)" 503 "baked: readiness 503 at once after SIGTERM"
expect "$(code / 2)" 200 "baked: liveness still 200 while draining"
st=$(score)
in_delay=$(python3 -c "print(float('$(since "$t_term")') < $DRAIN_SECS)")
if [ "$st" = 200 ] && [ "$in_delay" = True ]; then ok "baked: new request during the drain delay served (200)"
else bad "baked: new request during the drain delay: $st (within the delay: $in_delay)"; fi
sleep "$(python3 -c "print(max(0.0, $DRAIN_SECS + 0.7 - float('$(since "$t_term")')))")"
expect "$(score)" 503 "baked: new request after the drain delay refused (503)"
exit_code=$(wait_exit "$NAME" $((GRACE_SECS + DRAIN_SECS + 10)))
stop_secs=$(since "$t_term")
for pid in "${stream_pids[@]}"; do wait "$pid" || true; done
stream_pids=()
complete=0
for i in $(seq 1 $streams); do [ "$(stream_tokens "$tmp/inflight-$i")" = "$inflight_tokens" ] && complete=$((complete + 1)); done
expect "$complete" "$streams" "baked: streams in flight at SIGTERM finished with all ${inflight_tokens} tokens and [DONE]"
if [ "$exit_code" = 0 ] && python3 -c "import sys; sys.exit(0 if $stop_secs <= $GRACE_SECS + $DRAIN_SECS else 1)"; then
  ok "baked: exit 0 ${stop_secs}s after SIGTERM (drain ${DRAIN_SECS}s + grace ${GRACE_SECS}s)"
else
  bad "baked: exit after SIGTERM: code '${exit_code:-still running}' after ${stop_secs}s"
fi
timings+=("baked: SIGTERM -> exit ${stop_secs}s (drain delay ${DRAIN_SECS}s, $streams streams of $inflight_tokens tokens)")
echo "---- $NAME log (last 6 lines) ----" >&2
ctr logs "$NAME" 2>&1 | tail -6 >&2

# ==== shape 2: Azure ML (plain image, model mounted read-only, arbitrary UID, read-only root) ====================
models_dir=$tmp/azureml-models
nested=$models_dir/smollm2-135m-instruct-gguf/1/model
mkdir -p "$nested"
cp -L "$GGUF" "$nested/"
chmod -R a+rX "$models_dir"
aml_opts=(--user 54321:54321 --read-only --tmpfs /tmp -v "$models_dir:/var/azureml-app/azureml-models:ro"
  -e AZUREML_MODEL_DIR=/var/azureml-app/azureml-models/smollm2-135m-instruct-gguf/1)
if start "$NAME-aml" "$IMAGE" "${aml_opts[@]}"; then
  ok "azureml: nested AZUREML_MODEL_DIR found, UID 54321, read-only root filesystem"
  score_ok azureml
  if ctr logs "$NAME-aml" 2>&1 | grep -q 'model/SmolLM2-135M-Instruct.Q4_1.gguf'; then
    ok "azureml: loaded the GGUF found under AZUREML_MODEL_DIR"
  else
    bad "azureml: log does not name the nested GGUF"
  fi
  ctr kill --signal TERM "$NAME-aml" >/dev/null
  expect "$(wait_exit "$NAME-aml" 20)" 0 "azureml: exit 0 on SIGTERM (nothing in flight)"
else
  bad "azureml: never ready"
fi

# ==== failed load ================================================================================================
mkdir -p "$tmp/bad-model/1"
printf 'not a gguf file' >"$tmp/bad-model/1/broken.gguf"
chmod -R a+rX "$tmp/bad-model"
ctr run -d --name "$NAME-bad" "${run_opts[@]}" --user 54321:54321 --read-only \
  -v "$tmp/bad-model:/var/azureml-app/azureml-models:ro" -e AZUREML_MODEL_DIR=/var/azureml-app/azureml-models/1 \
  -e AMLSERVE_LOG_FORMAT=text "$IMAGE" >/dev/null
live=""
for _ in $(seq 1 150); do # 30 s
  live=$(code /)
  [ "$live" = 503 ] && break
  sleep 0.2
done
expect "$live" 503 "failed load: liveness 503 (the platform restarts the container)"
if grep -q 'failed to load' "$tmp/body"; then ok "failed load: liveness says why: $(head -c 100 "$tmp/body")"
else bad "failed load: liveness body: $(head -c 200 "$tmp/body")"; fi
expect "$(code /health)" 503 "failed load: readiness 503"

# ---- summary -------------------------------------------------------------------------------------------------
size=$(ctr image inspect -f '{{.Size}}' "$IMAGE")
demo_size=$(ctr image inspect -f '{{.Size}}' "$DEMO")
echo
echo "== amlserve smoke test ($ENGINE${RUNTIME:+, runtime $RUNTIME})"
echo "images:  $IMAGE $(python3 -c "print(f'{$size/1e6:.0f} MB')") (no model), $DEMO $(python3 -c "print(f'{$demo_size/1e6:.0f} MB')")"
echo "build:   ${build_secs}s"
printf 'timing:  %s\n' "${timings[@]}"
echo "passed:  ${#pass[@]}"; printf '  - %s\n' "${pass[@]}"
if [ "${#fail[@]}" -gt 0 ]; then
  echo "FAILED:  ${#fail[@]}"; printf '  - %s\n' "${fail[@]}"
  exit 1
fi
echo "smoke test passed"

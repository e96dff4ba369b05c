#!/usr/bin/env bash
# Decode at long context, served (issue 13): 16 streams whose prompts are CONTEXT tokens each (distinct random
# words), all sent at once, greedy, ignoring end-of-sequence. Each server first reads the 16 prompts in a cold wave
# (SHORT tokens each: its TTFT is the prompts' reading), then runs the same 16 prompts twice more, now from its
# cache (amlserve's prefix cache, llama-server's slots), generating SHORT and SHORT + DECODE tokens. With the
# prompts' reading out of both, the difference of the two warm waves' wall times is decode alone, all 16 streams
# at CONTEXT tokens and beyond:
#
#   decode tok/s = 16 * DECODE / (wall(SHORT + DECODE) - wall(SHORT))
#
# (what llama-batched-bench calls S_TG, measured through HTTP). Also printed: the cold wave's TTFT p50 and prompt
# tok/s, the long wave's time per output token p50. amlserve runs with a prefix cache big enough for the 16
# prompts (AMLSERVE_ARGS adds flags); with LLAMA_SERVER (and LLAMA_MODEL, e.g. its Q8_0 requantization)
# llama-server -np 16 runs the same waves. Reports go to target/bench-context-serving/.
#
#   scripts/bench-context-serving.sh
#   CONTEXT=2000 DECODE=256 LLAMA_SERVER=... LLAMA_MODEL=... scripts/bench-context-serving.sh
set -euo pipefail
cd "$(dirname "$0")/.."
model=${BENCH_MODEL:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
llama_model=${LLAMA_MODEL:-$model}
context=${CONTEXT:-2000}
short=${SHORT:-16}
decode=${DECODE:-256}
out=${BENCH_OUT:-target/bench-context-serving}
mkdir -p "$out"
# shellcheck source=scripts/serve-common.sh
. scripts/serve-common.sh
wave() { # PORT JSON SEED MAX_TOKENS: one wave of 16 requests sent together
  local port=$1 json=$2
  target/release/amlserve-loadtest openai-completions "http://127.0.0.1:$port" --temperature 0 --seed "$3" \
    --warmup 0 --concurrency 16 --requests 16 --prompt-tokens "$context" --max-tokens "$4" --ignore-eos \
    --json "$json" > "${json%.json}.log" 2>&1
}

# measure NAME PORT: the cold wave, then the two warm ones, then stops the server.
measure() {
  wait_ready "http://127.0.0.1:$2/health"
  wave "$2" "$out/$1-cold.json" 1 "$short"
  wave "$2" "$out/$1-short.json" 1 "$short"
  wave "$2" "$out/$1-long.json" 1 $((short + decode))
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  python3 - "$1" "$out" "$short" "$decode" "$context" >> "$out/table.md" <<'PY'
import json, sys
name, out, short, decode, context = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
r = lambda k: json.load(open(f"{out}/{name}-{k}.json"))["results"][0]
c, s, l = r("cold"), r("short"), r("long")
for w, n in ((c, short), (s, short), (l, short + decode)):
    assert w["ok"] == 16 and w["output_tokens"] == 16 * n, (name, w["ok"], w["output_tokens"])
wall = lambda w: w["duration_s"]
print(f"| {name} | {16 * decode / (wall(l) - wall(s)):.0f} | {l['tpot_ms']['p50']:.1f} | "
      f"{s['ttft_ms']['p50'] / 1000:.2f} | {c['ttft_ms']['p50'] / 1000:.1f} | {16 * context / wall(c):.0f} | "
      f"{wall(c):.1f} / {wall(s):.1f} / {wall(l):.1f} |")
PY
}

{
  echo "| server | decode tok/s | TPOT p50 ms | warm TTFT p50 s | cold TTFT p50 s | cold prompt tok/s | walls cold / short / long s |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
} > "$out/table.md"
port=$(free_port)
# shellcheck disable=SC2086
target/release/amlserve --host 127.0.0.1 --port "$port" --model "$model" --embedding-model none \
  --kv-cache-mb 3072 --prefix-cache-mb $((16 * (context + short + decode) * 24 / 1000 + 256)) ${AMLSERVE_ARGS:-} > "$out/amlserve.log" 2>&1 &
pid=$!
measure amlserve "$port"
if [ -n "${LLAMA_SERVER:-}" ]; then
  port=$(free_port)
  # 16 slots, each with room for its prompt and the long wave's tokens.
  "$LLAMA_SERVER" -m "$llama_model" -t "${LLAMA_THREADS:-2}" -np 16 -c $((16 * (context + short + decode + 256))) \
    --host 127.0.0.1 --port "$port" > "$out/llama-server.log" 2>&1 &
  pid=$!
  measure llama-server "$port"
fi
echo "16 streams at ~$context prompt tokens; decode = the warm $((short + decode))-token wave minus the warm $short-token wave:"
cat "$out/table.md"

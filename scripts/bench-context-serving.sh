#!/usr/bin/env bash
# Decode at long context, served (issue 13): 16 streams whose prompts are CONTEXT tokens each (distinct random
# words, so no prefix is shared), all sent at once, greedy, ignoring end-of-sequence. Each server runs two such waves
# of 16 with the same prompt length, one generating SHORT tokens and one SHORT + DECODE tokens (different seeds, so
# neither reuses the other's prompts from a cache); the difference of their wall times is decode alone:
#
#   decode tok/s = 16 * DECODE / (wall(SHORT + DECODE) - wall(SHORT))
#
# which is what llama-batched-bench calls S_TG, measured through HTTP with the prompts' reading taken out. Also
# printed: each wave's output tok/s, time per output token p50 of the long wave, and TTFT p50. amlserve runs with its
# defaults (AMLSERVE_ARGS adds flags); with LLAMA_SERVER (and LLAMA_MODEL, e.g. its Q8_0 requantization)
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

# measure NAME PORT: a warm-up wave, then the short and the long wave, then stops the server.
measure() {
  wait_ready "http://127.0.0.1:$2/health"
  wave "$2" "$out/$1-warmup.json" 7 4
  wave "$2" "$out/$1-short.json" 1 "$short"
  wave "$2" "$out/$1-long.json" 2 $((short + decode))
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  python3 - "$1" "$out" "$short" "$decode" >> "$out/table.md" <<'PY'
import json, sys
name, out, short, decode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = lambda k: json.load(open(f"{out}/{name}-{k}.json"))["results"][0]
s, l = r("short"), r("long")
for w, n in ((s, short), (l, short + decode)):
    assert w["ok"] == 16 and w["output_tokens"] == 16 * n, (name, w["ok"], w["output_tokens"])
wall = lambda w: w["duration_s"]
print(f"| {name} | {16 * decode / (wall(l) - wall(s)):.0f} | {s['output_tokens_per_s']:.0f} | "
      f"{l['output_tokens_per_s']:.0f} | {l['tpot_ms']['p50']:.1f} | {s['ttft_ms']['p50'] / 1000:.1f} | "
      f"{wall(s):.1f} / {wall(l):.1f} |")
PY
}

{
  echo "| server | decode tok/s | output tok/s, short wave | output tok/s, long wave | TPOT p50 ms | TTFT p50 s | wave walls s |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
} > "$out/table.md"
port=$(free_port)
# shellcheck disable=SC2086
target/release/amlserve --host 127.0.0.1 --port "$port" --model "$model" --embedding-model none \
  ${AMLSERVE_ARGS:-} > "$out/amlserve.log" 2>&1 &
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
echo "16 streams at ~$context prompt tokens, decode = the $((short + decode))-token wave minus the $short-token wave:"
cat "$out/table.md"

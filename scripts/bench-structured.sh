#!/usr/bin/env bash
# Constrained-decoding benchmark: 16 concurrent streaming chats (~40-word prompts, up to 64 tokens, greedy)
# without a grammar, then with a response_format json_schema, against one amlserve; prints both loadtest
# reports, the tok/s ratio, and the per-token mask time and grammar compile time from /metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_OUT:-target/bench-structured}
mkdir -p "$out"
cargo build --release -p amlserve --bin amlserve >&2
cargo build --release -p amlserve-loadtest >&2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/amlserve --host 127.0.0.1 --port "$port" >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
schema='{"response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}, "year": {"type": "integer"}}, "required": ["title", "tags", "year"]}}}}'
run() { # name [extra-body]
  local extra=()
  [ -n "${2:-}" ] && extra=(--extra-body "$2")
  target/release/amlserve-loadtest openai-chat "http://127.0.0.1:$port" --concurrency 16 --requests 96 \
    --prompt-tokens 40 --max-tokens 64 --temperature 0 --warmup 4 --seed 1 --json "$out/$1.json" \
    --markdown "$out/$1.md" "${extra[@]}" >"$out/$1.txt"
  echo "== $1"; cat "$out/$1.md"
}
run plain
run json_schema "$schema"
curl -sf "http://127.0.0.1:$port/metrics" >"$out/metrics.txt"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
tps = {n: json.load(open(f"{out}/{n}.json")) for n in ("plain", "json_schema")}
def tok_s(r):
    return r["results"][0]["output_tokens_per_s"]
a, b = tok_s(tps["plain"]), tok_s(tps["json_schema"])
print(f"\n| run | output tok/s |\n|---|---:|\n| plain | {a:.1f} |\n| json_schema | {b:.1f} |\n| ratio | {b / a:.2f}x |")
def quantiles(name):
    buckets, count = [], 0
    for line in open(f"{out}/metrics.txt"):
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
        elif line.startswith(name + "_count"):
            count = float(line.split()[-1])
    def q(p):
        for le, c in buckets:
            if c >= p * count:
                return le
    return count, q(0.5), q(0.99)
for name in ("amlserve_constraint_mask_seconds", "amlserve_grammar_compile_seconds"):
    n, p50, p99 = quantiles(name)
    print(f"{name}: {int(n)} samples, p50 <= {p50 * 1e3:.3g} ms, p99 <= {p99 * 1e3:.3g} ms (bucket bounds)")
PY

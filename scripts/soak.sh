#!/usr/bin/env bash
# Soak test: starts the release amlserve (every flag at its default, prefix cache included) on a free port,
# measures its capacity with a short closed-loop ramp, then runs amlserve-loadtest --soak for SOAK_SECONDS
# at twice that capacity (open loop, Poisson arrivals) with mixed traffic: streamed and whole-JSON requests,
# 10% of clients hanging up mid-stream, 2% bad requests. Prints the ramp and the soak report; exits non-zero
# when the verdict fails (any 5xx, a 429 without Retry-After, a bad request not refused with its 4xx, a
# transport error, RSS growing after the warm-up, a slot left running or waiting after the drain).
#
# Capacity: for each concurrency in CAPACITY_LEVELS, CAPACITY_SECONDS of streamed chats of the soak's shape;
# its throughput is concurrency / mean end-to-end latency (Little's law: exact for a closed loop, and free of
# the level's start and tail); the ramp stops at the first level that adds less than 10%, and the capacity is
# the best throughput seen. Offering twice that keeps the waiting queue full, so the server must refuse about
# half of what it is sent, all the time, while serving the rest.
#
# RSS warm-up (RSS must stay flat after it): SOAK_WARMUP seconds (a quarter of the soak, at most 60) and
# SOAK_WARMUP_REQUESTS (200) answered requests, whichever comes later. Until then RSS rises for good reasons:
# the batch and the waiting queue fill (128 places by default), and so does the prefix cache (256 MiB by
# default: about 40 finished requests of this shape at 46 KB of KV per token). On a machine so slow that 200
# requests do not end during the load, the RSS rule is reported as not judged.
#
# Knobs (environment): SOAK_SECONDS (600), SOAK_FACTOR (2), CAPACITY_LEVELS ("4 8 16 32 64"),
# CAPACITY_SECONDS (15), SOAK_WARMUP, SOAK_WARMUP_REQUESTS (see above), SOAK_PROMPT_TOKENS (40),
# SOAK_MAX_TOKENS (64), SOAK_TIMEOUT (300, seconds per request), SOAK_ARGS (more amlserve-loadtest flags,
# e.g. "--bad-fraction 0.05"), AMLSERVE_ARGS (server flags), SOAK_OUT (target/soak: server log, JSON and
# Markdown reports, rss.svg).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${SOAK_OUT:-target/soak}
seconds=${SOAK_SECONDS:-600}
factor=${SOAK_FACTOR:-2}
levels=${CAPACITY_LEVELS:-4 8 16 32 64}
level_seconds=${CAPACITY_SECONDS:-15}
shape=(--prompt-tokens "${SOAK_PROMPT_TOKENS:-40}" --max-tokens "${SOAK_MAX_TOKENS:-64}" --ignore-eos --seed 1)
mkdir -p "$out"
cargo build --release -p amlserve --bin amlserve >&2
cargo build --release -p amlserve-loadtest >&2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# shellcheck disable=SC2086 # AMLSERVE_ARGS is a list of flags
target/release/amlserve --host 127.0.0.1 --port "$port" ${AMLSERVE_ARGS:-} >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
url="http://127.0.0.1:$port"

echo "== capacity: closed-loop ramp, ${level_seconds} s per level (${shape[*]})"
best=0
warmup=2
for c in $levels; do
  target/release/amlserve-loadtest openai-chat "$url" --concurrency "$c" --duration "$level_seconds" \
    "${shape[@]}" --warmup "$warmup" --quiet --json "$out/capacity-c$c.json" >/dev/null
  warmup=0
  read -r rps gain best < <(python3 - "$out/capacity-c$c.json" "$best" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
best = float(sys.argv[2])
c = r["load"]["value"]
mean_s = r["e2e_ms"]["mean"] / 1000
rps = c / mean_s if r["ok"] and mean_s > 0 else 0.0
print(f"{rps:.3f} {rps / best if best else 99:.3f} {max(rps, best):.3f}")
sys.stderr.write(f"c={c:<3} ok {r['ok']:>4}  errors {r['errors']:>3}  E2E mean {mean_s * 1000:7.0f} ms  "
                 f"-> {rps:6.2f} req/s (wall-clock {r['requests_per_s']:.2f})  out tok/s {r['output_tokens_per_s']:.1f}\n")
PY
  )
  if python3 -c "import sys; sys.exit(0 if float('$gain') < 1.10 else 1)"; then
    echo "c=$c adds less than 10%: throughput has stopped growing"
    break
  fi
done
rate=$(python3 -c "print(f'{max($best * $factor, 0.1):.2f}')")
warm=${SOAK_WARMUP:-$(python3 -c "print(min(60, $seconds / 4))")}
warm_requests=${SOAK_WARMUP_REQUESTS:-200}
echo "capacity: $best req/s; soak: ${factor}x = $rate req/s for $seconds s;" \
  "RSS warm-up: $warm s and $warm_requests answered requests"
echo

echo "== soak"
set +e
# shellcheck disable=SC2086 # SOAK_ARGS is a list of flags
target/release/amlserve-loadtest openai-chat "$url" --soak --rate "$rate" --duration "$seconds" "${shape[@]}" \
  --timeout "${SOAK_TIMEOUT:-300}" --server-pid "$pid" --json "$out/soak.json" --markdown "$out/soak.md" \
  --rss-warmup "$warm" --rss-warmup-requests "$warm_requests" --plot "$out" ${SOAK_ARGS:-}
rc=$?
set -e
echo
if kill -0 "$pid" 2>/dev/null; then
  echo "server still up; its log: $(grep -c ' ERROR ' "$out/server.log" || true) ERROR lines, $(grep -c ' WARN ' "$out/server.log" || true) WARN lines ($out/server.log)"
  grep -m 5 ' ERROR ' "$out/server.log" || true
else
  echo "the server died during the soak; last lines of $out/server.log:"
  tail -20 "$out/server.log"
  rc=1
fi
echo "reports: $out/soak.json, $out/soak.md, $out/rss.svg"
exit $rc

#!/usr/bin/env bash
# GPU check, run ON a GPU machine that has the NVIDIA driver and CUDA 13 libraries (cuBLAS, cuRAND, NVRTC) but
# no Rust toolchain: it uses binaries built elsewhere with `scripts/gpu-pack.sh` (a `--features cuda` amlserve,
# the device_forward test binary, the device bench, the load tester) and the SmolLM2 GGUF, all under $GPU_DIR (default .gpu):
#
#   $GPU_DIR/bin.tar.xz               the four binaries
#   $GPU_DIR/model.part-a, .part-b    the GGUF in two pieces (a call to a lent machine carries at most 64 MiB)
#
#   scripts/gpu-check.sh stage   unpack the binaries and keep what model pieces are here under $WORK (/tmp/gpu),
#                                then run the kernel tests (no model needed)
#   scripts/gpu-check.sh         the rest: join the model, run the CUDA tests (kernels against their CPU versions,
#                                the GPU forward against candle's CPU backend) and the serving benchmark with the
#                                load tester (single stream and 64 concurrent streams), and print a table
#
# Logs and reports go to ${OUT:-$WORK/out}. DEVICE (default cuda; candle-cpu for a dry run of this script on a
# machine without a GPU, with CPU binaries), CONCURRENCY (1,64), REQUESTS (16,512) and MAX_TOKENS (128) shape
# the serving runs.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${GPU_DIR:-.gpu}
work=${WORK:-/tmp/gpu}
out=${OUT:-$work/out}
device=${DEVICE:-cuda}
mkdir -p "$work" "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}

if [ ! -x "$work/amlserve" ] && [ -f "$src/bin.tar.xz" ]; then
  tar -xJf "$src/bin.tar.xz" -C "$work"
fi
for part in a b; do
  [ -f "$src/model.part-$part" ] && cp "$src/model.part-$part" "$work/"
done
[ -x "$work/amlserve" ] || { echo "gpu-check: no binaries in $work (carry $src/bin.tar.xz)" >&2; exit 2; }

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || echo "gpu-check: no nvidia-smi"

if [ "${1:-}" = stage ]; then
  "$work/device_forward" --test-threads 1 --nocapture cuda::the_cuda_kernels
  exit 0
fi

model=$work/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$model" ]; then
  [ -f "$work/model.part-a" ] && [ -f "$work/model.part-b" ] || { echo "gpu-check: model pieces missing in $work" >&2; exit 3; }
  cat "$work/model.part-a" "$work/model.part-b" > "$model"
fi
echo "model sha256: $(sha256sum "$model" | cut -c1-16)"

if [ "${GPU_TESTS:-1}" = 1 ]; then
  AMLSERVE_TEST_MODEL=$model "$work/device_forward" --test-threads 1 --nocapture cuda:: --skip decode_graphs 2>&1 \
    | tee "$out/cuda-tests.log"
  # Alone and last: a fault in a replayed graph would end the process that runs it.
  AMLSERVE_TEST_MODEL=$model "$work/device_forward" --test-threads 1 --nocapture cuda::decode_graphs 2>&1 \
    | tee "$out/cuda-graphs-test.log" || echo "gpu-check: the CUDA graphs test failed (see cuda-graphs-test.log)"
fi

# Step times of the forward alone (host issue, device wait, logits copy or the rows' argmax) per weight format,
# and where a step's time goes: decode at batch 1 and 64, and a step reading 16 prompts of 128 tokens together
# (a burst of requests: what TTFT at 64 streams waits for).
weights=${WEIGHTS:-q8_0 f32}
# STAGES (default --stages 1,64; empty for none) and DEVICE_BENCH_ARGS (default --graphs --packed-stages: each
# format again with CUDA graphs, and the packed step's stages) are split into words on purpose.
# shellcheck disable=SC2086
"$work/device_bench" --device "$device" --model "$model" --weights "$(echo "$weights" | tr ' ' ,)" \
  ${STAGES-"--stages 1,64"} ${DEVICE_BENCH_ARGS-"--graphs --packed-stages"} 2>&1 | tee "$out/device-bench.log" \
  || echo "gpu-check: the device bench failed (see device-bench.log)"

# Serving variants, NAME:WEIGHTS:MAX_BATCH_TOKENS[:graphs] each (graphs: --cuda-graphs).
variants=${VARIANTS:-$(for w in $weights; do printf '%s:%s:2048 %s-graphs:%s:2048:graphs ' "$w" "$w" "$w" "$w"; done)}

port=5001
table="$out/serve-table.md"
echo "| variant | load | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | errors |" > "$table"
echo "|---|---|---:|---:|---:|---:|---:|---:|" >> "$table"
for variant in $variants; do
  IFS=: read -r w wformat mbt graphs <<< "$variant"
  extra=()
  [ "${graphs:-}" = graphs ] && extra+=(--cuda-graphs)
  # Without KV_CACHE_MB the server sizes its KV cache from the GPU's free memory (logged below).
  [ -n "${KV_CACHE_MB:-}" ] && extra+=(--kv-cache-mb "$KV_CACHE_MB")
  "$work/amlserve" --device "$device" --model "$model" --weights "$wformat" --host 127.0.0.1 --port $port --embedding-model none \
    "${extra[@]}" \
    --max-batch-size 64 --max-batch-tokens "$mbt" --max-prefill-tokens-alone "$((mbt > 4096 ? mbt : 4096))" \
    --max-waiting 1024 ${AMLSERVE_ARGS:-} > "$out/amlserve-$w.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
  grep -E 'KV cache sized|warmed up|CUDA graphs|cuda-graphs' "$out/amlserve-$w.log" || true
  { curl -sf "http://127.0.0.1:$port/info"; echo
    curl -s "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
      -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'; echo; } | tee "$out/checks-$w.txt"
  "$work/amlserve-loadtest" openai-chat "http://127.0.0.1:$port" --concurrency "${CONCURRENCY:-1,64}" \
    --requests "${REQUESTS:-16,512}" --prompt-tokens 100 --max-tokens "${MAX_TOKENS:-128}" --ignore-eos --temperature 0 --warmup 4 --seed 1 \
    --json "$out/serve-$w.json" ${BENCH_ARGS:-} > "$out/loadtest-$w.log" 2>&1 || {
    # One failing variant (e.g. an experimental setting) leaves the others to run.
    tail -20 "$out/loadtest-$w.log"; tail -20 "$out/amlserve-$w.log"
    echo "| $w | failed: see loadtest-$w.log and amlserve-$w.log | | | | | | |" >> "$table"
    kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
    continue
  }
  curl -s "http://127.0.0.1:$port/metrics" > "$out/metrics-$w.txt" || true
  echo "server-side sums and counts, $variant:"
  grep -E '^amlserve_(forward|step|time_to_first_token|request_queue_time)_seconds_(sum|count)|^amlserve_batch_size_(sum|count)|^amlserve_inter_token_latency_seconds_(sum|count)' \
    "$out/metrics-$w.txt" || true
  # How long the forward steps took, bucket by bucket (a wave's prompt steps against its decode steps: where TTFT
  # and ITL p99 go), and how long requests queued.
  python3 - "$out/metrics-$w.txt" <<'PY' || true
import re, sys
hist = {}
for line in open(sys.argv[1]):
    m = re.match(r'amlserve_(forward_seconds|request_queue_time_seconds)_bucket\{.*le="([^"]+)".*\} (\S+)', line)
    if m:
        hist.setdefault(m[1], []).append((float("inf") if m[2] == "+Inf" else float(m[2]), float(m[3])))
for name, buckets in hist.items():
    prev_le, prev_n, parts = 0.0, 0.0, []
    for le, n in sorted(buckets):
        if n > prev_n:
            parts.append(f"{prev_le * 1e3:g}-{le * 1e3:g} ms: {n - prev_n:.0f}")
        prev_le, prev_n = le, n
    print(f"{name} by bucket: " + ", ".join(parts))
PY
  python3 - "$out/serve-$w.json" "$w" >> "$table" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
for x in r:
    print(f"| {sys.argv[2]} | c={x['load']['value']} | {x['output_tokens_per_s']:.0f} | {x['ttft_ms']['p50']:.1f} | {x['ttft_ms']['p99']:.1f} "
          f"| {x['itl_ms']['p50']:.2f} | {x['itl_ms']['p99']:.2f} | {x.get('errors', 0)} |")
PY
  kill $pid; wait $pid 2>/dev/null || true
done
echo; cat "$table"

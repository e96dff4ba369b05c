#!/usr/bin/env bash
# The CUDA 13.0 toolchain from PyPI wheels, for building the `cuda` feature on a machine without a CUDA install
# (no NVIDIA images or GPU needed): nvcc, headers, cuBLAS, cuRAND, NVRTC, pinned to CUDA 13.0 (newer nvcc emits PTX
# that driver 580 cannot load). Unpacked under $CUDA_DIR (default target/cuda-toolchain), which gets an env.sh to
# source: CUDA_HOME, PATH, CUDA_COMPUTE_CAP (default 80: candle's kernels as compute_80 PTX, which the driver
# compiles for 8.6, 8.9 and 9.0 at first use; amlserve's own kernels are compiled by NVRTC for the device found),
# CUDARC_CUDA_VERSION, LIBRARY_PATH and CARGO_TARGET_DIR (target/cuda).
#
#   scripts/cuda-toolchain.sh        the toolchain (idempotent); enough for `cargo check --features cuda`
#   scripts/cuda-toolchain.sh stub   after `cargo build --release --features cuda --lib`: a stand-in libcuda.so
#                                    (soname libcuda.so.1, empty functions named after the driver symbols cudarc
#                                    uses) so binaries link; at run time the machine's driver library is used
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${CUDA_DIR:-$PWD/target/cuda-toolchain}
home=$dir/cuda/nvidia/cu13
mkdir -p "$dir"
if [ ! -x "$home/bin/nvcc" ]; then
  python3 -m pip download -q --no-deps --disable-pip-version-check -d "$dir/wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
    'nvidia-cuda-cccl>=13.0,<13.1' 'nvidia-cublas>=13.0,<13.2' 'nvidia-curand>=10.4,<10.5' 'nvidia-cuda-nvrtc>=13.0,<13.1'
  for w in "$dir"/wheels/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$dir/cuda"
  done
  chmod +x "$home"/bin/* "$home"/nvvm/bin/*
  for lib in cublas cublasLt cudart curand nvrtc; do
    ln -sf "$(basename "$(ls "$home"/lib/lib$lib.so.* | head -n1)")" "$home/lib/lib$lib.so"
  done
fi
cat > "$dir/env.sh" <<ENV
export CUDA_HOME=$home CUDA_ROOT=$home CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-80}
export PATH=$home/bin:\$PATH
export LIBRARY_PATH=$home/lib:$dir/stub
export CARGO_TARGET_DIR=\${CUDA_TARGET_DIR:-$PWD/target/cuda}
ENV
if [ "${1:-}" = stub ]; then
  # shellcheck disable=SC1091
  . "$dir/env.sh"
  rlib=$(ls "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib | head -n1)
  mkdir -p "$dir/stub"
  nm -u "$rlib" 2>/dev/null | awk '{print $2}' | grep -E '^cu[A-Z]' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$dir/stub/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/stub/libcuda.so" "$dir/stub/stub.c"
fi
echo "source $dir/env.sh"

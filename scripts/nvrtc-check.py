#!/usr/bin/env python3
"""Compiles src/model/device/kernels.cu with NVIDIA's NVRTC (as the server does at start on a GPU) for compute
capabilities 8.0 and 9.0, and prints the compiler's log: `make check-cuda` runs it with the CUDA wheels' NVRTC, so
a kernel that the CPU emulation (kernel-emu) accepts but NVRTC would not is caught without a GPU. It also fails
when a kernel's per-thread arrays spill to local memory (a `__local_depot` in its PTX), which the emulation
cannot see and which would make that kernel slow."""
import ctypes
import sys

nvrtc = ctypes.CDLL("libnvrtc.so.13")
source = open("src/model/device/kernels.cu", "rb").read()
for arch in (b"compute_80", b"compute_90"):
    prog = ctypes.c_void_p()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, b"kernels.cu", 0, None, None)
    if rc != 0:
        sys.exit(f"nvrtcCreateProgram failed: {rc}")
    opts = (ctypes.c_char_p * 1)(b"--gpu-architecture=" + arch)
    rc = nvrtc.nvrtcCompileProgram(prog, 1, opts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    print(f"NVRTC {arch.decode()}: {'ok' if rc == 0 else 'failed'} {log.value.decode().strip()}")
    if rc != 0:
        sys.exit(1)
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    entries = ptx.value.decode().split(".entry ")[1:]
    spilled = [e.split("(")[0] for e in entries if "__local_depot" in e]
    print(f"  {len(entries)} kernels; local memory in: {', '.join(spilled) or 'none'}")
    if spilled:
        sys.exit(1)

#!/usr/bin/env python3
"""Compiles src/model/device/kernels.cu with NVIDIA's NVRTC (as the server does at start on a GPU) for compute
capabilities 8.0 and 9.0, and prints the compiler's log: `make check-cuda` runs it with the CUDA wheels' NVRTC, so
a kernel that the CPU emulation (kernel-emu) accepts but NVRTC would not is caught without a GPU. It also fails
when a kernel's per-thread arrays spill to local memory (a `__local_depot` in its PTX), which the emulation
cannot see and which would make that kernel slow. Where the toolkit's ptxas is on PATH (the CUDA wheels have it),
it also assembles the PTX for sm_80 and sm_90 as the driver would, prints each kernel's registers, and fails on
spill stores there too."""
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile

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
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        print("  (no ptxas on PATH: registers not checked)")
        continue
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernels.ptx")
        open(src, "wb").write(ptx.value)
        sm = arch.decode().replace("compute_", "sm_")
        run = subprocess.run([ptxas, f"-arch={sm}", "-v", src, "-o", os.path.join(tmp, "kernels.cubin")],
                             capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"ptxas {sm} failed: {run.stderr}")
    report, spills = [], []
    for name, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry|\Z)", run.stderr, re.S):
        regs = re.search(r"Used (\d+) registers", body)
        report.append(f"{name.removeprefix('amlserve_')} {regs.group(1) if regs else '?'}")
        if re.search(r"[1-9]\d* bytes spill stores", body):
            spills.append(name)
    print(f"  ptxas {sm}, registers a thread: {', '.join(report)}; spills in: {', '.join(spills) or 'none'}")
    if spills:
        sys.exit(1)

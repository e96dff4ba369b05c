//! Compiles `emu.cpp`, which includes the server's `kernels.cu` as C++, into a static library.

fn main() {
    // Fibers, mmap'd stacks and an ELF assembler: Linux only (the crate is empty elsewhere).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let kernels = std::path::Path::new("../src/model/device");
    println!("cargo:rerun-if-changed=emu.cpp");
    println!("cargo:rerun-if-changed=../src/model/device/kernels.cu");
    cc::Build::new()
        .cpp(true)
        .file("emu.cpp")
        .include(kernels)
        .std("c++20")
        .opt_level(2)
        // The kernels are C written for CUDA: unused parameters and the like are not this build's business.
        .warnings(false)
        .compile("amlserve_kernel_emu");
}

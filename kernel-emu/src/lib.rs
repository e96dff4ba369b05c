//! Runs amlserve's CUDA kernels (`src/model/device/kernels.cu`) on the CPU, so that tests on a machine without
//! a GPU check the kernels themselves against the ops' CPU implementations (`tests/kernels_emulated.rs`).
//!
//! `emu.cpp` compiles `kernels.cu` as C++ with the CUDA names it uses defined for the CPU: each thread of a
//! block is a fiber with its own stack, `__syncthreads` and warp shuffles are points where a fiber waits for the
//! others of its block or warp, and blocks run one after another (emu.cpp's header says how it schedules them
//! so that a missing barrier shows, and what it refuses). [`launch`] takes a kernel's name, its launch shape and
//! its arguments as `cuLaunchKernel` would (pointers here point to host memory), and checks each argument's kind
//! against the kernel's parameters. [`Guarded`] buffers carry NaN canaries on both sides, so writes past a
//! buffer fail the test and reads past it poison the result; shared memory starts as NaN in every block.
//!
//! What this does not check: the memory-ordering questions of real hardware beyond barriers (threads of one
//! warp run here one after another between shuffles), and the argument order `super::cuda` passes.
// The kernels are foreign functions taking raw pointers.
#![allow(unsafe_code)]
#![cfg(target_os = "linux")]

use std::ffi::{c_char, c_void, CString};

extern "C" {
    fn amlserve_emu_knows(name: *const c_char) -> i32;
    fn amlserve_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: u32,
        shared: u32,
        args: *mut *mut c_void,
        arg_kinds: *const c_char,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// One kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A buffer (see [`Guarded::ptr`]).
    Ptr(*mut c_void),
    I32(i32),
    F32(f32),
}

/// An argument's value where the kernel reads it from.
#[repr(C)]
#[derive(Clone, Copy)]
union Slot {
    p: *mut c_void,
    i: i32,
    f: f32,
}

/// Whether the emulation knows kernel `name`.
pub fn knows(name: &str) -> bool {
    let Ok(c) = CString::new(name) else { return false };
    // SAFETY: a NUL-terminated string the call only reads.
    unsafe { amlserve_emu_knows(c.as_ptr()) != 0 }
}

/// Runs kernel `name` on `grid` blocks of `block` threads with `shared` bytes of dynamic shared memory.
///
/// # Safety
/// Every [`Arg::Ptr`] must point to a buffer of the type and at least the size the kernel reads and writes at
/// these arguments (as on a GPU, nothing here checks that; [`Guarded`] buffers show a write past their end).
pub unsafe fn launch(name: &str, grid: (u32, u32, u32), block: u32, shared: u32, args: &[Arg]) -> Result<(), String> {
    let c = CString::new(name).map_err(|e| e.to_string())?;
    let mut slots: Vec<Slot> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(p) => Slot { p },
            Arg::I32(i) => Slot { i },
            Arg::F32(f) => Slot { f },
        })
        .collect();
    let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut Slot as *mut c_void).collect();
    let kinds: String = args
        .iter()
        .map(|a| match a {
            Arg::Ptr(_) => 'p',
            Arg::I32(_) => 'i',
            Arg::F32(_) => 'f',
        })
        .collect();
    let kinds = CString::new(kinds).map_err(|e| e.to_string())?;
    let grid = [grid.0, grid.1, grid.2];
    let mut err = vec![0u8; 512];
    // SAFETY: the strings are NUL-terminated, `ptrs` holds one pointer per argument (as many as `kinds` has
    // letters) to a slot that lives until the call returns, `err` is writable for its length; the buffers are
    // the caller's promise.
    let rc = unsafe {
        amlserve_emu_launch(
            c.as_ptr(),
            grid.as_ptr(),
            block,
            shared,
            ptrs.as_mut_ptr(),
            kinds.as_ptr(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(String::from_utf8_lossy(&err[..end]).into_owned())
}

/// Canary elements on each side of a [`Guarded`] buffer.
const GUARD: usize = 64;

/// A buffer with canaries on both sides: the kernel gets a pointer to the data between them.
pub struct Guarded<T: Copy> {
    all: Vec<T>,
    canary: T,
    len: usize,
}

impl<T: Copy> Guarded<T> {
    /// `data` between `GUARD` copies of `canary` on each side (choose a NaN, so that a read past the end shows).
    pub fn new(data: &[T], canary: T) -> Self {
        let mut all = vec![canary; data.len() + 2 * GUARD];
        all[GUARD..GUARD + data.len()].copy_from_slice(data);
        Self {
            all,
            canary,
            len: data.len(),
        }
    }

    /// The pointer a kernel gets.
    pub fn ptr(&mut self) -> Arg {
        Arg::Ptr(self.all[GUARD..].as_mut_ptr().cast())
    }

    /// The data (the canaries excluded).
    pub fn data(&self) -> &[T] {
        &self.all[GUARD..GUARD + self.len]
    }

    /// An error naming the first canary a kernel overwrote, if any.
    pub fn check(&self, what: &str) -> Result<(), String>
    where
        T: Bits,
    {
        let canary = self.canary.bits();
        for (i, v) in self.all.iter().enumerate() {
            let inside = (GUARD..GUARD + self.len).contains(&i);
            if !inside && v.bits() != canary {
                let at = i as i64 - GUARD as i64;
                return Err(format!("{what}: element {at} (buffer of {}) was written", self.len));
            }
        }
        Ok(())
    }
}

/// An element's bits, to compare canaries (NaN canaries compare by their bits).
pub trait Bits {
    fn bits(&self) -> u64;
}

impl Bits for f32 {
    fn bits(&self) -> u64 {
        u64::from(self.to_bits())
    }
}

impl Bits for u32 {
    fn bits(&self) -> u64 {
        u64::from(*self)
    }
}

impl Bits for u16 {
    fn bits(&self) -> u64 {
        u64::from(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kernels_and_wrong_arity_are_errors() {
        assert!(knows("amlserve_paged_attention_bf16"));
        assert!(!knows("amlserve_nothing"));
        // SAFETY: the launch is refused before any kernel runs.
        let e = unsafe { launch("amlserve_nothing", (1, 1, 1), 32, 0, &[]) }.unwrap_err();
        assert!(e.contains("no kernel"), "{e}");
        let e = unsafe { launch("amlserve_add_bias", (1, 1, 1), 32, 0, &[Arg::I32(1)]) }.unwrap_err();
        assert!(e.contains("takes 4 arguments, given 1"), "{e}");
    }

    #[test]
    fn a_grid_stride_kernel_runs_and_a_canary_catches_an_overrun() {
        let (rows, width) = (3usize, 5usize);
        let mut x = Guarded::new(&vec![1.0f32; rows * width], f32::NAN);
        let mut bias = Guarded::new(&[0.0, 1.0, 2.0, 3.0, 4.0], f32::NAN);
        let args = [x.ptr(), bias.ptr(), Arg::I32(rows as i32), Arg::I32(width as i32)];
        // SAFETY: x holds rows * width floats and bias width.
        unsafe { launch("amlserve_add_bias", (2, 1, 1), 8, 0, &args) }.unwrap();
        assert_eq!(&x.data()[..5], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(&x.data()[10..], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        x.check("x").unwrap();
        // The gated activation told of one row more than its output holds writes past the output's end.
        let mut gate_up = Guarded::new(&vec![1.0f32; (rows + 1) * 2 * width], f32::NAN);
        let mut out = Guarded::new(&vec![0.0f32; rows * width], f32::NAN);
        let args = [
            out.ptr(),
            gate_up.ptr(),
            Arg::I32(rows as i32 + 1),
            Arg::I32(width as i32),
            Arg::I32(0),
        ];
        // SAFETY: the overrun (one row of 5) lands in the output's own canaries (64 elements), which is tested.
        unsafe { launch("amlserve_gated", (1, 1, 1), 32, 0, &args) }.unwrap();
        let e = out.check("out").unwrap_err();
        assert!(e.contains("element 15"), "{e}");
    }

    #[test]
    fn threads_waiting_at_different_barriers_fail_instead_of_hanging() {
        // emu.cpp's own test kernel: lanes 0-15 of a warp shuffle while lanes 16-31 wait at __syncthreads.
        let mut out = Guarded::new(&[0.0f32; 32], f32::NAN);
        // SAFETY: out holds a float per thread.
        let e = unsafe { launch("emu_test_divergent", (1, 1, 1), 32, 0, &[out.ptr()]) }.unwrap_err();
        assert!(
            e.contains("at a shuffle on line") && e.contains("while thread 16 at a barrier"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_barrier_between_warps_reads_nan() {
        // emu.cpp's own test kernel: each warp's lane 0 writes its slot and every thread sums all slots with no
        // barrier between: the warp run first sees the other's slot unwritten (NaN), whichever order.
        for blocks in [1, 2] {
            let mut out = Guarded::new(&vec![0.0f32; 64], f32::NAN);
            // SAFETY: out holds a float per thread; every block writes the same 64.
            unsafe { launch("emu_test_missing_barrier", (blocks, 1, 1), 64, 0, &[out.ptr()]) }.unwrap();
            assert!(out.data().iter().any(|v| v.is_nan()), "{:?}", out.data());
        }
    }

    #[test]
    fn a_16_byte_load_from_a_misaligned_address_fails_the_launch() {
        let words: Vec<u32> = (0..40).collect();
        let mut input = Guarded::new(&words, u32::MAX);
        assert_eq!(input.data().as_ptr() as usize % 16, 0, "the buffer itself is aligned");
        for (offset, aligned) in [(0, true), (4, true), (2, false)] {
            let mut out = Guarded::new(&[0u32; 8], u32::MAX);
            // SAFETY: 8 threads read 4 words each from word `offset` <= 4: inside the 40 words.
            let r = unsafe {
                launch(
                    "emu_test_vector_load",
                    (1, 1, 1),
                    8,
                    0,
                    &[out.ptr(), input.ptr(), Arg::I32(offset)],
                )
            };
            match (r, aligned) {
                (Ok(()), true) => {
                    let o = offset as u32;
                    assert_eq!(out.data()[1], 4 * (o + 4) + 6);
                }
                (Err(e), false) => assert!(e.contains("misaligned"), "{e}"),
                (r, _) => panic!("offset {offset}: {r:?}"),
            }
        }
    }

    #[test]
    fn an_argument_of_the_wrong_kind_is_an_error() {
        let mut x = Guarded::new(&[0.0f32; 4], f32::NAN);
        let args = [x.ptr(), x.ptr(), Arg::F32(1.0), Arg::I32(4)];
        // SAFETY: refused before the kernel runs.
        let e = unsafe { launch("amlserve_add_bias", (1, 1, 1), 32, 0, &args) }.unwrap_err();
        assert!(e.contains("argument 2 is a float, the kernel takes an int"), "{e}");
    }

    #[test]
    fn a_reduction_across_warps_and_a_whole_block_returning_early() {
        // add_rms_norm: blocks past `rows` return before the block reduction, the others reduce over two warps.
        let hidden = 8usize;
        let mut out = Guarded::new(&vec![0.0f32; 2 * hidden], f32::NAN);
        let mut x = Guarded::new(&vec![1.0f32; hidden], f32::NAN);
        let mut y = Guarded::new(&vec![1.0f32; hidden], f32::NAN);
        let mut w = Guarded::new(&vec![1.0f32; hidden], f32::NAN);
        let args = [
            out.ptr(),
            x.ptr(),
            y.ptr(),
            w.ptr(),
            Arg::I32(1),
            Arg::I32(hidden as i32),
            Arg::F32(0.0),
        ];
        // SAFETY: one row of `hidden` floats each; out holds two rows.
        unsafe { launch("amlserve_add_rms_norm", (2, 1, 1), 64, 0, &args) }.unwrap();
        // (1 + 1) / rms(2, ..., 2) = 1.
        assert!(out.data()[..hidden].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(out.data()[hidden..].iter().all(|&v| v == 2.0));
        out.check("out").unwrap();
    }
}

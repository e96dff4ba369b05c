//! glibc malloc settings that keep steps fast and the resident set near what is in use, and huge pages for the
//! weights.
//!
//! glibc's defaults grow the mmap threshold to the size of whatever large buffer was last freed (up to 32 MiB),
//! after which freed memory in the middle of a heap arena is never given back: a burst of long prompts left
//! ~650 MB resident after it ended (454 -> 1,107 MB over six rounds of an adversarial mix). A fixed 128 KiB
//! mmap threshold (with the trim threshold at glibc's 128 KiB) cured that, but cost every decode step dearly:
//! each step's activations above 128 KiB (a 16-row MLP is 256 KiB a layer) were mapped, faulted in page by
//! page, zeroed and unmapped again, and the heap top was given back and grown again. Gemma 3 270M's batched
//! forward at 16 rows: 350 tok/s so, 612 with the settings here (same minutes, `benches/engine.rs`).
//!
//! So: buffers from 4 MiB up (long prompts' KV and scratch) are mapped and unmapped on their own, a heap top up
//! to 64 MiB is kept between steps, and a background thread calls `malloc_trim(0)` every
//! [`TRIM_EVERY`], which hands back every whole free page in every arena (middle ones included), so what a
//! burst leaves behind is returned within seconds rather than kept. An operator's `MALLOC_MMAP_THRESHOLD_`
//! wins over all of it (no thread then).
//!
//! [`advise_huge_pages`] asks Linux to back a large weight buffer with 2 MiB pages where transparent huge pages
//! are on `madvise` (the common default): the matmul kernel streams hundreds of MiB per step, and with 4 KiB
//! pages it walks a page table every 64 cache lines and the prefetchers stop at each page's end.
//!
//! Only for glibc (and Linux) targets; elsewhere both do nothing.

#![allow(unsafe_code)]

/// Bytes from which allocations are mapped on their own.
const MMAP_THRESHOLD: i32 = 4 << 20;
/// Free bytes at the top of the heap that make glibc give them back at once.
const TRIM_THRESHOLD: i32 = 64 << 20;
/// How often free memory is handed back (see the module docs).
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Applies the settings and starts the trimming thread; call first thing in `main`, before other threads start.
pub fn configure() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before any other thread exists, with
        // parameters and values glibc documents.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
        let trimmer = std::thread::Builder::new().name("amlserve-trim".into()).spawn(|| loop {
            std::thread::sleep(TRIM_EVERY);
            // SAFETY: malloc_trim only returns free pages to the system; any thread may call it at any time.
            unsafe { libc::malloc_trim(0) };
        });
        if let Err(e) = trimmer {
            // Logging is not set up yet this early.
            eprintln!("amlserve: no memory trimming thread ({e}): freed memory is kept until reused");
        }
    }
}

/// Huge pages for the 2 MiB-aligned interior of `buf`, a buffer about to be written for the first time (the
/// advice applies to pages not yet touched). Only a hint: any error is ignored, and the buffer works either way.
pub fn advise_huge_pages<T>(buf: &mut [std::mem::MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let (first, end) = (start.next_multiple_of(HUGE), (start + size_of_val(buf)) / HUGE * HUGE);
        if end > first {
            // SAFETY: the range lies inside `buf`, memory this process owns; MADV_HUGEPAGE changes how its pages
            // are backed, never their contents or mapping.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
}

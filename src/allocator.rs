//! glibc malloc settings that keep the resident set near what is in use, and huge pages for the weights.
//!
//! By default glibc serves a large allocation with `mmap` and unmaps it on free, but then raises its mmap
//! threshold to the size just freed (up to 32 MiB). After the first long request has freed its KV buffers
//! (one per layer, megabytes each), later ones come from the heap arenas instead, and freed heap memory in the
//! middle of an arena is never given back: a burst of long prompts left ~650 MB resident after it ended
//! (454 -> 1,107 MB over six rounds of an adversarial mix, plateauing after two). A fixed 128 KiB threshold
//! (the default's starting value) stops the adjustment, so every large buffer is unmapped when freed: the
//! same mix then peaked at 602 MB and fell back to 466 MB once it ended. (`MALLOC_ARENA_MAX=2` changed
//! nothing: 714 and 860 MB after two rounds, as with the default.) Setting the threshold also fixes the trim threshold, which is set here
//! to glibc's default so heap tops are still returned. An operator's `MALLOC_MMAP_THRESHOLD_` wins.
//!
//! [`advise_huge_pages`] asks Linux to back a large weight buffer with 2 MiB pages where transparent huge pages
//! are on `madvise` (the common default): the matmul kernel streams hundreds of MiB per step, and with 4 KiB
//! pages it walks a page table every 64 cache lines and the prefetchers stop at each page's end.
//!
//! Only for glibc (and Linux) targets; elsewhere both do nothing.

#![allow(unsafe_code)]

/// Bytes from which allocations are mapped on their own (glibc's default starting value).
const MMAP_THRESHOLD: i32 = 128 * 1024;
/// Free bytes at the top of the heap that make glibc give them back (glibc's default).
const TRIM_THRESHOLD: i32 = 128 * 1024;

/// Applies the settings; call first thing in `main`, before threads start.
pub fn configure() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread exists, with
    // parameters and values glibc documents.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
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

//! glibc malloc settings that keep the resident set near what is in use.
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
//! Only for glibc targets; elsewhere this does nothing.

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

//! Case counts and seeds shared by the `fuzz_*` tests (included with `#[path]`): `make test` runs a short,
//! fixed-seed pass of each target, `make fuzz` a long one with a fresh seed.
//!
//! Knobs, all proptest's own: `PROPTEST_CASES` (cases per target; unset: the target's CI count),
//! `PROPTEST_RNG_SEED` (unset: a fixed seed, so CI runs the same cases every time), `PROPTEST_MAX_SHRINK_TIME`
//! (milliseconds spent shrinking a failure; unset: 60 s).
#![allow(dead_code)]

use proptest::test_runner::{Config, RngSeed};

/// The seed of the CI runs.
const CI_SEED: u64 = 0x616d_6c73;

/// proptest's configuration for a target that runs `ci_cases` cases in `make test`.
pub fn config(ci_cases: u32) -> Config {
    let set = |name: &str| std::env::var_os(name).is_some();
    let mut c = Config::default();
    if !set("PROPTEST_CASES") {
        c.cases = ci_cases;
    }
    if !set("PROPTEST_RNG_SEED") {
        c.rng_seed = RngSeed::Fixed(CI_SEED);
    }
    if !set("PROPTEST_MAX_SHRINK_TIME") {
        c.max_shrink_time = 60_000;
    }
    c
}

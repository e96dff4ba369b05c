//! The Q8_0 VNNI matmul kernel alone ([`amlserve::model::vnni_q8::VnniQ8`]): time per call, multiply-adds and
//! weight bytes per second, per shape and activation row count.
//!
//! `cargo bench --bench matmul -- [--shapes 262144x640,1536x576] [--rows 1,16,64] [--threads 2]`. The default
//! shapes are Gemma 3 270M's output projection (262,144 x 640, the decode step's largest matrix) and SmolLM2's
//! MLP up projection. Synthetic weights; numbers are for comparison within one run.

use std::time::{Duration, Instant};

use amlserve::model::vnni_q8::VnniQ8;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Matrices as ROWSxCOLS (output rows x input width; width a multiple of 32, rows of 16).
    #[arg(long, value_delimiter = ',', default_values = ["262144x640", "1536x576"])]
    shapes: Vec<String>,
    /// Activation rows per call.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    rows: Vec<usize>,
    /// Compute threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

/// A deterministic spread of byte values (a multiplicative hash of the index; no two neighbours alike).
fn byte(i: usize, seed: usize) -> u8 {
    (i.wrapping_add(seed).wrapping_mul(0x9E37_79B1) >> 16) as u8
}

/// Raw Q8_0 blocks of an `[n, k]` matrix: scale 0.01 (f16), spread values.
fn q8_0(n: usize, k: usize) -> Vec<u8> {
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    let mut out = Vec::with_capacity(n * k / 32 * 34);
    for b in 0..n * k / 32 {
        out.extend_from_slice(&scale);
        out.extend((b * 32..(b + 1) * 32).map(|i| byte(i, 1)));
    }
    out
}

fn main() {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    amlserve::set_compute_threads(threads, false);
    println!("threads: {threads} | {} s per measurement\n", args.secs);
    println!("| matrix | weight MiB | rows | ms/call | GMAC/s | weight GB/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for shape in &args.shapes {
        let (n, k) = shape
            .split_once('x')
            .and_then(|(n, k)| Some((n.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
            .unwrap_or_else(|| panic!("--shapes: {shape:?} is not ROWSxCOLS"));
        let Some(w) = VnniQ8::new(&q8_0(n, k), n, k) else {
            println!("| {shape} | kernel unavailable (CPU lacks AVX-512 VNNI, or the shape does not tile) |");
            continue;
        };
        for &m in &args.rows {
            let x: Vec<f32> = (0..m * k).map(|i| f32::from(byte(i, 7) as i8) / 64.0).collect();
            let mut out = vec![0f32; m * n];
            w.matmul_into(&x, &mut out); // warm: pages touched, tiles in whatever cache holds them
            let (mut calls, start) = (0u32, Instant::now());
            while start.elapsed() < Duration::from_secs_f64(args.secs) {
                w.matmul_into(&x, &mut out);
                calls += 1;
            }
            let per = start.elapsed().as_secs_f64() / f64::from(calls);
            println!(
                "| {shape} | {:.0} | {m} | {:.3} | {:.1} | {:.1} |",
                w.bytes() as f64 / (1 << 20) as f64,
                per * 1e3,
                (m * n * k) as f64 / per / 1e9,
                w.bytes() as f64 / per / 1e9
            );
        }
    }
}

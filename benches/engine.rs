//! Model-level speed on this machine: prefill and decode tokens/s for each weight format and batch size.
//!
//! `make bench` (or `cargo bench --bench engine -- [--weights q8_0,f32] [--batch 1,4,16] [--decode 64]`).
//! Prints a markdown table. Measures the batched forward + greedy argmax, as the engine runs them, without
//! HTTP. Numbers are for comparison within one run (the machine is shared and noisy).

use std::time::Instant;

use amlserve::engine::sampler::argmax;
use amlserve::model::{Model, SeqChunk, SeqKv, WeightFormat};
mod common;

use clap::{Parser, ValueEnum};

#[derive(Parser)]
struct Args {
    /// Weight formats to compare.
    #[arg(long, value_delimiter = ',', default_values = ["q8_0", "f32"])]
    weights: Vec<String>,
    /// Batch sizes for the decode measurement.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    batch: Vec<usize>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prefill: usize,
    /// Decode steps per measurement.
    #[arg(long, default_value_t = 64)]
    decode: usize,
    #[command(flatten)]
    common: common::ModelArgs,
}

fn prompt(model: &Model, n: usize) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog while the cat watches from the window. ".repeat(n / 8 + 2);
    let mut ids = model.tokenizer.encode(&text).expect("encode");
    ids.truncate(n);
    ids
}

/// One forward step: `tokens[i]` appended to sequence `i`; returns each sequence's greedy next token.
fn step(model: &Model, kvs: &mut [SeqKv], tokens: &[Vec<u32>]) -> Vec<u32> {
    let mut chunks: Vec<SeqChunk> = kvs
        .iter_mut()
        .zip(tokens)
        .map(|(kv, t)| SeqChunk {
            kv,
            tokens: t,
            want_logits: true,
        })
        .collect();
    let logits = model
        .cpu()
        .expect("the CPU forward")
        .forward(&mut chunks)
        .expect("forward");
    logits
        .to_vec2::<f32>()
        .expect("logits")
        .iter()
        .map(|r| argmax(r))
        .collect()
}

fn main() {
    let args = Args::parse();
    let (threads, path) = args.common.apply(false);
    println!(
        "model: {} | threads: {threads} | prefill {} tokens | decode {} steps\n",
        path.display(),
        args.prefill,
        args.decode
    );
    println!("| weights | weight MiB | prefill tok/s | batch | decode tok/s (total) | ms/step |");
    println!("|---|---:|---:|---:|---:|---:|");
    for w in &args.weights {
        let format = WeightFormat::from_str(w, true).unwrap_or_else(|e| panic!("--weights {w}: {e}"));
        let model = Model::load(&path, format).expect("model loads");
        let shape = model.config.kv_shape();
        let ids = prompt(&model, args.prefill);
        // Warm-up, then prefill timing (best of 3).
        let mut best_prefill = f64::MAX;
        for _ in 0..3 {
            let mut kv = SeqKv::new(shape, ids.len(), ids.len());
            let t = Instant::now();
            model
                .cpu()
                .expect("the CPU forward")
                .forward(&mut [SeqChunk {
                    kv: &mut kv,
                    tokens: &ids,
                    want_logits: true,
                }])
                .expect("prefill");
            best_prefill = best_prefill.min(t.elapsed().as_secs_f64());
        }
        let prefill_tps = ids.len() as f64 / best_prefill;
        for &b in &args.batch {
            let short = prompt(&model, 16);
            let mut kvs: Vec<SeqKv> = (0..b)
                .map(|_| SeqKv::new(shape, 16 + args.decode + 1, 16 + args.decode + 1))
                .collect();
            // The prompt step, then `decode` single-token steps; greedy next tokens.
            let mut next = step(&model, &mut kvs, &vec![short.clone(); b]);
            let t = Instant::now();
            for _ in 0..args.decode {
                let last: Vec<Vec<u32>> = next.iter().map(|&id| vec![id]).collect();
                next = step(&model, &mut kvs, &last);
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "| {w} | {} | {prefill_tps:.0} | {b} | {:.1} | {:.2} |",
                model.weight_bytes() >> 20,
                (b * args.decode) as f64 / secs,
                secs * 1000.0 / args.decode as f64
            );
        }
    }
}

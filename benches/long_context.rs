//! Long prompts and long contexts at model level: prefill tokens/s (and time to the first logits) of one
//! prompt of 1k, 4k and 8k tokens in the engine's chunks, decode tokens/s of 16 streams whose contexts are
//! 2k tokens each, and the attention's share of a step.
//!
//! `make bench-long` (or `cargo bench --bench long_context -- [--prompts 1024,4096,8000] [--chunks 64,512]
//! [--streams 16] [--context 2048] [--decode 32]`). Prints markdown tables. With `LLAMA_BENCH` and
//! `LLAMA_BATCHED_BENCH` set, `scripts/bench-long.sh` runs llama.cpp's own benchmarks on a Q8_0 file of the
//! same model beside it, one after the other.

use std::time::Instant;

use amlserve::model::{Model, SeqChunk, SeqKv, WeightFormat};
mod common;

use clap::{Parser, ValueEnum};

#[derive(Parser)]
struct Args {
    /// Prompt lengths for the prefill measurement.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 4096, 8000])]
    prompts: Vec<usize>,
    /// Chunk sizes the prompt is fed in (the engine's --max-batch-tokens when the prompt runs alone).
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 512])]
    chunks: Vec<usize>,
    /// Concurrent streams for the decode measurement.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Context of each stream before decoding.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Weight format.
    #[arg(long, default_value = "q8_0")]
    weights: String,
    #[command(flatten)]
    common: common::ModelArgs,
}

/// `n` prompt tokens of varied text.
fn prompt(model: &Model, n: usize) -> Vec<u32> {
    let text = "In the archive we found letters, maps and ledgers from 1843 to 1911; each one told of trade. ";
    let mut ids = model.tokenizer.encode(&text.repeat(n / 16 + 2)).expect("encode");
    ids.truncate(n);
    ids
}

/// Feeds `ids` into `kv` in chunks of `chunk`; returns the seconds until the last chunk's logits.
fn prefill(model: &Model, kv: &mut SeqKv, ids: &[u32], chunk: usize) -> f64 {
    let t = Instant::now();
    for (i, part) in ids.chunks(chunk).enumerate() {
        let last = (i + 1) * chunk >= ids.len();
        model
            .cpu()
            .expect("the CPU forward")
            .forward(&mut [SeqChunk {
                kv,
                tokens: part,
                want_logits: last,
            }])
            .expect("prefill");
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let args = Args::parse();
    let (threads, path) = args.common.apply(false);
    let format = WeightFormat::from_str(&args.weights, true).unwrap_or_else(|e| panic!("--weights: {e}"));
    let model = Model::load(&path, format).expect("model loads");
    let shape = model.config.kv_shape();
    println!(
        "model: {} | weights {} | threads {threads} | KV cache {} bytes/token\n",
        path.display(),
        args.weights,
        shape.bytes_per_token()
    );
    println!("| prompt tokens | chunk | time to logits (s) | prefill tok/s |");
    println!("|---:|---:|---:|---:|");
    // Warm-up: pool threads, page faults of the weights.
    let warm = prompt(&model, 256);
    prefill(&model, &mut SeqKv::new(shape, 256, 256), &warm, 64);
    for &n in &args.prompts {
        let ids = prompt(&model, n);
        for &chunk in &args.chunks {
            let mut kv = SeqKv::new(shape, ids.len(), ids.len());
            let secs = prefill(&model, &mut kv, &ids, chunk);
            println!(
                "| {} | {chunk} | {secs:.2} | {:.0} |",
                ids.len(),
                ids.len() as f64 / secs
            );
        }
    }

    // Decode: one context computed once and copied to every stream (a stream's step reads its own copy).
    let (b, ctx) = (args.streams, args.context);
    let ids = prompt(&model, ctx);
    let mut first = SeqKv::new(shape, ctx, ctx);
    prefill(&model, &mut first, &ids[..ctx - 1], 512);
    let mut kvs: Vec<SeqKv> = (0..b)
        .map(|_| {
            let mut kv = SeqKv::new(shape, ctx + args.decode + 1, ctx + args.decode + 1);
            kv.copy_prefix(&first, ctx - 1).expect("room");
            kv
        })
        .collect();
    let mut next: Vec<u32> = vec![ids[ctx - 1]; b];
    let t = Instant::now();
    for _ in 0..args.decode {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&id| [id]).collect();
        let mut chunks: Vec<SeqChunk> = kvs
            .iter_mut()
            .zip(&tokens)
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
            .expect("decode");
        next = logits
            .to_vec2::<f32>()
            .expect("logits")
            .iter()
            .map(|r| amlserve::engine::sampler::argmax(r))
            .collect();
    }
    let secs = t.elapsed().as_secs_f64();
    println!("\n| streams | context | decode tok/s (total) | ms/step | KV read per step (MiB) |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {b} | {ctx} | {:.1} | {:.1} | {:.0} |",
        (b * args.decode) as f64 / secs,
        secs * 1000.0 / args.decode as f64,
        (b * ctx * shape.bytes_per_token()) as f64 / (1 << 20) as f64
    );
}

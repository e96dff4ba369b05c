//! The device forward's step times (`--device cuda` on a GPU; `candle-cpu` anywhere): decode steps at batch
//! 1..64 over a cached context, and prompt reads of one sequence, each split into the host's time to issue the
//! step, the wait for the device, and the copy of the logits back. Prints a table.
//!
//! `cargo bench --bench device -- --device candle-cpu --context 64 --batches 1,4` here;
//! `scripts/gpu-check.sh` runs the CUDA build of it on a GPU.

mod common;

use std::time::Instant;

use amlserve::model::device::forward::DeviceChunk;
use amlserve::model::device::{self, DeviceChoice, DeviceLlama, KvPool, PagedKv};
use amlserve::model::{Forward, Model, WeightFormat};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    model: common::ModelArgs,
    /// Device (`cuda`, `cuda:N`, `candle-cpu`).
    #[arg(long, default_value = "cuda")]
    device: DeviceChoice,
    /// Cached tokens per sequence before the timed decode steps.
    #[arg(long, default_value_t = 256)]
    context: usize,
    /// Batch sizes of the decode steps.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,32,64")]
    batches: Vec<usize>,
    /// Prompt lengths read in one step.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    prompts: Vec<usize>,
    /// Timed steps per row (after 3 untimed).
    #[arg(long, default_value_t = 20)]
    steps: usize,
}

/// Milliseconds of one step: issuing it, waiting for the device, copying the logits back.
#[derive(Default, Clone, Copy)]
struct Split {
    issue: f64,
    wait: f64,
    copy: f64,
}

fn timed_step(llama: &DeviceLlama, pool: &KvPool, kvs: &mut [PagedKv], tokens: &[Vec<u32>]) -> Split {
    let t0 = Instant::now();
    let mut chunks: Vec<DeviceChunk<'_>> = kvs
        .iter_mut()
        .zip(tokens)
        .map(|(kv, t)| DeviceChunk {
            kv,
            tokens: t,
            want_logits: true,
        })
        .collect();
    let logits = llama.forward(&mut chunks, pool).expect("forward");
    let t1 = Instant::now();
    llama.device().synchronize().expect("sync");
    let t2 = Instant::now();
    let rows = llama.rows_to_host(&logits).expect("logits");
    let t3 = Instant::now();
    assert_eq!(rows.len(), tokens.len());
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    Split {
        issue: ms(t0, t1),
        wait: ms(t1, t2),
        copy: ms(t2, t3),
    }
}

fn median(mut v: Vec<Split>) -> Split {
    v.sort_by(|a, b| (a.issue + a.wait + a.copy).total_cmp(&(b.issue + b.wait + b.copy)));
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let (_, path) = args.model.apply();
    let (dev, info) = device::open(args.device)
        .expect("device")
        .expect("a device, not the fast CPU forward");
    let model = Model::load_on(&path, WeightFormat::Q8_0, Some((&dev, info.clone()))).expect("model");
    let Forward::Device(llama, _) = &model.forward else {
        unreachable!()
    };
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let longest = args
        .prompts
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(args.context + args.steps + 8);
    let per_token = KvPool::bytes_per_token(model.config.kv_shape(), llama.kv_dtype());
    let pool = llama
        .new_pool(per_token * (max_batch + 1) * (longest + 64))
        .expect("pool");
    let vocab = model.config.vocab_size as u32;
    let token = |i: usize| (i as u32 * 7919 + 13) % vocab;
    println!(
        "device {} ({}), model {}",
        info.device,
        info.name.unwrap_or_default(),
        model.name
    );
    println!("\n| step | tokens | step ms | issue ms | device wait ms | logits copy ms | tok/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &b in &args.batches {
        let mut kvs: Vec<PagedKv> = (0..b).map(|_| PagedKv::new(pool.clone(), longest + 64)).collect();
        let prompt: Vec<Vec<u32>> = (0..b)
            .map(|s| (0..args.context).map(|i| token(i + s)).collect())
            .collect();
        timed_step(llama, &pool, &mut kvs, &prompt);
        let mut times = Vec::new();
        for i in 0..args.steps + 3 {
            let next: Vec<Vec<u32>> = (0..b).map(|s| vec![token(i * 31 + s)]).collect();
            let t = timed_step(llama, &pool, &mut kvs, &next);
            if i >= 3 {
                times.push(t);
            }
        }
        let m = median(times);
        let step = m.issue + m.wait + m.copy;
        println!(
            "| decode, batch {b}, context {} | {b} | {step:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            args.context,
            m.issue,
            m.wait,
            m.copy,
            b as f64 * 1e3 / step
        );
    }
    for &n in &args.prompts {
        let prompt: Vec<u32> = (0..n).map(token).collect();
        let mut times = Vec::new();
        for i in 0..4 {
            let mut kvs = vec![PagedKv::new(pool.clone(), n)];
            let t = timed_step(llama, &pool, &mut kvs, std::slice::from_ref(&prompt));
            if i > 0 {
                times.push(t);
            }
        }
        let m = median(times);
        let step = m.issue + m.wait + m.copy;
        println!(
            "| prompt of {n} | {n} | {step:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            m.issue,
            m.wait,
            m.copy,
            n as f64 * 1e3 / step
        );
    }
}

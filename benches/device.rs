//! The device forward's step times (`--device cuda` on a GPU; `candle-cpu` anywhere): decode steps at batch
//! 1..64 over a cached context, and prompt reads of one sequence, each split into the host's time to issue the
//! step, the wait for the device, and the copy of the logits back; or, for greedy rows, the rows' argmax computed
//! on the device and copied back instead (what the server does when every row of a step is plain greedy). Prints
//! a table.
//!
//! `--graphs` measures each weight format again with decode steps replayed as CUDA graphs. `--packed 16x128`
//! (the default) times a step reading 16 prompts of 128 tokens together, the shape of a burst of requests;
//! `--packed-stages` splits it into stages; `--beside 1984` (the default) times the largest decode batch beside
//! a prompt chunk. Each step is timed with each attention kernel it may take: decode steps with the grouped
//! kernel (the default) and the per-row one; steps with prompts also with the tiled kernel (the default for
//! prompt chunks). Decode steps of up to 8 rows on Q8_0 weights are also timed with candle's matmul kernels in
//! place of ours (`amlserve_q8_0_rows_*`).
//!
//! `cargo bench --bench device -- --device candle-cpu --context 64 --batches 1,4` here;
//! `scripts/gpu-check.sh` runs the CUDA build of it on a GPU.

mod common;

use std::time::Instant;

use amlserve::model::device::forward::DeviceChunk;
use amlserve::model::device::launch::{self, Kernels};
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
    /// Weight formats to measure, one table each (`q8_0`, `f16`, `f32`, `stored`).
    #[arg(long, value_delimiter = ',', default_value = "q8_0")]
    weights: Vec<WeightFormat>,
    /// Also time each stage of the forward (the device waited for after each) at these batch sizes.
    #[arg(long, value_delimiter = ',')]
    stages: Vec<usize>,
    /// Measure each weight format a second time with decode steps replayed as CUDA graphs (`--cuda-graphs`).
    #[arg(long)]
    graphs: bool,
    /// Steps reading SEQSxTOKENS prompts together (a burst of requests prefilled in one step).
    #[arg(long, value_delimiter = ',', default_value = "16x128", value_parser = packed_shape)]
    packed: Vec<(usize, usize)>,
    /// Also time each stage of the packed prompt steps.
    #[arg(long)]
    packed_stages: bool,
    /// Steps of the largest decode batch beside a prompt chunk of this many tokens (what the streams' ITL
    /// pays while a prompt is read); 0 for none.
    #[arg(long, default_value_t = 1984)]
    beside: usize,
}

/// `SEQSxTOKENS`, both positive.
fn packed_shape(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once('x').ok_or("expected SEQSxTOKENS, e.g. 16x128")?;
    let n = |v: &str| {
        v.parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or(format!("{v} is not a positive count"))
    };
    Ok((n(a)?, n(b)?))
}

/// Milliseconds of one step: issuing it, waiting for the device, copying the logits back (or instead their
/// argmax, computed on the device).
#[derive(Default, Clone, Copy)]
struct Split {
    issue: f64,
    wait: f64,
    copy: f64,
    argmax: f64,
}

fn timed_step(llama: &DeviceLlama, pool: &KvPool, kvs: &mut [PagedKv], tokens: &[Vec<u32>]) -> Split {
    // Written first, as the engine's buffer kept from step to step is: the copy is timed, not page faults.
    let mut rows = vec![1f32; tokens.len() * llama.config.vocab_size];
    let t0 = Instant::now();
    let logits = llama
        .forward(&mut DeviceChunk::each_wanted(kvs, tokens), pool)
        .expect("forward");
    let t1 = Instant::now();
    llama.device().synchronize().expect("sync");
    let t2 = Instant::now();
    llama.rows_to_host(&logits, &mut rows).expect("logits");
    let t3 = Instant::now();
    let mut ids = vec![0u32; tokens.len()];
    llama.argmax_to_host(&logits, &mut ids).expect("argmax");
    let t4 = Instant::now();
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    Split {
        issue: ms(t0, t1),
        wait: ms(t1, t2),
        copy: ms(t2, t3),
        argmax: ms(t3, t4),
    }
}

fn median(mut v: Vec<Split>) -> Split {
    v.sort_by(|a, b| (a.issue + a.wait + a.copy).total_cmp(&(b.issue + b.wait + b.copy)));
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let (_, path) = args.model.apply(matches!(args.device, DeviceChoice::Cuda(_)));
    let (dev, info) = device::open(args.device)
        .expect("device")
        .expect("a device, not the fast CPU forward");
    println!("device {} ({})", info.device, info.name.clone().unwrap_or_default());
    for &format in &args.weights {
        for graphs in [false, true].into_iter().filter(|&g| !g || args.graphs) {
            let model = Model::load_on(&path, format, Some((&dev, info.clone()))).expect("model");
            let Forward::Device(llama, _) = &model.forward else {
                unreachable!()
            };
            println!(
                "\nmodel {}, weights {format:?} ({} MiB on the device), CUDA graphs {}",
                model.name,
                llama.weight_bytes >> 20,
                if graphs { "on" } else { "off" }
            );
            measure(&args, &model, llama, format, graphs);
        }
    }
}

/// The step table for one loaded model, then the per-stage tables asked for.
fn measure(args: &Args, model: &Model, llama: &DeviceLlama, format: WeightFormat, graphs: bool) {
    let max_batch = args.batches.iter().chain(&args.stages).copied().max().unwrap_or(1);
    let longest = args
        .prompts
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(args.context + args.steps + 8)
        .max(args.beside);
    // The first two decode steps of each batch size run op by op and record its graph: both are untimed.
    if graphs {
        if let Err(why) = llama.enable_decode_graphs(max_batch, longest) {
            println!("(graphs off: {why})");
        }
    }
    let per_token = KvPool::bytes_per_token(model.config.kv_shape(), llama.kv_dtype());
    let packed_tokens = args.packed.iter().map(|&(n, t)| n * (t + 16)).max().unwrap_or(0);
    let pool = llama
        .new_pool(per_token * ((max_batch + 1) * (longest + 64)).max(packed_tokens))
        .expect("pool");
    let vocab = model.config.vocab_size as u32;
    let token = |i: usize| (i as u32 * 7919 + 13) % vocab;
    // `b` sequences holding `context` tokens each.
    let started = |b: usize| -> Vec<PagedKv> {
        let mut kvs: Vec<PagedKv> = (0..b).map(|_| PagedKv::new(pool.clone(), longest + 64)).collect();
        let prompt: Vec<Vec<u32>> = (0..b)
            .map(|s| (0..args.context).map(|i| token(i + s)).collect())
            .collect();
        timed_step(llama, &pool, &mut kvs, &prompt);
        kvs
    };
    println!(
        "\n| step | tokens | step ms | issue ms | device wait ms | logits copy ms | tok/s | argmax ms | tok/s, argmax |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &b in &args.batches {
        // Decode steps have no prompt chunks to tile: the grouped kernel and the per-row one; with Q8_0 weights
        // and up to Q8_MAX_ROWS rows, also candle's matmul kernels in place of ours (with graphs, each set
        // records its own: graphs are kept per batch size and kernel set).
        let mut sets = vec![
            ("attention grouped", Kernels::ALL),
            ("attention per row", Kernels::PER_ROW),
        ];
        if format == WeightFormat::Q8_0 && b <= launch::Q8_MAX_ROWS {
            sets.push(("attention grouped, candle's Q8_0 matmuls", Kernels::CANDLE_Q8));
        }
        for (what, kernels) in sets {
            launch::set_kernels(kernels);
            let mut kvs = started(b);
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
                "| decode, batch {b}, context {}, {} | {b} | {step:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} |",
                args.context,
                what,
                m.issue,
                m.wait,
                m.copy,
                b as f64 * 1e3 / step,
                m.argmax,
                b as f64 * 1e3 / (m.issue + m.wait + m.argmax)
            );
        }
        launch::set_kernels(Kernels::ALL);
    }
    // Fresh sequences each time: `seqs` prompts of `n` tokens.
    let packed = |seqs: usize, n: usize| -> (Vec<PagedKv>, Vec<Vec<u32>>) {
        let kvs = (0..seqs).map(|_| PagedKv::new(pool.clone(), n)).collect();
        let prompts = (0..seqs).map(|s| (0..n).map(|i| token(i + 7 * s)).collect()).collect();
        (kvs, prompts)
    };
    let shapes = args.prompts.iter().map(|&n| (1, n)).chain(args.packed.iter().copied());
    for (seqs, n) in shapes {
        for (what, kernels) in Kernels::ATTENTION_SETS {
            launch::set_kernels(kernels);
            let mut times = Vec::new();
            for i in 0..4 {
                let (mut kvs, prompts) = packed(seqs, n);
                let t = timed_step(llama, &pool, &mut kvs, &prompts);
                if i > 0 {
                    times.push(t);
                }
            }
            let m = median(times);
            let step = m.issue + m.wait + m.copy;
            let shape = if seqs == 1 {
                format!("prompt of {n}")
            } else {
                format!("{seqs} prompts of {n}, packed")
            };
            println!(
                "| {shape}, attention {what} | {} | {step:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | |",
                seqs * n,
                m.issue,
                m.wait,
                m.copy,
                (seqs * n) as f64 * 1e3 / step,
                m.argmax
            );
        }
        launch::set_kernels(Kernels::ALL);
    }
    if let Some(&b) = args.batches.iter().max().filter(|_| args.beside > 0) {
        let n = args.beside;
        let prompt: Vec<u32> = (0..n).map(token).collect();
        for (what, kernels) in Kernels::ATTENTION_SETS {
            launch::set_kernels(kernels);
            let mut kvs = started(b);
            let mut times = Vec::new();
            for i in 0..4 {
                // The decode rows first, as the scheduler packs a step, then a fresh prompt chunk.
                let mut step: Vec<Vec<u32>> = (0..b).map(|s| vec![token(i * 31 + s)]).collect();
                step.push(prompt.clone());
                kvs.push(PagedKv::new(pool.clone(), n));
                let t = timed_step(llama, &pool, &mut kvs, &step);
                kvs.pop();
                if i > 0 {
                    times.push(t);
                }
            }
            let m = median(times);
            let step = m.issue + m.wait + m.copy;
            println!(
                "| decode, batch {b}, beside a prompt of {n}, attention {what} | {} | {step:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | |",
                b + n,
                m.issue,
                m.wait,
                m.copy,
                (b + n) as f64 * 1e3 / step,
                m.argmax
            );
        }
        launch::set_kernels(Kernels::ALL);
    }
    for &b in &args.stages {
        let mut kvs = started(b);
        llama.stages.set(true);
        for i in 0..args.steps {
            let next: Vec<Vec<u32>> = (0..b).map(|s| vec![token(i * 31 + s)]).collect();
            timed_step(llama, &pool, &mut kvs, &next);
        }
        llama.stages.set(false);
        let title = format!("a decode step, batch {b}, context {}", args.context);
        print_stages(llama, &title, args.steps);
    }
    if args.packed_stages {
        for &(seqs, n) in &args.packed {
            llama.stages.set(true);
            for _ in 0..3 {
                let (mut kvs, prompts) = packed(seqs, n);
                timed_step(llama, &pool, &mut kvs, &prompts);
            }
            llama.stages.set(false);
            print_stages(llama, &format!("a step reading {seqs} prompts of {n}"), 3);
        }
    }
}

/// The stage times `llama` collected over `steps` steps, as a table.
fn print_stages(llama: &DeviceLlama, title: &str, steps: usize) {
    let stages = llama.stages.take();
    let total: f64 = stages.iter().map(|s| s.1).sum();
    println!("\nstages of {title} (device waited for after each stage)");
    println!("\n| stage | ms per step | share |");
    println!("|---|---:|---:|");
    for (name, ms, _) in &stages {
        let per = ms / steps as f64;
        println!("| {name} | {per:.3} | {:.0}% |", 100.0 * ms / total);
    }
    println!("| total | {:.3} | |", total / steps as f64);
}

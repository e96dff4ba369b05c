//! Embedding throughput through HTTP: the same single-input requests sent one by one, then all at once, so the
//! embedding engine can pack them into batch forwards.
//!
//! `make bench-embed` (or `cargo bench --bench embeddings -- [--requests 64] [--rounds 3] [--batch-tokens 1024]`).
//! Starts the real `amlserve` binary on 127.0.0.1 (port 0) with the real all-MiniLM-L6-v2, and prints a markdown
//! table: requests/s for each mode and the concurrent / sequential ratio. Modes alternate within each round, so
//! the ratio compares like with like on a shared, noisy machine; no number passes or fails anything.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Requests per mode and round (each has one input).
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Rounds; each runs both modes.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// --embedding-max-batch-tokens for the server.
    #[arg(long, default_value_t = 1024)]
    batch_tokens: usize,
    /// Compute threads for the server (its default when unset).
    #[arg(long)]
    threads: Option<usize>,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

/// The server process; killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &Args) -> (Server, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_amlserve"));
    cmd.args(["--host", "127.0.0.1", "--port", "0"])
        .arg("--model")
        .arg(root.join(amlserve::config::DEFAULT_MODEL))
        .arg("--embedding-model")
        .arg(root.join(amlserve::config::DEFAULT_EMBEDDING_MODEL))
        .args(["--embedding-max-batch-tokens", &args.batch_tokens.to_string()])
        .args(["--embedding-max-waiting", &(args.requests + 1).to_string()])
        .env("RUST_LOG", "warn,amlserve::server=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(t) = args.threads {
        cmd.args(["--threads", &t.to_string()]);
    }
    let mut child = cmd.spawn().expect("start amlserve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("server printed its address").expect("read");
        if let Some(rest) = line.split("address=").nth(1) {
            break rest.split_whitespace().next().expect("address").to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (Server(child), format!("http://{addr}"))
}

/// Distinct inputs of mixed lengths (8 to ~70 tokens), like search queries and passages.
fn inputs(n: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "river", "market", "engine", "quiet", "policy", "garden", "signal", "harbor", "winter", "ledger", "orbit",
        "canvas", "theory", "bridge", "summer", "copper",
    ];
    (0..n)
        .map(|i| {
            let len = 6 + (i * 37) % 60;
            (0..len)
                .map(|j| WORDS[(i * 7 + j * 3) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

async fn embed(client: &reqwest::Client, url: &str, text: &str) {
    let r = client
        .post(url)
        .json(&json!({"input": text}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200, "embedding request failed");
    r.bytes().await.expect("body");
}

async fn sequential(client: &reqwest::Client, url: &str, texts: &[String]) -> Duration {
    let t = Instant::now();
    for text in texts {
        embed(client, url, text).await;
    }
    t.elapsed()
}

async fn concurrent(client: &reqwest::Client, url: &str, texts: &[String]) -> Duration {
    let t = Instant::now();
    futures::future::join_all(texts.iter().map(|text| embed(client, url, text))).await;
    t.elapsed()
}

/// `name_count` and `name_sum` of a histogram in a scrape.
fn histogram(scrape: &str, name: &str) -> (f64, f64) {
    let get = |suffix: &str| {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (get("count"), get("sum"))
}

/// Forwards, inputs and forward seconds so far.
async fn forwards(client: &reqwest::Client, base: &str) -> (f64, f64, f64) {
    let scrape = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    let (n, inputs) = histogram(&scrape, "amlserve_embedding_batch_size");
    (n, inputs, histogram(&scrape, "amlserve_embedding_forward_seconds").1)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (_server, base) = start(&args);
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(120);
    while client
        .get(format!("{base}/health"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < until, "server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("{base}/v1/embeddings");
    let texts = inputs(args.requests);
    // Warm-up: first calls pay for allocations and thread pools.
    concurrent(&client, &url, &texts[..texts.len().min(8)]).await;
    println!(
        "{} single-input requests per mode | --embedding-max-batch-tokens {} | {} rounds\n",
        args.requests, args.batch_tokens, args.rounds
    );
    println!(
        "| round | sequential req/s | concurrent req/s | ratio | sequential: forward s | concurrent: forwards, inputs each, forward s |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    let (mut seq_total, mut conc_total) = (Duration::ZERO, Duration::ZERO);
    let rate = |d: Duration| args.requests as f64 / d.as_secs_f64();
    for round in 1..=args.rounds {
        let (_, _, t0) = forwards(&client, &base).await;
        let s = sequential(&client, &url, &texts).await;
        let (f0, i0, t1) = forwards(&client, &base).await;
        let c = concurrent(&client, &url, &texts).await;
        let (f1, i1, t2) = forwards(&client, &base).await;
        seq_total += s;
        conc_total += c;
        println!(
            "| {round} | {:.1} | {:.1} | {:.2}x | {:.2} | {}, {:.1}, {:.2} |",
            rate(s),
            rate(c),
            rate(c) / rate(s),
            t1 - t0,
            f1 - f0,
            (i1 - i0) / (f1 - f0).max(1.0),
            t2 - t1
        );
    }
    let (s, c) = (rate(seq_total), rate(conc_total));
    let r = args.rounds as f64;
    println!("| all | {:.1} | {:.1} | {:.2}x | | |", s * r, c * r, c / s);
}

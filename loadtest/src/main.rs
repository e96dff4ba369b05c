//! Entry point: parse, build the clients, run the sweep (or the soak), print and write the reports.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use amlserve_loadtest::cli::{Cli, Config, SoakConfig};
use amlserve_loadtest::client::Client;
use amlserve_loadtest::plot;
use amlserve_loadtest::report::{self, Report};
use amlserve_loadtest::runner::{self, Endpoint, Interrupt};
use amlserve_loadtest::soak;
use amlserve_loadtest::workload::Workload;

fn main() -> anyhow::Result<()> {
    let config = Cli::parse().into_config()?;
    let workload = Arc::new(Workload::new(&config.prompts, config.params.max_tokens, config.seed)?);
    let endpoints = config
        .urls
        .iter()
        .zip(["A", "B"])
        .map(|(url, label)| {
            let client = Client::new(
                url,
                config.target,
                config.params.clone(),
                config.timeout,
                config.api_key.as_deref(),
                &config.headers,
            )?;
            Ok(Endpoint {
                label: label.to_string(),
                client,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let (stop_tx, interrupt) = tokio::sync::watch::channel(false);
    let passed = runtime.block_on(async {
        // First Ctrl-C: end the run and report what was measured; a second one exits at once.
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: reporting what was measured (Ctrl-C again to quit)");
                let _ = stop_tx.send(true);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        match &config.soak {
            Some(s) => run_soak(&config, s, &endpoints[0], workload, &interrupt).await,
            None => run_sweep(&config, &endpoints, workload, &interrupt)
                .await
                .map(|()| true),
        }
    })?;
    if *interrupt.borrow() {
        std::process::exit(130); // as a shell reports a Ctrl-C'd command, after the reports are written
    }
    if !passed {
        std::process::exit(1); // a failed soak verdict, after the reports are written
    }
    Ok(())
}

async fn run_sweep(
    config: &Config,
    endpoints: &[Endpoint],
    workload: Arc<Workload>,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let results = runner::run(config, endpoints, workload, interrupt).await;
    let report = Report::new(config, &results);
    print!("{}", report::text(&report));
    if let Some(path) = &config.json {
        report::write_json(path, &report)?;
    }
    if let Some(path) = &config.markdown {
        report::write_markdown(path, &report)?;
    }
    if let Some(dir) = &config.plot {
        for f in plot::write_all(dir, &results)? {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}

/// Runs the soak and writes its reports; returns whether its verdict passed.
async fn run_soak(
    config: &Config,
    soak: &SoakConfig,
    endpoint: &Endpoint,
    workload: Arc<Workload>,
    interrupt: &Interrupt,
) -> anyhow::Result<bool> {
    let result = soak::run(config, soak, endpoint, workload, interrupt)
        .await
        .context("starting the soak's metrics client")?;
    print!("{}", soak::report::text(config, &result));
    if let Some(path) = &config.json {
        soak::report::write_json(path, config, &result)?;
    }
    if let Some(path) = &config.markdown {
        soak::report::write_markdown(path, config, &result)?;
    }
    if let Some(dir) = &config.plot {
        let points: Vec<(f64, f64)> = result
            .readings
            .iter()
            .filter_map(|r| r.rss_bytes.map(|b| (r.t_s, b as f64 / (1024.0 * 1024.0))))
            .collect();
        if !points.is_empty() {
            eprintln!("wrote {}", plot::write_rss(dir, points)?.display());
        }
    }
    Ok(result.verdict.pass)
}

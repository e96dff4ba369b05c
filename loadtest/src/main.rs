//! Entry point: parse, build the clients, run the sweep, print and write the reports.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use amlserve_loadtest::cli::Cli;
use amlserve_loadtest::client::Client;
use amlserve_loadtest::plot;
use amlserve_loadtest::report::{self, Report};
use amlserve_loadtest::runner::{self, Endpoint};
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
    let results = runtime.block_on(async {
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
        runner::run(&config, &endpoints, workload, &interrupt).await
    });
    let report = Report::new(&config, &results);
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
    if *interrupt.borrow() {
        std::process::exit(130); // as a shell reports a Ctrl-C'd command, after the reports are written
    }
    Ok(())
}

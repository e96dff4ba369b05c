//! The `amlserve` binary: parse the configuration, set up logging, run the server.

use std::io::IsTerminal;

use amlserve::config::LogFormat;
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let level = std::env::var("RUST_LOG")
        .or_else(|_| std::env::var("AZUREML_LOG_LEVEL").map(|l| l.to_lowercase()))
        .unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).init(),
    }
}

fn main() -> anyhow::Result<()> {
    amlserve::allocator::configure();
    let args = amlserve::config::Args::parse();
    init_tracing(args.log_format);
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("amlserve: {e}");
            std::process::exit(2);
        }
    };
    amlserve::set_compute_threads(config.threads);
    tracing::info!(
        threads = config.threads,
        "compute threads set (CANDLE_NUM_THREADS, RAYON_NUM_THREADS)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(amlserve::server::run(config))
}

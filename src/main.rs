//! The `amlserve` binary: parse the configuration, set up logging, run the server.

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn init_tracing() {
    let level = std::env::var("RUST_LOG")
        .or_else(|_| std::env::var("AZUREML_LOG_LEVEL").map(|l| l.to_lowercase()))
        .unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

fn main() -> anyhow::Result<()> {
    let args = amlserve::config::Args::parse();
    init_tracing();
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("amlserve: {e}");
            std::process::exit(2);
        }
    };
    amlserve::set_compute_threads(config.threads);
    tracing::info!(threads = config.threads, "compute threads set (CANDLE_NUM_THREADS, RAYON_NUM_THREADS)");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(amlserve::server::run(config))
}

//! What the model-level benches share: the model and thread flags, and applying them.

use std::path::PathBuf;

/// Flags every model-level bench takes (flattened into its own).
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Compute threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// GGUF to load (default: the README's model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    pub bench: bool,
}

impl ModelArgs {
    /// Applies the server's allocator settings (`amlserve::allocator`: they change step times a lot) and sets
    /// candle's compute threads (`gpu`: for a model on a GPU, see `set_compute_threads`); returns the threads and
    /// the model path.
    pub fn apply(&self, gpu: bool) -> (usize, PathBuf) {
        amlserve::allocator::configure();
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        amlserve::set_compute_threads(threads, gpu);
        let path = self
            .model
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(amlserve::config::DEFAULT_MODEL));
        (threads, path)
    }
}

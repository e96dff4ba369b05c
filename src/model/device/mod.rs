//! The device-generic forward: the same batched llama forward as [`super::llama`], written against candle's
//! `Device` so it runs on the GPU (candle's CUDA backend) and, in tests and on request, on candle's CPU backend.
//!
//! - [`DeviceChoice`] / [`open`]: `--device auto|cpu|cuda[:N]` turned into a candle `Device` and a description
//!   ([`DeviceInfo`]) for the log and `/info`.
//! - [`paged`]: the KV cache as one pool of fixed-size blocks per layer on the device, shared by every sequence
//!   (a sequence holds a block table), with blocks shared between a prefix-cache entry and the sequences that
//!   start with it.
//! - [`ops`]: the kernels candle does not have (writing keys, rotated, and values to their slots; paged causal
//!   attention, rotating the queries as it reads them; greedy rows' argmax) or has only as several launches
//!   (the residual add with the next norm, the gated activation, q/k/v biases, per-head norms, Q8_0 projections
//!   of a few rows, the last with the gated activation read into the MLP's down projection), each with a CPU
//!   implementation and a CUDA one (compiled at run time by NVRTC, so the build needs no extra nvcc step).
//! - [`budget`]: the pool's size: its margin beyond the admission budget, and the budget a GPU's free memory
//!   allows.
//! - [`launch`]: the kernels' launch geometry, shared with their CPU emulation in the tests.
//! - [`forward`]: weights uploaded once as candle quantized tensors, the packed forward step.
//! - `graphs` (CUDA builds): decode steps recorded once per batch size as CUDA graphs and replayed
//!   (`--cuda-graphs`).
//!
//! The fast CPU path ([`super::llama`]) stays the CPU default; this one is what `--device cuda` runs, and its
//! CPU run is what `make test` checks against the fast path.

pub mod budget;
pub mod forward;
pub mod launch;
pub mod ops;
pub mod paged;
pub mod stages;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod graphs;

use candle_core::Device;

pub use forward::DeviceLlama;
pub use paged::{KvPool, PagedKv};

/// Where the model computes (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The GPU when this build has CUDA and the machine a GPU, else the CPU.
    #[default]
    Auto,
    /// The CPU, on the fast CPU forward.
    Cpu,
    /// The device-generic forward on candle's CPU backend: slower than `cpu`; for tests and for comparing the
    /// two forwards on machines without a GPU.
    CandleCpu,
    /// CUDA device `N` (0 when not given).
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "candle-cpu" => Ok(Self::CandleCpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "'{other}' is not a device: use auto, cpu, cuda, cuda:N or candle-cpu"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::CandleCpu => f.write_str("candle-cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device the model runs on, as the log and `/info` show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The GPU's name (absent on the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The GPU's memory in MiB (absent on the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<usize>,
    /// The GPU's compute capability, e.g. `9.0` (absent on the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
}

impl DeviceInfo {
    /// The CPU.
    pub fn cpu() -> Self {
        Self {
            device: "cpu".into(),
            name: None,
            memory_mb: None,
            compute_capability: None,
        }
    }
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device {0}: this amlserve was built without CUDA (build with `--features cuda`, or use the CUDA image)"
    )]
    NoCudaBuild(DeviceChoice),
    #[error("--device {choice}: {message}")]
    Unavailable { choice: DeviceChoice, message: String },
}

/// Whether this build has the CUDA backend.
pub const fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// Opens the device `choice` names. `None` means the fast CPU forward (`cpu`, or `auto` without a usable GPU);
/// `Some` is a GPU with its description.
pub fn open(choice: DeviceChoice) -> Result<Option<(Device, DeviceInfo)>, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::CandleCpu => Ok(Some((
            Device::Cpu,
            DeviceInfo {
                device: "candle-cpu".into(),
                ..DeviceInfo::cpu()
            },
        ))),
        DeviceChoice::Auto if !cuda_built() => Ok(None),
        DeviceChoice::Auto => Ok(open_cuda(0).ok()),
        DeviceChoice::Cuda(_) if !cuda_built() => Err(DeviceError::NoCudaBuild(choice)),
        DeviceChoice::Cuda(n) => open_cuda(n)
            .map(Some)
            .map_err(|message| DeviceError::Unavailable { choice, message }),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<(Device, DeviceInfo), String> {
    cuda::open(ordinal)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<(Device, DeviceInfo), String> {
    Err("this build has no CUDA backend".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("candle-cpu".parse(), Ok(DeviceChoice::CandleCpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert_eq!(DeviceChoice::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn a_cpu_build_refuses_cuda_and_falls_back_on_auto() {
        if cuda_built() {
            return;
        }
        assert!(matches!(open(DeviceChoice::Cuda(0)), Err(DeviceError::NoCudaBuild(_))));
        assert!(matches!(open(DeviceChoice::Auto), Ok(None)));
        assert!(matches!(open(DeviceChoice::Cpu), Ok(None)));
    }
}

#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod bench;
pub mod calibrate;
pub mod device;
pub mod error;
pub mod eval;
pub mod interrupt;
pub mod io;
pub mod model;
pub mod numeric;
pub mod pipeline;
pub mod platform;
/// The preflight (memory and time per layer, refusal with the fix) under its former name.
pub use pipeline::preflight as plan;
pub mod plot;
pub mod profile;
pub mod quant;
pub mod recipe;
pub mod resume;
pub mod shaders;
pub mod util;

pub use device::{AnyDevice, CpuDevice, Device, DeviceKind};
pub use error::{Error, Result};
pub use quant::{Gram, GramAccumulator, QuantConfig, QuantizedLayer};

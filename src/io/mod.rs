//! Files in and out: safetensors by memory map, dtype conversion, code packing, atomic writes.
//!
//! Nothing here knows about the algorithm. Inputs are memory-mapped and converted one tensor
//! (or one chunk of rows) at a time, so reading a model costs the page cache, not the heap.
//! Outputs are planned up front — every tensor's name, dtype and shape is known before any
//! layer is quantized — so each tensor is written at its final offset as soon as it exists, and
//! the file is renamed into place only when complete.

pub mod calib;
pub mod checkpoint;
pub mod dtype;
pub mod guard;
pub mod hfconfig;
pub mod images;
pub mod pack;
pub mod safetensors;
pub mod writer;

pub use self::safetensors::{Model, TensorMeta};
pub use calib::Calibration;
pub use checkpoint::Checkpoint;
pub use writer::{PlannedTensor, SafetensorsWriter};

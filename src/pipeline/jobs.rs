//! The job list: one planned layer per weight to quantize, with its options after the
//! per-layer overrides and its calibration.

use crate::io::calib::CalibKind;
use crate::io::TensorMeta;
use crate::model::Role;
use crate::quant::QuantConfig;

/// A planned layer: what will be quantized, with which options and calibration.
#[derive(Debug, Clone)]
pub struct Job {
    /// The weight tensor.
    pub meta: TensorMeta,
    /// Its name without `.weight`.
    pub prefix: String,
    /// Output channels.
    pub rows: usize,
    /// Inputs.
    pub cols: usize,
    /// Options after per-layer overrides.
    pub config: QuantConfig,
    /// Its calibration (`None` = data-free).
    pub calib: Option<CalibKind>,
    /// Block and role inside a recognised ViT (images mode).
    pub block: Option<(usize, Role)>,
    /// The bit width comes from a per-layer override (`--target-bits` leaves it alone).
    pub bits_fixed: bool,
}

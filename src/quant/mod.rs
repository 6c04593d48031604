//! The COMQ algorithm, independent of any device or file.
//!
//! COMQ minimises each linear layer's reconstruction error `‖X·Wᵀ − X·Q̂ᵀ‖²` by coordinate
//! descent over the integer codes, one weight at a time in a greedy order, with closed-form 1-D
//! steps (`../shared/design/comq-algorithm.md`, sections a.2–a.6). In Gram form (`G = XᵀX`) every
//! output row is an independent problem sharing `G`, so the state of a layer is `W`, `G`, the
//! current grid values `Q̂` and the residual `R = (W − Q̂)·G`.
//!
//! This module owns the math that decides *what* is computed — grids ([`grid`]), visiting
//! orders ([`order`]), Gram accumulation ([`gram`]) and the driver that sequences sweeps, scale
//! updates and loss evaluations ([`comq`]). A [`crate::device::Device`] only runs the
//! data-parallel primitives the driver asks for.

pub mod alloc;
mod any;
pub mod comq;
pub mod correct;
pub mod equalize;
mod grid_build;
pub mod prefactor;
pub mod preset;
pub mod search;
pub mod synth;

// The numeric data and kernels the algorithm shares with the devices live one layer down
// (`crate::numeric`); they stay reachable under their former paths.
pub use crate::numeric::grid::{Granularity, ScaleDtype};
pub use crate::numeric::order::OrderKind;
pub use crate::numeric::{gptq, gram, grid, linalg, order};

pub use comq::{quantize_layer, LayerOutcome};
pub use preset::{Choices, Preset, Resolved, Scalar, SearchMode};

/// [`quantize_layer`] on a run-time chosen device.
pub fn quantize_layer_any(
    device: &crate::device::AnyDevice,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    cfg: &QuantConfig,
) -> crate::error::Result<LayerOutcome> {
    match device {
        crate::device::AnyDevice::Cpu(d) => quantize_layer(d, name, w, rows, cols, gram, cfg),
        crate::device::AnyDevice::Wgpu(d) => {
            quantize_layer(d.as_ref(), name, w, rows, cols, gram, cfg)
        }
    }
}
pub use gram::{Gram, GramAccumulator};
pub use grid::Grid;
pub use order::Order;

use crate::error::{Error, Result};

/// Which algorithm produces the codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Coordinate-descent COMQ (the default).
    #[default]
    Comq,
    /// Round to nearest on the same grid: the baseline every report compares against.
    Rtn,
}

crate::util::value_enum!(Method {
    Comq = "comq",
    Rtn = "rtn",
});

/// Where the coordinate sweeps start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// `Q̂ = W`, `R = 0`: the reference's start (spec a.3).
    #[default]
    W,
    /// Every weight rounded to its nearest grid value.
    Rtn,
    /// GPTQ-style sequential rounding with error compensation through the upper Cholesky
    /// factor of the damped inverse of `G` ([`gptq`]).
    Gptq,
}

crate::util::value_enum!(Init {
    W = "w",
    Rtn = "rtn",
    Gptq = "gptq",
});

/// Every option that changes the numbers a quantization produces.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QuantConfig {
    /// Bits per weight, 2..=8.
    pub bits: u32,
    /// Symmetric grid (zero point 0) instead of the reference min/max asymmetric grid.
    pub sym: bool,
    /// Inputs per group; `None` is one grid per row.
    pub group_size: Option<usize>,
    /// Grid shrink `c` (spec a.2), `0 < c`; 1.0 reproduces the reference.
    pub scalar: f32,
    /// Number of coordinate-descent sweeps, ≥ 1.
    pub sweeps: usize,
    /// Visiting order.
    pub order: OrderKind,
    /// Closed-form scale step after each code sweep (spec a.4).
    pub scale_update: bool,
    /// One scale per row/group or per tensor.
    pub granularity: Granularity,
    /// COMQ or round-to-nearest.
    pub method: Method,
    /// Storage dtype of the scales.
    pub scale_dtype: ScaleDtype,
    /// Where the sweeps start.
    pub init: Init,
    /// Damping `λ`: the quantizer minimises over `G + λ·mean(diag G)·I` (every method, sweeps
    /// included); errors are still reported on the undamped `G`. 0 reproduces the reference.
    pub damp: f32,
    /// GPTQ visits the inputs by `G_jj` descending (act-order) instead of `0..n`.
    pub act_order: bool,
}

impl Default for QuantConfig {
    /// The official code's defaults (what [`Preset::Paper`] resolves to with no choices; the
    /// tool's own recipe is [`Preset::Default`]): 4 bits, per-channel asymmetric, scalar 1, one greedy sweep.
    fn default() -> Self {
        QuantConfig {
            bits: 4,
            sym: false,
            group_size: None,
            scalar: 1.0,
            sweeps: 1,
            order: OrderKind::Greedy,
            scale_update: false,
            granularity: Granularity::Channel,
            method: Method::Comq,
            scale_dtype: ScaleDtype::F32,
            init: Init::W,
            damp: 0.0,
            act_order: true,
        }
    }
}

impl QuantConfig {
    /// Whether a run starts from the GPTQ-style pass, and so needs its factor.
    pub fn gptq_start(&self) -> bool {
        self.init == Init::Gptq && self.method == Method::Comq
    }

    /// Checks the options on their own (ranges, combinations).
    pub fn validate(&self) -> Result<()> {
        if !(2..=8).contains(&self.bits) {
            return Err(Error::InvalidOption(format!(
                "--bits {} is out of range: comq-gpu quantizes to 2..=8 bits",
                self.bits
            )));
        }
        if !(self.scalar > 0.0 && self.scalar.is_finite()) {
            return Err(Error::InvalidOption(format!(
                "--scalar {} must be a positive finite number",
                self.scalar
            )));
        }
        if self.sweeps == 0 && self.init == Init::W && self.method == Method::Comq {
            return Err(Error::InvalidOption(
                "--sweeps must be at least 1 when starting from the float weights (--init w)"
                    .into(),
            ));
        }
        if !(self.damp >= 0.0 && self.damp.is_finite()) {
            return Err(Error::InvalidOption(format!(
                "--damp {} must be a finite number ≥ 0",
                self.damp
            )));
        }
        if self.group_size == Some(0) {
            return Err(Error::InvalidOption(
                "--group-size must be at least 1".into(),
            ));
        }
        if self.group_size.is_some() && self.granularity == Granularity::Layer {
            return Err(Error::InvalidOption(
                "--granularity layer uses one scale per tensor and cannot be combined with --group-size"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks the options against one layer's shape.
    pub fn validate_for(&self, name: &str, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Err(Error::Shape(format!(
                "layer '{name}' has an empty weight [{rows}, {cols}]"
            )));
        }
        if let Some(g) = self.group_size {
            if !cols.is_multiple_of(g) {
                return Err(Error::InvalidOption(format!(
                    "--group-size {g} does not divide the {cols} inputs of layer '{name}'"
                )));
            }
        }
        Ok(())
    }
}

/// The result of quantizing one weight matrix: integer codes and the grid they live on.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLayer {
    /// Rows (output channels).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Bit width.
    pub bits: u32,
    /// Integer codes `k`, row-major; the weight is `Δ·k`.
    pub codes: Vec<i32>,
    /// The grid, with the final steps (after any scale update).
    pub grid: Grid,
}

impl QuantizedLayer {
    /// The weights on the grid, `Δ·k`, row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for r in 0..self.rows {
            for c in 0..self.cols {
                let s = self.grid.slot(r, c);
                out.push(self.grid.value(s, self.codes[r * self.cols + c]));
            }
        }
        out
    }

    /// Codes shifted into `[0, 2^b − 1]` (`k − lo`), the unsigned form packers store.
    pub fn unsigned_codes(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for r in 0..self.rows {
            for c in 0..self.cols {
                let k = self.codes[r * self.cols + c];
                out.push((k - self.grid.lo[self.grid.slot(r, c)]) as u32);
            }
        }
        out
    }
}

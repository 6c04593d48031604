//! Quantization grids: where each weight may land.
//!
//! A grid gives every (row, group) of a weight matrix a step `Δ` and an integer code range
//! `[lo, lo + 2^b − 1]`; a weight on the grid is `Δ·k`. COMQ's reference grid (spec a.2) is
//! per row, asymmetric and min/max: `δ = (max − min)/(2^b − 1)`, `lo = round_half_even(min/δ)`,
//! `Δ = c·δ` with the user's `--scalar c` applied *after* `lo` is fixed. The symmetric grid is the
//! one compressed-tensors' min/max observer produces: `Δ = c·absmax / ((2^b − 1)/2)`,
//! codes `[−2^(b−1), 2^(b−1) − 1]`, so its files load in transformers.
//!
//! The one rounding rule used by every device: `k = clamp(ceil(t/Δ − ½), lo, hi)`. It is the
//! grid point nearest to `t`, with exact ties going to the lower code as the reference code's
//! `argmin` does.

/// Per-(row, group) steps and code ranges of one weight matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Bit width `b`; every range holds `2^b` codes.
    pub bits: u32,
    /// Rows of the weight matrix (output channels).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Inputs per group; equals `cols` for one grid per row.
    pub group_size: usize,
    /// Step `Δ` per (row, group), row-major `[rows, groups]`.
    pub delta: Vec<f32>,
    /// Lowest code per (row, group), row-major `[rows, groups]`.
    pub lo: Vec<i32>,
}

impl Grid {
    /// Number of groups per row.
    pub fn groups(&self) -> usize {
        self.cols / self.group_size
    }

    /// Number of codes in every range, `2^b`.
    pub fn levels(&self) -> i32 {
        1 << self.bits
    }

    /// Index into `delta`/`lo` for weight `(row, col)`.
    #[inline]
    pub fn slot(&self, row: usize, col: usize) -> usize {
        row * self.groups() + col / self.group_size
    }

    /// The code nearest to `target` in slot `slot` (see the module doc for the rule).
    #[inline]
    pub fn nearest(&self, slot: usize, target: f32) -> i32 {
        nearest_code(target, self.delta[slot], self.lo[slot], self.levels())
    }

    /// The value of code `k` in slot `slot`.
    #[inline]
    pub fn value(&self, slot: usize, k: i32) -> f32 {
        self.delta[slot] * k as f32
    }
}

/// `clamp(ceil(t/Δ − ½), lo, lo + levels − 1)`, in f32 exactly as the GPU kernels compute it.
///
/// Computed as `ceil(clamp(y, lo, hi))`, which is the same integer (`ceil` is monotone and
/// `lo`, `hi` are integers), with the ceiling taken from the truncating cast: x86-64's baseline
/// has no rounding instruction, so `f32::ceil` is a library call, and this function runs once
/// per weight per sweep (3% of a default run's CPU time went into `ceilf`).
#[inline]
pub fn nearest_code(target: f32, delta: f32, lo: i32, levels: i32) -> i32 {
    let hi = lo + levels - 1;
    // Clamp in float first so a huge target cannot overflow the integer cast; NaN goes to lo.
    let y = (target / delta - 0.5).max(lo as f32).min(hi as f32);
    let t = y as i32; // toward zero: the ceiling for y ≤ 0, one below it for a fraction > 0
    if (t as f32) < y {
        t + 1
    } else {
        t
    }
}

impl ScaleDtype {
    /// Rounds a step to what the output file can store, so codes are optimised against the
    /// scale a runtime will actually multiply by.
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleDtype::F32 => x,
            ScaleDtype::F16 => half::f16::from_f32(x).to_f32(),
            ScaleDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// How many scales a tensor has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One scale per output row (per group with `group_size`).
    #[default]
    Channel,
    /// One scale for the whole tensor (spec a.5).
    Layer,
}

crate::util::value_enum!(Granularity {
    Channel = "channel",
    Layer = "layer",
});

/// The dtype scales are stored in; steps are rounded to it before optimisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleDtype {
    /// 32-bit float (no rounding).
    #[default]
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

/// The closed-form scale step (spec a.4/a.5) shared by every device: with `num = k̃ᵀR` and
/// `den = k̃ᵀGk̃`, the new step is `Δ + num/den` rounded to the storage dtype. It is taken only if
/// it stays positive and finite and the exact change of the loss, `−2·s·num + s²·den` for
/// `s = Δ' − Δ`, is not positive (rounding to bf16 can move it off the optimum).
pub fn scale_step(old: f32, num: f64, den: f64, dtype: ScaleDtype) -> Option<f32> {
    if den.is_nan() || den <= 0.0 {
        return None;
    }
    let new = dtype.round((old as f64 + num / den) as f32);
    let s = new as f64 - old as f64;
    (new > 0.0 && new.is_finite() && s != 0.0 && -2.0 * s * num + s * s * den <= 0.0).then_some(new)
}

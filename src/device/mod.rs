//! Devices: where the arithmetic of a layer runs.
//!
//! The algorithm ([`crate::quant`]) decides what to compute; a [`Device`] only runs
//! data-parallel primitives on state it keeps resident — weights and Gram uploaded once per
//! layer, codes and steps downloaded once. The CPU device is the plain reference; the wgpu
//! device runs the same primitives as WGSL kernels, and every kernel has a parity test against
//! its CPU twin. The binary picks one at run time through [`AnyDevice`] (an enum, not `dyn`,
//! because the trait has an associated state type).

pub mod cpu;
pub mod cpu_gram;
pub mod cpu_linear;
pub mod cpu_ops;
pub mod ops;
pub mod wgpu;

pub use cpu::CpuDevice;
pub use wgpu::WgpuDevice;

use crate::error::{Error, Result};
use crate::numeric::grid::{Granularity, Grid, ScaleDtype};
use crate::numeric::order::Order;

/// Everything a device needs to start on one layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerProblem<'a> {
    /// The weight tensor's name (for errors and logs).
    pub name: &'a str,
    /// Row-major `rows × cols` float weights `W`.
    pub weights: &'a [f32],
    /// Row-major `cols × cols` Gram matrix `G` in f32.
    pub gram: &'a [f32],
    /// The initial grid.
    pub grid: &'a Grid,
    /// The visiting order.
    pub order: &'a Order,
    /// `G_jj` at or below this is a dead input (round to nearest, spec a.8).
    pub dead_threshold: f32,
    /// Steps are rounded to this dtype whenever they change.
    pub scale_dtype: ScaleDtype,
}

/// The primitives a device runs for the COMQ driver. State lives on the device between calls.
///
/// The state after [`Device::upload`] (and after [`Device::reset`]) is `Q̂ = W`, `R = 0`, the
/// initial grid — the reference's starting point (spec a.3).
pub trait Device {
    /// Device-resident state of one layer.
    type Layer;

    /// A human-readable name (adapter, backend), for logs and reports.
    fn describe(&self) -> String;

    /// Uploads a layer; the state is the starting point described above.
    fn upload(&self, problem: &LayerProblem<'_>) -> Result<Self::Layer>;

    /// `Σ_i w_iᵀ G w_i = ‖X·Wᵀ‖²`, the denominator of the relative error.
    fn energy(&self, layer: &mut Self::Layer) -> Result<f64>;

    /// Back to the starting point (`Q̂ = W`, `R = 0`, initial steps).
    fn reset(&self, layer: &mut Self::Layer) -> Result<()>;

    /// Every weight to its nearest grid value (RTN). Leaves `R` stale.
    fn round_to_nearest(&self, layer: &mut Self::Layer) -> Result<()>;

    /// One coordinate-descent pass: each row visits every column in its order, sets the code to
    /// the grid point nearest the 1-D minimiser `Q̂_ij + R_ij/G_jj` and updates `R_i` by rank 1.
    fn sweep(&self, layer: &mut Self::Layer) -> Result<()>;

    /// Recomputes `R = (W − Q̂)·G` exactly and returns the loss `Σ_i e_iᵀ G e_i`.
    fn refresh(&self, layer: &mut Self::Layer) -> Result<f64>;

    /// The loss `Σ_i e_iᵀ G e_i` alone, for a state no sweep will start from (`R` may be left
    /// stale: the next step that sweeps resets or refreshes it first). A device may compute it
    /// at half the cost of [`Device::refresh`]; by default it is the refresh.
    fn loss(&self, layer: &mut Self::Layer) -> Result<f64> {
        self.refresh(layer)
    }

    /// Closed-form scale steps with the codes fixed (spec a.4/a.5); needs an exact `R`.
    /// Never raises the loss. Leaves `R` approximately updated; call [`Device::refresh`] after.
    fn update_scales(&self, layer: &mut Self::Layer, granularity: Granularity) -> Result<()>;

    /// Downloads the integer codes (row-major) and the current steps (`[rows, groups]`).
    fn download(&self, layer: &mut Self::Layer) -> Result<(Vec<i32>, Vec<f32>)>;

    /// Sets the codes and steps (and so `Q̂ = Δ·k`) to values computed elsewhere (a start on the
    /// host; the parity tests put both devices in the same state with it). Leaves `R` stale.
    fn load_codes(&self, layer: &mut Self::Layer, codes: &[i32], delta: &[f32]) -> Result<()>;

    /// The GPTQ-style pass ([`crate::numeric::gptq`]) from the float weights with the current
    /// steps: sets every code and `Q̂`. Leaves `R` stale. A device may keep the factor resident
    /// and upload it again only when [`crate::numeric::gptq::GptqFactor::id`] changes.
    fn gptq(
        &self,
        layer: &mut Self::Layer,
        factor: &crate::numeric::gptq::GptqFactor,
    ) -> Result<()>;

    // The resident search: one upload of W and G per layer, every candidate of the search run
    // and scored on the device, one download of the shipped codes.

    /// Replaces the initial grid (steps and lowest codes, `[rows, groups]` each, same bits and
    /// groups) and resets to the starting point: a candidate uploads only its grid.
    fn set_grid(&self, layer: &mut Self::Layer, delta: &[f32], lo: &[i32]) -> Result<()>;

    /// Replaces the diagonal of `G` (`cols` values): a damping `G + λ'·I` without uploading `G`
    /// again. Leaves `R` stale.
    fn set_diagonal(&self, layer: &mut Self::Layer, diag: &[f32]) -> Result<()>;

    /// Replaces the visiting order by one of the same kind as the upload's: the one stashed
    /// under `stashed` when there is one (a device copy), else `order` (an upload).
    fn set_order(&self, layer: &mut Self::Layer, order: &Order, stashed: Option<u64>)
        -> Result<()>;

    /// Whether the device builds an [`Order::Ranked`] greedy order of a `cols`-wide layer from
    /// its resident weights itself (in [`Device::upload`] and [`Device::set_order`]), so the
    /// host neither sorts nor sends `rows × cols` indices. The search hands a ranked order only
    /// where this holds; [`Device::upload`] accepts one anyway and builds it from the problem's
    /// weights. The permutation is [`Order::build`]'s either way.
    fn ranks_orders(&self, _cols: usize) -> bool {
        false
    }

    /// Whether the device builds the GPTQ factor of a `cols`-wide layer itself
    /// ([`Device::build_factor`]) from the `G` it holds, so the factor does not go up.
    fn builds_factors(&self, _cols: usize) -> bool {
        false
    }

    /// Builds the GPTQ factor of `plan` from the resident `G`'s off-diagonal terms and the
    /// diagonal `diag` (visiting order, a dead input negative: [`crate::numeric::gptq::FactorPlan::diagonal`]),
    /// and keeps it as the layer's factor under `plan.id`: a later [`Device::gptq`] with that
    /// id runs on it. `Ok(false)` when the matrix is not positive definite (nothing kept); a
    /// factor already kept under `plan.id` is kept as it is. Only where
    /// [`Device::builds_factors`] holds.
    fn build_factor(
        &self,
        _layer: &mut Self::Layer,
        _plan: &crate::numeric::gptq::FactorPlan,
        _diag: &[f64],
    ) -> Result<bool> {
        Err(Error::Internal(format!(
            "{} does not build GPTQ factors",
            self.describe()
        )))
    }

    /// Keeps a device copy of the order now in use under `key` (nothing when `key` is kept
    /// already), so switching back to it moves no bytes from the host.
    fn stash_order(&self, layer: &mut Self::Layer, key: u64) -> Result<()>;

    /// `‖W − Q̂‖²_F`, the term a damping adds to the loss (divided by `λ'`).
    fn error_sqnorm(&self, layer: &mut Self::Layer) -> Result<f64>;

    /// Uploads a second, held-out Gram matrix (`cols × cols` f32) to score candidates on.
    fn attach_holdout(&self, layer: &mut Self::Layer, gram: &[f32]) -> Result<()>;

    /// Whether Gram matrices may already be on the device ([`Device::upload_held`]): only then
    /// does the search digest a layer's Grams to look for them.
    fn holds_grams(&self) -> bool {
        false
    }

    /// [`Device::upload`] with the Gram the device holds under `key` (the digest of the
    /// layer's f64 Gram, [`crate::numeric::gram::Gram::digest`], whose f32 values it holds) and
    /// `diag` as its diagonal, instead of `problem.gram` (which is not read and may be empty):
    /// no Gram crosses the bus. `None` when the device does not hold that Gram.
    fn upload_held(
        &self,
        _problem: &LayerProblem<'_>,
        _key: [u64; 2],
        _diag: &[f32],
    ) -> Result<Option<Self::Layer>> {
        Ok(None)
    }

    /// [`Device::attach_holdout`] with the Gram the device holds under `key`; `false` (and
    /// nothing attached) when it does not hold it.
    fn attach_held_holdout(&self, _layer: &mut Self::Layer, _key: [u64; 2]) -> Result<bool> {
        Ok(false)
    }

    /// `Σ_i a_iᵀ G_h a_i` on the held-out Gram with `a = W − Q̂` (a candidate's held-out loss)
    /// or, with `weights`, `a = W` (the held-out energy). Leaves `R` as it was.
    fn holdout_product(&self, layer: &mut Self::Layer, weights: bool) -> Result<f64>;

    /// Copies the current codes and steps to the layer's kept slot (the best candidate so far).
    fn keep(&self, layer: &mut Self::Layer) -> Result<()>;

    /// Downloads the kept codes and steps (as [`Device::download`]); an error when nothing was
    /// kept.
    fn download_kept(&self, layer: &mut Self::Layer) -> Result<(Vec<i32>, Vec<f32>)>;

    /// The choice row by row: keeps each row of the current state whose held-out loss (of the
    /// last [`Device::holdout_product`] on it, `weights = false`) is strictly below the kept
    /// row's, with its steps, lowest codes and `tag`. Rows are independent problems sharing `G`
    /// and each has its own grid, so any mix of candidates' rows is itself a quantization of the
    /// layer, and its held-out loss is the sum of its rows'. The first call keeps every row.
    fn keep_rows(&self, layer: &mut Self::Layer, tag: u32) -> Result<()>;

    /// Downloads what [`Device::keep_rows`] kept; an error when it was never called.
    fn download_kept_rows(&self, layer: &mut Self::Layer) -> Result<KeptRows>;

    /// Makes the rows kept by [`Device::keep_rows`] the current state (codes, steps, lowest
    /// codes and `Q̂`), to measure their calibration loss with [`Device::refresh`]. Leaves `R`
    /// stale.
    fn restore_kept_rows(&self, layer: &mut Self::Layer) -> Result<()>;

    /// From now on, keeps the exact products of the state a sweep starts from, so that the
    /// [`Device::refresh`] and the held-out [`Device::holdout_product`] after a sweep that
    /// changed few codes (a sweep after a GPTQ or RTN start changes about 1%) update them by the
    /// changed coordinates instead of computing a whole product again. Their values are the
    /// whole products' up to f64 rounding, and depend only on the run's own steps, never on an
    /// earlier candidate's. A device that does not do this ignores it.
    fn track_sweeps(&self, _layer: &mut Self::Layer) -> Result<()> {
        Ok(())
    }
}

/// The rows a row-by-row choice kept ([`Device::keep_rows`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KeptRows {
    /// Codes, row-major `[rows, cols]`.
    pub codes: Vec<i32>,
    /// Steps, `[rows, groups]`.
    pub delta: Vec<f32>,
    /// Lowest codes, `[rows, groups]`.
    pub lo: Vec<i32>,
    /// The tag of the candidate each row came from.
    pub tags: Vec<u32>,
    /// Each row's held-out loss.
    pub losses: Vec<f64>,
}

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A hardware GPU if there is one, else the CPU.
    #[default]
    Auto,
    /// The CPU reference path.
    Cpu,
    /// wgpu on the best adapter there is (a software one included).
    Gpu,
}

crate::util::value_enum!(DeviceKind {
    Auto = "auto",
    Cpu = "cpu",
    Gpu = "gpu",
});

/// The forward primitives of a run-time chosen device: the CPU reference or a wgpu device.
#[derive(Debug, Clone)]
pub enum AnyOps {
    /// Host threads.
    Cpu(cpu_ops::CpuOps),
    /// A wgpu device.
    Gpu(Box<wgpu::forward::GpuOps>),
}

impl AnyOps {
    /// The forward primitives of a quantization device (the same GPU, or the CPU).
    pub fn for_device(d: &AnyDevice) -> Result<AnyOps> {
        Ok(match d {
            AnyDevice::Cpu(_) => AnyOps::Cpu(cpu_ops::CpuOps),
            AnyDevice::Wgpu(w) => AnyOps::Gpu(Box::new(wgpu::forward::GpuOps::new(w))),
        })
    }

    /// Short description.
    pub fn describe(&self) -> String {
        use ops::Ops;
        match self {
            AnyOps::Cpu(o) => o.describe(),
            AnyOps::Gpu(o) => o.describe(),
        }
    }
}

/// A device chosen at run time.
pub enum AnyDevice {
    /// The CPU reference.
    Cpu(CpuDevice),
    /// A wgpu adapter.
    Wgpu(Box<WgpuDevice>),
}

impl AnyDevice {
    /// Bytes uploaded to and read back from a GPU so far through this handle (not through a
    /// [`AnyDevice::handle`] made from it), `(up, down)`; `None` on the CPU.
    pub fn traffic(&self) -> Option<(u64, u64)> {
        match self {
            AnyDevice::Cpu(_) => None,
            AnyDevice::Wgpu(d) => Some(d.traffic()),
        }
    }

    /// Bytes uploaded to and read back from a GPU so far through every handle on it, `(up,
    /// down)`; `None` on the CPU.
    pub fn total_traffic(&self) -> Option<(u64, u64)> {
        match self {
            AnyDevice::Cpu(_) => None,
            AnyDevice::Wgpu(d) => Some(d.total_traffic()),
        }
    }

    /// Opens the device `kind` asks for; `adapter` filters adapters by name (substring,
    /// case-insensitive). `auto` never fails: without a hardware GPU it says why and uses the CPU.
    pub fn select(kind: DeviceKind, adapter: Option<&str>) -> Result<AnyDevice> {
        match kind {
            DeviceKind::Cpu => Ok(AnyDevice::Cpu(CpuDevice::new())),
            DeviceKind::Gpu => Ok(AnyDevice::Wgpu(Box::new(WgpuDevice::open(adapter, true)?))),
            DeviceKind::Auto => match WgpuDevice::open(adapter, false) {
                Ok(dev) => Ok(AnyDevice::Wgpu(Box::new(dev))),
                Err(e) => {
                    log::info!("device auto: using the CPU because {e}");
                    Ok(AnyDevice::Cpu(CpuDevice::new()))
                }
            },
        }
    }

    /// Whether the device builds the GPTQ factor of a `cols`-wide layer itself
    /// ([`Device::builds_factors`]).
    pub fn builds_factors(&self, cols: usize) -> bool {
        match self {
            AnyDevice::Cpu(d) => d.builds_factors(cols),
            AnyDevice::Wgpu(d) => d.builds_factors(cols),
        }
    }

    /// A second handle on the same device, for another thread (the CPU has no state to share).
    /// Its transfers count on an account of their own, so [`AnyDevice::traffic`] of each handle
    /// holds that thread's work only; [`AnyDevice::total_traffic`] holds both.
    pub fn handle(&self) -> AnyDevice {
        match self {
            AnyDevice::Cpu(c) => AnyDevice::Cpu(c.clone()),
            AnyDevice::Wgpu(w) => AnyDevice::Wgpu(Box::new(w.own_account())),
        }
    }

    /// The device's description.
    pub fn describe(&self) -> String {
        match self {
            AnyDevice::Cpu(d) => d.describe(),
            AnyDevice::Wgpu(d) => d.describe(),
        }
    }

    /// The Gram matrix of `n`-wide activations streamed as row-major chunks, on this device.
    pub fn gram<I>(&self, n: usize, chunks: I) -> Result<crate::numeric::gram::Gram>
    where
        I: IntoIterator<Item = Result<Vec<f32>>>,
    {
        match self {
            AnyDevice::Cpu(_) => {
                let mut acc = crate::numeric::gram::GramAccumulator::new(n);
                for chunk in chunks {
                    acc.add(&chunk?);
                }
                Ok(acc.finish())
            }
            AnyDevice::Wgpu(d) => d.gram(n, chunks),
        }
    }
}

/// Returns an error when `v` holds a non-finite value, naming `what`.
pub fn check_finite(what: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            what: what.to_string(),
            value: v[index] as f64,
            index,
        }),
    }
}

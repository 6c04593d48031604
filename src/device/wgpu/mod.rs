//! The wgpu device: the COMQ primitives as WGSL compute kernels on Vulkan, Metal or DX12.
//!
//! One adapter, one logical device, pipelines built once. A layer's state (`W`, `Q̂`, `R`, codes,
//! steps, order, `G`) is uploaded once and stays resident until its codes and steps are
//! downloaded; only per-row loss partials (one f32 per row) come back in between, and are summed
//! in f64 on the host. Layers whose `[rows, cols]` f32 arrays exceed the adapter's storage-binding
//! limit are split into row tiles (rows are independent problems); `G` must fit one binding.
//! Validation and out-of-memory errors are caught by error scopes or the uncaptured-error handler
//! and returned as [`Error`]s; a lost device is reported, never panicked on.

pub mod buffers;
pub mod cache;
pub mod context;
pub mod forward;
pub mod held;
pub mod pipelines;

use std::sync::Arc;

use buffers::{gpu_err, BufferPool};
use pipelines::{
    BlockParams, FoldParams, GptqParams, GramParams, GridParams, ModeParams, Pipelines,
    ScaleParams, SweepParams, UnpackParams,
};

use super::{Device, LayerProblem};
use crate::error::{Error, Result};
use crate::numeric::gptq::GptqFactor;
use crate::numeric::gram::{Gram, GramAccumulator};
use crate::numeric::grid::{scale_step, Granularity, ScaleDtype};
use crate::numeric::order::SHARED_BLOCK;
use crate::numeric::order::{Order, OrderLayout};
use crate::shaders::{Kernel, MAX_STORAGE_BUFFERS, SWEEP_SHARED_MAX_COLS};

/// Largest workgroup count per dispatch dimension.
const MAX_GROUPS: u32 = 65535;

/// Bytes of `G` (or of the GPTQ factor) one dispatch of the per-row kernels may read: about
/// 0.5 s on a 300 GB/s card, under the watchdogs that kill long dispatches on desktops
/// (Windows' 2 s, macOS'). A tile whose rows would read more goes in several submits of
/// consecutive rows. `COMQ_SUBMIT_BYTES` lowers it (the tests split small layers with it).
pub const SUBMIT_BYTES: u64 = 150_000_000_000;

/// Rows of an `n`-wide layer one submit of the sweep or the GPTQ pass takes: each row reads
/// `n²` floats of `G` (or up to that of the factor).
pub fn rows_per_submit(n: usize) -> usize {
    static BOUND: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let bound = *BOUND.get_or_init(|| {
        std::env::var("COMQ_SUBMIT_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&b| b > 0)
            .unwrap_or(SUBMIT_BYTES)
    });
    let per_row = (n as u64 * n as u64 * 4).max(1);
    ((bound / per_row) as usize).max(1)
}

/// One adapter as `comq-gpu devices` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    /// Adapter name.
    pub name: String,
    /// Backend (Vulkan, Metal, Dx12).
    pub backend: String,
    /// Discrete, integrated, virtual, CPU (software) or other.
    pub device_type: String,
    /// Driver name.
    pub driver: String,
    /// Driver version information.
    pub driver_info: String,
    /// Largest storage binding in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer in bytes.
    pub max_buffer: u64,
    /// Workgroup memory in bytes.
    pub max_workgroup_storage: u32,
    /// Invocations per workgroup.
    pub max_invocations: u32,
    /// Optional features of interest the adapter has.
    pub features: Vec<String>,
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    wgpu::Instance::new(desc.with_env())
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn summary(a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let l = a.limits();
    let f = a.features();
    let wanted = [
        (wgpu::Features::SHADER_F16, "shader-f16"),
        (wgpu::Features::SHADER_F64, "shader-f64"),
        (wgpu::Features::SUBGROUP, "subgroup"),
        (wgpu::Features::SHADER_FLOAT32_ATOMIC, "f32-atomic"),
        (wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
    ];
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        max_storage_binding: l.max_storage_buffer_binding_size,
        max_buffer: l.max_buffer_size,
        max_workgroup_storage: l.max_compute_workgroup_storage_size,
        max_invocations: l.max_compute_invocations_per_workgroup,
        features: wanted
            .iter()
            .filter(|(x, _)| f.contains(*x))
            .map(|(_, n)| n.to_string())
            .collect(),
    }
}

/// Every adapter wgpu finds on the Vulkan, Metal and DX12 backends, best first.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let mut v = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()));
    v.sort_by_key(|a| rank(a.get_info().device_type));
    v.iter().map(summary).collect()
}

/// A wgpu device ready to run COMQ kernels. A clone is a second handle on the same device
/// (kernels, buffer pool, fault slot and transfer counters shared), for another thread;
/// [`WgpuDevice::own_account`] is one that counts its transfers apart.
#[derive(Clone)]
pub struct WgpuDevice {
    info: wgpu::AdapterInfo,
    /// The device, kernels, fault slot and transfers, shared with the forward primitives.
    ctx: context::GpuContext,
    limits: wgpu::Limits,
    pool: BufferPool,
    binding_cap: Option<u64>,
    /// Widest layer whose per-row state the sweep and the GPTQ pass keep in workgroup memory.
    shared_cols: usize,
    /// What became of the on-disk pipeline cache.
    pipeline_cache: cache::CacheState,
    /// Greedy orders are built on the host and sent even where the adapter could rank them.
    host_orders: bool,
    /// Comparisons per submit of the order ranking ([`RANK_SUBMIT_COMPARISONS`]).
    rank_submit: usize,
    /// GPTQ factors are built on the host and sent even where the adapter could build them.
    host_factors: bool,
    /// Reductions send their rows back for the host to sum even where the adapter could sum
    /// them in f64.
    host_sums: bool,
}

impl std::fmt::Debug for WgpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuDevice")
            .field("adapter", &self.info.name)
            .finish()
    }
}

impl WgpuDevice {
    /// Opens the best adapter (discrete, integrated, virtual, then software), optionally
    /// filtered by a case-insensitive name substring. With `allow_software == false` a software
    /// adapter (lavapipe) is refused, which is what `--device auto` wants.
    ///
    /// The compiled kernels are cached on disk where the backend supports it
    /// ([`cache::default_dir`]: `$COMQ_PIPELINE_CACHE`, `off`, or the user's cache directory).
    pub fn open(filter: Option<&str>, allow_software: bool) -> Result<WgpuDevice> {
        Self::open_with_cache(filter, allow_software, cache::default_dir().as_deref())
    }

    /// [`WgpuDevice::open`] with the pipeline cache in `cache_dir` (`None`: no cache).
    pub fn open_with_cache(
        filter: Option<&str>,
        allow_software: bool,
        cache_dir: Option<&std::path::Path>,
    ) -> Result<WgpuDevice> {
        let inst = instance();
        let mut adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
        if adapters.is_empty() {
            return Err(Error::NoAdapter(
                "wgpu found no Vulkan, Metal or DX12 adapter (install a GPU driver, or Mesa's \
                 mesa-vulkan-drivers for a software one; or use --device cpu)"
                    .into(),
            ));
        }
        if let Some(f) = filter {
            let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            let fl = f.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&fl));
            if adapters.is_empty() {
                return Err(Error::NoAdapter(format!(
                    "no adapter name contains '{f}'; available: {}",
                    names.join(", ")
                )));
            }
        }
        adapters.sort_by_key(|a| rank(a.get_info().device_type));
        let adapter = adapters.remove(0);
        let info = adapter.get_info();
        if !allow_software && info.device_type == wgpu::DeviceType::Cpu {
            return Err(Error::NoAdapter(format!(
                "the only adapter is the software rasterizer '{}' (use --device gpu to run on it anyway)",
                info.name
            )));
        }
        let limits = adapter.limits();
        if limits.max_storage_buffers_per_shader_stage < MAX_STORAGE_BUFFERS {
            return Err(Error::NoAdapter(format!(
                "adapter '{}' allows {} storage buffers per shader stage; comq-gpu's kernels bind \
                 up to {MAX_STORAGE_BUFFERS} (use --device cpu)",
                info.name, limits.max_storage_buffers_per_shader_stage
            )));
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("comq-gpu"),
            // f64 where there is one, for the kernels that rank in it (`Kernel::needs_f64`).
            required_features: adapter.features()
                & (wgpu::Features::PIPELINE_CACHE | wgpu::Features::SHADER_F64),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::NoAdapter(format!("adapter '{}' refused a device: {e}", info.name)))?;
        let fault = Arc::new(buffers::Faults::default());
        let f1 = fault.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("GPU error: {e}");
            f1.record(e.to_string());
        }));
        let f2 = fault.clone();
        device.set_device_lost_callback(move |reason, msg| {
            f2.lost(format!("the GPU device was lost ({reason:?}): {msg}"));
        });
        let disk = cache_dir
            .and_then(|d| cache::DiskCache::open(&device, &info, d, &crate::shaders::SOURCES));
        let pipelines = Pipelines::build(&device, disk.as_ref().map(|c| c.cache()))?;
        let pipeline_cache = match &disk {
            Some(c) => {
                c.save();
                log::debug!("pipeline cache {:?}: {}", c.state(), c.path().display());
                c.state()
            }
            None => cache::CacheState::Off,
        };
        log::info!(
            "wgpu adapter: {} ({:?}, {:?}, driver {} {})",
            info.name,
            info.backend,
            info.device_type,
            info.driver,
            info.driver_info
        );
        Ok(WgpuDevice {
            info,
            ctx: context::GpuContext::new(device, queue, pipelines, fault),
            limits,
            pool: BufferPool::default(),
            binding_cap: None,
            shared_cols: SWEEP_SHARED_MAX_COLS,
            pipeline_cache,
            host_orders: false,
            rank_submit: RANK_SUBMIT_COMPARISONS,
            host_factors: std::env::var("COMQ_DEVICE_FACTOR").is_ok_and(|v| v == "off"),
            host_sums: false,
        })
    }

    /// What became of the on-disk pipeline cache when the device opened.
    pub fn pipeline_cache(&self) -> cache::CacheState {
        self.pipeline_cache
    }

    /// Whether the adapter is a software one (lavapipe, WARP…).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The adapter's information.
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    fn check_fault(&self) -> Result<()> {
        self.ctx
            .check_fault("for large layers try a smaller model shard or --device cpu")
    }

    /// Causes a validation error on the calling thread (a buffer both mappable for reading and
    /// a storage binding), for tests of fault reporting.
    #[doc(hidden)]
    pub fn provoke_validation_error(&self) {
        let _ = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("invalid on purpose"),
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
    }

    /// Waits for the device and reports the calling thread's fault since its last check.
    pub fn sync(&self) -> Result<()> {
        buffers::wait(&self.ctx.device)?;
        self.check_fault()
    }

    fn submit(&self, enc: wgpu::CommandEncoder) -> Result<()> {
        self.ctx.queue.submit([enc.finish()]);
        buffers::wait(&self.ctx.device)?;
        self.check_fault()
    }

    fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.ctx.encoder(label)
    }

    fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        self.ctx.uniform(label, value)
    }

    fn bind(&self, kernel: Kernel, entries: &[(u32, &wgpu::Buffer)]) -> wgpu::BindGroup {
        self.ctx.bind(kernel, entries)
    }

    fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        bg: &wgpu::BindGroup,
        groups: (u32, u32),
    ) {
        self.ctx.pass(enc, kernel, bg, (groups.0, groups.1, 1));
    }

    fn max_binding(&self) -> u64 {
        let l = &self.limits;
        let hw = l.max_storage_buffer_binding_size.min(l.max_buffer_size);
        self.binding_cap.map_or(hw, |c| c.min(hw))
    }

    /// The largest storage binding this device accepts, in bytes.
    pub fn binding_limit(&self) -> u64 {
        self.max_binding()
    }

    /// Caps the bytes per storage binding below the adapter's limit, so row tiling can be
    /// exercised (and tested) on small layers.
    pub fn cap_binding_bytes(&mut self, bytes: u64) {
        self.binding_cap = Some(bytes.max(16));
    }

    /// Builds greedy orders on the host and sends them, as on an adapter without f64, so that
    /// path can be exercised (and tested, and compared) on any adapter.
    pub fn rank_orders_on_host(&mut self) {
        self.host_orders = true;
    }

    /// Builds GPTQ factors on the host and sends them, as on an adapter without f64, so that
    /// path can be exercised (and tested, and compared) on any adapter.
    pub fn factor_on_host(&mut self) {
        self.host_factors = true;
    }

    /// Reads every reduction's rows back and sums them on the host, as on an adapter without
    /// f64, so that path can be exercised (and tested, and compared) on any adapter. Layers
    /// uploaded after the call follow it.
    pub fn sum_rows_on_host(&mut self) {
        self.host_sums = true;
    }

    /// Lowers the comparisons per submit of the order ranking, so its split over submits can be
    /// exercised (and tested) on small layers.
    pub fn cap_rank_submit(&mut self, comparisons: usize) {
        self.rank_submit = comparisons.clamp(1, RANK_SUBMIT_COMPARISONS);
    }

    /// The per-row order a layer's sweeps walk now, read back (`rows × cols` indices; a natural
    /// order's `0..cols` per row, a shared order's one permutation per row): for tests.
    pub fn order_table(&self, l: &WgpuLayer) -> Result<Vec<u32>> {
        let n = l.cols;
        let mut out = Vec::new();
        for t in &l.tiles {
            let b = TileBufs::of(&t.bufs);
            match l.order_layout {
                OrderLayout::Natural => {
                    out.extend((0..t.rows).flat_map(|_| 0..n as u32));
                }
                OrderLayout::Shared => {
                    let perm = self.ctx.io.read_i32(b.order, n)?;
                    out.extend((0..t.rows).flat_map(|_| perm.iter().map(|&v| v as u32)));
                }
                OrderLayout::PerRow => {
                    let v = self.ctx.io.read_i32(b.order, t.rows * n)?;
                    out.extend(v.into_iter().map(|v| v as u32));
                }
            }
        }
        Ok(out)
    }

    /// Lowers the widest layer whose per-row state the sweep and the GPTQ pass keep in
    /// workgroup memory, so their storage variants (for layers over 4096 inputs) can be
    /// exercised (and tested) on small layers.
    pub fn cap_shared_cols(&mut self, cols: usize) {
        self.shared_cols = cols.min(SWEEP_SHARED_MAX_COLS);
    }

    /// Caps the staging copy of one transfer below [`buffers::STAGING_CHUNK`], so chunked
    /// uploads and readbacks can be exercised (and tested) on small layers.
    pub fn cap_staging_bytes(&mut self, bytes: u64) {
        self.ctx.io.cap_chunk(bytes);
    }

    /// Bytes uploaded to and read back from the device so far through this handle, its clones
    /// and the forward primitives made from them, `(up, down)`. A handle made by
    /// [`WgpuDevice::own_account`] (and what is made from it) counts apart.
    pub fn traffic(&self) -> (u64, u64) {
        let t = self.ctx.io.traffic();
        (t.up(), t.down())
    }

    /// Bytes uploaded to and read back from the device so far through every handle, `(up,
    /// down)`.
    pub fn total_traffic(&self) -> (u64, u64) {
        let t = self.ctx.io.total();
        (t.up(), t.down())
    }

    /// A second handle on the same device (kernels, buffer pool and fault slot shared, as a
    /// clone) whose transfers count on an account of their own ([`WgpuDevice::traffic`]): what
    /// another thread moves through it is not counted as this handle's. Both count in
    /// [`WgpuDevice::total_traffic`].
    pub fn own_account(&self) -> WgpuDevice {
        let mut d = self.clone();
        d.ctx.io = self.ctx.io.own_account();
        d
    }

    /// Writes `data` to a new device buffer and reads it back, both through the staging chunks.
    #[doc(hidden)]
    pub fn roundtrip(&self, data: &[f32]) -> Result<Vec<f32>> {
        let buf = self
            .pool
            .take(&self.ctx.device, "roundtrip", (data.len() * 4) as u64);
        self.ctx.io.write(&buf, 0, bytemuck::cast_slice(data))?;
        let back = self.ctx.io.read_f32(&buf, data.len());
        self.pool.give([buf]);
        self.check_fault()?;
        back
    }

    /// The Gram matrix of `n`-wide activations streamed as row-major chunks, accumulated on the
    /// device in f32 (`gram.wgsl`) and read back once.
    pub fn gram<I>(&self, n: usize, chunks: I) -> Result<Gram>
    where
        I: IntoIterator<Item = Result<Vec<f32>>>,
    {
        let np = n.div_ceil(64) * 64;
        let g_bytes = (np * np * 4) as u64;
        // Room after the padded sums for their upper triangle, packed on the device so the
        // readback moves n(n+1)/2 values instead of np²; without that room, the whole square.
        let tri = n * (n + 1) / 2;
        let packed_bytes = g_bytes + (tri * 4) as u64;
        let pack = n > 0 && packed_bytes <= self.max_binding();
        if g_bytes > self.max_binding() {
            return Err(gpu_err(format!(
                "a {n}×{n} Gram matrix ({g_bytes} bytes) exceeds the adapter's storage-binding limit ({} bytes); use --device cpu",
                self.max_binding()
            )));
        }
        let rows_cap = ((self.max_binding() / (np as u64 * 4)) as usize / 16 * 16).clamp(16, 4096);
        let scope = self
            .ctx
            .device
            .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let g = self.pool.take(
            &self.ctx.device,
            "gram",
            if pack { packed_bytes } else { g_bytes },
        );
        let x = self
            .pool
            .take(&self.ctx.device, "gram-chunk", (rows_cap * np * 4) as u64);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err(format!(
                "out of GPU memory for a {n}-wide Gram matrix: {e}; use --device cpu"
            )));
        }
        let result = (|| {
            let mut enc = self.encoder("gram-clear");
            enc.clear_buffer(&g, 0, None);
            self.submit(enc)?;
            let mut samples = 0u64;
            let mut padded = Vec::new();
            for chunk in chunks {
                let chunk = chunk?;
                assert_eq!(chunk.len() % n, 0, "chunks hold whole rows");
                let rows = chunk.len() / n;
                for start in (0..rows).step_by(rows_cap) {
                    let end = (start + rows_cap).min(rows);
                    let rp = (end - start).div_ceil(16) * 16;
                    padded.clear();
                    padded.resize(rp * np, 0.0f32);
                    for (t, r) in (start..end).enumerate() {
                        padded[t * np..t * np + n].copy_from_slice(&chunk[r * n..(r + 1) * n]);
                    }
                    self.ctx.io.write(&x, 0, bytemuck::cast_slice(&padded))?;
                    let params = self.uniform(
                        "gram-params",
                        &GramParams {
                            rows: rp as u32,
                            n4: (np / 4) as u32,
                            // One slice: this path is bound by its uploads.
                            split: rp as u32,
                            valid: rp as u32,
                            x0: 0,
                            y0: 0,
                            pad: [0; 2],
                        },
                    );
                    let bg = self.bind(Kernel::Gram, &[(0, &x), (1, &g), (2, &params)]);
                    let mut enc = self.encoder("gram");
                    self.dispatch(
                        &mut enc,
                        Kernel::Gram,
                        &bg,
                        ((np / 64) as u32, (np / 64) as u32),
                    );
                    self.submit(enc)?;
                    samples += (end - start) as u64;
                }
            }
            let mut acc = GramAccumulator::new(n);
            if pack {
                let params = self.uniform(
                    "fold-params",
                    &FoldParams {
                        n: n as u32,
                        np: np as u32,
                        slices: 1,
                        full: 0,
                    },
                );
                let bg = self.bind(Kernel::FoldPack, &[(0, &g), (2, &params)]);
                let mut enc = self.encoder("gram-pack");
                self.dispatch(&mut enc, Kernel::FoldPack, &bg, per_element(n * n));
                self.submit(enc)?;
                let packed = self.ctx.io.read_f32_at(&g, g_bytes, tri)?;
                self.check_fault()?;
                acc.add_partial(&upper_from_packed(&packed, n), n, samples);
                let gram = acc.finish();
                self.hold_packed(&g, g_bytes, &gram)?;
                return Ok(gram);
            } else {
                let sums = self.ctx.io.read_f32(&g, np * np)?;
                self.check_fault()?;
                acc.add_partial(&sums, np, samples);
            }
            Ok(acc.finish())
        })();
        self.pool.give([g, x]);
        result
    }
}

impl WgpuDevice {
    /// Keeps the packed upper triangle of `gram` (at byte `offset` of `src`, where `fold_pack`
    /// left it) on the device for the layers that quantize with it ([`held`]).
    fn hold_packed(&self, src: &wgpu::Buffer, offset: u64, gram: &Gram) -> Result<()> {
        let n = gram.n;
        let Some(buf) = held::triangle_buffer(&self.ctx.device, n, self.max_binding()) else {
            return Ok(());
        };
        let mut enc = self.encoder("hold-gram");
        enc.copy_buffer_to_buffer(src, offset, &buf, 0, held::triangle_bytes(n));
        self.submit(enc)?;
        self.ctx.held.insert(gram.digest(), n, buf);
        Ok(())
    }

    /// The triangle of the `n`-wide Gram held under `key`, where this handle can bind it (one
    /// it could not bind, under a smaller binding cap than the calibration's, is as good as not
    /// held).
    fn held_gram(&self, key: [u64; 2], n: usize) -> Option<wgpu::Buffer> {
        held::usable(n, self.max_binding())
            .then(|| self.ctx.held.get(key, n))
            .flatten()
    }
}

/// Dispatch size for one workgroup per row.
fn per_row(rows: usize) -> (u32, u32) {
    let rows = rows as u32;
    (rows.min(MAX_GROUPS), rows.div_ceil(MAX_GROUPS))
}

/// Dispatch size for one invocation per element in workgroups of 256.
fn per_element(count: usize) -> (u32, u32) {
    let blocks = (count as u32).div_ceil(256);
    (blocks.min(MAX_GROUPS), blocks.div_ceil(MAX_GROUPS))
}

/// One row tile of a layer: its buffers and bind groups.
struct Tile {
    rows: usize,
    bufs: Vec<wgpu::Buffer>,
    w: usize,
    q: usize,
    r: usize,
    codes: usize,
    s: usize,
    delta: usize,
    delta0: usize,
    lo: usize,
    out: usize,
    residual: [wgpu::BindGroup; 3],
    reduce: [wgpu::BindGroup; 6],
    /// The held-out Gram's products (modes 0 and 1 into `s`), once one is attached.
    holdout: Option<[wgpu::BindGroup; 2]>,
    /// The kept codes and steps.
    kept: Option<(wgpu::Buffer, wgpu::Buffer)>,
    /// The rows a row-by-row choice kept: codes, steps and lowest codes.
    kept_rows: Option<[wgpu::Buffer; 3]>,
    /// Where the adapter has f64: the f64 sum of `out` (8 bytes) and `sum_rows`' bind group.
    sum: Option<(wgpu::Buffer, wgpu::BindGroup)>,
    /// The last held-out product's per-row losses, copied from `out` on the device (read back
    /// only when a row-by-row choice compares them).
    held_copy: Option<wgpu::Buffer>,
    rtn: wgpu::BindGroup,
    apply: wgpu::BindGroup,
    sweep: wgpu::BindGroup,
    /// The sweep's parameters (for tiles that go in several submits).
    sweep_params: SweepParams,
    scale: wgpu::BindGroup,
    /// Shared order: per block of columns, the bind groups of `block_steps` and `block_update`.
    blocks: Vec<(wgpu::BindGroup, wgpu::BindGroup)>,
}

/// Which product a reduction reads: a residual mode's, or the held-out Gram's.
#[derive(Clone, Copy)]
enum Pick {
    Residual(usize),
    Holdout(usize),
}

/// Where the last held-out product's per-row losses are, for [`Device::keep_rows`].
#[derive(Debug, Default)]
enum HeldRows {
    /// None since the layer was uploaded.
    #[default]
    None,
    /// Copied to each tile's `held_copy` on the device.
    OnDevice,
    /// Read back (an adapter without f64).
    Host(Vec<f32>),
}

/// A tile's buffers by name, in the order [`WgpuDevice::tile_buffers`] makes them (the indices
/// [`Tile`] keeps).
struct TileBufs<'a> {
    w: &'a wgpu::Buffer,
    q: &'a wgpu::Buffer,
    r: &'a wgpu::Buffer,
    codes: &'a wgpu::Buffer,
    s: &'a wgpu::Buffer,
    delta: &'a wgpu::Buffer,
    delta0: &'a wgpu::Buffer,
    lo: &'a wgpu::Buffer,
    order: &'a wgpu::Buffer,
    out: &'a wgpu::Buffer,
    /// The shared order's block corner.
    block_d: Option<&'a wgpu::Buffer>,
}

impl<'a> TileBufs<'a> {
    fn of(bufs: &'a [wgpu::Buffer]) -> TileBufs<'a> {
        TileBufs {
            w: &bufs[0],
            q: &bufs[1],
            r: &bufs[2],
            codes: &bufs[3],
            s: &bufs[4],
            delta: &bufs[5],
            delta0: &bufs[6],
            lo: &bufs[7],
            order: &bufs[8],
            out: &bufs[9],
            block_d: bufs.get(10),
        }
    }
}

impl Tile {
    fn buf(&self, i: usize) -> &wgpu::Buffer {
        &self.bufs[i]
    }
}

/// A layer's state on the GPU.
pub struct WgpuLayer {
    cols: usize,
    /// How the uploaded order is held (`set_order` keeps it).
    order_layout: OrderLayout,
    /// The held-out Gram, once attached.
    gh: Option<wgpu::Buffer>,
    /// The last GPTQ factor handed in (its id, `U` and the permutation), kept resident.
    factor: Option<(u64, wgpu::Buffer, wgpu::Buffer)>,
    /// Orders stashed by key: a copy per tile of its order buffer.
    stash: Vec<(u64, Vec<wgpu::Buffer>)>,
    groups: usize,
    group_size: usize,
    levels: i32,
    g: Option<wgpu::Buffer>,
    tiles: Vec<Tile>,
    pool: BufferPool,
    scale_dtype: ScaleDtype,
    layer_delta: f32,
    layer_delta0: f32,
    /// Each row's value of the last held-out product of `W − Q̂`, as the reduction left it.
    held_rows: HeldRows,
    /// The row-by-row choice's tags and losses, per row ([`Device::keep_rows`]).
    row_keep: Option<(Vec<u32>, Vec<f64>)>,
}

impl WgpuLayer {
    /// Bytes per row of what a row-by-row choice keeps: codes, steps and lowest codes.
    fn kept_row_bytes(&self) -> [u64; 3] {
        let (n, ng) = (self.cols as u64, self.groups as u64);
        [4 * n, 4 * ng, 4 * ng]
    }
}

impl Drop for WgpuLayer {
    fn drop(&mut self) {
        let mut bufs: Vec<wgpu::Buffer> = self.g.take().into_iter().collect();
        bufs.extend(self.gh.take());
        if let Some((_, u, perm)) = self.factor.take() {
            bufs.extend([u, perm]);
        }
        for (_, copies) in self.stash.drain(..) {
            bufs.extend(copies);
        }
        for t in self.tiles.drain(..) {
            bufs.extend(t.bufs);
            if let Some((c, d)) = t.kept {
                bufs.extend([c, d]);
            }
            bufs.extend(t.kept_rows.into_iter().flatten());
        }
        self.pool.give(bufs);
    }
}

/// A Gram's upper triangle as `fold_pack` leaves it (row `i` from its diagonal on, row after
/// row) back in place in a row-major `n × n` matrix; the lower triangle stays zero, since a Gram
/// accumulator reads only the upper one.
pub(super) fn upper_from_packed(packed: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * n];
    let mut at = 0;
    for i in 0..n {
        out[i * n + i..(i + 1) * n].copy_from_slice(&packed[at..at + n - i]);
        at += n - i;
    }
    out
}

/// The widest layer whose greedy order the GPU ranks (`order.wgsl`): ranking costs `n`
/// comparisons per weight against the host sort's `log n`, and past this width `G`'s `n²`
/// outweighs the `m·n` indices on the bus anyway, so the host sorts and sends them.
pub const RANK_MAX_COLS: usize = 4096;

/// The widest layer whose GPTQ factor the GPU builds from its resident Gram (`factor.wgsl`).
/// The build is unblocked: `2n` dependent dispatches and `n³/3` f64 work, against an upload of
/// `2n²` bytes of `U` from a host factor built ahead off the critical path. By estimate (not yet
/// measured on a hardware GPU) it costs some milliseconds at 1024 inputs and most of a second at
/// 4096, where the upload takes about 16 ms; so wider layers take the host's factor.
/// `COMQ_DEVICE_FACTOR=off` sends every factor from the host.
pub const FACTOR_MAX_COLS: usize = 1024;

/// Comparisons per submit of the ranking (`rows · n²`): about 4·10⁹, a few milliseconds on a
/// desktop GPU, far below a watchdog's seconds.
const RANK_SUBMIT_COMPARISONS: usize = 1 << 32;

/// Values per chunk of a compact upload: the packed copy's device buffer holds at most this
/// many 32-bit words (64 MiB), whatever the matrix, and no more than a staging chunk.
pub const PACK_CHUNK: usize = 16 << 20;

/// Whether the row-major `n × n` matrix `m` is exactly symmetric (a Gram matrix is, by
/// construction; one read from a file may not be, and then goes up whole).
fn is_symmetric(m: &[f32], n: usize) -> bool {
    const T: usize = 64;
    // In tiles, so the column reads stay in cache.
    (0..n).step_by(T).all(|i0| {
        (i0..n).step_by(T).all(|j0| {
            (i0..(i0 + T).min(n)).all(|i| {
                (j0.max(i + 1)..(j0 + T).min(n))
                    .all(|j| m[i * n + j].to_bits() == m[j * n + i].to_bits())
            })
        })
    })
}

impl WgpuDevice {
    /// Writes the row-major `n × n` matrix `m` to `dst`, moving only its upper triangle (half
    /// the bytes): rows go up packed from their diagonal on, in chunks of at most
    /// [`PACK_CHUNK`] values, and `unpack.wgsl` writes them into place; a `symmetric` matrix's
    /// lower triangle is then mirrored on the device, a triangular one's set to zero. A matrix
    /// that is not what it says (not exactly symmetric, or not zero below the diagonal) goes up
    /// whole, so the device always holds `m` bit for bit.
    fn write_upper(&self, dst: &wgpu::Buffer, m: &[f32], n: usize, symmetric: bool) -> Result<()> {
        let fits = if symmetric {
            is_symmetric(m, n)
        } else {
            (0..n).all(|i| m[i * n..i * n + i].iter().all(|v| v.to_bits() == 0))
        };
        if !fits || n < 2 {
            return self.ctx.io.write(dst, 0, bytemuck::cast_slice(m));
        }
        let cap = self.pack_words().max(n);
        let tmp = self.pool.take(
            &self.ctx.device,
            "packed",
            (4 * cap.min(n * (n + 1) / 2)) as u64,
        );
        let result = (|| {
            let mut i0 = 0;
            while i0 < n {
                let (mut i1, mut len) = (i0, 0);
                while i1 < n && len + (n - i1) <= cap {
                    len += n - i1;
                    i1 += 1;
                }
                let mut packed = Vec::with_capacity(len);
                for i in i0..i1 {
                    packed.extend_from_slice(&m[i * n + i..(i + 1) * n]);
                }
                self.ctx.io.write(&tmp, 0, bytemuck::cast_slice(&packed))?;
                let params = UnpackParams {
                    n: n as u32,
                    first: i0 as u32,
                    rows: (i1 - i0) as u32,
                    zero_lower: u32::from(!symmetric),
                };
                self.unpack(Kernel::UnpackUpper, dst, &tmp, &params, (i1 - i0) * n)?;
                i0 = i1;
            }
            if symmetric {
                let params = UnpackParams {
                    n: n as u32,
                    first: 0,
                    rows: 0,
                    zero_lower: 0,
                };
                self.unpack(Kernel::MirrorLower, dst, &tmp, &params, n * n)?;
            }
            Ok(())
        })();
        self.pool.give(vec![tmp]);
        result
    }

    /// Writes `values` to `dst` from `first` on as 16-bit halves (half the bytes), expanded by
    /// `unpack.wgsl`; values of 2¹⁶ and more go up whole.
    fn write_halves(&self, dst: &wgpu::Buffer, values: &[u32]) -> Result<()> {
        if values.len() < 2 || values.iter().any(|&v| v > 0xffff) {
            return self.ctx.io.write(dst, 0, bytemuck::cast_slice(values));
        }
        let cap = 2 * self.pack_words();
        let tmp = self.pool.take(
            &self.ctx.device,
            "packed",
            (2 * cap.min(values.len() + 1)) as u64,
        );
        let result = (|| {
            for (c, chunk) in values.chunks(cap).enumerate() {
                let packed: Vec<u32> = chunk
                    .chunks(2)
                    .map(|p| p[0] | p.get(1).map_or(0, |&hi| hi << 16))
                    .collect();
                self.ctx.io.write(&tmp, 0, bytemuck::cast_slice(&packed))?;
                let params = UnpackParams {
                    n: chunk.len() as u32,
                    first: (c * cap) as u32,
                    rows: 0,
                    zero_lower: 0,
                };
                self.unpack(Kernel::UnpackHalves, dst, &tmp, &params, chunk.len())?;
            }
            Ok(())
        })();
        self.pool.give(vec![tmp]);
        result
    }

    /// 32-bit words per chunk of a compact upload.
    fn pack_words(&self) -> usize {
        PACK_CHUNK.min((self.ctx.io.chunk() / 4) as usize).max(1)
    }

    /// One dispatch of an `unpack.wgsl` kernel over `count` elements.
    fn unpack(
        &self,
        kernel: Kernel,
        dst: &wgpu::Buffer,
        src: &wgpu::Buffer,
        params: &UnpackParams,
        count: usize,
    ) -> Result<()> {
        let params = self.uniform("unpack-params", params);
        // The mirror reads nothing but the matrix itself.
        let bind = match kernel {
            Kernel::MirrorLower => self.bind(kernel, &[(0, dst), (2, &params)]),
            _ => self.bind(kernel, &[(0, dst), (1, src), (2, &params)]),
        };
        let mut enc = self.encoder("unpack");
        self.dispatch(&mut enc, kernel, &bind, per_element(count));
        self.submit(enc)
    }
}

impl WgpuDevice {
    fn make_tile(
        &self,
        p: &LayerProblem<'_>,
        g: &wgpu::Buffer,
        norms: Option<&wgpu::Buffer>,
        row0: usize,
        rows: usize,
    ) -> Result<Tile> {
        let bufs = self.tile_buffers(p, rows);
        let b = TileBufs::of(&bufs);
        self.upload_tile(p, &b, norms, row0, rows)?;
        let blocks = match b.block_d {
            Some(dbuf) => self.block_bindings(p, g, &b, dbuf, rows),
            None => Vec::new(),
        };
        let (residual, reduce) = self.measure_bindings(g, &b, rows, p.grid.cols);
        let (rtn, apply) = self.grid_bindings(p, &b, rows);
        let sweep_params = Self::sweep_params(p, rows);
        let sweep = self.sweep_binding(&sweep_params, g, &b);
        let scale = self.scale_binding(p, g, &b, rows);
        let sum = self.sum_binding(b.out, rows);
        Ok(Tile {
            rows,
            w: 0,
            q: 1,
            r: 2,
            codes: 3,
            s: 4,
            delta: 5,
            delta0: 6,
            lo: 7,
            out: 9,
            residual,
            reduce,
            holdout: None,
            kept: None,
            kept_rows: None,
            sum,
            held_copy: None,
            rtn,
            apply,
            sweep,
            sweep_params,
            scale,
            blocks,
            bufs,
        })
    }

    /// A tile's buffers from the pool, in [`TileBufs`] order: w q r codes s delta delta0 lo
    /// order out, and the block corner `d` for the shared order.
    fn tile_buffers(&self, p: &LayerProblem<'_>, rows: usize) -> Vec<wgpu::Buffer> {
        let n = p.grid.cols;
        let mn = (rows * n * 4) as u64;
        let mg = (rows * p.grid.groups() * 4) as u64;
        let take = |label: &str, size: u64| self.pool.take(&self.ctx.device, label, size);
        let mut bufs = vec![
            take("w", mn),
            take("q", mn),
            take("r", mn),
            take("codes", mn),
            take("s", mn),
            take("delta", mg),
            take("delta0", mg),
            take("lo", mg),
            take(
                "order",
                match p.order.layout() {
                    OrderLayout::Natural => 16,
                    OrderLayout::Shared => (n * 4) as u64,
                    OrderLayout::PerRow => mn,
                },
            ),
            take("out", (rows * 4) as u64),
        ];
        if matches!(p.order, Order::Shared { .. }) {
            bufs.push(take("block-d", (rows * SHARED_BLOCK * 4) as u64));
        }
        bufs
    }

    /// Uploads the tile's rows of W, the starting steps, the grid offsets and its visiting
    /// order (a ranked one ranked here from the tile's `W` when `norms` holds its norms).
    fn upload_tile(
        &self,
        p: &LayerProblem<'_>,
        b: &TileBufs<'_>,
        norms: Option<&wgpu::Buffer>,
        row0: usize,
        rows: usize,
    ) -> Result<()> {
        let n = p.grid.cols;
        self.ctx.io.write(
            b.w,
            0,
            bytemuck::cast_slice(&p.weights[row0 * n..(row0 + rows) * n]),
        )?;
        self.write_grid(b, &p.grid.delta, &p.grid.lo, p.grid.groups(), row0, rows)?;
        let w = &p.weights[row0 * n..(row0 + rows) * n];
        self.write_order(b, p.order, n, row0, rows, norms, Some(w))
    }

    /// The tile's rows of an initial grid: steps into `delta0`, lowest codes into `lo`.
    fn write_grid(
        &self,
        b: &TileBufs<'_>,
        delta: &[f32],
        lo: &[i32],
        groups: usize,
        row0: usize,
        rows: usize,
    ) -> Result<()> {
        let gr = row0 * groups..(row0 + rows) * groups;
        self.ctx
            .io
            .write(b.delta0, 0, bytemuck::cast_slice(&delta[gr.clone()]))?;
        self.ctx.io.write(b.lo, 0, bytemuck::cast_slice(&lo[gr]))
    }

    /// The tile's rows of a visiting order (nothing for the natural order). A ranked order is
    /// ranked on the device from the tile's resident `W` when `norms` holds its norms
    /// ([`WgpuDevice::order_norms`]); else it is built on the host from the tile's weights `w`.
    #[allow(clippy::too_many_arguments)]
    fn write_order(
        &self,
        b: &TileBufs<'_>,
        order: &Order,
        n: usize,
        row0: usize,
        rows: usize,
        norms: Option<&wgpu::Buffer>,
        w: Option<&[f32]>,
    ) -> Result<()> {
        let io = &self.ctx.io;
        match order {
            Order::PerRow { perm, .. } => {
                self.write_halves(b.order, &perm[row0 * n..(row0 + rows) * n])
            }
            Order::Ranked { .. } => match (norms, w) {
                (Some(nb), _) => self.rank_order(b, nb, n, rows),
                (None, Some(w)) => match &*order.resolve(w, rows) {
                    Order::PerRow { perm, .. } => self.write_halves(b.order, perm),
                    _ => unreachable!("a ranked order resolves to a per-row one"),
                },
                (None, None) => Err(Error::Internal(
                    "a ranked order on an adapter without f64 needs the host's weights".into(),
                )),
            },
            Order::Shared { perm, .. } => io.write(b.order, 0, bytemuck::cast_slice(perm)),
            Order::Natural { .. } => Ok(()),
        }
    }

    /// A ranked order's column norms on the device (`n` f64 values), when the adapter ranks
    /// orders itself (SHADER_F64) and `order` is ranked; `None` otherwise.
    fn order_norms(&self, order: &Order) -> Result<Option<wgpu::Buffer>> {
        match order {
            Order::Ranked { norms, .. } if self.ranks_orders(norms.len()) => {
                let buf =
                    self.pool
                        .take(&self.ctx.device, "norms", (norms.len().max(1) * 8) as u64);
                self.ctx.io.write(&buf, 0, bytemuck::cast_slice(norms))?;
                Ok(Some(buf))
            }
            _ => Ok(None),
        }
    }

    /// The greedy order of the tile's resident `W` by the column norms in `norms`, into its
    /// order buffer (`order.wgsl`): the host's permutation, bit for bit. In submits of at most
    /// [`RANK_SUBMIT_COMPARISONS`] comparisons, so no one submit runs long enough for a
    /// desktop's watchdog.
    fn rank_order(
        &self,
        b: &TileBufs<'_>,
        norms: &wgpu::Buffer,
        n: usize,
        rows: usize,
    ) -> Result<()> {
        let per_submit = (self.rank_submit / (n * n).max(1)).max(1);
        for first in (0..rows).step_by(per_submit) {
            let end = (first + per_submit).min(rows);
            let params = self.uniform(
                "rank-params",
                &ModeParams {
                    rows: end as u32,
                    n: n as u32,
                    mode: first as u32,
                    pad: 0,
                },
            );
            let bind = self.bind(
                Kernel::GreedyRank,
                &[(0, b.w), (1, norms), (2, b.order), (3, &params)],
            );
            let mut enc = self.encoder("greedy-rank");
            self.dispatch(
                &mut enc,
                Kernel::GreedyRank,
                &bind,
                (
                    n.div_ceil(256) as u32,
                    (end - first).min(MAX_GROUPS as usize) as u32,
                ),
            );
            self.submit(enc)?;
        }
        Ok(())
    }

    /// The shared-order sweep's bind groups per block of columns: in-block steps and the
    /// trailing update.
    fn block_bindings(
        &self,
        p: &LayerProblem<'_>,
        g: &wgpu::Buffer,
        b: &TileBufs<'_>,
        dbuf: &wgpu::Buffer,
        rows: usize,
    ) -> Vec<(wgpu::BindGroup, wgpu::BindGroup)> {
        let n = p.grid.cols;
        (0..n)
            .step_by(SHARED_BLOCK)
            .map(|t0| {
                let bp = self.uniform(
                    "block-params",
                    &BlockParams {
                        rows: rows as u32,
                        n: n as u32,
                        group_size: p.grid.group_size as u32,
                        levels: p.grid.levels(),
                        dead: p.dead_threshold,
                        groups: p.grid.groups() as u32,
                        t0: t0 as u32,
                        b: SHARED_BLOCK.min(n - t0) as u32,
                    },
                );
                let steps = self.bind(
                    Kernel::BlockSteps,
                    &[
                        (0, b.w),
                        (1, b.q),
                        (2, b.r),
                        (3, b.codes),
                        (4, g),
                        (5, b.delta),
                        (6, b.lo),
                        (7, b.order),
                        (8, dbuf),
                        (9, &bp),
                    ],
                );
                let update = self.bind(
                    Kernel::BlockUpdate,
                    &[(2, b.r), (4, g), (7, b.order), (8, dbuf), (9, &bp)],
                );
                (steps, update)
            })
            .collect()
    }

    /// The residual (modes 0–2) and reduction (modes 0–3) bind groups that measure losses.
    fn measure_bindings(
        &self,
        g: &wgpu::Buffer,
        b: &TileBufs<'_>,
        rows: usize,
        n: usize,
    ) -> ([wgpu::BindGroup; 3], [wgpu::BindGroup; 6]) {
        let mode = |m: u32| self.mode_uniform(rows, n, m);
        let residual = [0u32, 1, 2].map(|m| {
            let target = if m == 0 { b.r } else { b.s };
            self.residual_binding(g, b, target, mode(m))
        });
        let reduce = [0u32, 1, 2, 3, 4, 5].map(|m| {
            self.bind(
                Kernel::Reduce,
                &[
                    (0, b.w),
                    (1, b.q),
                    (2, b.codes),
                    (3, b.r),
                    (4, b.s),
                    (5, b.out),
                    (6, &mode(m)),
                ],
            )
        });
        (residual, reduce)
    }

    /// The uniform of the residual and reduction kernels for a tile of `rows` and mode `m`.
    fn mode_uniform(&self, rows: usize, n: usize, m: u32) -> wgpu::Buffer {
        self.uniform(
            "mode-params",
            &ModeParams {
                rows: rows as u32,
                n: n as u32,
                mode: m,
                pad: 0,
            },
        )
    }

    /// A residual kernel's bind group: `target = A·g` with `A` chosen by `mode`'s uniform.
    fn residual_binding(
        &self,
        g: &wgpu::Buffer,
        b: &TileBufs<'_>,
        target: &wgpu::Buffer,
        mode: wgpu::Buffer,
    ) -> wgpu::BindGroup {
        self.bind(
            Kernel::Residual,
            &[
                (0, b.w),
                (1, b.q),
                (2, b.codes),
                (3, g),
                (4, target),
                (5, &mode),
            ],
        )
    }

    /// The round-to-nearest and apply-scale bind groups, which share the grid's parameters.
    fn grid_bindings(
        &self,
        p: &LayerProblem<'_>,
        b: &TileBufs<'_>,
        rows: usize,
    ) -> (wgpu::BindGroup, wgpu::BindGroup) {
        let grid = self.uniform(
            "grid-params",
            &GridParams {
                rows: rows as u32,
                n: p.grid.cols as u32,
                group_size: p.grid.group_size as u32,
                levels: p.grid.levels(),
            },
        );
        let rtn = self.bind(
            Kernel::Rtn,
            &[
                (0, b.w),
                (1, b.q),
                (2, b.codes),
                (3, b.delta),
                (4, b.lo),
                (5, &grid),
            ],
        );
        // apply_scale reads neither W nor lo, so its derived layout has no slots for them.
        let apply = self.bind(
            Kernel::ApplyScale,
            &[(1, b.q), (2, b.codes), (3, b.delta), (5, &grid)],
        );
        (rtn, apply)
    }

    /// The per-row greedy sweep's parameters for a tile of `rows` rows.
    fn sweep_params(p: &LayerProblem<'_>, rows: usize) -> SweepParams {
        SweepParams {
            rows: rows as u32,
            n: p.grid.cols as u32,
            group_size: p.grid.group_size as u32,
            levels: p.grid.levels(),
            dead: p.dead_threshold,
            natural: matches!(p.order, Order::Natural { .. }) as u32,
            groups: p.grid.groups() as u32,
            row0: 0,
        }
    }

    /// The per-row greedy sweep's bind group, from row `params.row0` on.
    fn sweep_binding(
        &self,
        params: &SweepParams,
        g: &wgpu::Buffer,
        b: &TileBufs<'_>,
    ) -> wgpu::BindGroup {
        let sp = self.uniform("sweep-params", params);
        self.bind(
            self.sweep_kernel(params.n as usize),
            &[
                (0, b.w),
                (1, b.q),
                (2, b.r),
                (3, b.codes),
                (4, g),
                (5, b.delta),
                (6, b.lo),
                (7, b.order),
                (8, b.s),
                (9, &sp),
            ],
        )
    }

    /// The closed-form scale step's bind group.
    fn scale_binding(
        &self,
        p: &LayerProblem<'_>,
        g: &wgpu::Buffer,
        b: &TileBufs<'_>,
        rows: usize,
    ) -> wgpu::BindGroup {
        let scp = self.uniform(
            "scale-params",
            &ScaleParams {
                rows: rows as u32,
                n: p.grid.cols as u32,
                group_size: p.grid.group_size as u32,
                dtype: match p.scale_dtype {
                    ScaleDtype::F32 => 0,
                    ScaleDtype::F16 => 1,
                    ScaleDtype::Bf16 => 2,
                },
            },
        );
        self.bind(
            Kernel::ScaleChannel,
            &[
                (0, b.q),
                (1, b.r),
                (2, b.codes),
                (3, g),
                (4, b.delta),
                (5, b.s),
                (6, &scp),
            ],
        )
    }

    fn sweep_kernel(&self, n: usize) -> Kernel {
        if n <= self.shared_cols
            && self.limits.max_compute_workgroup_storage_size as usize >= SWEEP_SHARED_MAX_COLS * 4
        {
            Kernel::SweepShared
        } else {
            Kernel::SweepStorage
        }
    }

    /// Reads codes and steps back from the buffers `pick` names in every tile, in row order
    /// (an internal error when a tile has none: nothing was kept).
    fn read_codes<'t>(
        &self,
        l: &'t WgpuLayer,
        pick: impl Fn(&'t Tile) -> Option<(&'t wgpu::Buffer, &'t wgpu::Buffer)>,
    ) -> Result<(Vec<i32>, Vec<f32>)> {
        let mut codes = Vec::new();
        let mut delta = Vec::new();
        for t in &l.tiles {
            let (c, d) =
                pick(t).ok_or_else(|| Error::Internal("download_kept: nothing was kept".into()))?;
            codes.extend(self.ctx.io.read_i32(c, t.rows * l.cols)?);
            delta.extend(self.ctx.io.read_f32(d, t.rows * l.groups)?);
        }
        self.check_fault()?;
        Ok((codes, delta))
    }

    /// Runs `residual` mode `mode` and `reduce` mode `red` on every tile; returns Σ rows in f64.
    fn product_sum(&self, l: &mut WgpuLayer, residual: Option<usize>, red: usize) -> Result<f64> {
        self.products(l, residual.map(Pick::Residual), red, false)
    }

    /// Runs the residual bind group `pick` names per tile (if any), then `reduce` mode `red`;
    /// returns Σ rows in f64. Where the adapter has f64 the rows are summed on the device and
    /// 8 bytes per tile come back (with `keep`, the rows are also copied to the tile's
    /// `held_copy` for a row-by-row choice to read); else the rows come back and the host sums
    /// them (and keeps them in `held_rows`, with `keep`).
    fn products(
        &self,
        l: &mut WgpuLayer,
        pick: Option<Pick>,
        red: usize,
        keep: bool,
    ) -> Result<f64> {
        let mut total = 0.0f64;
        let mut rows = Vec::new();
        let cols = l.cols;
        let on_device = l.tiles.iter().all(|t| t.sum.is_some());
        for t in &mut l.tiles {
            let mut enc = self.encoder("product");
            let bg = match pick {
                Some(Pick::Residual(m)) => Some(&t.residual[m]),
                Some(Pick::Holdout(m)) => t.holdout.as_ref().map(|h| &h[m]),
                None => None,
            };
            if let Some(bg) = bg {
                self.dispatch(
                    &mut enc,
                    Kernel::Residual,
                    bg,
                    (cols.div_ceil(128) as u32, t.rows.div_ceil(128) as u32),
                );
            }
            self.dispatch(&mut enc, Kernel::Reduce, &t.reduce[red], per_row(t.rows));
            if let (true, Some((sum, sbg))) = (on_device, t.sum.as_ref()) {
                self.dispatch(&mut enc, Kernel::SumRows, sbg, (1, 1));
                if keep {
                    let bytes = (t.rows * 4) as u64;
                    let copy = t
                        .held_copy
                        .get_or_insert_with(|| l.pool.take(&self.ctx.device, "held-rows", bytes));
                    enc.copy_buffer_to_buffer(&t.bufs[t.out], 0, copy, 0, bytes);
                }
                self.submit(enc)?;
                let b = self.ctx.io.read_bytes(sum, 8)?;
                total += f64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
                continue;
            }
            self.submit(enc)?;
            let part = self.ctx.io.read_f32(t.buf(t.out), t.rows)?;
            total += part.iter().map(|&v| v as f64).sum::<f64>();
            rows.extend(part);
        }
        self.check_fault()?;
        if keep {
            // On the device the rows wait in `held_copy`; else they came back.
            l.held_rows = if on_device {
                HeldRows::OnDevice
            } else {
                HeldRows::Host(rows)
            };
        }
        Ok(total)
    }

    /// A bind group of `sum_rows` over a tile's `out` (`rows` values) and its 8-byte sum, where
    /// the adapter has f64 (`None` otherwise: the rows then come back to the host).
    fn sum_binding(
        &self,
        out: &wgpu::Buffer,
        rows: usize,
    ) -> Option<(wgpu::Buffer, wgpu::BindGroup)> {
        if self.host_sums || !self.ctx.pipelines.has(Kernel::SumRows) {
            return None;
        }
        let sum = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("row-sum"),
            size: 8,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let params = self.mode_uniform(rows, 0, 0);
        let bg = self.bind(Kernel::SumRows, &[(0, out), (1, &sum), (2, &params)]);
        Some((sum, bg))
    }
}

/// Where a layer's Gram comes from: the host (`n × n` f32, uploaded as its upper triangle
/// where it is symmetric), or the device itself (a packed upper triangle held since the
/// calibration, [`held`], with the diagonal to set, when one is given).
#[derive(Clone, Copy)]
enum GramFrom<'a> {
    Host(&'a [f32]),
    Held(&'a wgpu::Buffer, &'a [f32]),
}

impl WgpuDevice {
    /// Writes the `n × n` Gram `from` gives into `dst`.
    fn write_gram(&self, dst: &wgpu::Buffer, n: usize, from: GramFrom<'_>) -> Result<()> {
        match from {
            GramFrom::Host(m) => self.write_upper(dst, m, n, true),
            GramFrom::Held(tri, diag) => {
                let all = UnpackParams {
                    n: n as u32,
                    first: 0,
                    rows: n as u32,
                    zero_lower: 0,
                };
                self.unpack(Kernel::UnpackUpper, dst, tri, &all, n * n)?;
                self.unpack(
                    Kernel::MirrorLower,
                    dst,
                    tri,
                    &UnpackParams { rows: 0, ..all },
                    n * n,
                )?;
                if diag.is_empty() {
                    Ok(())
                } else {
                    self.write_diagonal(dst, n, diag)
                }
            }
        }
    }

    /// Sets the diagonal of the `n × n` matrix in `g` to `diag` (`n` values go up).
    fn write_diagonal(&self, g: &wgpu::Buffer, n: usize, diag: &[f32]) -> Result<()> {
        let d = self.pool.take(&self.ctx.device, "diag", (n * 4) as u64);
        self.ctx.io.write(&d, 0, bytemuck::cast_slice(diag))?;
        let params = self.uniform(
            "diag-params",
            &ModeParams {
                rows: 0,
                n: n as u32,
                mode: 0,
                pad: 0,
            },
        );
        let bind = self.bind(Kernel::SetDiagonal, &[(0, g), (1, &d), (2, &params)]);
        let mut enc = self.encoder("set-diagonal");
        self.dispatch(
            &mut enc,
            Kernel::SetDiagonal,
            &bind,
            (n.div_ceil(256) as u32, 1),
        );
        let result = self.submit(enc);
        self.pool.give(vec![d]);
        result
    }

    /// [`Device::upload`] with the Gram `from` gives.
    fn upload_from(&self, p: &LayerProblem<'_>, from: GramFrom<'_>) -> Result<WgpuLayer> {
        let (rows, n) = (p.grid.rows, p.grid.cols);
        let max = self.max_binding();
        let g_bytes = (n * n * 4) as u64;
        if g_bytes > max {
            return Err(gpu_err(format!(
                "layer '{}': its {n}×{n} Gram matrix ({g_bytes} bytes) exceeds the adapter's storage-binding limit ({max} bytes); use --device cpu",
                p.name
            )));
        }
        // Rows per tile: every [rows, n] f32 array within one binding, and at most 16·65535 rows
        // so the residual kernel's dispatch fits.
        let tile_rows = ((max / (n as u64 * 4)) as usize).clamp(1, 16 * MAX_GROUPS as usize);
        let scope = self
            .ctx
            .device
            .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let g = self.pool.take(&self.ctx.device, "gram", g_bytes);
        self.write_gram(&g, n, from)?;
        let norms = self.order_norms(p.order)?;
        let mut tiles = Vec::new();
        for row0 in (0..rows).step_by(tile_rows) {
            let rows = tile_rows.min(rows - row0);
            match self.make_tile(p, &g, norms.as_ref(), row0, rows) {
                Ok(t) => tiles.push(t),
                Err(e) => {
                    self.pool.give(norms.into_iter().collect::<Vec<_>>());
                    return Err(e);
                }
            }
        }
        self.pool.give(norms.into_iter().collect::<Vec<_>>());
        let oom = pollster::block_on(scope.pop());
        let layer = WgpuLayer {
            cols: n,
            order_layout: p.order.layout(),
            gh: None,
            factor: None,
            stash: Vec::new(),
            groups: p.grid.groups(),
            group_size: p.grid.group_size,
            levels: p.grid.levels(),
            g: Some(g),
            tiles,
            pool: self.pool.clone(),
            scale_dtype: p.scale_dtype,
            layer_delta: p.grid.delta[0],
            layer_delta0: p.grid.delta[0],
            held_rows: HeldRows::None,
            row_keep: None,
        };
        if let Some(e) = oom {
            drop(layer);
            self.pool.clear();
            return Err(gpu_err(format!(
                "out of GPU memory uploading layer '{}' [{rows}, {n}]: {e}; use --device cpu",
                p.name
            )));
        }
        let mut layer = layer;
        self.reset(&mut layer)?;
        Ok(layer)
    }

    /// [`Device::attach_holdout`] of a Gram from the host or held on the device.
    fn attach_holdout_from(&self, l: &mut WgpuLayer, from: GramFrom<'_>) -> Result<()> {
        let n = l.cols;
        let scope = self
            .ctx
            .device
            .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let gh = l
            .pool
            .take(&self.ctx.device, "gram-holdout", (n * n * 4) as u64);
        self.write_gram(&gh, n, from)?;
        for t in &mut l.tiles {
            let b = TileBufs::of(&t.bufs);
            t.holdout = Some(
                [0u32, 1]
                    .map(|m| self.residual_binding(&gh, &b, b.s, self.mode_uniform(t.rows, n, m))),
            );
        }
        if let Some(old) = l.gh.replace(gh) {
            l.pool.give(vec![old]);
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err(format!(
                "out of GPU memory uploading a held-out Gram matrix ({n} × {n}): {e}; use --device cpu"
            )));
        }
        Ok(())
    }
}

impl Device for WgpuDevice {
    type Layer = WgpuLayer;

    fn describe(&self) -> String {
        format!(
            "gpu: {} ({:?}, {:?}, {} {})",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info
        )
    }

    fn upload(&self, p: &LayerProblem<'_>) -> Result<WgpuLayer> {
        self.upload_from(p, GramFrom::Host(p.gram))
    }

    fn holds_grams(&self) -> bool {
        !self.ctx.held.is_empty()
    }

    fn upload_held(
        &self,
        p: &LayerProblem<'_>,
        key: [u64; 2],
        diag: &[f32],
    ) -> Result<Option<WgpuLayer>> {
        let n = p.grid.cols;
        if diag.len() != n {
            return Err(Error::Internal(format!(
                "upload_held: {} diagonal values for a {n}-wide Gram",
                diag.len()
            )));
        }
        match self.held_gram(key, n) {
            Some(buf) => {
                log::debug!("layer '{}': its Gram is copied on the device", p.name);
                self.upload_from(p, GramFrom::Held(&buf, diag)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn attach_held_holdout(&self, l: &mut WgpuLayer, key: [u64; 2]) -> Result<bool> {
        match self.held_gram(key, l.cols) {
            Some(buf) => self
                .attach_holdout_from(l, GramFrom::Held(&buf, &[]))
                .map(|_| true),
            None => Ok(false),
        }
    }

    fn energy(&self, l: &mut WgpuLayer) -> Result<f64> {
        self.product_sum(l, Some(1), 1)
    }

    fn reset(&self, l: &mut WgpuLayer) -> Result<()> {
        let mut enc = self.encoder("reset");
        for t in &l.tiles {
            let mn = (t.rows * l.cols * 4) as u64;
            let mg = (t.rows * l.groups * 4) as u64;
            enc.copy_buffer_to_buffer(t.buf(t.w), 0, t.buf(t.q), 0, mn);
            enc.clear_buffer(t.buf(t.r), 0, Some(mn));
            enc.clear_buffer(t.buf(t.codes), 0, Some(mn));
            enc.copy_buffer_to_buffer(t.buf(t.delta0), 0, t.buf(t.delta), 0, mg);
        }
        self.submit(enc)?;
        l.layer_delta = l.layer_delta0;
        Ok(())
    }

    fn round_to_nearest(&self, l: &mut WgpuLayer) -> Result<()> {
        let mut enc = self.encoder("rtn");
        for t in &l.tiles {
            self.dispatch(&mut enc, Kernel::Rtn, &t.rtn, per_element(t.rows * l.cols));
        }
        self.submit(enc)
    }

    fn sweep(&self, l: &mut WgpuLayer) -> Result<()> {
        let kernel = self.sweep_kernel(l.cols);
        let chunk = rows_per_submit(l.cols);
        let mut enc = self.encoder("sweep");
        for t in &l.tiles {
            if t.blocks.is_empty() && t.rows <= chunk {
                self.dispatch(&mut enc, kernel, &t.sweep, per_row(t.rows));
                continue;
            }
            if t.blocks.is_empty() {
                // Consecutive rows, one submit each, so no dispatch runs past the bound.
                let g = l.g.as_ref().expect("a live layer has its Gram");
                let b = TileBufs::of(&t.bufs);
                self.submit(std::mem::replace(&mut enc, self.encoder("sweep")))?;
                for row0 in (0..t.rows).step_by(chunk) {
                    let params = SweepParams {
                        row0: row0 as u32,
                        ..t.sweep_params
                    };
                    let bind = self.sweep_binding(&params, g, &b);
                    let mut e = self.encoder("sweep-rows");
                    self.dispatch(&mut e, kernel, &bind, per_row(chunk.min(t.rows - row0)));
                    self.submit(e)?;
                }
                continue;
            }
            // Shared order: per block, the steps of every row, then one matrix product.
            let groups = t.rows.div_ceil(SHARED_BLOCK) as u32;
            for (steps, update) in &t.blocks {
                self.dispatch(&mut enc, Kernel::BlockSteps, steps, (groups, 1));
                self.dispatch(
                    &mut enc,
                    Kernel::BlockUpdate,
                    update,
                    (l.cols.div_ceil(64) as u32, groups),
                );
            }
        }
        self.submit(enc)
    }

    fn refresh(&self, l: &mut WgpuLayer) -> Result<f64> {
        self.product_sum(l, Some(0), 0)
    }

    fn update_scales(&self, l: &mut WgpuLayer, granularity: Granularity) -> Result<()> {
        match granularity {
            Granularity::Channel => {
                let mut enc = self.encoder("scale");
                for t in &l.tiles {
                    self.dispatch(&mut enc, Kernel::ScaleChannel, &t.scale, per_row(t.rows));
                }
                self.submit(enc)
            }
            Granularity::Layer => {
                // δ ← δ + Σ kᵀR / Σ kᵀGk over all rows: two reductions, one host step.
                let num = self.product_sum(l, None, 2)?;
                let den = self.product_sum(l, Some(2), 3)?;
                if let Some(new) = scale_step(l.layer_delta, num, den, l.scale_dtype) {
                    let mut enc = self.encoder("apply-scale");
                    for t in &l.tiles {
                        let v = vec![new; t.rows * l.groups];
                        self.ctx
                            .io
                            .write(t.buf(t.delta), 0, bytemuck::cast_slice(&v))?;
                        self.dispatch(
                            &mut enc,
                            Kernel::ApplyScale,
                            &t.apply,
                            per_element(t.rows * l.cols),
                        );
                    }
                    self.submit(enc)?;
                    l.layer_delta = new;
                }
                Ok(())
            }
        }
    }

    fn download(&self, l: &mut WgpuLayer) -> Result<(Vec<i32>, Vec<f32>)> {
        self.read_codes(l, |t| Some((t.buf(t.codes), t.buf(t.delta))))
    }

    fn load_codes(&self, l: &mut WgpuLayer, codes: &[i32], delta: &[f32]) -> Result<()> {
        let mut enc = self.encoder("load-codes");
        let (mut row0, n, ng) = (0, l.cols, l.groups);
        for t in &l.tiles {
            self.ctx.io.write(
                t.buf(t.codes),
                0,
                bytemuck::cast_slice(&codes[row0 * n..(row0 + t.rows) * n]),
            )?;
            self.ctx.io.write(
                t.buf(t.delta),
                0,
                bytemuck::cast_slice(&delta[row0 * ng..(row0 + t.rows) * ng]),
            )?;
            self.dispatch(
                &mut enc,
                Kernel::ApplyScale,
                &t.apply,
                per_element(t.rows * n),
            );
            row0 += t.rows;
        }
        self.submit(enc)?;
        l.layer_delta = delta.first().copied().unwrap_or(l.layer_delta);
        Ok(())
    }

    fn gptq(&self, l: &mut WgpuLayer, f: &GptqFactor) -> Result<()> {
        let n = l.cols;
        if l.factor.as_ref().is_none_or(|(id, _, _)| *id != f.id) {
            if f.u.len() != n * n {
                return Err(Error::Internal(format!(
                    "gptq: factor {} is neither resident nor given ({} values for {n} × {n})",
                    f.id,
                    f.u.len()
                )));
            }
            if let Some((_, u, perm)) = l.factor.take() {
                l.pool.give(vec![u, perm]);
            }
            let take = |label: &str, size: u64| l.pool.take(&self.ctx.device, label, size);
            let u = take("gptq-u", (n * n * 4) as u64);
            let perm = take("gptq-perm", (n * 4) as u64);
            self.write_upper(&u, &f.u, n, false)?;
            self.ctx.io.write(&perm, 0, bytemuck::cast_slice(&f.perm))?;
            l.factor = Some((f.id, u, perm));
        }
        let (_, u, perm) = l.factor.as_ref().expect("set above");
        // Consecutive rows, one submit each, so no dispatch reads more than the bound.
        let chunk = rows_per_submit(n);
        // The row's working copy in workgroup memory where it fits (as the sweep's residual).
        let kernel = if n <= self.shared_cols
            && self.limits.max_compute_workgroup_storage_size as usize >= SWEEP_SHARED_MAX_COLS * 4
        {
            Kernel::GptqShared
        } else {
            Kernel::Gptq
        };
        for t in &l.tiles {
            for row0 in (0..t.rows).step_by(chunk) {
                let params = self.uniform(
                    "gptq-params",
                    &GptqParams {
                        rows: t.rows as u32,
                        n: n as u32,
                        group_size: l.group_size as u32,
                        levels: l.levels,
                        groups: l.groups as u32,
                        row0: row0 as u32,
                        pad: [0; 2],
                    },
                );
                let bind = self.bind(
                    kernel,
                    &[
                        (0, t.buf(t.w)),
                        (1, t.buf(t.q)),
                        (2, t.buf(t.codes)),
                        (3, u),
                        (4, perm),
                        (5, t.buf(t.delta)),
                        (6, t.buf(t.lo)),
                        (7, t.buf(t.s)),
                        (8, &params),
                    ],
                );
                let mut enc = self.encoder("gptq");
                self.dispatch(&mut enc, kernel, &bind, per_row(chunk.min(t.rows - row0)));
                self.submit(enc)?;
            }
        }
        Ok(())
    }

    fn set_grid(&self, l: &mut WgpuLayer, delta: &[f32], lo: &[i32]) -> Result<()> {
        let rows: usize = l.tiles.iter().map(|t| t.rows).sum();
        let ng = l.groups;
        if delta.len() != rows * ng || lo.len() != rows * ng {
            return Err(Error::Internal(format!(
                "set_grid: {} steps and {} offsets for a resident [{rows}, {ng}] grid",
                delta.len(),
                lo.len()
            )));
        }
        let mut row0 = 0;
        for t in &l.tiles {
            self.write_grid(&TileBufs::of(&t.bufs), delta, lo, ng, row0, t.rows)?;
            row0 += t.rows;
        }
        l.layer_delta0 = delta[0];
        self.reset(l)
    }

    fn set_diagonal(&self, l: &mut WgpuLayer, diag: &[f32]) -> Result<()> {
        let n = l.cols;
        if diag.len() != n {
            return Err(Error::Internal(format!(
                "set_diagonal: {} values for a {n}-wide Gram",
                diag.len()
            )));
        }
        let g = l.g.as_ref().expect("a live layer has its Gram");
        self.write_diagonal(g, n, diag)
    }

    fn set_order(&self, l: &mut WgpuLayer, order: &Order, stashed: Option<u64>) -> Result<()> {
        if order.layout() != l.order_layout {
            return Err(Error::Internal(
                "set_order: the order kind differs from the upload's".into(),
            ));
        }
        if let Some((_, copies)) = l.stash.iter().find(|(k, _)| Some(*k) == stashed) {
            let mut enc = self.encoder("restore-order");
            for (t, c) in l.tiles.iter().zip(copies) {
                let b = TileBufs::of(&t.bufs);
                // A pooled stash can be larger than the order it holds.
                enc.copy_buffer_to_buffer(c, 0, b.order, 0, b.order.size().min(c.size()));
            }
            return self.submit(enc);
        }
        let norms = self.order_norms(order)?;
        let mut row0 = 0;
        let mut result = Ok(());
        for t in &l.tiles {
            let b = TileBufs::of(&t.bufs);
            result = self.write_order(&b, order, l.cols, row0, t.rows, norms.as_ref(), None);
            if result.is_err() {
                break;
            }
            row0 += t.rows;
        }
        self.pool.give(norms.into_iter().collect::<Vec<_>>());
        result
    }

    fn builds_factors(&self, cols: usize) -> bool {
        !self.host_factors
            && cols <= FACTOR_MAX_COLS
            && (8 * cols * cols) as u64 <= self.max_binding()
            && self.ctx.pipelines.has(Kernel::CholStep)
    }

    fn build_factor(
        &self,
        l: &mut WgpuLayer,
        plan: &crate::numeric::gptq::FactorPlan,
        diag: &[f64],
    ) -> Result<bool> {
        let n = l.cols;
        if l.factor.as_ref().is_some_and(|(id, _, _)| *id == plan.id) {
            return Ok(true);
        }
        if plan.n != n || diag.len() != n || plan.perm.len() != n || !self.builds_factors(n) {
            return Err(Error::Internal(format!(
                "build_factor: a {}-wide plan for a {n}-wide layer on {}",
                plan.n,
                self.describe()
            )));
        }
        if let Some((_, u, perm)) = l.factor.take() {
            l.pool.give(vec![u, perm]);
        }
        let take = |label: &str, size: u64| l.pool.take(&self.ctx.device, label, size);
        let u = take("gptq-u", (n * n * 4) as u64);
        let perm = take("gptq-perm", (n * 4) as u64);
        let dg = take("factor-diag", (n * 8) as u64);
        let a = take("factor-a", (n * n * 8) as u64);
        let m = take("factor-m", (n * n * 8) as u64);
        let flag = take("factor-flag", 16);
        let result = (|| -> Result<bool> {
            self.ctx
                .io
                .write(&perm, 0, bytemuck::cast_slice(&plan.perm))?;
            self.ctx.io.write(&dg, 0, bytemuck::cast_slice(diag))?;
            self.ctx
                .io
                .write(&flag, 0, bytemuck::cast_slice(&[0u32; 4]))?;
            let g = l.g.as_ref().expect("a live layer has its Gram");
            let p0 = self.uniform(
                "factor-params",
                &ModeParams {
                    rows: n as u32,
                    n: 0,
                    mode: 0,
                    pad: 0,
                },
            );
            let sq = |w: usize| (w.div_ceil(16) as u32, w.div_ceil(16) as u32);
            let mut enc = self.encoder("factor");
            let fill = self.bind(
                Kernel::FactorFill,
                &[(0, g), (1, &dg), (2, &perm), (3, &a), (4, &m), (7, &p0)],
            );
            self.dispatch(&mut enc, Kernel::FactorFill, &fill, sq(n));
            // One dispatch per column, then per row, in submits of at most 256; each step's k
            // is its dispatch's size, so one bind group serves them all.
            let chol = self.bind(Kernel::CholStep, &[(3, &a), (4, &m), (6, &flag), (7, &p0)]);
            for k in 0..n {
                let groups = ((n - k) as u32, (n - k).div_ceil(64) as u32);
                self.dispatch(&mut enc, Kernel::CholStep, &chol, groups);
                if k % 256 == 255 {
                    self.submit(std::mem::replace(&mut enc, self.encoder("factor")))?;
                }
            }
            self.submit(enc)?;
            if self.ctx.io.read_i32(&flag, 1)?[0] != 0 {
                return Ok(false);
            }
            let mut enc = self.encoder("factor-inverse");
            let inv = self.bind(Kernel::InvRow, &[(3, &a), (4, &m), (7, &p0)]);
            for k in 0..n {
                self.dispatch(&mut enc, Kernel::InvRow, &inv, ((k + 1) as u32, 1));
                if k % 256 == 255 {
                    self.submit(std::mem::replace(&mut enc, self.encoder("factor-inverse")))?;
                }
            }
            let pack = self.bind(Kernel::FactorPack, &[(3, &a), (5, &u), (7, &p0)]);
            self.dispatch(&mut enc, Kernel::FactorPack, &pack, sq(n));
            self.submit(enc)?;
            self.check_fault()?;
            Ok(true)
        })();
        l.pool.give(vec![dg, a, m, flag]);
        match result {
            Ok(true) => {
                l.factor = Some((plan.id, u, perm));
                Ok(true)
            }
            other => {
                l.pool.give(vec![u, perm]);
                other
            }
        }
    }

    fn ranks_orders(&self, cols: usize) -> bool {
        !self.host_orders && cols <= RANK_MAX_COLS && self.ctx.pipelines.has(Kernel::GreedyRank)
    }

    fn stash_order(&self, l: &mut WgpuLayer, key: u64) -> Result<()> {
        if l.stash.iter().any(|(k, _)| *k == key) {
            return Ok(());
        }
        let mut enc = self.encoder("stash-order");
        let copies: Vec<wgpu::Buffer> = l
            .tiles
            .iter()
            .map(|t| {
                let b = TileBufs::of(&t.bufs);
                let c = l.pool.take(&self.ctx.device, "order-stash", b.order.size());
                enc.copy_buffer_to_buffer(b.order, 0, &c, 0, b.order.size());
                c
            })
            .collect();
        l.stash.push((key, copies));
        self.submit(enc)
    }

    fn error_sqnorm(&self, l: &mut WgpuLayer) -> Result<f64> {
        self.product_sum(l, None, 5)
    }

    fn attach_holdout(&self, l: &mut WgpuLayer, gram: &[f32]) -> Result<()> {
        let n = l.cols;
        if gram.len() != n * n {
            return Err(Error::Internal(format!(
                "attach_holdout: {} values for a {n}-wide Gram",
                gram.len()
            )));
        }
        self.attach_holdout_from(l, GramFrom::Host(gram))
    }

    fn holdout_product(&self, l: &mut WgpuLayer, weights: bool) -> Result<f64> {
        if l.gh.is_none() {
            return Err(Error::Internal(
                "holdout_product: no held-out Gram attached".into(),
            ));
        }
        let (m, red) = if weights { (1, 1) } else { (0, 4) };
        self.products(l, Some(Pick::Holdout(m)), red, !weights)
    }

    fn keep(&self, l: &mut WgpuLayer) -> Result<()> {
        let (n, ng) = (l.cols, l.groups);
        let mut enc = self.encoder("keep");
        for t in &mut l.tiles {
            let (mn, mg) = ((t.rows * n * 4) as u64, (t.rows * ng * 4) as u64);
            if t.kept.is_none() {
                t.kept = Some((
                    l.pool.take(&self.ctx.device, "kept-codes", mn),
                    l.pool.take(&self.ctx.device, "kept-delta", mg),
                ));
            }
            let (kc, kd) = t.kept.as_ref().expect("set above");
            enc.copy_buffer_to_buffer(&t.bufs[t.codes], 0, kc, 0, mn);
            enc.copy_buffer_to_buffer(&t.bufs[t.delta], 0, kd, 0, mg);
        }
        self.submit(enc)
    }

    fn download_kept(&self, l: &mut WgpuLayer) -> Result<(Vec<i32>, Vec<f32>)> {
        self.read_codes(l, |t| t.kept.as_ref().map(|(c, d)| (c, d)))
    }

    fn keep_rows(&self, l: &mut WgpuLayer, tag: u32) -> Result<()> {
        let m: usize = l.tiles.iter().map(|t| t.rows).sum();
        // The rows' losses of the held-out product (read back now where they waited on the
        // device): the comparison is made here and only the rows that improved are copied, as
        // runs of consecutive rows.
        let losses: Vec<f64> = match &l.held_rows {
            HeldRows::Host(rows) => rows.iter().map(|&v| v as f64).collect(),
            HeldRows::OnDevice => {
                let mut rows = Vec::with_capacity(m);
                for t in &l.tiles {
                    let copy = t.held_copy.as_ref().expect("copied with the product");
                    rows.extend(
                        self.ctx
                            .io
                            .read_f32(copy, t.rows)?
                            .into_iter()
                            .map(|v| v as f64),
                    );
                }
                self.check_fault()?;
                rows
            }
            HeldRows::None => Vec::new(),
        };
        if losses.len() != m {
            return Err(Error::Internal(
                "keep_rows: no held-out product of this state".into(),
            ));
        }
        let first = l.row_keep.is_none();
        let (tags, kept) = l
            .row_keep
            .get_or_insert_with(|| (vec![tag; m], vec![f64::INFINITY; m]));
        let better: Vec<bool> = losses.iter().zip(kept.iter()).map(|(a, b)| a < b).collect();
        for (i, &b) in better.iter().enumerate() {
            if b {
                tags[i] = tag;
                kept[i] = losses[i];
            }
        }
        let per_row = l.kept_row_bytes();
        let mut enc = self.encoder("keep-rows");
        let mut row0 = 0;
        for t in &mut l.tiles {
            let sizes = per_row.map(|b| b * t.rows as u64);
            if t.kept_rows.is_none() {
                t.kept_rows = Some([
                    l.pool.take(&self.ctx.device, "kept-row-codes", sizes[0]),
                    l.pool.take(&self.ctx.device, "kept-row-delta", sizes[1]),
                    l.pool.take(&self.ctx.device, "kept-row-lo", sizes[2]),
                ]);
            }
            let dst = t.kept_rows.as_ref().expect("set above");
            let src = [t.buf(t.codes), t.buf(t.delta), t.buf(t.lo)];
            let mut i = 0;
            while i < t.rows {
                if !(first || better[row0 + i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < t.rows && (first || better[row0 + i]) {
                    i += 1;
                }
                for k in 0..3 {
                    let (off, len) = (start as u64 * per_row[k], (i - start) as u64 * per_row[k]);
                    enc.copy_buffer_to_buffer(src[k], off, &dst[k], off, len);
                }
            }
            row0 += t.rows;
        }
        self.submit(enc)
    }

    fn download_kept_rows(&self, l: &mut WgpuLayer) -> Result<super::KeptRows> {
        let (tags, losses) = l
            .row_keep
            .clone()
            .ok_or_else(|| Error::Internal("download_kept_rows: nothing was kept".into()))?;
        let (mut codes, mut delta, mut lo) = (Vec::new(), Vec::new(), Vec::new());
        for t in &l.tiles {
            let [c, d, o] = t
                .kept_rows
                .as_ref()
                .ok_or_else(|| Error::Internal("download_kept_rows: nothing was kept".into()))?;
            codes.extend(self.ctx.io.read_i32(c, t.rows * l.cols)?);
            delta.extend(self.ctx.io.read_f32(d, t.rows * l.groups)?);
            lo.extend(self.ctx.io.read_i32(o, t.rows * l.groups)?);
        }
        self.check_fault()?;
        Ok(super::KeptRows {
            codes,
            delta,
            lo,
            tags,
            losses,
        })
    }

    fn restore_kept_rows(&self, l: &mut WgpuLayer) -> Result<()> {
        let per_row = l.kept_row_bytes();
        let mut enc = self.encoder("restore-rows");
        for t in &l.tiles {
            let src = t
                .kept_rows
                .as_ref()
                .ok_or_else(|| Error::Internal("restore_kept_rows: nothing was kept".into()))?;
            let dst = [t.buf(t.codes), t.buf(t.delta), t.buf(t.lo)];
            let sizes = per_row.map(|b| b * t.rows as u64);
            for k in 0..3 {
                enc.copy_buffer_to_buffer(&src[k], 0, dst[k], 0, sizes[k]);
            }
            self.dispatch(
                &mut enc,
                Kernel::ApplyScale,
                &t.apply,
                per_element(t.rows * l.cols),
            );
        }
        self.submit(enc)
    }
}

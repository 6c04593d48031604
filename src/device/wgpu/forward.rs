//! The ViT forward primitives on a wgpu device (`shaders/vit.wgsl`), with the Gram matrices of
//! layer inputs accumulated where the activations already are.
//!
//! Work is recorded into one open command encoder (dispatches and copies, each dispatch's
//! parameters in its own slot of a uniform ring) and submitted every [`DISPATCHES_PER_SUBMIT`]
//! and at every readback and wait; nothing waits but a download, a Gram's readback, `sync` and
//! `throttle`. wgpu runs submissions in order.
//! Activations never leave the device during calibration; the Gram kernel (`gram.wgsl`) reads a
//! zero-padded copy of a row chunk made on the device (`pad_rows`), sums the chunk in f32 and
//! adds it into an f32 accumulator on the device, read back once, when the block's Gram is
//! finished.

use super::buffers::gpu_err;
use super::context::GpuContext;
use super::held;
use super::pipelines::{FoldParams, GramParams, VitParams};
use super::{WgpuDevice, MAX_GROUPS};
use crate::device::ops::{Activation, Ops};
use crate::error::Result;
use crate::numeric::gram::{Gram, GramAccumulator};
use crate::shaders::Kernel;

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Gram matrices at least this wide are accumulated by `gram_wide` (128×128 tiles, 8×8 per
/// invocation); narrower ones by `gram` (64×64 tiles), whose 4×4 blocks keep more workgroups
/// busy on a narrow Gram (on an H100 the probe's 8×8 kernel won at 4096, lost at 1024).
pub const GRAM_WIDE_MIN: usize = 2048;

/// The padded width of an `n`-wide Gram accumulator on the device.
pub fn gram_padded(n: usize) -> usize {
    if n >= GRAM_WIDE_MIN {
        n.div_ceil(128) * 128
    } else {
        n.div_ceil(64) * 64
    }
}

/// A tensor in device memory.
#[derive(Debug)]
pub struct GpuTensor {
    buf: wgpu::Buffer,
    len: usize,
}

/// Workgroups a Gram dispatch aims for (about four per SM on a 132-SM card; `gram_wide` at
/// 4096 inputs has 528 upper-triangle tiles).
pub const GRAM_TARGET_WORKGROUPS: usize = 528;
/// Most slices of a Gram's split over rows.
pub const GRAM_MAX_SLICES: usize = 8;

/// How many slices an `n`-wide Gram accumulates in (its rows split among them, each slice an
/// f32 accumulator of its own, added in f64 on readback): enough that the upper-triangle tiles
/// times the slices reach [`GRAM_TARGET_WORKGROUPS`], at most [`GRAM_MAX_SLICES`], and no more
/// than a storage binding of `max_binding` bytes holds.
///
/// Wide Grams (`gram_wide`, 2048 inputs and more) keep one slice: they have 136 tiles or more,
/// and their slices would cost the memory plan of the largest models most.
pub fn gram_slices(n: usize, max_binding: u64) -> usize {
    if n >= GRAM_WIDE_MIN {
        return 1;
    }
    let np = gram_padded(n);
    let side = np / 64;
    let tiles = (side * (side + 1) / 2).max(1);
    let fit = (max_binding / (np as u64 * np as u64 * 4).max(1)) as usize;
    GRAM_TARGET_WORKGROUPS
        .div_ceil(tiles)
        .clamp(1, GRAM_MAX_SLICES)
        .min(fit.max(1))
}

/// Device bytes of an `n`-wide Gram accumulator (all its slices; an upper bound for any
/// adapter).
pub fn gram_device_bytes(n: usize) -> u64 {
    let np = gram_padded(n) as u64;
    gram_slices(n, u64::MAX) as u64 * np * np * 4
}

/// A Gram accumulator in device memory.
#[derive(Debug)]
pub struct GpuGram {
    /// The f32 sums (upper triangle), one `np × np` slice per part of the split over rows.
    g: wgpu::Buffer,
    n: usize,
    np: usize,
    slices: usize,
    samples: u64,
}

/// Dispatches recorded into one command encoder before it is submitted (a submit costs tens of
/// microseconds of driver time; a ViT-L batch through a block is about 15 dispatches).
pub const DISPATCHES_PER_SUBMIT: usize = 64;
/// Slots of the uniform ring (each 256 bytes, the largest offset alignment wgpu allows). More
/// than [`DISPATCHES_PER_SUBMIT`]: a slot is rewritten only after the submit that read it (queue
/// writes land in queue order, before the next submit's work).
const UNIFORM_SLOTS: u64 = 1024;
const UNIFORM_SLOT_BYTES: u64 = 256;

/// Forward primitives on one wgpu device. Holds its own handles (cheap clones), so it outlives
/// a change of the quantization device.
#[derive(Debug, Clone)]
pub struct GpuOps {
    name: String,
    /// The quantization device's context: same queue, kernels, fault slot and transfers.
    ctx: GpuContext,
    max_binding: u64,
    /// The open encoder, the uniform ring and the submissions, shared by clones (their work is
    /// one stream).
    state: std::sync::Arc<std::sync::Mutex<Stream>>,
    /// The uniform ring: every dispatch's parameters in a slot of its own.
    ring: std::sync::Arc<wgpu::Buffer>,
}

/// See [`GpuOps::state`].
#[derive(Debug, Default)]
struct Stream {
    /// Dispatches and copies recorded and not yet submitted.
    open: Option<wgpu::CommandEncoder>,
    recorded: usize,
    /// The next slot of the uniform ring.
    slot: u64,
    /// The latest submission, and the one [`Ops::throttle`] marked last: at most the work
    /// between two marks and the one after is in flight.
    latest: Option<wgpu::SubmissionIndex>,
    marked: Option<wgpu::SubmissionIndex>,
}

fn grid(count: usize) -> (u32, u32) {
    let blocks = (count as u32).div_ceil(256).max(1);
    (blocks.min(MAX_GROUPS), blocks.div_ceil(MAX_GROUPS))
}

impl GpuOps {
    /// Forward primitives on the device of `d`.
    pub fn new(d: &WgpuDevice) -> GpuOps {
        let ring = d.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("vit-params-ring"),
            size: UNIFORM_SLOTS * UNIFORM_SLOT_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        GpuOps {
            state: Default::default(),
            ring: std::sync::Arc::new(ring),
            name: format!("{} ({:?})", d.info.name, d.info.backend),
            ctx: d.ctx.clone(),
            max_binding: d.max_binding(),
        }
    }

    fn stream(&self) -> std::sync::MutexGuard<'_, Stream> {
        // A panic while recording leaves nothing half-done that a later op could misread.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits what is recorded (a no-op when nothing is).
    fn flush_locked(&self, st: &mut Stream) {
        if let Some(enc) = st.open.take() {
            st.latest = Some(self.ctx.queue.submit([enc.finish()]));
            st.recorded = 0;
        }
    }

    /// Submits what is recorded: before a transfer that submits on its own (a readback), and at
    /// every wait.
    fn flush(&self) {
        let mut st = self.stream();
        self.flush_locked(&mut st);
    }

    /// Records into the open encoder with `f`, submitting after [`DISPATCHES_PER_SUBMIT`].
    fn record(&self, st: &mut Stream, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let enc = st.open.get_or_insert_with(|| self.ctx.encoder("vit"));
        f(enc);
        st.recorded += 1;
        if st.recorded >= DISPATCHES_PER_SUBMIT {
            self.flush_locked(st);
        }
    }

    fn check_fault(&self) -> Result<()> {
        self.ctx
            .check_fault("the forward pass can run on the CPU with --device cpu")
    }

    fn alloc(&self, len: usize) -> Result<GpuTensor> {
        let bytes = (len.max(4) * 4) as u64;
        if bytes > self.max_binding {
            return Err(gpu_err(format!(
                "a forward-pass tensor of {bytes} bytes exceeds the adapter's storage-binding limit ({} bytes); use fewer images per batch or --device cpu",
                self.max_binding
            )));
        }
        Ok(GpuTensor {
            buf: self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("vit"),
                size: bytes.next_multiple_of(16),
                usage: STORAGE,
                mapped_at_creation: false,
            }),
            len,
        })
    }

    /// Records one dispatch of `kernel` with `params` at binding 4 (no wait).
    fn run(
        &self,
        kernel: Kernel,
        bufs: &[(u32, &wgpu::Buffer)],
        params: VitParams,
        groups: (u32, u32, u32),
    ) {
        self.dispatch(kernel, bufs, bytemuck::bytes_of(&params), 4, groups);
    }

    /// Records one dispatch of `kernel` over `bufs` with the uniform bytes `params` (in the
    /// next slot of the ring) at binding `ubinding` (no wait).
    fn dispatch(
        &self,
        kernel: Kernel,
        bufs: &[(u32, &wgpu::Buffer)],
        params: &[u8],
        ubinding: u32,
        groups: (u32, u32, u32),
    ) {
        let mut st = self.stream();
        let offset = st.slot * UNIFORM_SLOT_BYTES;
        st.slot = (st.slot + 1) % UNIFORM_SLOTS;
        self.ctx.queue.write_buffer(&self.ring, offset, params);
        let ring = (ubinding, self.ring.as_ref(), offset, params.len() as u64);
        let bg = self.ctx.bind_with(kernel, bufs, Some(ring));
        self.record(&mut st, |enc| self.ctx.pass(enc, kernel, &bg, groups));
    }

    fn elementwise(
        &self,
        kernel: Kernel,
        bufs: &[(u32, &wgpu::Buffer)],
        count: usize,
        mut p: VitParams,
    ) {
        let (gx, gy) = grid(count);
        p.gx = gx;
        self.run(kernel, bufs, p, (gx, gy, 1));
    }
}

impl GpuOps {
    /// Adds `rows` rows into `g`: of `xs[0]` alone (`gram` or `gram_wide`, the upper triangle),
    /// or of `xs[0]` against `xs[1]` (`cross`, every tile). An aligned width is read in place;
    /// another is copied into the padded layout, in staging chunks sized to the batch (a short
    /// batch does not get the largest one).
    fn accumulate(&self, g: &mut GpuGram, xs: &[&GpuTensor], rows: usize) -> Result<()> {
        let (n, np, slices) = (g.n, g.np, g.slices);
        if let Some(x) = xs.iter().find(|x| rows * n > x.len) {
            return Err(crate::error::Error::Internal(format!(
                "Gram accumulation: {rows} rows of {n} from a tensor of {}",
                x.len
            )));
        }
        let cap = ((self.max_binding / (np as u64 * 4)) as usize / 16 * 16).clamp(16, 4096);
        let chunks = if n == np {
            Vec::new()
        } else {
            let len = cap.min(rows.div_ceil(16) * 16).max(16) * np;
            xs.iter()
                .map(|_| self.alloc(len))
                .collect::<Result<Vec<_>>>()?
        };
        let (kernel, tile) = match xs.len() {
            2 => (Kernel::Cross, 64),
            _ if n >= GRAM_WIDE_MIN => (Kernel::GramWide, 128),
            _ => (Kernel::Gram, 64),
        };
        for r0 in (0..rows).step_by(cap) {
            let r = cap.min(rows - r0);
            let rp = r.div_ceil(16) * 16;
            let (srcs, x0): (Vec<&wgpu::Buffer>, usize) = if chunks.is_empty() {
                (xs.iter().map(|x| &x.buf).collect(), r0 * np / 4)
            } else {
                let p = VitParams {
                    a: (rp * np) as u32,
                    b: n as u32,
                    c: np as u32,
                    d: r0 as u32,
                    e: r as u32,
                    ..Default::default()
                };
                for (x, c) in xs.iter().zip(&chunks) {
                    self.elementwise(Kernel::PadRows, &[(0, &x.buf), (3, &c.buf)], rp * np, p);
                }
                (chunks.iter().map(|c| &c.buf).collect(), 0)
            };
            let gp = GramParams {
                rows: rp as u32,
                n4: (np / 4) as u32,
                split: (rp.div_ceil(slices).div_ceil(16) * 16) as u32,
                valid: r as u32,
                x0: x0 as u32,
                y0: x0 as u32,
                pad: [0; 2],
            };
            let mut bufs = vec![(0, srcs[0]), (1, &g.g)];
            if let Some(y) = srcs.get(1) {
                bufs.push((3, *y));
            }
            self.dispatch(
                kernel,
                &bufs,
                bytemuck::bytes_of(&gp),
                2,
                ((np / tile) as u32, (np / tile) as u32, slices as u32),
            );
            g.samples += r as u64;
        }
        Ok(())
    }

    /// The accumulator read back once (the pending work submitted first), as row-major parts
    /// of row stride `stride` whose upper triangle (or, with `full`, every element) holds the
    /// sums. An accumulator of several slices is folded on the device first ([`Kernel::FoldSum`],
    /// [`Kernel::FoldPack`]): one unpadded matrix comes back instead of `slices` padded ones,
    /// and of a Gram matrix only the upper triangle (its f32 slices added in f32 there, where the
    /// host added them in f64: one rounding of a sum of at most [`GRAM_MAX_SLICES`] terms, each
    /// of which already sums its rows in f32).
    fn read_folded(&self, g: &GpuGram, full: bool) -> Result<(Vec<f32>, usize)> {
        let (n, np) = (g.n, g.np);
        if g.slices < 2 || n == 0 {
            self.flush();
            let sums = self.ctx.io.read_f32(&g.g, g.slices * np * np)?;
            self.check_fault()?;
            return Ok((sums, np));
        }
        let p = FoldParams {
            n: n as u32,
            np: np as u32,
            slices: g.slices as u32,
            full: u32::from(full),
        };
        let (gx, gy) = grid(n * n);
        for kernel in [Kernel::FoldSum, Kernel::FoldPack] {
            self.dispatch(kernel, &[(0, &g.g)], bytemuck::bytes_of(&p), 2, (gx, gy, 1));
        }
        self.flush();
        let count = if full { n * n } else { n * (n + 1) / 2 };
        let packed = self.ctx.io.read_f32_at(&g.g, (np * np * 4) as u64, count)?;
        self.check_fault()?;
        if full {
            return Ok((packed, n));
        }
        Ok((super::upper_from_packed(&packed, n), n))
    }
}

impl GpuOps {
    /// Keeps the packed upper triangle of the folded accumulator `g` on the device under the
    /// digest of `gram`, its host copy ([`super::held`]), for the layers that quantize with it.
    /// A Gram too wide to hold is not held (its layers upload it).
    fn hold(&self, g: &GpuGram, gram: &Gram) -> Result<()> {
        let n = g.n;
        let Some(buf) = held::triangle_buffer(&self.ctx.device, n, self.max_binding) else {
            return Ok(());
        };
        let (key, bytes) = (gram.digest(), held::triangle_bytes(n));
        let np = g.np as u64;
        let mut st = self.stream();
        self.record(&mut st, |enc| {
            if g.slices >= 2 {
                // `fold_pack` left the triangle, packed, after the first slice.
                enc.copy_buffer_to_buffer(&g.g, np * np * 4, &buf, 0, bytes);
            } else {
                // One padded slice: its upper triangle row by row.
                let mut at = 0u64;
                for i in 0..n as u64 {
                    let len = (n as u64 - i) * 4;
                    enc.copy_buffer_to_buffer(&g.g, (i * np + i) * 4, &buf, at, len);
                    at += len;
                }
            }
        });
        // Submitted before the triangle is offered: any use of it is queued after the copy.
        self.flush_locked(&mut st);
        drop(st);
        self.check_fault()?;
        self.ctx.held.insert(key, n, buf);
        Ok(())
    }
}

impl Ops for GpuOps {
    type T = GpuTensor;
    type G = GpuGram;
    type X = GpuGram;

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn upload(&self, data: &[f32]) -> Result<GpuTensor> {
        let t = self.alloc(data.len())?;
        if !data.is_empty() {
            self.ctx.io.write(&t.buf, 0, bytemuck::cast_slice(data))?;
        }
        Ok(t)
    }

    fn duplicate(&self, t: &GpuTensor) -> Result<GpuTensor> {
        let c = self.alloc(t.len)?;
        let mut st = self.stream();
        self.record(&mut st, |enc| {
            enc.copy_buffer_to_buffer(&t.buf, 0, &c.buf, 0, (t.len * 4) as u64)
        });
        Ok(c)
    }

    fn download(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        self.flush();
        let v = self.ctx.io.read_f32(&t.buf, t.len)?;
        self.check_fault()?;
        Ok(v)
    }

    fn linear(
        &self,
        x: &GpuTensor,
        rows: usize,
        k: usize,
        w: &GpuTensor,
        b: &GpuTensor,
        n: usize,
    ) -> Result<GpuTensor> {
        let y = self.alloc(rows * n)?;
        let p = VitParams {
            a: rows as u32,
            b: k as u32,
            c: n as u32,
            ..Default::default()
        };
        let gy = rows.div_ceil(128) as u32;
        if gy > MAX_GROUPS {
            return Err(gpu_err(format!(
                "{rows} rows in one GEMM exceed the dispatch limit; use fewer images per batch"
            )));
        }
        self.run(
            Kernel::Linear,
            &[(0, &x.buf), (1, &w.buf), (2, &b.buf), (3, &y.buf)],
            p,
            (n.div_ceil(128) as u32, gy, 1),
        );
        Ok(y)
    }

    fn layernorm(
        &self,
        x: &GpuTensor,
        rows: usize,
        d: usize,
        w: &GpuTensor,
        b: &GpuTensor,
        eps: f32,
    ) -> Result<GpuTensor> {
        let y = self.alloc(rows * d)?;
        let gx = (rows as u32).clamp(1, MAX_GROUPS);
        let gy = (rows as u32).div_ceil(MAX_GROUPS).max(1);
        let p = VitParams {
            a: rows as u32,
            b: d as u32,
            gx,
            eps,
            ..Default::default()
        };
        self.run(
            Kernel::LayerNorm,
            &[(0, &x.buf), (1, &w.buf), (2, &b.buf), (3, &y.buf)],
            p,
            (gx, gy, 1),
        );
        Ok(y)
    }

    fn activation(&self, x: &mut GpuTensor, len: usize, act: Activation) -> Result<()> {
        let p = VitParams {
            a: len as u32,
            b: act.code(),
            ..Default::default()
        };
        self.elementwise(Kernel::Gelu, &[(3, &x.buf)], len, p);
        Ok(())
    }

    fn attention(
        &self,
        qkv: &GpuTensor,
        n: usize,
        t: usize,
        heads: usize,
        hd: usize,
        bias: Option<(&GpuTensor, usize)>,
    ) -> Result<GpuTensor> {
        if t == 0 || hd == 0 {
            return Err(crate::error::Error::Shape(format!(
                "attention over {t} tokens with head dimension {hd}"
            )));
        }
        if n > MAX_GROUPS as usize {
            return Err(gpu_err(format!(
                "attention over {n} sequences exceeds the dispatch limit of {MAX_GROUPS}; use fewer images per batch or --device cpu"
            )));
        }
        let d = heads * hd;
        let y = self.alloc(n * t * d)?;
        let p = VitParams {
            a: t as u32,
            b: hd as u32,
            c: d as u32,
            scale: 1.0 / (hd as f32).sqrt(),
            ..Default::default()
        };
        match bias {
            // The two entry points share one body, so both declare the bias binding; the plain one
            // never reads it and gets the input there.
            None => self.run(
                Kernel::Attention,
                &[(0, &qkv.buf), (1, &qkv.buf), (3, &y.buf)],
                p,
                (t.div_ceil(64) as u32, heads as u32, n as u32),
            ),
            Some((b, groups)) => {
                if groups == 0 || b.len != groups * heads * t * t {
                    return Err(crate::error::Error::Shape(format!(
                        "attention bias of {} values for {groups} groups of {heads} heads over {t} tokens",
                        b.len
                    )));
                }
                let p = VitParams {
                    d: groups as u32,
                    e: heads as u32,
                    ..p
                };
                self.run(
                    Kernel::AttentionBias,
                    &[(0, &qkv.buf), (1, &b.buf), (3, &y.buf)],
                    p,
                    (t.div_ceil(64) as u32, heads as u32, n as u32),
                );
            }
        }
        Ok(y)
    }

    fn gather_rows(&self, x: &GpuTensor, order: &[u32], d: usize) -> Result<GpuTensor> {
        let rows = x.len / d.max(1);
        // The indices travel as f32: exact below 2^24.
        if rows >= 1 << 24 {
            return Err(gpu_err(format!(
                "a row gather over {rows} rows exceeds the kernel's limit of 2^24; use fewer images per batch or --device cpu"
            )));
        }
        if let Some(bad) = order.iter().find(|&&r| r as usize >= rows) {
            return Err(crate::error::Error::Shape(format!(
                "row gather asks for row {bad} of {rows}"
            )));
        }
        let idx: Vec<f32> = order.iter().map(|&r| r as f32).collect();
        let idx = self.upload(&idx)?;
        let len = order.len() * d;
        let y = self.alloc(len)?;
        let p = VitParams {
            a: len as u32,
            b: d as u32,
            ..Default::default()
        };
        self.elementwise(
            Kernel::GatherRows,
            &[(0, &x.buf), (1, &idx.buf), (3, &y.buf)],
            len,
            p,
        );
        Ok(y)
    }

    fn qk_norm(
        &self,
        qkv: &mut GpuTensor,
        rows: usize,
        heads: usize,
        hd: usize,
        gain: &GpuTensor,
        bias: &GpuTensor,
        eps: f32,
    ) -> Result<()> {
        let segments = (rows * 2 * heads) as u32;
        let gx = segments.clamp(1, MAX_GROUPS);
        let gy = segments.div_ceil(MAX_GROUPS).max(1);
        let p = VitParams {
            a: segments,
            b: hd as u32,
            c: heads as u32,
            gx,
            eps,
            ..Default::default()
        };
        self.run(
            Kernel::QkNorm,
            &[(1, &gain.buf), (2, &bias.buf), (3, &qkv.buf)],
            p,
            (gx, gy, 1),
        );
        Ok(())
    }

    fn add_scaled(
        &self,
        h: &mut GpuTensor,
        o: &GpuTensor,
        gamma: &GpuTensor,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let p = VitParams {
            a: (rows * d) as u32,
            b: d as u32,
            ..Default::default()
        };
        self.elementwise(
            Kernel::AddScaled,
            &[(0, &o.buf), (1, &gamma.buf), (3, &h.buf)],
            rows * d,
            p,
        );
        Ok(())
    }

    fn patch_embed(
        &self,
        px: &GpuTensor,
        n: usize,
        c: usize,
        (sh, sw): (usize, usize),
        pz: usize,
        w: &GpuTensor,
        b: &GpuTensor,
        d: usize,
    ) -> Result<GpuTensor> {
        let (gh, gw) = (sh / pz, sw / pz);
        let k = c * pz * pz;
        let total = n * gh * gw * k;
        let cols = self.alloc(total)?;
        let p = VitParams {
            a: total as u32,
            b: c as u32,
            c: sw as u32,
            d: pz as u32,
            e: gw as u32,
            f: sh as u32,
            h: gh as u32,
            ..Default::default()
        };
        self.elementwise(Kernel::Im2col, &[(0, &px.buf), (3, &cols.buf)], total, p);
        self.linear(&cols, n * gh * gw, k, w, b, d)
    }

    fn assemble(
        &self,
        patches: &GpuTensor,
        prefix: &GpuTensor,
        pos: &GpuTensor,
        n: usize,
        prefix_tokens: usize,
        g: usize,
        d: usize,
    ) -> Result<GpuTensor> {
        let total = n * (prefix_tokens + g) * d;
        let y = self.alloc(total)?;
        let p = VitParams {
            a: total as u32,
            b: prefix_tokens as u32,
            c: g as u32,
            d: d as u32,
            ..Default::default()
        };
        self.elementwise(
            Kernel::Assemble,
            &[
                (0, &patches.buf),
                (1, &prefix.buf),
                (2, &pos.buf),
                (3, &y.buf),
            ],
            total,
            p,
        );
        Ok(y)
    }

    fn gram_new(&self, n: usize) -> Result<GpuGram> {
        let np = gram_padded(n);
        let slices = gram_slices(n, self.max_binding);
        let bytes = (slices * np * np * 4) as u64;
        if bytes > self.max_binding {
            return Err(gpu_err(format!(
                "a {n}×{n} Gram matrix ({bytes} bytes) exceeds the adapter's storage-binding limit; use --device cpu"
            )));
        }
        let make = |label: &str| {
            self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: STORAGE,
                mapped_at_creation: false,
            })
        };
        let g = make("gram");
        let mut st = self.stream();
        self.record(&mut st, |enc| enc.clear_buffer(&g, 0, None));
        drop(st);
        Ok(GpuGram {
            g,
            n,
            np,
            slices,
            samples: 0,
        })
    }

    fn gram_add(&self, g: &mut GpuGram, x: &GpuTensor, rows: usize) -> Result<()> {
        self.accumulate(g, &[x], rows)
    }

    fn cross_new(&self, n: usize) -> Result<GpuGram> {
        self.gram_new(n)
    }

    fn cross_add(
        &self,
        c: &mut GpuGram,
        xq: &GpuTensor,
        xf: &GpuTensor,
        rows: usize,
    ) -> Result<()> {
        self.accumulate(c, &[xq, xf], rows)
    }

    fn cross_finish(&self, c: GpuGram) -> Result<crate::numeric::gram::CrossGram> {
        let mut acc = crate::numeric::gram::CrossGram::zeros(c.n);
        let (parts, stride) = self.read_folded(&c, true)?;
        for (i, part) in parts.chunks(stride * stride).enumerate() {
            acc.add_partial(part, stride, if i == 0 { c.samples } else { 0 });
        }
        Ok(acc)
    }

    fn gram_finish(&self, g: GpuGram) -> Result<Gram> {
        let mut acc = GramAccumulator::new(g.n);
        let (parts, stride) = self.read_folded(&g, false)?;
        for (i, part) in parts.chunks(stride * stride).enumerate() {
            acc.add_partial(part, stride, if i == 0 { g.samples } else { 0 });
        }
        let gram = acc.finish();
        self.hold(&g, &gram)?;
        Ok(gram)
    }

    fn sync(&self) -> Result<()> {
        self.flush();
        super::buffers::wait(&self.ctx.device)?;
        self.check_fault()
    }

    fn throttle(&self) -> Result<()> {
        let previous = {
            let mut st = self.stream();
            self.flush_locked(&mut st);
            let latest = st.latest.clone();
            std::mem::replace(&mut st.marked, latest)
        };
        if let Some(idx) = previous {
            super::buffers::wait_for(&self.ctx.device, Some(idx))?;
        }
        self.check_fault()
    }
}

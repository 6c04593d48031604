//! Buffer reuse across layers, and reading results back.
//!
//! Storage buffers are taken from a pool and returned when a layer's state is dropped, so a
//! model of many equally-shaped layers allocates its device memory once. Readback is the
//! copy → map → poll → unmap dance, documented once here: copy into a `MAP_READ` staging
//! buffer, submit, `map_async`, block on `device.poll(wait_indefinitely)` (which also drives the
//! map callback), copy the mapped bytes out, unmap.
//!
//! Both directions move at most [`STAGING_CHUNK`] bytes at a time. A transfer's staging copy is
//! device-visible memory of its own size, held until the copy completes: one whole-size copy of
//! the 6B shape's fc2 Gram (655 MB) each way came on top of the planned state and took a run
//! planned at 7.3 GB past its 8 GB budget. In chunks the staging is bounded by
//! [`STAGING_BYTES`], which the memory plans count. The chunk is large enough that the transfers
//! of ViT-H and smaller shapes (and the Gram's activation chunks of every shape) stay single
//! copies, with no extra waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Bytes of free buffers a pool keeps; beyond this the oldest are released. Without a cap the
/// pool would end up holding one state of every layer shape of a block at once (qkv, proj,
/// fc1/fc2 and both Gram sizes: 2.7 GB for the 6-billion-parameter shape), on top of the
/// calibration's resident hidden state.
pub const POOL_CAP_BYTES: u64 = 512 << 20;

/// A pool of storage buffers, shared by the layers of one device.
#[derive(Debug, Default, Clone)]
pub struct BufferPool {
    free: Arc<Mutex<Vec<wgpu::Buffer>>>,
}

impl BufferPool {
    /// A storage buffer of at least `size` bytes (the smallest free one that fits, else a new one).
    pub fn take(&self, device: &wgpu::Device, label: &str, size: u64) -> wgpu::Buffer {
        let size = size.max(16).next_multiple_of(16);
        let mut free = self.free.lock().expect("pool lock");
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.size() >= size && b.size() <= size.saturating_mul(2))
            .min_by_key(|(_, b)| b.size())
            .map(|(i, _)| i);
        match best {
            Some(i) => free.remove(i),
            None => device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: STORAGE,
                mapped_at_creation: false,
            }),
        }
    }

    /// Returns buffers to the pool (releasing the oldest beyond [`POOL_CAP_BYTES`]).
    pub fn give(&self, buffers: impl IntoIterator<Item = wgpu::Buffer>) {
        let mut free = self.free.lock().expect("pool lock");
        free.extend(buffers);
        let mut total: u64 = free.iter().map(|b| b.size()).sum();
        let mut drop_front = 0;
        while total > POOL_CAP_BYTES && drop_front < free.len() {
            total -= free[drop_front].size();
            drop_front += 1;
        }
        free.drain(..drop_front);
    }

    /// Frees every pooled buffer.
    pub fn clear(&self) {
        self.free.lock().expect("pool lock").clear();
    }
}

/// Bytes moved between the host and one device through [`Transfers`] (the data transfers; the
/// few bytes of uniform parameters are not counted), for the profile and the report.
#[derive(Debug, Default)]
pub struct Traffic {
    up: AtomicU64,
    down: AtomicU64,
}

impl Traffic {
    fn add_up(&self, bytes: u64) {
        self.up.fetch_add(bytes, Ordering::Relaxed);
    }

    fn add_down(&self, bytes: u64) {
        self.down.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes uploaded so far.
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    /// Bytes read back so far.
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
}

/// Largest single staging copy of an upload or a readback (a multiple of 4, wgpu's copy
/// alignment).
pub const STAGING_CHUNK: u64 = 256 << 20;

/// Staging memory the transfers of one device may hold at once: one upload chunk and one
/// readback chunk.
pub const STAGING_BYTES: u64 = 2 * STAGING_CHUNK;

/// The host↔device transfers of one device, in staging chunks of at most `chunk` bytes
/// ([`STAGING_CHUNK`] on a device as opened). Cloned into every user of the device (the
/// quantization primitives and the forward pass), so both move data the same way.
///
/// Bytes are counted twice: for the whole device, and for the account these transfers belong
/// to. A clone shares both; [`Transfers::own_account`] opens a new account, so that a second
/// thread's work on the same device (the calibration's forward pass and Gram matrices beside
/// the quantization) is not counted as the first thread's.
#[derive(Debug, Clone)]
pub struct Transfers {
    device: wgpu::Device,
    queue: wgpu::Queue,
    chunk: u64,
    /// Bytes moved each way on this account, shared by every clone.
    traffic: Arc<Traffic>,
    /// Bytes moved each way on the device, every account together.
    total: Arc<Traffic>,
}

impl Transfers {
    /// Transfers on `device` through `queue`, in chunks of at most [`STAGING_CHUNK`].
    pub fn new(device: wgpu::Device, queue: wgpu::Queue) -> Transfers {
        Transfers {
            device,
            queue,
            chunk: STAGING_CHUNK,
            traffic: Arc::default(),
            total: Arc::default(),
        }
    }

    /// The same transfers on a new account: what moves through them (and their clones) is
    /// counted in the device's total and in the new account, not in this one.
    pub fn own_account(&self) -> Transfers {
        Transfers {
            traffic: Arc::default(),
            ..self.clone()
        }
    }

    /// Bytes uploaded and read back through these transfers (and their clones, on this
    /// account) so far.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    /// Bytes uploaded and read back on the whole device so far, every account together.
    pub fn total(&self) -> &Traffic {
        &self.total
    }

    /// The staging chunk in bytes.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Caps the staging chunk at `bytes`, rounded down to a positive multiple of wgpu's copy
    /// alignment.
    pub fn cap_chunk(&mut self, bytes: u64) {
        self.chunk = (bytes / wgpu::COPY_BUFFER_ALIGNMENT * wgpu::COPY_BUFFER_ALIGNMENT)
            .max(wgpu::COPY_BUFFER_ALIGNMENT);
    }

    /// Writes `data` into `dst` at `offset` (both multiples of 4 bytes). Up to the chunk it is
    /// one `write_buffer`, staged until the next submit like any other; a larger write goes in
    /// chunks, each submitted and waited for before the next is staged, so it never holds more
    /// than one chunk of staging memory. The data lands in the same order relative to other work
    /// either way: before anything submitted after this call.
    pub fn write(&self, dst: &wgpu::Buffer, offset: u64, data: &[u8]) -> Result<()> {
        self.traffic.add_up(data.len() as u64);
        self.total.add_up(data.len() as u64);
        let chunk = self.chunk;
        if data.len() as u64 <= chunk {
            if !data.is_empty() {
                self.queue.write_buffer(dst, offset, data);
            }
            return Ok(());
        }
        for (i, part) in data.chunks(chunk as usize).enumerate() {
            self.queue
                .write_buffer(dst, offset + i as u64 * chunk, part);
            self.queue.submit([]);
            wait(&self.device)?;
        }
        Ok(())
    }

    /// Reads `size` bytes at the start of `src` back to the host, through one staging buffer of
    /// at most the chunk.
    pub fn read_bytes(&self, src: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        self.read_bytes_at(src, 0, size)
    }

    /// Reads `size` bytes of `src` from byte `offset` on (a multiple of 4), as
    /// [`Transfers::read_bytes`].
    pub fn read_bytes_at(&self, src: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        if size == 0 {
            return Ok(Vec::new());
        }
        self.traffic.add_down(size);
        self.total.add_down(size);
        let (device, queue) = (&self.device, &self.queue);
        let chunk = size.min(self.chunk);
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: chunk,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut out = Vec::with_capacity(size as usize);
        let mut at = 0u64;
        while at < size {
            let len = (size - at).min(chunk);
            let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
            enc.copy_buffer_to_buffer(src, offset + at, &staging, 0, len);
            queue.submit([enc.finish()]);
            let (tx, rx) = std::sync::mpsc::channel();
            staging.map_async(wgpu::MapMode::Read, ..len, move |r| {
                let _ = tx.send(r);
            });
            wait(device)?;
            rx.recv()
                .map_err(|_| gpu_err("the readback was never completed (device lost?)".into()))?
                .map_err(|e| gpu_err(format!("mapping a readback buffer failed: {e}")))?;
            {
                let view = staging
                    .get_mapped_range(..len)
                    .map_err(|e| gpu_err(format!("reading a mapped buffer failed: {e}")))?;
                out.extend_from_slice(&view);
            }
            staging.unmap();
            at += len;
        }
        Ok(out)
    }

    /// Reads `count` f32 values.
    pub fn read_f32(&self, src: &wgpu::Buffer, count: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(src, (count * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Reads `count` f32 values from byte `offset` on.
    pub fn read_f32_at(&self, src: &wgpu::Buffer, offset: u64, count: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes_at(src, offset, (count * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Reads `count` i32 values.
    pub fn read_i32(&self, src: &wgpu::Buffer, count: usize) -> Result<Vec<i32>> {
        let bytes = self.read_bytes(src, (count * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

pub(crate) fn gpu_err(message: String) -> Error {
    Error::Gpu {
        layer: None,
        message,
    }
}

/// Default of `COMQ_GPU_TIMEOUT`: the longest the host waits for the GPU to finish submitted
/// work (one submit of the planned size runs well under a second on a desktop card).
pub const DEFAULT_WAIT_SECONDS: f64 = 300.0;

/// How long [`wait`] waits: `COMQ_GPU_TIMEOUT` seconds, else [`DEFAULT_WAIT_SECONDS`].
pub fn wait_limit() -> std::time::Duration {
    let secs = std::env::var("COMQ_GPU_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(DEFAULT_WAIT_SECONDS);
    std::time::Duration::from_secs_f64(secs)
}

/// Waits for the device to finish the work submitted so far, at most [`wait_limit`]: a GPU that
/// hangs (or a driver that never signals) becomes an error naming the limit, not a hung run.
pub fn wait(device: &wgpu::Device) -> Result<()> {
    wait_for(device, None)
}

/// [`wait`] for the work up to submission `index` only (all of it with `None`).
pub fn wait_for(device: &wgpu::Device, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
    let limit = wait_limit();
    match device.poll(wgpu::PollType::Wait {
        submission_index: index,
        timeout: Some(limit),
    }) {
        Ok(_) => Ok(()),
        Err(wgpu::PollError::Timeout) => Err(gpu_err(format!(
            "the GPU did not finish its work within {:.3} s (COMQ_GPU_TIMEOUT); the device may be \
             hung or far slower than planned: try --device cpu",
            limit.as_secs_f64()
        ))),
        Err(e) => Err(gpu_err(format!("waiting for the GPU failed: {e}"))),
    }
}

/// GPU faults, kept per thread. wgpu reports a validation or out-of-memory error through the
/// uncaptured-error handler on the thread whose call caused it, so each thread finds its own
/// fault at its next check and never another thread's (a calibration thread's out-of-memory must
/// not be taken by the quantization thread, which would then go on with a wrong Gram). A lost
/// device concerns every thread: it stays set and every later check reports it.
#[derive(Debug, Default)]
pub struct Faults {
    by_thread: Mutex<std::collections::HashMap<std::thread::ThreadId, String>>,
    lost: Mutex<Option<String>>,
}

impl Faults {
    /// Records `msg` for the calling thread (the first fault of a thread wins until checked).
    pub fn record(&self, msg: String) {
        if let Ok(mut m) = self.by_thread.lock() {
            m.entry(std::thread::current().id()).or_insert(msg);
        }
    }

    /// Records that the device was lost.
    pub fn lost(&self, msg: String) {
        if let Ok(mut l) = self.lost.lock() {
            l.get_or_insert(msg);
        }
    }

    /// The calling thread's fault since its last check, or the device loss.
    pub fn take(&self) -> Option<String> {
        if let Some(l) = self.lost.lock().ok().and_then(|l| l.clone()) {
            return Some(l);
        }
        self.by_thread
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&std::thread::current().id()))
    }
}

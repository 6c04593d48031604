//! The one wgpu context under both the quantization primitives ([`super::WgpuDevice`]) and the
//! forward primitives ([`super::forward::GpuOps`]): the device and queue, the compiled kernels,
//! the per-thread fault slot and the chunked transfers, with the plumbing both need (a uniform
//! buffer, a bind group, one compute pass, the fault check). Cloning it shares everything.

use std::sync::Arc;

use super::buffers::{gpu_err, Faults, Transfers};
use super::held::HeldGrams;
use super::pipelines::Pipelines;
use crate::error::Result;
use crate::shaders::Kernel;

/// A wgpu device with its kernels, fault slot and transfers.
#[derive(Debug, Clone)]
pub struct GpuContext {
    pub(super) device: wgpu::Device,
    pub(super) queue: wgpu::Queue,
    pub(super) pipelines: Pipelines,
    pub(super) fault: Arc<Faults>,
    /// Uploads and readbacks, in staging chunks.
    pub(super) io: Transfers,
    /// Gram matrices the calibration left on the device for the layers that use them.
    pub(super) held: Arc<HeldGrams>,
}

impl GpuContext {
    /// The context of an opened device.
    pub(super) fn new(
        device: wgpu::Device,
        queue: wgpu::Queue,
        pipelines: Pipelines,
        fault: Arc<Faults>,
    ) -> GpuContext {
        let io = Transfers::new(device.clone(), queue.clone());
        GpuContext {
            device,
            queue,
            pipelines,
            fault,
            io,
            held: Arc::default(),
        }
    }

    /// The calling thread's fault since its last check, as an error with `hint` (what the user
    /// can do about it).
    pub(super) fn check_fault(&self, hint: &str) -> Result<()> {
        match self.fault.take() {
            None => Ok(()),
            Some(msg) => Err(gpu_err(format!("{msg} ({hint})"))),
        }
    }

    /// A command encoder named `label`.
    pub(super) fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// A uniform buffer holding `value`.
    pub(super) fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: std::mem::size_of::<T>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buf, 0, bytemuck::bytes_of(value));
        buf
    }

    /// The bind group of `kernel` over `entries` (binding, buffer).
    pub(super) fn bind(&self, kernel: Kernel, entries: &[(u32, &wgpu::Buffer)]) -> wgpu::BindGroup {
        self.bind_with(kernel, entries, None)
    }

    /// [`GpuContext::bind`] plus, optionally, one binding of a buffer range (a uniform ring's
    /// slot: binding, buffer, offset, size).
    pub(super) fn bind_with(
        &self,
        kernel: Kernel,
        entries: &[(u32, &wgpu::Buffer)],
        range: Option<(u32, &wgpu::Buffer, u64, u64)>,
    ) -> wgpu::BindGroup {
        let layout = self.pipelines.get(kernel).get_bind_group_layout(0);
        let mut entries: Vec<wgpu::BindGroupEntry> = entries
            .iter()
            .map(|(binding, buf)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: buf.as_entire_binding(),
            })
            .collect();
        if let Some((binding, buffer, offset, size)) = range {
            entries.push(wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset,
                    size: std::num::NonZeroU64::new(size),
                }),
            });
        }
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry()),
            layout: &layout,
            entries: &entries,
        })
    }

    /// Records one compute pass of `kernel` over `groups` workgroups into `enc`.
    pub(super) fn pass(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        bg: &wgpu::BindGroup,
        groups: (u32, u32, u32),
    ) {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(kernel.entry()),
            timestamp_writes: None,
        });
        pass.set_pipeline(self.pipelines.get(kernel));
        pass.set_bind_group(0, bg, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }
}

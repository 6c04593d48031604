//! Compute pipelines, built once per device, and the uniform parameter structs they read.
//!
//! Pipeline creation runs inside a validation error scope so a WGSL error becomes
//! [`Error::Shader`] instead of wgpu's uncaptured-error panic. Layouts are derived from the
//! shaders (`layout: None`), and bind groups use `get_bind_group_layout(0)`.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::shaders::Kernel;

/// `GramParams` in `gram.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct GramParams {
    /// Padded rows of the chunk.
    pub rows: u32,
    /// Padded width / 4.
    pub n4: u32,
    /// Rows per slice of the split over rows (a multiple of 16).
    pub split: u32,
    /// Rows that exist in the bound buffer from `x0` on; later ones read as zero.
    pub valid: u32,
    /// The chunk's first vec4 in the bound buffer.
    pub x0: u32,
    /// The chunk's first vec4 in the second buffer (`cross` only).
    pub y0: u32,
    /// Padding to 32 bytes.
    pub pad: [u32; 2],
}

/// `ResidualParams` / `ReduceParams` (same layout) in `residual.wgsl` and `reduce.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ModeParams {
    /// Rows of the tile.
    pub rows: u32,
    /// Columns.
    pub n: u32,
    /// Which product or dot.
    pub mode: u32,
    /// Padding to 16 bytes.
    pub pad: u32,
}

/// Parameters of `unpack.wgsl` (the fields' meaning per entry point is in the shader).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct UnpackParams {
    /// The matrix width, or the values in the chunk.
    pub n: u32,
    /// The chunk's first row, or its first value in the destination.
    pub first: u32,
    /// Rows in the chunk.
    pub rows: u32,
    /// 1: zeros below the diagonal.
    pub zero_lower: u32,
}

/// `GridParams` in `rtn.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct GridParams {
    /// Rows of the tile.
    pub rows: u32,
    /// Columns.
    pub n: u32,
    /// Inputs per group.
    pub group_size: u32,
    /// Codes per range, `2^b`.
    pub levels: i32,
}

/// `SweepParams` in `sweep.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SweepParams {
    /// Rows of the tile.
    pub rows: u32,
    /// Columns.
    pub n: u32,
    /// Inputs per group.
    pub group_size: u32,
    /// Codes per range.
    pub levels: i32,
    /// Dead-input threshold on `G_jj`.
    pub dead: f32,
    /// 1 for the natural order (no order table read).
    pub natural: u32,
    /// Groups per row.
    pub groups: u32,
    /// First row of this dispatch (a tile's rows go in several submits when one would run
    /// too long: [`super::rows_per_submit`]).
    pub row0: u32,
}

/// `BlockParams` in `block.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockParams {
    /// Rows of the tile.
    pub rows: u32,
    /// Columns.
    pub n: u32,
    /// Inputs per group.
    pub group_size: u32,
    /// Codes per range.
    pub levels: i32,
    /// Dead-input threshold on `G_jj`.
    pub dead: f32,
    /// Groups per row.
    pub groups: u32,
    /// First step of the block.
    pub t0: u32,
    /// Columns in the block (≤ 64).
    pub b: u32,
}

/// `GptqParams` in `gptq.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct GptqParams {
    /// Rows of the tile.
    pub rows: u32,
    /// Columns.
    pub n: u32,
    /// Inputs per group.
    pub group_size: u32,
    /// Codes per range.
    pub levels: i32,
    /// Groups per row.
    pub groups: u32,
    /// First row of this dispatch (see [`SweepParams::row0`]).
    pub row0: u32,
    /// Padding to 32 bytes.
    pub pad: [u32; 2],
}

/// `ScaleParams` in `scale.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ScaleParams {
    /// Rows of the tile.
    pub rows: u32,
    /// Columns.
    pub n: u32,
    /// Inputs per group.
    pub group_size: u32,
    /// Storage dtype of Δ: 0 f32, 1 f16, 2 bf16.
    pub dtype: u32,
}

/// `FoldParams` in `fold.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct FoldParams {
    /// The matrix width.
    pub n: u32,
    /// The padded width of a slice.
    pub np: u32,
    /// Slices of the accumulator.
    pub slices: u32,
    /// 1: every element (a cross-Gram); 0: the upper triangle.
    pub full: u32,
}

/// `VitParams` in `vit.wgsl` (field meanings per kernel are in the shader).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, Default)]
pub struct VitParams {
    /// First size.
    pub a: u32,
    /// Second size.
    pub b: u32,
    /// Third size.
    pub c: u32,
    /// Fourth size.
    pub d: u32,
    /// Fifth size.
    pub e: u32,
    /// Width of the 2-D workgroup grid of elementwise kernels.
    pub gx: u32,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Attention scale.
    pub scale: f32,
    /// Sixth size.
    pub f: u32,
    /// Seventh size.
    pub h: u32,
    /// Padding to 48 bytes.
    pub pad: [u32; 2],
}

/// Every pipeline, built once.
#[derive(Debug, Clone)]
pub struct Pipelines {
    list: Vec<(Kernel, wgpu::ComputePipeline)>,
}

impl Pipelines {
    /// Compiles every kernel (each WGSL file parsed once), through `cache` when given; a WGSL
    /// error is returned, not panicked on.
    pub fn build(device: &wgpu::Device, cache: Option<&wgpu::PipelineCache>) -> Result<Pipelines> {
        let mut list = Vec::new();
        let mut modules: Vec<(&str, wgpu::ShaderModule)> = Vec::new();
        let f64 = device.features().contains(wgpu::Features::SHADER_F64);
        for kernel in Kernel::ALL.into_iter().filter(|k| f64 || !k.needs_f64()) {
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let module = match modules.iter().find(|(f, _)| *f == kernel.file()) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(kernel.file()),
                        source: wgpu::ShaderSource::Wgsl(kernel.source().into()),
                    });
                    modules.push((kernel.file(), m.clone()));
                    m
                }
            };
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.entry()),
                layout: None,
                module: &module,
                entry_point: Some(kernel.entry()),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache,
            });
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(Error::Shader {
                    kernel: kernel.entry().to_string(),
                    message: e.to_string(),
                });
            }
            list.push((kernel, pipeline));
        }
        Ok(Pipelines { list })
    }

    /// Whether `kernel` was built (one that [`Kernel::needs_f64`] is not, without SHADER_F64).
    pub fn has(&self, kernel: Kernel) -> bool {
        self.list.iter().any(|(k, _)| *k == kernel)
    }

    /// The pipeline of `kernel`.
    pub fn get(&self, kernel: Kernel) -> &wgpu::ComputePipeline {
        &self
            .list
            .iter()
            .find(|(k, _)| *k == kernel)
            .expect("every kernel used is built")
            .1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_structs_match_their_wgsl_sizes() {
        assert_eq!(std::mem::size_of::<GramParams>(), 32);
        assert_eq!(std::mem::size_of::<ModeParams>(), 16);
        assert_eq!(std::mem::size_of::<UnpackParams>(), 16);
        assert_eq!(std::mem::size_of::<FoldParams>(), 16);
        assert_eq!(std::mem::size_of::<GridParams>(), 16);
        assert_eq!(std::mem::size_of::<SweepParams>(), 32);
        assert_eq!(std::mem::size_of::<BlockParams>(), 32);
        assert_eq!(std::mem::size_of::<ScaleParams>(), 16);
        assert_eq!(std::mem::size_of::<VitParams>(), 48);
    }
}

//! The WGSL kernels, one family per file under `shaders/`, compiled into the binary.
//!
//! Each file opens with a comment listing its bindings and workgroup size. Every file is valid
//! WGSL as committed (no templating), so `tests/shaders.rs` validates all of them with naga
//! without a device.

/// A kernel entry point: its family file and function name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `G += XᵀX` for a padded chunk (`gram.wgsl`).
    Gram,
    /// `G += XᵀX`, 128×128 tiles with 8×8 per invocation, for wide Grams (`gram.wgsl`).
    GramWide,
    /// `out = A·G` with `A` = `W − Q̂`, `W` or codes (`residual.wgsl`).
    Residual,
    /// Per-row dot products for losses and scale steps (`reduce.wgsl`).
    Reduce,
    /// Round to nearest on the grid (`rtn.wgsl`).
    Rtn,
    /// `Q̂ = Δ·codes` after the steps changed (`rtn.wgsl`).
    ApplyScale,
    /// One sweep with the row's residual in workgroup memory (`sweep.wgsl`).
    SweepShared,
    /// One sweep with the row's residual in storage (`sweep.wgsl`).
    SweepStorage,
    /// Shared-order sweep: the steps of one block of columns (`block.wgsl`).
    BlockSteps,
    /// Shared-order sweep: `R −= D·G[block, :]` (`block.wgsl`).
    BlockUpdate,
    /// Per-(row, group) closed-form scale steps (`scale.wgsl`).
    ScaleChannel,
    /// The GPTQ-style start, the row in storage (`gptq.wgsl`).
    Gptq,
    /// The GPTQ-style start, the row in workgroup memory (`gptq.wgsl`).
    GptqShared,
    /// ViT forward: `y = x·Wᵀ + b` (`vit.wgsl`).
    Linear,
    /// ViT forward: row LayerNorm (`vit.wgsl`).
    LayerNorm,
    /// ViT forward: exact GELU in place (`vit.wgsl`).
    Gelu,
    /// ViT forward: `h += γ ⊙ o` (`vit.wgsl`).
    AddScaled,
    /// ViT forward: LayerNorm over each head's query and key in place (`vit.wgsl`).
    QkNorm,
    /// ViT forward: softmax attention (`vit.wgsl`).
    Attention,
    /// Swin forward: softmax attention with an additive bias per window group (`vit.wgsl`).
    AttentionBias,
    /// Swin forward: rows gathered by an index list (`vit.wgsl`).
    GatherRows,
    /// ViT forward: patch extraction (`vit.wgsl`).
    Im2col,
    /// ViT forward: prefix tokens + patches + position embedding (`vit.wgsl`).
    Assemble,
    /// Zero-padded copy of activation rows for the Gram kernel (`vit.wgsl`).
    PadRows,
    /// A damping on the resident Gram matrix: sets its diagonal (`diag.wgsl`).
    SetDiagonal,
    /// The cross-Gram `xᵀ·y` of two activations of the same rows (`gram.wgsl`).
    Cross,
    /// Rows of a matrix from their packed upper parts (`unpack.wgsl`).
    UnpackUpper,
    /// A symmetric matrix's lower triangle from its upper one (`unpack.wgsl`).
    MirrorLower,
    /// 32-bit values from 16-bit halves (`unpack.wgsl`).
    UnpackHalves,
    /// A Gram accumulator's slices added into the first (`fold.wgsl`).
    FoldSum,
    /// The folded Gram's triangle (or all of a cross-Gram) packed for readback (`fold.wgsl`).
    FoldPack,
    /// The greedy order ranked from the resident weights, in f64 (`order.wgsl`; needs
    /// SHADER_F64, see [`Kernel::needs_f64`]).
    GreedyRank,
    /// The GPTQ factor's work matrix from the resident Gram, reversed (`factor.wgsl`; f64).
    FactorFill,
    /// One column of the Cholesky factor and the trailing update (`factor.wgsl`; f64).
    CholStep,
    /// One row of the triangular inverse (`factor.wgsl`; f64).
    InvRow,
    /// The factor `U` in f32 from the inverse (`factor.wgsl`; f64).
    FactorPack,
    /// A reduction's per-row values summed in f64 (`sum.wgsl`; f64).
    SumRows,
}

/// Every shader file: (file name, source).
pub const SOURCES: [(&str, &str); 15] = [
    ("block.wgsl", include_str!("../shaders/block.wgsl")),
    ("diag.wgsl", include_str!("../shaders/diag.wgsl")),
    ("factor.wgsl", include_str!("../shaders/factor.wgsl")),
    ("fold.wgsl", include_str!("../shaders/fold.wgsl")),
    ("gptq.wgsl", include_str!("../shaders/gptq.wgsl")),
    ("gram.wgsl", include_str!("../shaders/gram.wgsl")),
    ("order.wgsl", include_str!("../shaders/order.wgsl")),
    ("residual.wgsl", include_str!("../shaders/residual.wgsl")),
    ("reduce.wgsl", include_str!("../shaders/reduce.wgsl")),
    ("rtn.wgsl", include_str!("../shaders/rtn.wgsl")),
    ("sweep.wgsl", include_str!("../shaders/sweep.wgsl")),
    ("scale.wgsl", include_str!("../shaders/scale.wgsl")),
    ("sum.wgsl", include_str!("../shaders/sum.wgsl")),
    ("unpack.wgsl", include_str!("../shaders/unpack.wgsl")),
    ("vit.wgsl", include_str!("../shaders/vit.wgsl")),
];

/// Residual rows of at most this many columns fit `sweep_shared`'s workgroup array.
pub const SWEEP_SHARED_MAX_COLS: usize = 4096;

/// The most storage buffers one kernel binds (the per-row sweep and the shared-order block
/// steps: weights, grid values, residual, codes, `G`, steps, offsets, order, scratch). WebGPU's
/// guaranteed minimum is 8; every native Vulkan, Metal and DX12 adapter wgpu knows allows more.
/// An adapter below this is refused at open (so `--device auto` uses the CPU); a test holds the
/// constant to the shaders.
pub const MAX_STORAGE_BUFFERS: u32 = 9;

impl Kernel {
    /// Every kernel.
    pub const ALL: [Kernel; 37] = [
        Kernel::BlockSteps,
        Kernel::BlockUpdate,
        Kernel::Gptq,
        Kernel::GptqShared,
        Kernel::Gram,
        Kernel::GramWide,
        Kernel::Residual,
        Kernel::Reduce,
        Kernel::Rtn,
        Kernel::ApplyScale,
        Kernel::SweepShared,
        Kernel::SweepStorage,
        Kernel::ScaleChannel,
        Kernel::Linear,
        Kernel::LayerNorm,
        Kernel::Gelu,
        Kernel::AddScaled,
        Kernel::QkNorm,
        Kernel::Attention,
        Kernel::AttentionBias,
        Kernel::GatherRows,
        Kernel::Im2col,
        Kernel::Assemble,
        Kernel::PadRows,
        Kernel::SetDiagonal,
        Kernel::Cross,
        Kernel::UnpackUpper,
        Kernel::MirrorLower,
        Kernel::UnpackHalves,
        Kernel::FoldSum,
        Kernel::FoldPack,
        Kernel::GreedyRank,
        Kernel::FactorFill,
        Kernel::CholStep,
        Kernel::InvRow,
        Kernel::FactorPack,
        Kernel::SumRows,
    ];

    /// The file the kernel lives in.
    pub fn file(self) -> &'static str {
        match self {
            Kernel::Gram | Kernel::GramWide | Kernel::Cross => "gram.wgsl",
            Kernel::Residual => "residual.wgsl",
            Kernel::Reduce => "reduce.wgsl",
            Kernel::Rtn | Kernel::ApplyScale => "rtn.wgsl",
            Kernel::SweepShared | Kernel::SweepStorage => "sweep.wgsl",
            Kernel::ScaleChannel => "scale.wgsl",
            Kernel::BlockSteps | Kernel::BlockUpdate => "block.wgsl",
            Kernel::Gptq | Kernel::GptqShared => "gptq.wgsl",
            Kernel::SetDiagonal => "diag.wgsl",
            Kernel::UnpackUpper | Kernel::MirrorLower | Kernel::UnpackHalves => "unpack.wgsl",
            Kernel::FoldSum | Kernel::FoldPack => "fold.wgsl",
            Kernel::GreedyRank => "order.wgsl",
            Kernel::SumRows => "sum.wgsl",
            Kernel::FactorFill | Kernel::CholStep | Kernel::InvRow | Kernel::FactorPack => {
                "factor.wgsl"
            }
            Kernel::Linear
            | Kernel::LayerNorm
            | Kernel::Gelu
            | Kernel::AddScaled
            | Kernel::QkNorm
            | Kernel::Attention
            | Kernel::AttentionBias
            | Kernel::GatherRows
            | Kernel::Im2col
            | Kernel::Assemble
            | Kernel::PadRows => "vit.wgsl",
        }
    }

    /// The entry point's name.
    pub fn entry(self) -> &'static str {
        match self {
            Kernel::Gram => "gram",
            Kernel::GramWide => "gram_wide",
            Kernel::Residual => "residual",
            Kernel::Reduce => "reduce",
            Kernel::Rtn => "rtn",
            Kernel::ApplyScale => "apply_scale",
            Kernel::SweepShared => "sweep_shared",
            Kernel::SweepStorage => "sweep_storage",
            Kernel::ScaleChannel => "scale_channel",
            Kernel::BlockSteps => "block_steps",
            Kernel::BlockUpdate => "block_update",
            Kernel::Gptq => "gptq",
            Kernel::GptqShared => "gptq_shared",
            Kernel::Linear => "linear",
            Kernel::LayerNorm => "layernorm",
            Kernel::Gelu => "gelu",
            Kernel::AddScaled => "add_scaled",
            Kernel::QkNorm => "qk_norm",
            Kernel::Attention => "attention",
            Kernel::AttentionBias => "attention_bias",
            Kernel::GatherRows => "gather_rows",
            Kernel::Im2col => "im2col",
            Kernel::Assemble => "assemble",
            Kernel::PadRows => "pad_rows",
            Kernel::SetDiagonal => "set_diagonal",
            Kernel::Cross => "cross",
            Kernel::UnpackUpper => "unpack_upper",
            Kernel::MirrorLower => "mirror_lower",
            Kernel::UnpackHalves => "unpack_halves",
            Kernel::FoldSum => "fold_sum",
            Kernel::FoldPack => "fold_pack",
            Kernel::GreedyRank => "greedy_rank",
            Kernel::FactorFill => "factor_fill",
            Kernel::CholStep => "chol_step",
            Kernel::InvRow => "inv_row",
            Kernel::FactorPack => "factor_pack",
            Kernel::SumRows => "sum_rows",
        }
    }

    /// Whether the kernel computes in f64 and so is built only on adapters with
    /// `SHADER_F64` (Vulkan's `shaderFloat64`: lavapipe and desktop GPUs; not Metal). The
    /// device does the same work another way where it is missing.
    pub fn needs_f64(self) -> bool {
        matches!(
            self,
            Kernel::GreedyRank
                | Kernel::FactorFill
                | Kernel::CholStep
                | Kernel::InvRow
                | Kernel::FactorPack
                | Kernel::SumRows
        )
    }

    /// The WGSL source of the kernel's file.
    pub fn source(self) -> &'static str {
        SOURCES
            .iter()
            .find(|(f, _)| *f == self.file())
            .map(|(_, s)| *s)
            .expect("every kernel's file is in SOURCES")
    }
}

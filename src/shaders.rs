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
    /// Per-(row, group) closed-form scale steps (`scale.wgsl`).
    ScaleChannel,
}

/// Every shader file: (file name, source).
pub const SOURCES: [(&str, &str); 6] = [
    ("gram.wgsl", include_str!("../shaders/gram.wgsl")),
    ("residual.wgsl", include_str!("../shaders/residual.wgsl")),
    ("reduce.wgsl", include_str!("../shaders/reduce.wgsl")),
    ("rtn.wgsl", include_str!("../shaders/rtn.wgsl")),
    ("sweep.wgsl", include_str!("../shaders/sweep.wgsl")),
    ("scale.wgsl", include_str!("../shaders/scale.wgsl")),
];

/// Residual rows of at most this many columns fit `sweep_shared`'s workgroup array.
pub const SWEEP_SHARED_MAX_COLS: usize = 4096;

impl Kernel {
    /// Every kernel.
    pub const ALL: [Kernel; 8] = [
        Kernel::Gram,
        Kernel::Residual,
        Kernel::Reduce,
        Kernel::Rtn,
        Kernel::ApplyScale,
        Kernel::SweepShared,
        Kernel::SweepStorage,
        Kernel::ScaleChannel,
    ];

    /// The file the kernel lives in.
    pub fn file(self) -> &'static str {
        match self {
            Kernel::Gram => "gram.wgsl",
            Kernel::Residual => "residual.wgsl",
            Kernel::Reduce => "reduce.wgsl",
            Kernel::Rtn | Kernel::ApplyScale => "rtn.wgsl",
            Kernel::SweepShared | Kernel::SweepStorage => "sweep.wgsl",
            Kernel::ScaleChannel => "scale.wgsl",
        }
    }

    /// The entry point's name.
    pub fn entry(self) -> &'static str {
        match self {
            Kernel::Gram => "gram",
            Kernel::Residual => "residual",
            Kernel::Reduce => "reduce",
            Kernel::Rtn => "rtn",
            Kernel::ApplyScale => "apply_scale",
            Kernel::SweepShared => "sweep_shared",
            Kernel::SweepStorage => "sweep_storage",
            Kernel::ScaleChannel => "scale_channel",
        }
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

//! Any bytes as a calibration file: every `P.input` / `P.gram` is checked against the width its
//! shape claims and, when small, accumulated into a Gram matrix on the CPU.
#![no_main]

use comq_gpu::device::{AnyDevice, CpuDevice};
use comq_gpu::io::{Calibration, Model};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Model::from_bytes(std::path::Path::new("fuzz-calib.safetensors"), data.to_vec()) else {
        return;
    };
    let names: Vec<(String, usize, usize)> = m
        .tensors()
        .iter()
        .filter_map(|t| {
            let prefix = t.name.strip_suffix(".input").or_else(|| t.name.strip_suffix(".gram"))?;
            Some((prefix.to_string(), t.shape.last().copied().unwrap_or(0), t.numel()))
        })
        .collect();
    let calib = Calibration::from_model(m);
    let device = AnyDevice::Cpu(CpuDevice::new());
    for (prefix, cols, numel) in names {
        // Widths other than the tensor's own must be refused, not panic.
        let _ = calib.check(&prefix, cols + 1);
        if cols > 0 && cols <= 64 && numel <= 1 << 16 && calib.check(&prefix, cols).is_ok() {
            if let Ok(g) = calib.gram(&prefix, cols, &device) {
                assert_eq!(g.n, cols);
                assert!(g.data.iter().all(|v| v.is_finite()));
            }
        }
    }
});

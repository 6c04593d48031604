//! Any bytes as a saved layer in a work directory: `--resume` loads a layer that describes a
//! valid grid with its codes on it, or recomputes it, or refuses with an error; never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use comq_gpu::resume::{weights_digest, WorkDir};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| std::env::temp_dir().join(format!("comq-fuzz-resume-{}", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    let work = WorkDir::open(d, "fp", true).expect("work directory");
    std::fs::write(d.join("layer-00000.safetensors"), data).expect("write");
    let (rows, cols) = (4, 8);
    let w = vec![0.5f32; rows * cols];
    if let Ok(Some(saved)) = work.load(0, "lin.weight", rows, cols, &weights_digest(&w)) {
        let q = saved.outcome.layer;
        let levels = 1i64 << q.grid.bits;
        for (t, &k) in q.codes.iter().enumerate() {
            let slot = q.grid.slot(t / cols, t % cols);
            let rel = k as i64 - q.grid.lo[slot] as i64;
            assert!((0..levels).contains(&rel));
        }
        let _ = q.dequantize();
    }
});

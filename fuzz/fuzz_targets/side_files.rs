//! Any bytes as `config.json` and `preprocessor_config.json` (split at the first NUL byte) beside
//! a small real ViT: the model is recognised or refused with an error, never a panic, and a
//! recognised one has a preprocessing a forward pass can run with.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use comq_gpu::io::Checkpoint;
use comq_gpu::model::synthetic::SyntheticVit;
use comq_gpu::model::{parse_side_file, Family, VitSpec};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static PathBuf {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("comq-fuzz-side-{}", std::process::id()));
        SyntheticVit {
            family: Family::TimmVit,
            dim: 32,
            depth: 1,
            heads: 2,
            mlp: 64,
            patch: 4,
            img: 16,
            channels: 3,
            classes: 2,
            seed: 1,
        }
        .write(&dir)
        .expect("fixture");
        dir.join("model.safetensors")
    })
}

fuzz_target!(|data: &[u8]| {
    let ck = Checkpoint::open(model()).expect("fixture opens");
    let (a, b) = match data.iter().position(|&c| c == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(config) = parse_side_file(Path::new("config.json"), a) else {
        return;
    };
    let prep = match b.map(|b| parse_side_file(Path::new("preprocessor_config.json"), b)) {
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return,
        None => None,
    };
    if let Ok(spec) = VitSpec::detect_with(&ck, config, prep) {
        let p = &spec.preprocess;
        assert!(p.crop > 0 && p.resize >= p.crop && p.crop % spec.patch == 0);
        assert!(p.std.iter().all(|s| s.is_finite() && *s > 0.0));
        assert!(p.mean.iter().all(|m| m.is_finite()));
        assert!(spec.heads > 0 && spec.dim % spec.heads == 0);
        assert!(spec.eps.is_finite() && spec.eps > 0.0);
    }
});

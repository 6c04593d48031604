//! Any bytes as an image file (PNG/JPEG decode) and as an image pack: decoding and the
//! preprocessing (resize and centre crop, or squash; normalise) must return an image or an error,
//! never panic.
#![no_main]

use comq_gpu::io::images::{decode_bytes, preprocess, ImageSet};
use comq_gpu::io::Model;
use comq_gpu::model::Preprocess;
use libfuzzer_sys::fuzz_target;

fn prep(channels: usize, squash: bool, crop_w: usize) -> Preprocess {
    Preprocess {
        channels,
        resize: 18,
        crop: 16,
        crop_w,
        squash,
        bicubic: true,
        mean: vec![0.5; channels],
        std: vec![0.25; channels],
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = decode_bytes(data) {
        // Keep huge declared sizes from turning the fuzzer into a resize benchmark.
        if (img.width() as u64) * (img.height() as u64) <= 1 << 20 {
            for (c, squash, w) in [
                (1, false, 16),
                (3, false, 16),
                (3, true, 16),
                (3, false, 24),
                (3, true, 24),
            ] {
                let v = preprocess(&img, &prep(c, squash, w));
                assert_eq!(v.len(), c * 16 * w);
                assert!(v.iter().all(|x| x.is_finite()));
            }
        }
    }
    let Ok(m) = Model::from_bytes(std::path::Path::new("fuzz-pack.safetensors"), data.to_vec())
    else {
        return;
    };
    let Ok(set) = ImageSet::from_pack(m) else {
        return;
    };
    for i in 0..set.len().min(4) {
        let _ = set.label(i);
        if let Ok(v) = set.pixels(i, &prep(3, false, 16)) {
            assert_eq!(v.len(), 3 * 16 * 16);
        }
    }
});

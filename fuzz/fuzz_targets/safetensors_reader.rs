//! Any bytes as a model file: header parsing and validation, then every tensor's bytes decoded.
#![no_main]

use comq_gpu::io::{dtype, Model};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Model::from_bytes(std::path::Path::new("fuzz.safetensors"), data.to_vec()) {
        for t in m.tensors() {
            let bytes = m.bytes(t);
            assert_eq!(bytes.len(), t.range.len());
            if dtype::is_float(t.dtype) {
                let v = m.read_f32(t).expect("validated float tensors decode");
                assert_eq!(v.len(), t.numel());
            }
        }
    }
});

//! Any text as a `--config` recipe: parsing, sizes and per-layer regexes.
#![no_main]

use comq_gpu::recipe::Recipe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(r) = Recipe::parse(text) {
        let _ = r.overrides();
        if let Some(s) = &r.max_shard_size {
            let _ = s.bytes();
        }
    }
});

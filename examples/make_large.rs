//! Writes a sharded synthetic model for memory benchmarks: `LAYERS` linear layers of
//! `[ROWS, COLS]` f32 (default 64 × [65536, 128], about 2.1 GB) in 500 MB shards with an index.
//!
//! `cargo run --release --example make_large -- DIR [LAYERS] [ROWS] [COLS]`

use std::collections::BTreeMap;
use std::path::PathBuf;

use comq_gpu::bench::SplitMix;
use comq_gpu::io::writer::ShardedWriter;
use comq_gpu::io::PlannedTensor;
use safetensors::Dtype;

fn main() -> comq_gpu::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("large-model"));
    let layers: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let rows: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(65536);
    let cols: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(128);
    std::fs::create_dir_all(&dir).map_err(|e| comq_gpu::Error::io(&dir, e))?;
    let mut plan = Vec::new();
    for i in 0..layers {
        plan.push(PlannedTensor {
            name: format!("layers.{i:03}.linear.weight"),
            dtype: Dtype::F32,
            shape: vec![rows, cols],
        });
        plan.push(PlannedTensor {
            name: format!("layers.{i:03}.linear.bias"),
            dtype: Dtype::F32,
            shape: vec![rows],
        });
    }
    let mut w = ShardedWriter::create(
        &dir.join("model.safetensors"),
        plan,
        500_000_000,
        &BTreeMap::new(),
    )?;
    let mut rng = SplitMix::new(1);
    let scale = (1.0 / cols as f32).sqrt();
    for i in 0..layers {
        let data: Vec<u8> = (0..rows * cols)
            .flat_map(|_| (scale * rng.normal()).to_le_bytes())
            .collect();
        w.write(&format!("layers.{i:03}.linear.weight"), &data)?;
        w.write(&format!("layers.{i:03}.linear.bias"), &vec![0u8; rows * 4])?;
    }
    let shards = w.shards();
    w.finish(&BTreeMap::new())?;
    println!(
        "wrote {} ({layers} layers of [{rows}, {cols}] f32 in {shards} shards)",
        dir.display()
    );
    Ok(())
}

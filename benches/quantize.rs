//! CPU-path throughput on ViT-B/16 layer shapes, in weights per second.
//!
//! Each iteration is one whole `quantize_layer` call with the reference defaults (4 bits,
//! per-channel, one greedy sweep): upload, energy, the RTN baseline, the sweep and the final
//! exact residual. `cargo bench --bench quantize`; results go into BENCHMARKS.md.

use comq_gpu::bench::{correlated_gram, weights, VIT_B16_SHAPES};
use comq_gpu::quant::{quantize_layer, GramAccumulator, QuantConfig};
use comq_gpu::CpuDevice;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn comq_cpu(c: &mut Criterion) {
    let dev = CpuDevice::new();
    let mut group = c.benchmark_group("comq_cpu_w4");
    group.sample_size(10);
    for (rows, cols) in VIT_B16_SHAPES {
        let w = weights(rows, cols, 1);
        let g = correlated_gram(cols, 2);
        let cfg = QuantConfig::default();
        group.throughput(Throughput::Elements((rows * cols) as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{rows}x{cols}")),
            &(),
            |b, _| {
                b.iter(|| {
                    quantize_layer(&dev, "bench", &w, rows, cols, &g, &cfg).expect("quantizes")
                })
            },
        );
    }
    group.finish();
}

fn gram_cpu(c: &mut Criterion) {
    let mut group = c.benchmark_group("gram_cpu");
    group.sample_size(10);
    for n in [768usize, 3072] {
        let rows = 1024;
        let x = weights(rows, n, 3);
        group.throughput(Throughput::Elements((rows * n * n) as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{rows}x{n}")),
            &(),
            |b, _| {
                b.iter(|| {
                    let mut acc = GramAccumulator::new(n);
                    acc.add(&x);
                    acc.finish()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, comq_cpu, gram_cpu);
criterion_main!(benches);

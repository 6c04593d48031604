//! The GPTQ start's factor (Cholesky of the damped Gram and a triangular inverse, in f64) per
//! input width, against its floor: `2·n³/3` flops at this machine's f64 GEMM rate.
//!
//! `cargo bench --bench factor` times n = 1024, 3072 and 4096 (the ViT-B/L widths);
//! `COMQ_FACTOR_SIZES=12800 cargo bench --bench factor` any others (12800: the 6B shape's fc2).
//! Wall clock of one call after one warm-up, best of three; results go into BENCHMARKS.md.
//! Then the CPU's GPTQ pass (`gptq::quantize_rows`, all threads) on the shapes of a ViT-S/B
//! block's layers, in multiply-adds per second (`m·n²/2` of them).

use std::time::Instant;

use comq_gpu::bench::correlated_gram;
use comq_gpu::numeric::{gptq, linalg};

fn best_of<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let sizes: Vec<usize> = std::env::var("COMQ_FACTOR_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1024, 3072, 4096]);
    // The floor's rate: a square f64 GEMM of the same machine (matrixmultiply, all threads).
    let m = 1024;
    let a: Vec<f64> = (0..m * m)
        .map(|i| ((i * 7919) % 1013) as f64 / 1013.0)
        .collect();
    let mut c = vec![0.0f64; m * m];
    let t = best_of(3, || linalg::dgemm(m, m, m, &a, &a, &mut c));
    let gemm = 2.0 * (m as f64).powi(3) / t;
    println!("f64 GEMM {m}³: {:.2} GFLOP/s", gemm / 1e9);
    println!(
        "{:>6} {:>10} {:>10} {:>12} {:>8}",
        "n", "factor s", "floor s", "GFLOP/s", "of GEMM"
    );
    for n in sizes {
        let h = correlated_gram(n, 2).damped(0.01);
        let dead = h.dead_threshold() as f64;
        let t = best_of(if n > 4096 { 1 } else { 3 }, || {
            gptq::factor(&h, true, dead).expect("positive definite");
        });
        let flops = 2.0 * (n as f64).powi(3) / 3.0;
        println!(
            "{n:>6} {t:>10.3} {:>10.3} {:>12.2} {:>7.0}%",
            flops / gemm,
            flops / t / 1e9,
            100.0 * flops / t / gemm
        );
    }
    println!("{:>12} {:>10} {:>10}", "GPTQ pass", "ms", "GMAC/s");
    for (m, n) in [
        (384usize, 384usize),
        (1536, 384),
        (384, 1536),
        (3072, 768),
        (768, 3072),
    ] {
        let f = gptq::factor(&correlated_gram(n, 3).damped(0.1), true, 0.0).expect("factor");
        let w: Vec<f32> = (0..m * n)
            .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
            .collect();
        let (delta, lo) = (vec![0.1f32; m], vec![-8i32; m]);
        let grid = gptq::RowGrid {
            delta: &delta,
            lo: &lo,
            group_size: n,
            levels: 16,
        };
        let (mut codes, mut q) = (vec![0i32; m * n], vec![0f32; m * n]);
        let t = best_of(5, || gptq::quantize_rows(&w, &f, grid, &mut codes, &mut q));
        let mac = (m * n * n) as f64 / 2.0;
        println!(
            "{:>12} {:>10.2} {:>10.1}",
            format!("{m}x{n}"),
            t * 1e3,
            mac / t / 1e9
        );
    }
}

//! GPU kernels against their CPU twins on seeded random data with awkward shapes.
//!
//! Runs on whatever adapter wgpu finds — Mesa's lavapipe in CI. Without an adapter each test
//! prints a visible skip, or fails when COMQ_REQUIRE_GPU=1.

mod common;

use common::{correlated_x, gram_of, Rng};
use comq_gpu::device::{AnyDevice, CpuDevice, Device, LayerProblem, WgpuDevice};
use comq_gpu::quant::{quantize_layer, Granularity, Grid, Order, OrderKind, QuantConfig};

#[path = "common/gpu.rs"]
mod gpu;

/// GPU Gram (f32 sums on the device) vs the f64 CPU Gram: relative Frobenius error.
const GRAM_REL_TOL: f64 = 1e-5;
/// Energies and losses from the same state (f32 GEMM + per-row f32 sums vs f64).
const LOSS_REL_TOL: f64 = 1e-4;
/// End to end and after one sweep: the share of codes that may differ (rounding near ties).
const CODE_DISAGREEMENT_MAX: f64 = 1e-3;
/// End to end: the final loss.
const FINAL_LOSS_REL_TOL: f64 = 1e-3;

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

fn frob_rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// W3 from a GPTQ start at damping 0.01: the default recipe's method at the width where
/// candidates differ most.
fn gptq_w3() -> QuantConfig {
    QuantConfig {
        bits: 3,
        init: comq_gpu::quant::Init::Gptq,
        damp: 0.01,
        ..QuantConfig::default()
    }
}

fn layer(seed: u64, rows: usize, cols: usize) -> (Vec<f32>, comq_gpu::Gram) {
    let mut rng = Rng::new(seed);
    let w: Vec<f32> = rng.normals(rows * cols).iter().map(|v| v * 0.05).collect();
    let x = correlated_x(&mut rng, 3 * cols.max(8), cols);
    (w, gram_of(&x, 3 * cols.max(8), cols))
}

#[test]
fn gram_matches_the_f64_cpu_gram() {
    let Some(gpu) = gpu::device() else { return };
    let cpu = AnyDevice::Cpu(CpuDevice::new());
    let gpu = AnyDevice::Wgpu(Box::new(gpu));
    for (i, (rows, cols)) in [(100usize, 1usize), (33, 7), (250, 63), (300, 257)]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::new(50 + i as u64);
        let x = correlated_x(&mut rng, rows, cols);
        // Uneven chunks, as a calibration file streams them.
        let chunks = |x: &[f32]| {
            let a = (rows / 3) * cols;
            vec![Ok(x[..a].to_vec()), Ok(x[a..].to_vec())]
        };
        let g_cpu = cpu.gram(cols, chunks(&x)).unwrap();
        let g_gpu = gpu.gram(cols, chunks(&x)).unwrap();
        assert_eq!(g_gpu.samples, rows as u64);
        let e = frob_rel(&g_gpu.data, &g_cpu.data);
        assert!(
            e <= GRAM_REL_TOL,
            "{rows}×{cols}: Gram relative error {e:.2e} > {GRAM_REL_TOL:.0e}"
        );
    }
}

/// A Gram built from activations on the GPU (`--calib` with `P.input`) comes back as its upper
/// triangle, packed on the device without the padding to 64: the readback moves n(n+1)/2 values
/// (and the sums are those of the square read whole: the same matrix as the CPU's, within the
/// f32 tolerance).
#[test]
fn an_activation_gram_reads_back_its_packed_triangle() {
    let Some(gpu) = gpu::device() else { return };
    let cpu = AnyDevice::Cpu(CpuDevice::new());
    for (rows, cols) in [(70usize, 1usize), (90, 65), (40, 130)] {
        let mut rng = Rng::new(90 + cols as u64);
        let x = correlated_x(&mut rng, rows, cols);
        let (_, d0) = gpu.traffic();
        let g = gpu.gram(cols, vec![Ok(x.clone())]).unwrap();
        let down = gpu.traffic().1 - d0;
        assert_eq!(down, (2 * cols * (cols + 1)) as u64, "{rows}×{cols}");
        let c = cpu.gram(cols, vec![Ok(x)]).unwrap();
        assert!(frob_rel(&g.data, &c.data) <= GRAM_REL_TOL);
        // Symmetric, as the accumulator mirrors the triangle.
        for i in 0..cols {
            for j in 0..i {
                assert_eq!(g.data[i * cols + j], g.data[j * cols + i]);
            }
        }
    }
}

/// Many chunks with a large mean (the hard case for f32 sums): the device's f32 accumulation
/// across chunks, read back once, stays this close to the f64 CPU Gram.
const GRAM_LONG_REL_TOL: f64 = 2e-6;

#[test]
fn a_long_stream_of_chunks_keeps_the_gram_precise() {
    let Some(mut gpu) = gpu::device() else { return };
    let (rows, cols) = (40_000usize, 60usize);
    // A binding that just holds the padded 64 × 64 Gram makes the device chunk 64 rows: 625
    // chunks, each added into the running sum.
    gpu.cap_binding_bytes(64 * 64 * 4);
    let cpu = AnyDevice::Cpu(CpuDevice::new());
    let gpu = AnyDevice::Wgpu(Box::new(gpu));
    let mut rng = Rng::new(77);
    let x: Vec<f32> = rng.normals(rows * cols).iter().map(|v| 3.0 + v).collect();
    let chunks = |x: &[f32]| {
        x.chunks(5_000 * cols)
            .map(|c| Ok(c.to_vec()))
            .collect::<Vec<_>>()
    };
    let g_cpu = cpu.gram(cols, chunks(&x)).unwrap();
    let g_gpu = gpu.gram(cols, chunks(&x)).unwrap();
    assert_eq!(g_gpu.samples, rows as u64);
    let e = frob_rel(&g_gpu.data, &g_cpu.data);
    eprintln!("{rows} rows: relative Frobenius error {e:.2e}");
    assert!(e <= GRAM_LONG_REL_TOL, "{e:.2e} > {GRAM_LONG_REL_TOL:.0e}");
}

fn both_states(
    gpu: &WgpuDevice,
    w: &[f32],
    gram: &comq_gpu::Gram,
    rows: usize,
    cols: usize,
    cfg: &QuantConfig,
) -> (
    comq_gpu::device::cpu::CpuLayer,
    comq_gpu::device::wgpu::WgpuLayer,
) {
    let grid = Grid::build(w, rows, cols, cfg);
    let order = Order::build(cfg.order, w, rows, cols, &gram.diag());
    let g32 = gram.to_f32();
    let p = LayerProblem {
        name: "parity",
        weights: w,
        gram: &g32,
        grid: &grid,
        order: &order,
        dead_threshold: gram.dead_threshold(),
        scale_dtype: cfg.scale_dtype,
    };
    (
        CpuDevice::new().upload(&p).unwrap(),
        gpu.upload(&p).unwrap(),
    )
}

#[test]
fn residual_loss_energy_and_one_sweep_match_the_cpu_from_the_same_state() {
    let Some(gpu) = gpu::device() else { return };
    let cpu = CpuDevice::new();
    let (mut total, mut differ) = (0usize, 0usize);
    for (i, (rows, cols)) in [(5usize, 1usize), (17, 7), (33, 63), (19, 257), (130, 129)]
        .into_iter()
        .enumerate()
    {
        let (w, gram) = layer(200 + i as u64, rows, cols);
        let cfg = QuantConfig {
            bits: 3,
            ..QuantConfig::default()
        };
        let (mut c, mut g) = both_states(&gpu, &w, &gram, rows, cols, &cfg);
        let (ec, eg) = (cpu.energy(&mut c).unwrap(), gpu.energy(&mut g).unwrap());
        assert!(
            rel(eg, ec) <= LOSS_REL_TOL,
            "{rows}×{cols}: energy {eg} vs {ec}"
        );
        // The same state on both: round to nearest, then the exact residual and its loss.
        cpu.round_to_nearest(&mut c).unwrap();
        gpu.round_to_nearest(&mut g).unwrap();
        let (lc, lg) = (cpu.refresh(&mut c).unwrap(), gpu.refresh(&mut g).unwrap());
        assert!(
            rel(lg, lc) <= LOSS_REL_TOL,
            "{rows}×{cols}: RTN loss {lg} vs {lc}"
        );
        let (kc, _) = cpu.download(&mut c).unwrap();
        let (kg, _) = gpu.download(&mut g).unwrap();
        assert_eq!(kc, kg, "{rows}×{cols}: RTN codes are identical");
        // One sweep from that state (a true coordinate-descent sweep, R exact).
        cpu.sweep(&mut c).unwrap();
        gpu.sweep(&mut g).unwrap();
        let (kc, _) = cpu.download(&mut c).unwrap();
        let (kg, _) = gpu.download(&mut g).unwrap();
        total += kc.len();
        differ += kc.iter().zip(&kg).filter(|(a, b)| a != b).count();
        let (lc, lg) = (cpu.refresh(&mut c).unwrap(), gpu.refresh(&mut g).unwrap());
        assert!(
            rel(lg, lc) <= FINAL_LOSS_REL_TOL,
            "{rows}×{cols}: loss after a sweep {lg} vs {lc}"
        );
    }
    let share = differ as f64 / total as f64;
    assert!(
        share <= CODE_DISAGREEMENT_MAX,
        "{differ} of {total} codes differ after one sweep"
    );
}

fn end_to_end(gpu: &WgpuDevice, configs: &[QuantConfig]) {
    let cpu = CpuDevice::new();
    let shapes = [(3usize, 1usize), (9, 7), (70, 63), (37, 257), (130, 64)];
    let (mut total, mut differ) = (0usize, 0usize);
    for cfg in configs {
        for (i, &(rows, cols)) in shapes.iter().enumerate() {
            let mut cfg = cfg.clone();
            if cfg.group_size.is_some_and(|g| cols % g != 0) {
                cfg.group_size = None;
            }
            let (w, gram) = layer(700 + i as u64, rows, cols);
            let c = quantize_layer(&cpu, "parity", &w, rows, cols, &gram, &cfg).unwrap();
            let g = quantize_layer(gpu, "parity", &w, rows, cols, &gram, &cfg).unwrap();
            total += c.layer.codes.len();
            differ += c
                .layer
                .codes
                .iter()
                .zip(&g.layer.codes)
                .filter(|(a, b)| a != b)
                .count();
            assert!(
                rel(g.rel_error, c.rel_error) <= FINAL_LOSS_REL_TOL,
                "{rows}×{cols} {cfg:?}: final relative error {} (GPU) vs {} (CPU)",
                g.rel_error,
                c.rel_error
            );
            assert!(rel(g.rel_error_rtn, c.rel_error_rtn) <= LOSS_REL_TOL);
        }
    }
    let share = differ as f64 / total as f64;
    eprintln!(
        "end to end: {differ} of {total} codes differ ({:.4}%)",
        100.0 * share
    );
    assert!(
        share <= CODE_DISAGREEMENT_MAX,
        "{differ} of {total} codes differ end to end"
    );
}

#[test]
fn end_to_end_codes_and_losses_match_the_cpu() {
    let Some(gpu) = gpu::device() else { return };
    let base = QuantConfig::default();
    end_to_end(
        &gpu,
        &[
            base.clone(),
            QuantConfig {
                bits: 2,
                sweeps: 3,
                ..base.clone()
            },
            QuantConfig {
                bits: 3,
                sym: true,
                group_size: Some(16),
                ..base.clone()
            },
            QuantConfig {
                order: OrderKind::Natural,
                sweeps: 2,
                ..base.clone()
            },
        ],
    );
}

#[test]
fn shared_order_blocked_sweep_matches_the_cpu() {
    // block_steps + block_update against the CPU's blocked sweep: several blocks (257 columns),
    // a partial last block, several workgroups of rows (130), grouped grids, two sweeps.
    let Some(gpu) = gpu::device() else { return };
    let base = QuantConfig {
        order: OrderKind::Shared,
        ..QuantConfig::default()
    };
    end_to_end(
        &gpu,
        &[
            base.clone(),
            QuantConfig {
                bits: 3,
                sweeps: 2,
                group_size: Some(16),
                ..base.clone()
            },
            QuantConfig {
                scale_update: true,
                sweeps: 2,
                ..base.clone()
            },
        ],
    );
}

#[test]
fn end_to_end_with_scale_updates_matches_the_cpu() {
    let Some(gpu) = gpu::device() else { return };
    let base = QuantConfig {
        scale_update: true,
        sweeps: 2,
        ..QuantConfig::default()
    };
    end_to_end(
        &gpu,
        &[
            base.clone(),
            QuantConfig {
                group_size: Some(16),
                bits: 3,
                ..base.clone()
            },
            QuantConfig {
                granularity: Granularity::Layer,
                ..base.clone()
            },
        ],
    );
}

#[test]
fn layers_larger_than_a_binding_are_tiled_by_rows() {
    let Some(mut gpu) = gpu::device() else { return };
    let (rows, cols) = (100, 40);
    // A binding just large enough for G (40 × 40 f32) holds 40 rows: tiles of 40, 40 and 20 rows.
    gpu.cap_binding_bytes((cols * cols * 4) as u64);
    let cpu = CpuDevice::new();
    let (w, gram) = layer(31, rows, cols);
    for cfg in [
        QuantConfig {
            sweeps: 2,
            ..QuantConfig::default()
        },
        QuantConfig {
            granularity: Granularity::Layer,
            scale_update: true,
            ..QuantConfig::default()
        },
        QuantConfig {
            order: OrderKind::Shared,
            ..QuantConfig::default()
        },
    ] {
        let c = quantize_layer(&cpu, "tiled", &w, rows, cols, &gram, &cfg).unwrap();
        let g = quantize_layer(&gpu, "tiled", &w, rows, cols, &gram, &cfg).unwrap();
        let differ = c
            .layer
            .codes
            .iter()
            .zip(&g.layer.codes)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            differ as f64 <= CODE_DISAGREEMENT_MAX * (rows * cols) as f64 + 1.0,
            "{differ} codes differ"
        );
        assert!(rel(g.rel_error, c.rel_error) <= FINAL_LOSS_REL_TOL);
    }
}

#[test]
fn a_gram_larger_than_a_binding_is_a_clear_error() {
    let Some(mut gpu) = gpu::device() else { return };
    gpu.cap_binding_bytes(1024);
    let (w, gram) = layer(3, 4, 32);
    let err = quantize_layer(&gpu, "big", &w, 4, 32, &gram, &QuantConfig::default()).unwrap_err();
    assert!(err.to_string().contains("storage-binding limit"), "{err}");
}

/// A validation error caused on one thread is reported to that thread at its next check, and
/// never to another thread sharing the device (which would otherwise fail the wrong work, or let
/// the faulty one go on).
#[test]
fn a_gpu_fault_is_seen_by_the_thread_that_caused_it() {
    let Some(dev) = gpu::device() else {
        return;
    };
    let dev = std::sync::Arc::new(dev);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let (d1, b1) = (dev.clone(), barrier.clone());
    let faulty = std::thread::spawn(move || {
        d1.provoke_validation_error();
        b1.wait(); // the other thread checks now
        b1.wait();
        d1.sync()
    });
    let (d2, b2) = (dev.clone(), barrier.clone());
    let other = std::thread::spawn(move || {
        b2.wait();
        let r = d2.sync();
        b2.wait();
        r
    });
    let other = other.join().unwrap();
    assert!(
        other.is_ok(),
        "another thread's fault was reported here: {other:?}"
    );
    let e = faulty
        .join()
        .unwrap()
        .expect_err("the fault must reach its thread");
    assert!(e.to_string().contains("invalid on purpose"), "{e}");
    // Reported once: the next check of that thread is clean.
    assert!(dev.sync().is_ok());
}

/// Uploads and readbacks in staging chunks (bounded device memory for the largest layers) move
/// every byte: a round trip through chunks that do not divide the data is exact.
#[test]
fn chunked_transfers_move_every_value() {
    let Some(mut gpu) = gpu::device() else { return };
    let mut rng = Rng::new(41);
    let data: Vec<f32> = rng.normals(2501);
    gpu.cap_staging_bytes(1000);
    assert_eq!(gpu.roundtrip(&data).unwrap(), data);
    // A chunk that is not a multiple of 4 bytes is rounded down to one that is.
    gpu.cap_staging_bytes(7);
    assert_eq!(gpu.roundtrip(&data[..13]).unwrap(), &data[..13]);
}

/// The whole layer path (uploads of W, G, the grid and the order; the GPTQ factor; the Gram's
/// readback; the codes' download) gives bit-identical results in small staging chunks.
#[test]
fn a_layer_in_small_staging_chunks_matches_one_in_whole_copies() {
    let Some(whole) = gpu::device() else { return };
    let Some(mut chunked) = gpu::device() else {
        return;
    };
    chunked.cap_staging_bytes(256);
    let (rows, cols) = (24, 40);
    let mut rng = Rng::new(43);
    let x = correlated_x(&mut rng, 96, cols);
    let chunks = |x: &[f32]| -> Vec<comq_gpu::Result<Vec<f32>>> {
        x.chunks(32 * cols).map(|c| Ok(c.to_vec())).collect()
    };
    let g_whole = whole.gram(cols, chunks(&x)).unwrap();
    let g_chunked = chunked.gram(cols, chunks(&x)).unwrap();
    assert_eq!(g_whole.data, g_chunked.data);
    let (w, gram) = layer(44, rows, cols);
    let cfg = QuantConfig {
        init: comq_gpu::quant::Init::Gptq,
        damp: 0.01,
        ..QuantConfig::default()
    };
    let a = quantize_layer(&whole, "l", &w, rows, cols, &gram, &cfg).unwrap();
    let b = quantize_layer(&chunked, "l", &w, rows, cols, &gram, &cfg).unwrap();
    assert_eq!(a.layer.codes, b.layer.codes);
    assert_eq!(a.layer.grid.delta, b.layer.grid.delta);
    assert_eq!(a.rel_error, b.rel_error);
}

/// The profile's transfer counters: a layer moves at least its weights and the upper triangle of
/// its Gram up (and less than both whole: the Gram goes up as its triangle, the order as 16-bit
/// indices) and its codes down, and the same layer again moves exactly as much again.
#[test]
fn transfers_are_counted() {
    let Some(gpu) = gpu::device() else { return };
    let (rows, cols) = (16, 32);
    let (w, gram) = layer(45, rows, cols);
    let cfg = QuantConfig::default();
    let (u0, d0) = gpu.traffic();
    quantize_layer(&gpu, "l", &w, rows, cols, &gram, &cfg).unwrap();
    let (u1, d1) = gpu.traffic();
    let triangle = (2 * cols * (cols + 1)) as u64;
    assert!(
        u1 - u0 >= (4 * rows * cols) as u64 + triangle,
        "{}",
        u1 - u0
    );
    assert!(
        u1 - u0 < (4 * rows * cols + 4 * cols * cols) as u64,
        "{}",
        u1 - u0
    );
    assert!(d1 - d0 >= (4 * rows * cols) as u64, "{}", d1 - d0);
    quantize_layer(&gpu, "l", &w, rows, cols, &gram, &cfg).unwrap();
    let (u2, d2) = gpu.traffic();
    assert_eq!((u2 - u1, d2 - d1), (u1 - u0, d1 - d0));
}

/// A Gram matrix that is not exactly symmetric (one read from a file may not be) goes up whole,
/// not as its upper triangle: the GPU's sweep from it agrees with the CPU's, which reads it as it
/// is, while a sweep from its upper triangle mirrored does not.
#[test]
fn a_gram_that_is_not_symmetric_is_held_as_it_is() {
    let Some(gpu) = gpu::device() else { return };
    let cpu = CpuDevice::new();
    let (rows, cols) = (33, 63);
    let (w, gram) = layer(77, rows, cols);
    let mut skew = gram.clone();
    for i in 0..cols {
        for j in 0..i {
            skew.data[i * cols + j] *= 0.5;
        }
    }
    let mut mirrored = skew.clone();
    for i in 0..cols {
        for j in 0..i {
            mirrored.data[i * cols + j] = mirrored.data[j * cols + i];
        }
    }
    let cfg = QuantConfig {
        bits: 3,
        ..QuantConfig::default()
    };
    let codes = |gram: &comq_gpu::Gram| {
        let (mut c, mut g) = both_states(&gpu, &w, gram, rows, cols, &cfg);
        let (kc, ..) = rtn_and_sweep(&cpu, &mut c);
        let (kg, ..) = rtn_and_sweep(&gpu, &mut g);
        (kc, kg)
    };
    let share = |a: &[i32], b: &[i32]| {
        a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
    };
    let (kc, kg) = codes(&skew);
    assert!(
        share(&kc, &kg) <= CODE_DISAGREEMENT_MAX,
        "GPU vs CPU on a skewed Gram: {:.3}",
        share(&kc, &kg)
    );
    let (km, _) = codes(&mirrored);
    assert!(
        share(&kc, &km) > CODE_DISAGREEMENT_MAX,
        "the skew must matter to the sweep for this test to mean anything"
    );
}

/// Runs RTN, a refresh and one sweep; returns the codes, the steps and the two losses.
fn rtn_and_sweep<D: Device>(d: &D, st: &mut D::Layer) -> (Vec<i32>, Vec<f32>, f64, f64) {
    d.round_to_nearest(st).unwrap();
    let l0 = d.refresh(st).unwrap();
    d.sweep(st).unwrap();
    let l1 = d.refresh(st).unwrap();
    let (codes, delta) = d.download(st).unwrap();
    (codes, delta, l0, l1)
}

/// The resident search's primitives on both devices: a state switched in place (another grid,
/// a damped diagonal, the order that damping ranks) is bit for bit the state a fresh upload of
/// the same problem gives, on each device; the damping term, the held-out products and the kept
/// slot agree with the CPU.
#[test]
fn a_state_switched_in_place_equals_a_fresh_upload() {
    let Some(gpu) = gpu::device() else { return };
    let cpu = CpuDevice::new();
    for (seed, rows, cols, group) in [(61u64, 13usize, 40usize, None), (62, 33, 96, Some(32))] {
        let (w, gram) = layer(seed, rows, cols);
        let held = layer(seed + 50, rows, cols).1;
        let cfg = QuantConfig {
            group_size: group,
            ..QuantConfig::default()
        };
        let (mut c, mut g) = both_states(&gpu, &w, &gram, rows, cols, &cfg);
        // The switched-to problem: grid shrunk to 0.9, G damped by 0.1, the order it ranks.
        let shrunk = QuantConfig {
            scalar: 0.9,
            ..cfg.clone()
        };
        let grid = Grid::build(&w, rows, cols, &shrunk);
        let damped = gram.damped(0.1);
        let order = Order::build(cfg.order, &w, rows, cols, &damped.diag());
        let diag: Vec<f32> = damped.diag().iter().map(|&v| v as f32).collect();
        let g32 = damped.to_f32();
        let p = LayerProblem {
            name: "fresh",
            weights: &w,
            gram: &g32,
            grid: &grid,
            order: &order,
            dead_threshold: gram.dead_threshold(),
            scale_dtype: cfg.scale_dtype,
        };
        let (mut fc, mut fg) = (cpu.upload(&p).unwrap(), gpu.upload(&p).unwrap());
        // The upload's order is stashed under key 1 before the switch (key 2 is not stashed:
        // `order` is uploaded).
        cpu.stash_order(&mut c, 1).unwrap();
        cpu.set_diagonal(&mut c, &diag).unwrap();
        cpu.set_order(&mut c, &order, Some(2)).unwrap();
        cpu.set_grid(&mut c, &grid.delta, &grid.lo).unwrap();
        gpu.stash_order(&mut g, 1).unwrap();
        gpu.set_diagonal(&mut g, &diag).unwrap();
        gpu.set_order(&mut g, &order, Some(2)).unwrap();
        gpu.set_grid(&mut g, &grid.delta, &grid.lo).unwrap();
        let (a, b) = (rtn_and_sweep(&cpu, &mut c), rtn_and_sweep(&cpu, &mut fc));
        assert_eq!(a, b, "{rows}x{cols}: CPU switched vs fresh");
        let (x, y) = (rtn_and_sweep(&gpu, &mut g), rtn_and_sweep(&gpu, &mut fg));
        assert_eq!(x, y, "{rows}x{cols}: GPU switched vs fresh");
        // And back: the upload's order comes from the stash (the order handed in, the damped
        // one, is not used), its diagonal and grid go up again; the state is the original
        // upload's, bit for bit.
        let (mut oc, mut og) = both_states(&gpu, &w, &gram, rows, cols, &cfg);
        let grid0 = Grid::build(&w, rows, cols, &cfg);
        let diag0: Vec<f32> = gram.diag().iter().map(|&v| v as f32).collect();
        cpu.stash_order(&mut c, 2).unwrap();
        cpu.set_diagonal(&mut c, &diag0).unwrap();
        cpu.set_order(&mut c, &order, Some(1)).unwrap();
        cpu.set_grid(&mut c, &grid0.delta, &grid0.lo).unwrap();
        gpu.stash_order(&mut g, 2).unwrap();
        gpu.set_diagonal(&mut g, &diag0).unwrap();
        gpu.set_order(&mut g, &order, Some(1)).unwrap();
        gpu.set_grid(&mut g, &grid0.delta, &grid0.lo).unwrap();
        let (a0, b0) = (rtn_and_sweep(&cpu, &mut c), rtn_and_sweep(&cpu, &mut oc));
        assert_eq!(a0, b0, "{rows}x{cols}: CPU back to the upload's order");
        let (x0, y0) = (rtn_and_sweep(&gpu, &mut g), rtn_and_sweep(&gpu, &mut og));
        assert_eq!(x0, y0, "{rows}x{cols}: GPU back to the upload's order");
        // The damping term and the held-out products, GPU against CPU from the same codes.
        gpu.load_codes(&mut g, &a.0, &a.1).unwrap();
        cpu.load_codes(&mut c, &a.0, &a.1).unwrap();
        let before = cpu.refresh(&mut c).unwrap();
        let (ec, eg) = (
            cpu.error_sqnorm(&mut c).unwrap(),
            gpu.error_sqnorm(&mut g).unwrap(),
        );
        assert!(rel(eg, ec) <= LOSS_REL_TOL, "‖W − Q̂‖²: {eg} vs {ec}");
        let h32 = held.to_f32();
        cpu.attach_holdout(&mut c, &h32).unwrap();
        gpu.attach_holdout(&mut g, &h32).unwrap();
        for weights in [false, true] {
            let (hc, hg) = (
                cpu.holdout_product(&mut c, weights).unwrap(),
                gpu.holdout_product(&mut g, weights).unwrap(),
            );
            assert!(
                rel(hg, hc) <= LOSS_REL_TOL,
                "held-out ({weights}): {hg} vs {hc}"
            );
        }
        // The held-out product leaves R alone: the next refresh is the loss before it.
        assert_eq!(cpu.refresh(&mut c).unwrap(), before);
        // The kept slot holds the codes of the moment it was taken, not later ones.
        kept_is_a_snapshot(&cpu, &mut c);
        kept_is_a_snapshot(&gpu, &mut g);
    }
}

/// Keeps the state's codes, changes them (back to RTN), and reads the kept ones back.
fn kept_is_a_snapshot<D: Device>(d: &D, st: &mut D::Layer) {
    assert!(d.download_kept(st).is_err(), "nothing kept yet");
    let before = d.download(st).unwrap();
    d.keep(st).unwrap();
    d.round_to_nearest(st).unwrap();
    assert_ne!(d.download(st).unwrap().0, before.0);
    assert_eq!(d.download_kept(st).unwrap(), before);
}

/// The default recipe's search on the GPU moves each input of a layer up once — `W`, `G`, the
/// held-out Gram, the GPTQ factor of each damping tried and the order each damping ranks — plus
/// a grid per candidate (bounded by 1.05× those inputs), and reads back the shipped codes once
/// plus one scalar per row per reduction. The two Grams and the triangular factors go up as
/// their upper triangles, the orders as 16-bit indices.
#[test]
fn a_resident_search_moves_each_input_once() {
    use comq_gpu::quant::search::search;
    let Some(gpu) = gpu::device() else { return };
    let (rows, cols) = (64usize, 128usize);
    let (w, gram) = layer(71, rows, cols);
    let held = layer(72, rows, cols).1;
    let cfg = gptq_w3();
    let plan = common::full_plan(0.0);
    let (u0, d0) = gpu.traffic();
    let c = search(&gpu, "t", &w, rows, cols, &gram, Some(&held), &cfg, &plan).unwrap();
    let (up, down) = (gpu.traffic().0 - u0, gpu.traffic().1 - d0);
    let mn = (4 * rows * cols) as u64;
    // W, G, G_h; the factor (U and its permutation) at 0.01 and 0.1; the per-row order at
    // 0.01, 0 (the paper candidate) and 0.1. `G`, `G_h` and `U` as upper triangles, the orders
    // as 16-bit indices, or as their f64 column norms where the device ranks them itself.
    let tri = (2 * cols * (cols + 1)) as u64;
    let orders = if gpu.ranks_orders(cols) {
        3 * 8 * cols as u64
    } else {
        3 * mn / 2
    };
    // The factors as triangles, or as their plans (order and damped diagonal: 12 bytes per
    // input) where the device builds them from its `G`.
    let factors = if gpu.builds_factors(cols) {
        2 * 12 * cols as u64
    } else {
        2 * (tri + 4 * cols as u64)
    };
    let inputs = mn + 2 * tri + factors + orders;
    let codes = mn + (4 * rows) as u64;
    let scalars = (4 * rows * 8 * c.tried.len()) as u64;
    eprintln!(
        "{} candidates: up {up} B ({:.2}× the inputs), down {down} B (codes {codes} B)",
        c.tried.len(),
        up as f64 / inputs as f64
    );
    // Switching back to a damping's order is a device copy: nothing but grids (steps and
    // lowest codes per row) and diagonals beyond the inputs, and at most one of each per
    // candidate.
    let grids = ((8 * rows + 4 * cols) * c.tried.len()) as u64;
    assert!(
        up >= inputs && up <= inputs + grids,
        "up {up} vs {inputs} + {grids}"
    );
    // Where the device ranks the orders and builds the factors itself, the whole search moves
    // at most 1.2× one upload of `W` and `G` (the held-out Gram goes up as a triangle beside
    // `G`'s, and a grid per candidate).
    if gpu.ranks_orders(cols) && gpu.builds_factors(cols) {
        let least = (4 * (rows * cols + cols * cols)) as u64;
        assert!(up as f64 <= 1.2 * least as f64, "up {up} vs 1.2 × {least}");
    }
    assert!(
        down >= codes && down <= codes + scalars,
        "down {down} vs {codes}"
    );
}

/// The row-by-row choice on a layer split over tiles of rows: the GPU keeps and restores each
/// tile's rows at the right offsets (its shipped codes have the held-out and calibration errors
/// it reports, close to the CPU's), it uploads exactly what the layer choice uploads (the
/// comparison is made with the per-row losses every held-out product reads back anyway), and
/// it reads back only the kept lowest codes and the mix's calibration error on top.
#[test]
fn a_row_choice_over_tiles_matches_the_cpu_and_uploads_nothing_more() {
    use comq_gpu::quant::search::{search_by, ChooseBy, SearchPlan};
    let Some(mut gpu) = gpu::device() else { return };
    let (rows, cols) = (100usize, 40usize);
    gpu.cap_binding_bytes((cols * cols * 4) as u64);
    let (w, gram) = layer(81, rows, cols);
    let held = layer(82, rows, cols).1;
    let cfg = gptq_w3();
    let plan = SearchPlan::quick(3, vec![0.1], 0.1);
    let h = Some(&held);
    let on_gpu = |c| search_by(&gpu, "t", &w, rows, cols, &gram, h, &cfg, &plan, None, c).unwrap();
    let t0 = gpu.traffic();
    let by_layer = on_gpu(ChooseBy::Layer);
    let t1 = gpu.traffic();
    let g = on_gpu(ChooseBy::Row);
    let t2 = gpu.traffic();
    let cpu = CpuDevice::new();
    let c = search_by(
        &cpu,
        "t",
        &w,
        rows,
        cols,
        &gram,
        h,
        &cfg,
        &plan,
        None,
        ChooseBy::Row,
    )
    .unwrap();
    assert!(
        !g.rows_from.is_empty(),
        "the rows come from several candidates"
    );
    // `Σ_r v_rᵀ M v_r` over the rows of `v`, in f64.
    let form = |v: &[f64], m: &comq_gpu::Gram| {
        let mut s = 0.0;
        for r in 0..rows {
            for a in 0..cols {
                for b in 0..cols {
                    s += v[r * cols + a] * m.data[a * cols + b] * v[r * cols + b];
                }
            }
        }
        s
    };
    let quad = |q: &comq_gpu::quant::QuantizedLayer, m: &comq_gpu::Gram| {
        let d = q.dequantize();
        let e: Vec<f64> = w
            .iter()
            .zip(&d)
            .map(|(&a, &b)| a as f64 - b as f64)
            .collect();
        form(&e, m)
    };
    let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let energy = |m: &comq_gpu::Gram| form(&w64, m);
    let held_direct = quad(&g.outcome.layer, &held) / energy(&held);
    let cal_direct = quad(&g.outcome.layer, &gram) / energy(&gram);
    let hg = g.rel_error_holdout.unwrap();
    assert!(
        rel(held_direct, hg) <= LOSS_REL_TOL,
        "{held_direct} vs {hg}"
    );
    assert!(rel(cal_direct, g.outcome.rel_error) <= LOSS_REL_TOL);
    assert!(rel(hg, c.rel_error_holdout.unwrap()) <= FINAL_LOSS_REL_TOL);
    assert!(hg <= by_layer.rel_error_holdout.unwrap() * (1.0 + 1e-6));
    let (up_layer, down_layer) = (t1.0 - t0.0, t1.1 - t0.1);
    let (up_row, down_row) = (t2.0 - t1.0, t2.1 - t1.1);
    assert_eq!(up_row, up_layer);
    // Where every product reads its rows back (rows summed on the host): beyond that, the kept
    // lowest codes, and the mix's calibration loss and `‖W − Q̂‖²` (one f32 per row each).
    let mut host = gpu.clone();
    host.sum_rows_on_host();
    let on = |c| search_by(&host, "t", &w, rows, cols, &gram, h, &cfg, &plan, None, c).unwrap();
    let h0 = host.traffic();
    let host_layer = on(ChooseBy::Layer);
    let h1 = host.traffic();
    let host_row = on(ChooseBy::Row);
    let h2 = host.traffic();
    assert_eq!(host_row.outcome.layer.codes, g.outcome.layer.codes);
    assert_eq!(host_layer.outcome.layer.codes, by_layer.outcome.layer.codes);
    let (host_down_layer, host_down_row) = (h1.1 - h0.1, h2.1 - h1.1);
    let extra = (3 * 4 * rows) as u64;
    assert!(
        host_down_row <= host_down_layer + extra,
        "down {host_down_row} vs {host_down_layer}"
    );
    // Where the device sums the rows: the layer choice reads back no row of any product, so
    // the row choice reads, beyond it, each scored candidate's per-row held-out losses too;
    // and it reads no more than when the host sums.
    let scored = (g.tried.len() * 4 * rows) as u64;
    assert!(
        down_row <= down_layer + extra + scored,
        "down {down_row} vs {down_layer}"
    );
    assert!(down_row <= host_down_row, "{down_row} vs {host_down_row}");
    assert!(
        down_layer <= host_down_layer,
        "{down_layer} vs {host_down_layer}"
    );
}

/// Forward primitives, GPU vs CPU: relative Frobenius error of f32 results whose sums run in
/// another order.
const FORWARD_OP_REL_TOL: f64 = 1e-5;

fn rel32(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    frob_rel(&a, &b)
}

/// The register-blocked forward GEMM (128×128 tiles, 8×8 per invocation, K in steps of 8)
/// against the CPU on shapes that fill no tile, one tile exactly, and cross tile edges in every
/// dimension (rows, inner width, outputs of 1 and primes).
#[test]
fn the_forward_linear_matches_the_cpu_on_awkward_shapes() {
    use comq_gpu::device::cpu_ops::CpuOps;
    use comq_gpu::device::ops::Ops;
    use comq_gpu::device::wgpu::forward::GpuOps;
    let Some(g) = gpu::device() else {
        return;
    };
    let ops = GpuOps::new(&g);
    let mut rng = Rng::new(11);
    for (m, k, n) in [
        (1, 1, 1),
        (7, 5, 3),
        (128, 8, 128),
        (129, 130, 257),
        (300, 17, 64),
        (33, 200, 131),
    ] {
        let x = rng.normals(m * k);
        let w = rng.normals(n * k);
        let b = rng.normals(n);
        let want = CpuOps.linear(&x, m, k, &w, &b, n).unwrap();
        let (gx, gw, gb) = (
            ops.upload(&x).unwrap(),
            ops.upload(&w).unwrap(),
            ops.upload(&b).unwrap(),
        );
        let got = ops
            .download(&ops.linear(&gx, m, k, &gw, &gb, n).unwrap())
            .unwrap();
        let e = rel32(&got, &want);
        assert!(e < FORWARD_OP_REL_TOL, "linear {m}x{k} -> {n}: {e}");
    }
}

/// The forward records its dispatches into one encoder and submits every
/// `DISPATCHES_PER_SUBMIT` of them, each dispatch's parameters in a slot of a uniform ring: a
/// chain of dependent ops several submits long, with copies in between and the ring wrapping
/// around, read back through a clone (clones share the stream), equals the CPU's chain.
#[test]
fn batched_forward_submits_keep_the_order_of_dependent_ops() {
    use comq_gpu::device::cpu_ops::CpuOps;
    use comq_gpu::device::ops::Ops;
    use comq_gpu::device::wgpu::forward::{GpuOps, DISPATCHES_PER_SUBMIT};
    let Some(g) = gpu::device() else {
        return;
    };
    let ops = GpuOps::new(&g);
    let other = ops.clone();
    let mut rng = Rng::new(16);
    let (rows, d) = (5, 7);
    let mut h = rng.normals(rows * d);
    let gammas: Vec<Vec<f32>> = (0..8).map(|_| rng.normals(d)).collect();
    let o = rng.normals(rows * d);
    let mut gh = ops.upload(&h).unwrap();
    let go = ops.upload(&o).unwrap();
    let gg: Vec<_> = gammas.iter().map(|v| ops.upload(v).unwrap()).collect();
    let steps = 3 * DISPATCHES_PER_SUBMIT + 1100;
    for i in 0..steps {
        let k = i % gammas.len();
        CpuOps.add_scaled(&mut h, &o, &gammas[k], rows, d).unwrap();
        ops.add_scaled(&mut gh, &go, &gg[k], rows, d).unwrap();
        if i % 97 == 0 {
            gh = other.duplicate(&gh).unwrap();
        }
    }
    let got = other.download(&gh).unwrap();
    let e = rel32(&got, &h);
    assert!(e < FORWARD_OP_REL_TOL, "{e}");
}

/// Flash-style attention (64 queries per workgroup, key tiles of 16, 64 head dims per pass)
/// against the CPU on shapes that fill no tile, cross the query and key tiles, take two and
/// three passes over the head dims, and run past the 2048 tokens the old kernel could hold.
#[test]
fn attention_matches_the_cpu_on_awkward_shapes() {
    use comq_gpu::device::cpu_ops::CpuOps;
    use comq_gpu::device::ops::Ops;
    use comq_gpu::device::wgpu::forward::GpuOps;
    let Some(g) = gpu::device() else {
        return;
    };
    let ops = GpuOps::new(&g);
    let mut rng = Rng::new(13);
    for (n, t, heads, hd) in [
        (1, 1, 1, 1),
        (2, 17, 2, 8),
        (1, 197, 3, 64),
        (2, 65, 2, 80),
        (1, 50, 1, 130),
        (3, 31, 2, 6),
        (1, 2050, 1, 4),
    ] {
        let qkv = rng.normals(n * t * 3 * heads * hd);
        let want = CpuOps.attention(&qkv, n, t, heads, hd, None).unwrap();
        let gq = ops.upload(&qkv).unwrap();
        let got = ops
            .download(&ops.attention(&gq, n, t, heads, hd, None).unwrap())
            .unwrap();
        let e = rel32(&got, &want);
        assert!(
            e < FORWARD_OP_REL_TOL,
            "attention n {n} t {t} heads {heads} hd {hd}: {e}"
        );
    }
}

/// Swin's primitives, GPU vs CPU: attention with a bias per sequence group (the shifted-window
/// mask included, `-100` on some pairs) and row gathers (window partition, patch merging).
#[test]
fn biased_attention_and_row_gathers_match_the_cpu() {
    use comq_gpu::device::cpu_ops::CpuOps;
    use comq_gpu::device::ops::Ops;
    use comq_gpu::device::wgpu::forward::GpuOps;
    use comq_gpu::model::swin;
    let Some(g) = gpu::device() else {
        return;
    };
    let ops = GpuOps::new(&g);
    let mut rng = Rng::new(12);
    let (heads, hd, window, side, images) = (3, 8, 4, 8, 2);
    let t = window * window;
    let d = heads * hd;
    let table = rng.normals((2 * window - 1) * (2 * window - 1) * heads);
    let (bias, groups) = swin::attention_bias(&table, heads, window, side, window / 2);
    assert_eq!(groups, 4);
    let windows = images * groups;
    let qkv = rng.normals(windows * t * 3 * d);
    let want = CpuOps
        .attention(&qkv, windows, t, heads, hd, Some((&bias, groups)))
        .unwrap();
    let (gq, gb) = (ops.upload(&qkv).unwrap(), ops.upload(&bias).unwrap());
    let got = ops
        .download(
            &ops.attention(&gq, windows, t, heads, hd, Some((&gb, groups)))
                .unwrap(),
        )
        .unwrap();
    let e = rel32(&got, &want);
    assert!(e < FORWARD_OP_REL_TOL, "biased attention: {e}");
    // The bias matters: without it the output is another one.
    let plain = CpuOps.attention(&qkv, windows, t, heads, hd, None).unwrap();
    assert!(rel32(&plain, &want) > 1e-2);

    let x = rng.normals(images * side * side * 5);
    for order in [
        swin::window_order(images, side, window, 2),
        swin::merge_order(images, side),
    ] {
        let want = CpuOps.gather_rows(&x, &order, 5).unwrap();
        let gx = ops.upload(&x).unwrap();
        let got = ops
            .download(&ops.gather_rows(&gx, &order, 5).unwrap())
            .unwrap();
        assert_eq!(got, want);
    }
    // A row outside the tensor is an error on both devices.
    let gx = ops.upload(&x).unwrap();
    assert!(ops
        .gather_rows(&gx, &[(images * side * side) as u32], 5)
        .is_err());
    assert!(CpuOps
        .gather_rows(&x, &[(images * side * side) as u32], 5)
        .is_err());
}

/// Rows of a layer whose sweep or GPTQ pass would read more than the per-submit bound go in
/// several submits of consecutive rows (no dispatch long enough for a desktop watchdog to kill):
/// with a bound of one row per submit the GPU run chooses the very same codes as with none (the
/// same kernel on the same rows), for the paper recipe's sweep and the default recipe's GPTQ
/// start alike.
#[test]
fn rows_split_over_submits_give_the_same_codes() {
    if gpu::device().is_none() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let model = root.join("assets/tiny-vit.safetensors");
    let calib = root.join("assets/tiny-vit.calib.safetensors");
    for preset in ["paper", "default"] {
        let mut hashes = Vec::new();
        for bound in [None, Some("1")] {
            let out = tmp
                .path()
                .join(format!("q-{preset}-{}.safetensors", bound.is_some()));
            let rep = tmp
                .path()
                .join(format!("r-{preset}-{}.json", bound.is_some()));
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_comq-gpu"));
            cmd.env("RUST_LOG", "warn").args([
                "run",
                model.to_str().unwrap(),
                "--calib",
                calib.to_str().unwrap(),
                "--preset",
                preset,
                "--device",
                "gpu",
                "--out",
                out.to_str().unwrap(),
                "--report",
                rep.to_str().unwrap(),
            ]);
            if let Some(b) = bound {
                cmd.env("COMQ_SUBMIT_BYTES", b);
            }
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
            hashes.push(r["codes_sha256"].as_str().unwrap().to_string());
        }
        assert_eq!(hashes[0], hashes[1], "{preset}");
    }
}

/// The per-submit bound in rows: one submit for the ViT-L layers, several for the 6B shape's
/// widest (fc2, 12800 inputs), each reading at most the bound (the first row always goes).
#[test]
fn the_submit_bound_splits_only_the_widest_layers() {
    use comq_gpu::device::wgpu::{rows_per_submit, SUBMIT_BYTES};
    if std::env::var("COMQ_SUBMIT_BYTES").is_ok() {
        return;
    }
    assert!(rows_per_submit(4096) >= 1024, "ViT-L fc2: one submit");
    let r = rows_per_submit(12800);
    assert!((1..3200).contains(&r), "6B fc2: {r} rows per submit");
    assert!(r as u64 * 12800 * 12800 * 4 <= SUBMIT_BYTES);
    assert_eq!(rows_per_submit(1 << 20), 1);
}

/// The forward pass's Gram split over rows (a narrow Gram's few tiles times up to 8 slices, each
/// an f32 accumulator of its own, added in f64 on readback): batches of several sizes (slices
/// left empty by a short batch included, rows no multiple of 16), widths padded by a copy and
/// widths read in place, against the CPU, and the split's bounds.
#[test]
fn the_gram_split_over_rows_matches_the_cpu() {
    use comq_gpu::device::cpu_ops::CpuOps;
    use comq_gpu::device::ops::Ops;
    use comq_gpu::device::wgpu::forward::{gram_slices, GpuOps};
    assert_eq!(gram_slices(60, u64::MAX), 8);
    assert_eq!(gram_slices(768, u64::MAX), 7);
    assert_eq!(gram_slices(1024, u64::MAX), 4);
    assert_eq!(gram_slices(4096, u64::MAX), 1);
    assert_eq!(gram_slices(2048, u64::MAX), 1);
    assert_eq!(gram_slices(3200, u64::MAX), 1);
    // No more slices than a binding holds.
    assert_eq!(gram_slices(768, 2 * 768 * 768 * 4), 2);
    assert_eq!(gram_slices(768, 1), 1);
    let Some(g) = gpu::device() else {
        return;
    };
    let ops = GpuOps::new(&g);
    let mut rng = Rng::new(14);
    // 60 and 200 are copied into the padded layout, 64 and 128 read in place.
    for n in [60usize, 200, 64, 128] {
        let mut c = CpuOps.gram_new(n).unwrap();
        let mut gg = ops.gram_new(n).unwrap();
        for rows in [19usize, 700, 1] {
            let x: Vec<f32> = rng.normals(rows * n).iter().map(|v| 1.0 + v).collect();
            CpuOps.gram_add(&mut c, &x, rows).unwrap();
            let gx = ops.upload(&x).unwrap();
            ops.gram_add(&mut gg, &gx, rows).unwrap();
        }
        let want = CpuOps.gram_finish(c).unwrap();
        let got = ops.gram_finish(gg).unwrap();
        let e = frob_rel(&got.data, &want.data);
        assert!(e < GRAM_REL_TOL, "n {n}: {e}");
        assert_eq!(got.samples, want.samples);
    }
}

/// The cross-Gram `xqᵀ·xf` (`--calib-mode corrected`) on the GPU against the CPU's: widths
/// padded by a copy and read in place, several batches, rows no multiple of 16, and a direct f64
/// product; it is not symmetric.
#[test]
fn the_cross_gram_matches_the_cpu() {
    use comq_gpu::device::cpu_ops::CpuOps;
    use comq_gpu::device::ops::Ops;
    use comq_gpu::device::wgpu::forward::GpuOps;
    let Some(g) = gpu::device() else {
        return;
    };
    let ops = GpuOps::new(&g);
    let mut rng = Rng::new(17);
    for n in [7usize, 64, 100] {
        let mut c = CpuOps.cross_new(n).unwrap();
        let mut gc = ops.cross_new(n).unwrap();
        let mut direct = vec![0.0f64; n * n];
        for rows in [19usize, 300, 1] {
            let xf: Vec<f32> = rng.normals(rows * n).iter().map(|v| 0.5 + v).collect();
            let xq: Vec<f32> = xf
                .iter()
                .zip(rng.normals(rows * n))
                .map(|(a, e)| a + 0.1 * e)
                .collect();
            for r in 0..rows {
                for i in 0..n {
                    for j in 0..n {
                        direct[i * n + j] += xq[r * n + i] as f64 * xf[r * n + j] as f64;
                    }
                }
            }
            CpuOps.cross_add(&mut c, &xq, &xf, rows).unwrap();
            let (gq, gf) = (ops.upload(&xq).unwrap(), ops.upload(&xf).unwrap());
            ops.cross_add(&mut gc, &gq, &gf, rows).unwrap();
        }
        let want = CpuOps.cross_finish(c).unwrap();
        let got = ops.cross_finish(gc).unwrap();
        assert_eq!(got.samples, 320);
        assert_eq!(want.samples, 320);
        assert!(frob_rel(&want.data, &direct) < GRAM_REL_TOL);
        let e = frob_rel(&got.data, &want.data);
        assert!(e < GRAM_REL_TOL, "n {n}: {e}");
        if n > 1 {
            assert!((want.data[1] - want.data[n]).abs() > 1e-6, "not symmetric");
        }
    }
}

/// The forward pass's Gram on the GPU against the CPU's at the widths where the wide kernel
/// (128×128 tiles, 8×8 per invocation) takes over: exactly 2048, and 2100 (padded to 2176, a
/// partial last tile), over a batch of rows that is no multiple of 16.
#[test]
fn the_wide_gram_kernel_matches_the_cpu() {
    use comq_gpu::device::cpu_ops::CpuOps;
    use comq_gpu::device::ops::Ops;
    use comq_gpu::device::wgpu::forward::{GpuOps, GRAM_WIDE_MIN};
    let Some(g) = gpu::device() else {
        return;
    };
    let ops = GpuOps::new(&g);
    let mut rng = Rng::new(13);
    for (rows, n) in [(37usize, GRAM_WIDE_MIN), (21, 2100), (19, 300)] {
        let x = rng.normals(rows * n);
        let mut c = CpuOps.gram_new(n).unwrap();
        CpuOps.gram_add(&mut c, &x, rows).unwrap();
        let want = CpuOps.gram_finish(c).unwrap();
        let gx = ops.upload(&x).unwrap();
        let mut gg = ops.gram_new(n).unwrap();
        ops.gram_add(&mut gg, &gx, rows).unwrap();
        let got = ops.gram_finish(gg).unwrap();
        let e = frob_rel(&got.data, &want.data);
        assert!(e < GRAM_REL_TOL, "{rows}x{n}: {e}");
        assert_eq!(got.samples, want.samples);
    }
}

/// The compiled kernels go to an on-disk pipeline cache where the backend keeps one (Vulkan):
/// the first open writes it, the next reads it, a damaged file is ignored and replaced (never
/// handed to the driver), and kernels built from any of them compute the same Gram.
#[test]
fn compiled_kernels_are_cached_on_disk_and_a_damaged_cache_is_ignored() {
    use comq_gpu::device::wgpu::cache::CacheState;
    let Some(probe) = gpu::device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let open = || WgpuDevice::open_with_cache(None, true, Some(dir.path())).unwrap();
    let first = open();
    if probe.info().backend != wgpu::Backend::Vulkan {
        assert_eq!(first.pipeline_cache(), CacheState::Off);
        return;
    }
    assert_eq!(first.pipeline_cache(), CacheState::Created);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_string_lossy().ends_with(".bin"));
    let mut rng = Rng::new(15);
    let x = correlated_x(&mut rng, 50, 20);
    let gram_on = |d: WgpuDevice| {
        AnyDevice::Wgpu(Box::new(d))
            .gram(20, vec![Ok(x.clone())])
            .unwrap()
            .data
    };
    let want = gram_on(first);
    assert_eq!(open().pipeline_cache(), CacheState::Loaded);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    std::fs::write(&files[0], &bytes).unwrap();
    let damaged = open();
    assert_eq!(damaged.pipeline_cache(), CacheState::Replaced);
    assert_eq!(gram_on(damaged), want);
    let again = open();
    assert_eq!(again.pipeline_cache(), CacheState::Loaded);
    assert_eq!(gram_on(again), want);
    // Off when no directory is given.
    let off = WgpuDevice::open_with_cache(None, true, None).unwrap();
    assert_eq!(off.pipeline_cache(), CacheState::Off);
}

/// Weights with many ties (a coarse grid of values, zeros, both signs) and a Gram diagonal with
/// dead and negative entries: where a ranking can go wrong.
fn tied_layer(seed: u64, rows: usize, cols: usize) -> (Vec<f32>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let w: Vec<f32> = rng
        .normals(rows * cols)
        .iter()
        .map(|v| (v * 4.0).round() / 4.0)
        .collect();
    let diag: Vec<f64> = rng
        .normals(cols)
        .iter()
        .enumerate()
        .map(|(j, v)| match j % 7 {
            0 => 0.0,
            1 => -1e-3,
            2 => 4.0,
            _ => (v * v) as f64 + 0.5,
        })
        .collect();
    (w, diag)
}

/// The greedy order ranked on the device from the resident weights (`order.wgsl`, f64) is the
/// host's stable sort bit for bit: on upload, after a switch in place, over tiles of rows, past
/// 65,535 rows (the dispatch's height) and past 256 columns (its tile), with ties everywhere.
/// With the ranking left to the host the same table arrives by upload.
#[test]
fn the_greedy_order_ranked_on_the_device_is_the_hosts() {
    let Some(gpu) = gpu::device() else { return };
    if std::env::var("COMQ_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        // Every adapter the tests run on in CI (lavapipe) has f64: the kernel must run there.
        assert!(gpu.ranks_orders(300), "{}: no f64 ranking", gpu.describe());
    }
    let mut host = gpu::device().unwrap();
    host.rank_orders_on_host();
    assert!(!host.ranks_orders(1));
    assert!(!gpu.ranks_orders(comq_gpu::device::wgpu::RANK_MAX_COLS + 1));
    let mut tiled = gpu::device().unwrap();
    for (seed, rows, cols) in [
        (1u64, 1usize, 1usize),
        (2, 3, 7),
        (3, 5, 300),
        (4, 40, 257),
        (5, 70_000, 2),
    ] {
        let (w, diag) = tied_layer(seed, rows, cols);
        let expect = Order::build(OrderKind::Greedy, &w, rows, cols, &diag);
        let ranked = Order::ranked(&diag);
        assert_eq!(
            &*ranked.resolve(&w, rows),
            &expect,
            "{rows}x{cols}: host resolve"
        );
        let cfg = QuantConfig::default();
        let grid = Grid::build(&w, rows, cols, &cfg);
        let g32: Vec<f32> = (0..cols * cols)
            .map(|k| {
                if k % (cols + 1) == 0 {
                    diag[k / (cols + 1)] as f32
                } else {
                    0.0
                }
            })
            .collect();
        let p = LayerProblem {
            name: "ranked",
            weights: &w,
            gram: &g32,
            grid: &grid,
            order: &ranked,
            dead_threshold: 0.0,
            scale_dtype: cfg.scale_dtype,
        };
        let table = expect.table(rows);
        let (u0, _) = gpu.traffic();
        let st = gpu.upload(&p).unwrap();
        let up = gpu.traffic().0 - u0;
        assert_eq!(
            gpu.order_table(&st).unwrap(),
            table,
            "{rows}x{cols}: on upload"
        );
        if rows * cols > 64 {
            // W and G go up; the order's indices do not (its norms are 8 bytes per column).
            let without = (4 * rows * cols + 4 * cols * cols + 8 * cols + 16 * rows) as u64;
            assert!(up <= without, "{rows}x{cols}: up {up} B > {without} B");
        }
        let st = host.upload(&p).unwrap();
        assert_eq!(
            host.order_table(&st).unwrap(),
            table,
            "{rows}x{cols}: host-ranked"
        );
        // Over tiles of rows (3 rows each, or 30,000 of the tall layer), and after a switch in
        // place to another diagonal's order and back to this one.
        let tile_rows = if rows > 1000 { 30_000 } else { 3 };
        tiled.cap_binding_bytes((tile_rows * cols * 4).max(cols * cols * 4) as u64);
        // And two rows per submit of the ranking (20,000 of the tall layer).
        let submit_rows = if rows > 1000 { 20_000 } else { 2 };
        tiled.cap_rank_submit(submit_rows * cols * cols);
        let mut st = tiled.upload(&p).unwrap();
        assert_eq!(
            tiled.order_table(&st).unwrap(),
            table,
            "{rows}x{cols}: tiled"
        );
        let other: Vec<f64> = diag.iter().rev().copied().collect();
        tiled
            .set_order(&mut st, &Order::ranked(&other), None)
            .unwrap();
        let switched = Order::build(OrderKind::Greedy, &w, rows, cols, &other).table(rows);
        assert_eq!(
            tiled.order_table(&st).unwrap(),
            switched,
            "{rows}x{cols}: switched"
        );
        tiled.set_order(&mut st, &ranked, None).unwrap();
        assert_eq!(
            tiled.order_table(&st).unwrap(),
            table,
            "{rows}x{cols}: back"
        );
    }
}

/// A search with the orders ranked on the device ships the same codes and steps as one with
/// the host's orders sent (the same permutations), and uploads less: no `rows × cols` indices
/// per damping.
#[test]
fn a_search_with_device_ranked_orders_ships_the_same_codes_and_sends_less() {
    use comq_gpu::quant::search::search;
    let Some(gpu) = gpu::device() else { return };
    let (rows, cols) = (96usize, 64usize);
    if !gpu.ranks_orders(cols) {
        eprintln!("SKIP: {} has no f64 to rank orders with", gpu.describe());
        return;
    }
    let mut host = gpu::device().unwrap();
    host.rank_orders_on_host();
    let (w, gram) = layer(91, rows, cols);
    let held = layer(92, rows, cols).1;
    let cfg = gptq_w3();
    let plan = common::full_plan(0.0);
    let run = |d: &WgpuDevice| {
        let u0 = d.traffic().0;
        let c = search(d, "t", &w, rows, cols, &gram, Some(&held), &cfg, &plan).unwrap();
        (c, d.traffic().0 - u0)
    };
    let (a, up_ranked) = run(&gpu);
    let (b, up_host) = run(&host);
    assert_eq!(a.outcome.layer.codes, b.outcome.layer.codes);
    assert_eq!(a.outcome.layer.grid.delta, b.outcome.layer.grid.delta);
    assert_eq!(a.tried.len(), b.tried.len());
    // Three per-row orders (dampings 0.01, 0 and 0.1) at 16 bits each, less their norms.
    let orders = (3 * rows * cols * 2) as u64;
    assert!(
        up_ranked + orders - 3 * 8 * cols as u64 <= up_host,
        "ranked {up_ranked} B vs host {up_host} B"
    );
}

/// A Gram whose f64 values are f32 values (as one accumulated on the GPU is), so the device's
/// f32 copy holds it exactly.
fn f32_exact_gram(seed: u64, cols: usize, dead: &[usize]) -> comq_gpu::Gram {
    let (_, mut g) = layer(seed, 1, cols);
    for &d in dead {
        for k in 0..cols {
            g.data[d * cols + k] = 0.0;
            g.data[k * cols + d] = 0.0;
        }
    }
    for v in g.data.iter_mut() {
        *v = *v as f32 as f64;
    }
    g
}

/// The GPTQ factor built on the device (`factor.wgsl`, f64) from the resident Gram runs the
/// same GPTQ pass as the host's factor uploaded: the same codes, on plain, dead-input and
/// act-order problems, over tiles of rows; and nothing of `U` goes up.
#[test]
fn the_gptq_factor_built_on_the_device_gives_the_hosts_codes() {
    use comq_gpu::numeric::gptq;
    let Some(gpu) = gpu::device() else { return };
    if std::env::var("COMQ_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        assert!(gpu.builds_factors(200), "{}: no f64 factor", gpu.describe());
    }
    if !gpu.builds_factors(200) {
        eprintln!("SKIP: {} has no f64 to build factors with", gpu.describe());
        return;
    }
    // Past its width the host's factor goes up (the unblocked build is slower than the upload).
    assert!(!gpu.builds_factors(comq_gpu::device::wgpu::FACTOR_MAX_COLS + 1));
    let mut tiled = gpu::device().unwrap();
    tiled.cap_binding_bytes(200 * 200 * 8);
    for (seed, rows, cols, dead, act_order, damp) in [
        (1u64, 7usize, 1usize, vec![], true, 0.01f32),
        (2, 33, 40, vec![3usize, 17], true, 0.01),
        (3, 64, 200, vec![], false, 0.1),
        (4, 300, 130, vec![0, 129], true, 0.01),
    ] {
        let gram = f32_exact_gram(seed, cols, &dead);
        let w = layer(seed + 10, rows, cols).0;
        let h = gram.damped(damp);
        let host = gptq::factor(&h, act_order, gram.dead_threshold() as f64).unwrap();
        let plan = gptq::plan(&h, act_order, gram.dead_threshold() as f64);
        assert_eq!(plan.perm, host.perm);
        let cfg = QuantConfig {
            bits: 3,
            ..QuantConfig::default()
        };
        let grid = Grid::build(&w, rows, cols, &cfg);
        let order = Order::build(OrderKind::Greedy, &w, rows, cols, &h.diag());
        let g32 = h.to_f32();
        let p = LayerProblem {
            name: "factor",
            weights: &w,
            gram: &g32,
            grid: &grid,
            order: &order,
            dead_threshold: gram.dead_threshold(),
            scale_dtype: cfg.scale_dtype,
        };
        for dev in [&gpu, &tiled] {
            let mut a = dev.upload(&p).unwrap();
            dev.gptq(&mut a, &host).unwrap();
            let expect = dev.download(&mut a).unwrap();
            let mut b = dev.upload(&p).unwrap();
            let u0 = dev.traffic().0;
            assert!(dev
                .build_factor(&mut b, &plan, &plan.diagonal(0).unwrap())
                .unwrap());
            // Kept: a second call builds nothing.
            assert!(dev
                .build_factor(&mut b, &plan, &plan.diagonal(0).unwrap())
                .unwrap());
            dev.gptq(&mut b, &plan.resident()).unwrap();
            let up = dev.traffic().0 - u0;
            assert!(up <= (12 * cols + 64) as u64, "{rows}x{cols}: up {up} B");
            let got = dev.download(&mut b).unwrap();
            assert_eq!(got, expect, "{rows}x{cols}: device factor vs host factor");
        }
    }
}

/// A Gram that is not positive definite is refused by the device's factor, as by the host's,
/// and the fallback damping that makes the host's factor work makes the device's work too, with
/// the same codes.
#[test]
fn the_device_factor_refuses_what_the_host_refuses_and_falls_back_the_same_way() {
    use comq_gpu::numeric::gptq;
    let Some(gpu) = gpu::device() else { return };
    if !gpu.builds_factors(16) {
        eprintln!("SKIP: {} has no f64 to build factors with", gpu.describe());
        return;
    }
    // Rank 4 in 16 inputs, undamped: not positive definite.
    let (rows, cols) = (8usize, 16usize);
    let mut rng = Rng::new(5);
    let x: Vec<f32> = rng.normals(4 * cols);
    let mut gram = gram_of(&x, 4, cols);
    for v in gram.data.iter_mut() {
        *v = *v as f32 as f64;
    }
    let w = layer(6, rows, cols).0;
    let plan = gptq::plan(&gram, true, 0.0);
    let host = gptq::factor(&gram, true, 0.0).unwrap();
    let cfg = QuantConfig::default();
    let grid = Grid::build(&w, rows, cols, &cfg);
    let order = Order::build(OrderKind::Greedy, &w, rows, cols, &gram.diag());
    let g32 = gram.to_f32();
    let p = LayerProblem {
        name: "singular",
        weights: &w,
        gram: &g32,
        grid: &grid,
        order: &order,
        dead_threshold: 0.0,
        scale_dtype: cfg.scale_dtype,
    };
    let mut st = gpu.upload(&p).unwrap();
    assert!(!gpu
        .build_factor(&mut st, &plan, &plan.diagonal(0).unwrap())
        .unwrap());
    let attempt = (1..)
        .find(|&k| {
            gpu.build_factor(&mut st, &plan, &plan.diagonal(k).unwrap())
                .unwrap()
        })
        .unwrap();
    assert!(attempt >= 1);
    gpu.gptq(&mut st, &plan.resident()).unwrap();
    let got = gpu.download(&mut st).unwrap();
    let mut h = gpu.upload(&p).unwrap();
    gpu.gptq(&mut h, &host).unwrap();
    assert_eq!(got, gpu.download(&mut h).unwrap());
    assert!(plan.diagonal(5).is_none());
}

/// A Gram the calibration's forward pass accumulated on the GPU stays there: a search (and a
/// lone run) on the same device copies it, and the held-out Gram likewise, instead of sending
/// them again. The codes, the choice and every score are the same bit for bit as on a device
/// that holds nothing, and the uploads are smaller by exactly the two triangles (less the
/// damped diagonal that goes up instead). A Gram changed on the host is not found and goes up.
/// Both accumulator layouts: folded slices, and one padded slice under a small binding cap.
#[test]
fn a_gram_accumulated_on_the_device_is_not_sent_back_to_it() {
    use comq_gpu::device::ops::Ops;
    use comq_gpu::device::wgpu::forward::GpuOps;
    use comq_gpu::quant::search::search;
    let (rows, n) = (48usize, 100usize);
    for cap in [None, Some((128 * 128 * 4) as u64)] {
        let open = || {
            let mut d = gpu::device()?;
            if let Some(c) = cap {
                d.cap_binding_bytes(c);
            }
            Some(d)
        };
        let (Some(dev), Some(fresh)) = (open(), open()) else {
            return;
        };
        // The calibration on a handle of its own, as a run does.
        let ops = GpuOps::new(&dev.own_account());
        let mut rng = Rng::new(91);
        let mut accumulate = |count: usize| {
            let mut g = ops.gram_new(n).unwrap();
            // Several batches, each within the smallest binding cap.
            for rows in [count / 3, count / 3, count - 2 * (count / 3)] {
                let x = correlated_x(&mut rng, rows, n);
                ops.gram_add(&mut g, &ops.upload(&x).unwrap(), rows)
                    .unwrap();
            }
            ops.gram_finish(g).unwrap()
        };
        let gram = accumulate(4 * n);
        let held = accumulate(2 * n);
        let w: Vec<f32> = rng.normals(rows * n).iter().map(|v| v * 0.05).collect();
        let cfg = gptq_w3();
        let plan = common::full_plan(0.0);
        let searched = |d: &WgpuDevice, g: &comq_gpu::Gram| {
            let u0 = d.traffic().0;
            let c = search(d, "held", &w, rows, n, g, Some(&held), &cfg, &plan).unwrap();
            (c, d.traffic().0 - u0)
        };
        let (want, up_fresh) = searched(&fresh, &gram);
        let (got, up_held) = searched(&dev, &gram);
        assert_eq!(
            got.outcome.layer.codes, want.outcome.layer.codes,
            "cap {cap:?}"
        );
        assert_eq!(got.chosen, want.chosen);
        assert_eq!(got.tried.len(), want.tried.len());
        for (a, b) in got.tried.iter().zip(&want.tried) {
            assert_eq!(a.rel_error.to_bits(), b.rel_error.to_bits(), "{}", a.label);
            assert_eq!(a.score.to_bits(), b.score.to_bits(), "{}", a.label);
        }
        let tri = (4 * n * (n + 1) / 2) as u64;
        assert_eq!(
            up_fresh - up_held,
            2 * tri - 4 * n as u64,
            "cap {cap:?}: up {up_held} on the holding device against {up_fresh}"
        );
        // A lone run copies it too, with the same codes.
        let lone = |d: &WgpuDevice| {
            let u0 = d.traffic().0;
            let o = quantize_layer(d, "held", &w, rows, n, &gram, &cfg).unwrap();
            (o.layer.codes, d.traffic().0 - u0)
        };
        let ((c_fresh, u_fresh), (c_held, u_held)) = (lone(&fresh), lone(&dev));
        assert_eq!(c_held, c_fresh);
        assert_eq!(u_fresh - u_held, tri - 4 * n as u64);
        // Changed on the host (a scale folded in, say), it is another Gram: sent as before
        // (the held-out Gram is still found).
        let mut changed = gram.clone();
        for v in &mut changed.data {
            *v *= 2.0;
        }
        let (c2, up2) = searched(&dev, &changed);
        let (c2_fresh, up2_fresh) = searched(&fresh, &changed);
        assert_eq!(c2.outcome.layer.codes, c2_fresh.outcome.layer.codes);
        assert_eq!(up2_fresh - up2, tri);
    }
}

/// Where the adapter has f64, a reduction's rows are summed on the device (`sum.wgsl`) and 8
/// bytes per tile come back instead of one f32 per row: a search over row tiles ships the same
/// codes and choice as with the rows summed on the host, every score within 1e-12 (only the
/// order of the f64 additions differs), and reads back the codes and steps plus at most 8 bytes
/// per tile per reduction.
#[test]
fn reductions_come_back_as_one_f64_sum_per_tile() {
    use comq_gpu::quant::search::search;
    let Some(mut gpu) = gpu::device() else { return };
    let (rows, cols) = (150usize, 48usize);
    // Three tiles of at most 64 rows.
    gpu.cap_binding_bytes((64 * cols * 4) as u64);
    let mut host = gpu.clone();
    host.sum_rows_on_host();
    let (w, gram) = layer(95, rows, cols);
    let held = layer(96, rows, cols).1;
    let cfg = gptq_w3();
    let plan = common::full_plan(0.0);
    let run = |d: &WgpuDevice| {
        let d0 = d.traffic().1;
        let c = search(d, "sums", &w, rows, cols, &gram, Some(&held), &cfg, &plan).unwrap();
        (c, d.traffic().1 - d0)
    };
    let (want, down_host) = run(&host);
    let (got, down) = run(&gpu);
    assert_eq!(got.outcome.layer.codes, want.outcome.layer.codes);
    assert_eq!(got.chosen, want.chosen);
    assert_eq!(got.tried.len(), want.tried.len());
    for (a, b) in got.tried.iter().zip(&want.tried) {
        assert!(
            rel(a.score, b.score) <= 1e-12,
            "{}: {} vs {}",
            a.label,
            a.score,
            b.score
        );
        assert!(rel(a.rel_error, b.rel_error) <= 1e-12, "{}", a.label);
    }
    if !gpu.ranks_orders(cols) {
        // No f64 on this adapter: both read the rows back.
        assert_eq!(down, down_host);
        return;
    }
    let shipped = (4 * rows * cols + 4 * rows) as u64;
    // Each candidate: its loss, `‖W − Q̂‖²` and held-out loss, per stage; the energies.
    let reductions = (6 * got.tried.len() + 8) as u64;
    let tiles = rows.div_ceil(64) as u64;
    assert!(
        down <= shipped + 8 * tiles * reductions,
        "down {down} against {shipped} shipped"
    );
    assert!(down < down_host, "{down} vs {down_host}");
    eprintln!("down {down} B with device sums, {down_host} B with host sums ({shipped} B shipped)");
}

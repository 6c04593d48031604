//! Every table and summary the commands print. Byte counts are written by one formatter.

use comq_gpu::bench::{BenchRow, E2eRow, ForwardRow, KernelRow};
use comq_gpu::device::wgpu::AdapterSummary;
use comq_gpu::pipeline::{InspectRow, RunReport};
use comq_gpu::plan::Preflight;

pub(super) fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

/// The per-stage table of `--profile`.
pub(super) fn print_profile(p: &comq_gpu::profile::ProfileReport) {
    println!(
        "{:<18} {:>10} {:>8} {:>7}",
        "stage", "seconds", "calls", "% wall"
    );
    for s in &p.stages {
        println!(
            "{:<18} {:>10.3} {:>8} {:>6.1}%",
            s.stage,
            s.seconds,
            s.calls,
            100.0 * s.seconds / p.wall_seconds.max(1e-9)
        );
    }
    println!(
        "wall {:.3} s, {:.3} s without I/O (the main thread's waits on reading and writing and the \
         output finish taken off); stages on other threads overlap, so they can sum to more{}",
        p.wall_seconds,
        p.wall_seconds_without_io,
        if p.exact { "" } else { " (GPU stages not synchronised)" }
    );
    if let (Some(up), Some(down)) = (p.device_bytes_up, p.device_bytes_down) {
        println!(
            "GPU transfers: {} uploaded, {} read back",
            human_bytes(up as usize),
            human_bytes(down as usize)
        );
    }
}

/// The quantization's share of the GPU transfers (the layers' own, summed) beside the rest (the
/// forward pass of the calibration and the evaluation, on a handle of their own), and the
/// quantization's bytes against one upload of each layer's `W` and `G` and one download of its
/// codes.
fn print_layer_traffic(report: &RunReport) {
    let (Some(up), Some(down)) = (
        report.profile.device_bytes_up,
        report.profile.device_bytes_down,
    ) else {
        return;
    };
    let layers = report
        .layers
        .iter()
        .map(|l| (l.shape, l.device_bytes_up, l.device_bytes_down));
    let Some(((lu, ld), floor)) = comq_gpu::pipeline::layers_traffic(layers) else {
        return;
    };
    println!(
        "GPU transfers of the layers: {} uploaded, {} read back ({:.2}× one upload of W and G \
         and one download of the codes); the rest (calibration and evaluation): {} uploaded, {} \
         read back",
        human_bytes(lu as usize),
        human_bytes(ld as usize),
        (lu + ld) as f64 / floor.max(1) as f64,
        human_bytes(up.saturating_sub(lu) as usize),
        human_bytes(down.saturating_sub(ld) as usize)
    );
}

/// The per-layer table of a run (with a search, the held-out errors and the shipped candidate).
pub(super) fn print_layer_table(report: &RunReport) {
    // With a search, the held-out errors and the shipped candidate follow.
    let searched = report.layers.iter().any(|l| l.chosen.is_some());
    let held = report.layers.iter().any(|l| l.rel_error_holdout.is_some());
    let extra = match (searched, held) {
        (true, true) => format!(" {:>12} {:>12}  chosen", "held COMQ", "held RTN"),
        (true, false) => "  chosen".to_string(),
        _ => String::new(),
    };
    println!(
        "{:<48} {:>13} {:>12} {:>12} {:>8} {:>8}{extra}",
        "layer", "shape", "err COMQ", "err RTN", "RTN/COMQ", "seconds"
    );
    let sci = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4e}"));
    for l in &report.layers {
        let ratio = if l.rel_error > 0.0 {
            l.rel_error_rtn / l.rel_error
        } else {
            f64::INFINITY
        };
        let extra = match (searched, held) {
            (true, true) => format!(
                " {:>12} {:>12}  {}",
                sci(l.rel_error_holdout),
                sci(l.rel_error_holdout_rtn),
                l.chosen.as_deref().unwrap_or("-")
            ),
            (true, false) => format!("  {}", l.chosen.as_deref().unwrap_or("-")),
            _ => String::new(),
        };
        println!(
            "{:<48} {:>13} {:>12.4e} {:>12.4e} {:>8.2} {:>8.3}{extra}",
            l.name,
            format!("{}x{}", l.shape[0], l.shape[1]),
            l.rel_error,
            l.rel_error_rtn,
            ratio,
            l.seconds
        );
    }
    let mixed = report
        .layers
        .iter()
        .filter(|l| !l.rows_from.is_empty())
        .count();
    if mixed > 0 {
        println!(
            "{mixed} of {} layers ship each row from its best candidate (--choose)",
            report.layers.len()
        );
    }
}

/// What `run` prints after the run: the layer table, the totals, the CPU re-runs, the profile
/// (with `--profile`), resumed layers, the outputs and the evaluation.
pub(super) fn run_summary(report: &RunReport, profile: bool) {
    print_layer_table(report);
    let t = &report.totals;
    if t.layers == 0 {
        println!("no layer quantized: the rotated model written as it is (--rotate)");
    } else {
        println!(
            "{} layers, {} weights, mean relative error {:.4e} (RTN {:.4e}) in {:.2} s on {}{}",
            t.layers,
            t.weights,
            t.mean_rel_error,
            t.mean_rel_error_rtn,
            t.seconds,
            report.device,
            if report.data_free {
                " [data-free: G = I for some layers]"
            } else {
                ""
            }
        );
    }
    for l in report.layers.iter().filter(|l| l.verify_cpu.is_some()) {
        let v = l.verify_cpu.as_ref().expect("filtered");
        println!(
            "verify-cpu {}: {:.4}% of codes differ (max |dk| {}), CPU error {:.4e} vs {:.4e}",
            l.name,
            100.0 * v.code_disagreement,
            v.max_code_diff,
            v.rel_error_cpu,
            l.rel_error
        );
    }
    if profile {
        print_profile(&report.profile);
        let tried: usize = report.layers.iter().map(|l| l.candidates.len()).sum();
        if tried > 0 {
            println!(
                "candidates tried: {tried} over {} layers",
                report.layers.len()
            );
        }
        print_layer_traffic(report);
    }
    let resumed = report.layers.iter().filter(|l| l.resumed).count();
    if resumed > 0 {
        println!("{resumed} layers resumed from the work directory");
    }
    for (k, v) in &report.outputs {
        println!("wrote {k}: {v}");
    }
    if let Some(e) = &report.eval {
        print!("{}", e.table());
    }
}

/// `inspect`'s table of tensors, with `bits` for the ones quantized.
pub(super) fn inspect_table(rows: &[InspectRow], bits: u32) {
    println!(
        "{:<56} {:>5} {:>16} {:>10} {:>10}  note",
        "tensor", "dtype", "shape", "before", "after"
    );
    for r in rows {
        println!(
            "{:<56} {:>5} {:>16} {:>10} {:>10}  {}",
            r.name,
            r.dtype,
            format!("{:?}", r.shape),
            human_bytes(r.bytes),
            human_bytes(r.bytes_after),
            if r.quantize {
                format!("quantize to {bits} bits")
            } else {
                r.reason.unwrap_or("").to_string()
            }
        );
    }
    let before: usize = rows.iter().map(|r| r.bytes).sum();
    let after: usize = rows.iter().map(|r| r.bytes_after).sum();
    println!(
        "{} tensors, {} to quantize; {} -> {} ({:.2}x smaller)",
        rows.len(),
        rows.iter().filter(|r| r.quantize).count(),
        human_bytes(before),
        human_bytes(after),
        before as f64 / after.max(1) as f64
    );
}

/// `inspect --plan`'s table of layers and the run's peaks.
pub(super) fn plan_table(model: &std::path::Path, plan: &Preflight) {
    println!("plan for {} on {}", model.display(), plan.device);
    println!(
        "{:<44} {:>11} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "layer", "shape", "bits", "W", "G", "R", "device", "host", "calib N", "est s"
    );
    for l in &plan.layers {
        println!(
            "{:<44} {:>11} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            l.name,
            format!("{}x{}", l.shape[0], l.shape[1]),
            l.bits,
            human_bytes(l.w_bytes as usize),
            human_bytes(l.g_bytes as usize),
            human_bytes(l.residual_bytes as usize),
            human_bytes(l.device_bytes as usize),
            human_bytes(l.host_bytes as usize),
            l.calib_rows,
            l.est_seconds.map_or("-".into(), |s| format!("{s:.3}"))
        );
    }
    let opt = |v: Option<u64>| v.map_or("unknown".to_string(), |b| human_bytes(b as usize));
    println!(
        "peak device memory {} (budget {}), peak host memory {} (available {}), binding limit {}",
        human_bytes(plan.peak_device_bytes as usize),
        opt(plan.device_budget),
        human_bytes(plan.peak_host_bytes as usize),
        opt(plan.host_available),
        opt(plan.binding_limit)
    );
    if let Some(s) = plan.est_seconds {
        println!(
            "estimated time {s:.2} s (from a measured 128x256 layer on this device; I/O excluded)"
        );
    }
}

/// `devices`: each adapter with its key limits and features.
pub(super) fn adapters(list: &[AdapterSummary]) {
    if list.is_empty() {
        println!("no Vulkan, Metal or DX12 adapter found; comq-gpu will run on the CPU");
        return;
    }
    for (i, a) in list.iter().enumerate() {
        println!(
            "[{i}] {} ({}, {}, driver {} {})",
            a.name, a.backend, a.device_type, a.driver, a.driver_info
        );
        println!(
            "    max storage binding {}, max buffer {}, workgroup memory {} B, {} invocations/workgroup, features: {}",
            human_bytes(a.max_storage_binding as usize),
            human_bytes(a.max_buffer as usize),
            a.max_workgroup_storage,
            a.max_invocations,
            if a.features.is_empty() { "none".to_string() } else { a.features.join(", ") }
        );
    }
}

/// The header of `bench`'s layer table.
pub(super) fn bench_header() {
    println!(
        "{:>11} {:>10} {:>10} {:>9} {:>12} {:>8} {:>11} {:>11}",
        "shape", "CPU s", "GPU s", "speed-up", "codes diff", "max |dk|", "err", "err RTN"
    );
}

/// One line of `bench`'s layer table.
pub(super) fn bench_row(r: &BenchRow) {
    let fmt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    println!(
        "{:>11} {:>10} {:>10} {:>9} {:>12} {:>8} {:>11.4e} {:>11.4e}",
        format!("{}x{}", r.shape[0], r.shape[1]),
        fmt(r.cpu_seconds, 4),
        fmt(r.gpu_seconds, 4),
        r.speedup.map_or("-".into(), |s| format!("{s:.1}x")),
        r.code_disagreement
            .map_or("-".into(), |d| format!("{:.4}%", 100.0 * d)),
        r.max_code_diff.map_or("-".into(), |d| d.to_string()),
        r.rel_error,
        r.rel_error_rtn
    );
}

/// The header of `bench --kernels`.
pub(super) fn kernel_header() {
    println!(
        "{:>4} {:>11} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12} {:>10} {:>14}",
        "dev",
        "shape",
        "Gram s",
        "GFLOP/s",
        "greedy s",
        "G GB",
        "GB/s",
        "shared s",
        "GFLOP/s",
        "order s"
    );
}

/// One line of `bench --kernels`.
pub(super) fn kernel_row(r: &KernelRow) {
    println!(
        "{:>4} {:>11} {:>10.4} {:>10.1} {:>12.4} {:>10.2} {:>10.1} {:>12.4} {:>10.1} {:>9.4} {:>4}",
        r.device,
        format!("{}x{}", r.shape[0], r.shape[1]),
        r.gram_seconds,
        r.gram_flops / r.gram_seconds.max(1e-12) / 1e9,
        r.sweep_greedy_seconds,
        r.sweep_greedy_bytes / 1e9,
        r.sweep_greedy_bytes / r.sweep_greedy_seconds.max(1e-12) / 1e9,
        r.sweep_shared_seconds,
        r.sweep_shared_flops / r.sweep_shared_seconds.max(1e-12) / 1e9,
        r.order_seconds,
        if r.order_on_device { "dev" } else { "host" }
    );
}

/// One device's end-to-end run of `bench --model`, described by `what` (order and recipe).
pub(super) fn e2e_run(r: &E2eRow, bits: u32, order: &str, recipe: &str) {
    println!(
        "{} ({} blocks, {:.1} M linear weights), {} images, W{} {} order, {} recipe, on {}:",
        r.model,
        r.blocks,
        r.linear_params as f64 / 1e6,
        r.images,
        bits,
        order,
        recipe,
        r.device_name
    );
    for s in &r.stages {
        println!(
            "  {:<18} {:>10.3} s {:>8} calls",
            s.stage, s.seconds, s.calls
        );
    }
    println!(
        "  wall {:.3} s, without I/O {:.3} s, peak memory {}, mean layer error {:.4e}",
        r.wall_seconds,
        r.wall_seconds_without_io,
        r.peak_rss_bytes
            .map_or("unknown".into(), |b| human_bytes(b as usize)),
        r.mean_rel_error
    );
    if let (Some(up), Some(down)) = (r.device_bytes_up, r.device_bytes_down) {
        println!(
            "  GPU transfers: {} uploaded, {} read back",
            human_bytes(up as usize),
            human_bytes(down as usize)
        );
    }
    if let (Some((up, down)), Some(floor)) = (r.layers_bytes, r.layers_floor_bytes) {
        println!(
            "  of which the layers': {} uploaded, {} read back ({:.2}× one upload of W and G and \
             one download of the codes)",
            human_bytes(up as usize),
            human_bytes(down as usize),
            (up + down) as f64 / floor.max(1) as f64
        );
    }
    if let Some(c) = &r.calibration_memory {
        println!(
            "  planned calibration memory: {} on the device, {} on the host",
            human_bytes(c.device_bytes as usize),
            human_bytes(c.host_bytes as usize)
        );
    }
}

/// `bench --forward`'s table.
pub(super) fn forward_table(r: &ForwardRow) {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!(
        "{:<10} {:>7} {:>12} {:>12} {:>9} {:>12}",
        "model", "images", "CPU img/s", "GPU img/s", "speed-up", "CLS rel diff"
    );
    println!(
        "{:<10} {:>7} {:>12} {:>12} {:>9} {:>12}",
        r.model,
        r.images,
        f(r.cpu_images_per_s),
        f(r.gpu_images_per_s),
        r.speedup.map_or("-".into(), |s| format!("{s:.1}x")),
        r.cls_rel_diff.map_or("-".into(), |d| format!("{d:.2e}"))
    );
}

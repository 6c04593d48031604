//! `comq-gpu bench`: synthetic layers on the CPU and the GPU (the default), the kernels alone
//! (`--kernels`), the forward pass (`--forward`) or a whole run of a synthetic ViT (`--model`).

use anyhow::Result;
use comq_gpu::quant::QuantConfig;
use comq_gpu::recipe::parse_size;

use super::args::BenchArgs;
use super::print;

/// The name a flag takes `v` by (`--order shared`), for a child run's command line.
fn flag_value<T: clap::ValueEnum>(v: T) -> String {
    v.to_possible_value()
        .expect("every variant has a name")
        .get_name()
        .to_string()
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| anyhow::anyhow!("shape '{s}' is not OUTxIN"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

pub(super) fn bench_cmd(a: BenchArgs) -> Result<()> {
    if let Some(shape) = &a.forward {
        return forward_bench_cmd(&a, shape);
    }
    if let Some(shape) = &a.model {
        return e2e_bench_cmd(&a, shape);
    }
    if a.kernels {
        return kernel_bench_cmd(&a);
    }
    use comq_gpu::bench::{run_bench, VIT_B16_SHAPES, VIT_L16_SHAPES};
    let shapes = bench_shapes(
        &a,
        &[(64, 64), (96, 128), (128, 96)],
        &[&VIT_B16_SHAPES[..], &VIT_L16_SHAPES[..]].concat(),
    )?;
    let cfg = QuantConfig {
        bits: a.bits,
        sweeps: a.sweeps,
        order: a.order,
        ..QuantConfig::default()
    };
    cfg.validate()?;
    let gpu = bench_devices(&a)?;
    print::bench_header();
    let rows = run_bench(
        &shapes,
        &cfg,
        gpu.as_ref(),
        !a.no_cpu,
        a.repeats,
        print::bench_row,
    )?;
    if let Some(path) = a.json {
        comq_gpu::io::writer::write_atomic(&path, &serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

/// The layer shapes of a benchmark: `--shapes`, else `quick` with `--quick`, else `full`.
fn bench_shapes(
    a: &BenchArgs,
    quick: &[(usize, usize)],
    full: &[(usize, usize)],
) -> Result<Vec<(usize, usize)>> {
    if !a.shapes.is_empty() {
        a.shapes.iter().map(|s| parse_shape(s)).collect()
    } else if a.quick {
        Ok(quick.to_vec())
    } else {
        Ok(full.to_vec())
    }
}

/// Opens the GPU of a benchmark (unless `--no-gpu`) and says which devices will run.
fn bench_devices(a: &BenchArgs) -> Result<Option<comq_gpu::device::WgpuDevice>> {
    let gpu = if a.no_gpu {
        None
    } else {
        Some(comq_gpu::device::WgpuDevice::open(
            a.adapter.as_deref(),
            true,
        )?)
    };
    match &gpu {
        Some(g) => {
            use comq_gpu::Device;
            println!("GPU: {}", g.describe());
            if g.is_software() {
                println!("note: this is a software adapter; its times are not GPU performance");
            }
        }
        None => println!("GPU: not run"),
    }
    println!(
        "CPU: {} threads{}",
        rayon::current_num_threads(),
        if a.no_cpu { " (not run)" } else { "" }
    );
    Ok(gpu)
}

fn kernel_bench_cmd(a: &BenchArgs) -> Result<()> {
    use comq_gpu::bench::{run_kernel_bench, VIT_L16_SHAPES};
    let shapes = bench_shapes(a, &[(64, 64), (96, 128)], &VIT_L16_SHAPES)?;
    let gpu = bench_devices(a)?;
    print::kernel_header();
    let rows = run_kernel_bench(
        &shapes,
        a.gram_rows,
        gpu.as_ref(),
        !a.no_cpu,
        print::kernel_row,
    )?;
    println!(
        "floors: the Gram and the shared sweep at the card's FP32 peak FLOP rate, the greedy sweep's \
         G bytes at its memory bandwidth (compare the rates above with the card's datasheet)"
    );
    if let Some(path) = &a.json {
        comq_gpu::io::writer::write_atomic(path, &serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

fn e2e_bench_cmd(a: &BenchArgs, shape: &str) -> Result<()> {
    use comq_gpu::bench::{run_e2e, E2eOptions};
    let dtype = match a.dtype.to_ascii_lowercase().as_str() {
        "f32" => safetensors::Dtype::F32,
        "bf16" => safetensors::Dtype::BF16,
        other => {
            return Err(comq_gpu::Error::InvalidOption(format!(
                "--dtype {other}: one of f32, bf16"
            ))
            .into())
        }
    };
    let order = flag_value(a.order);
    if let Some(m) = &a.memory_limit {
        parse_size(m)?; // refused here, before any model is written
    }
    let o = E2eOptions {
        shape: shape.to_string(),
        blocks: a.blocks,
        images: a.images,
        dtype,
        work_dir: a
            .work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("comq-e2e-bench")),
        run_args: [
            "--preset",
            &flag_value(a.preset),
            "--bits",
            &a.bits.to_string(),
            "--sweeps",
            &a.sweeps.to_string(),
            "--order",
            &order,
        ]
        .map(String::from)
        .into_iter()
        .chain(
            a.memory_limit
                .iter()
                .flat_map(|m| ["--memory-limit".to_string(), m.clone()]),
        )
        .collect(),
    };
    std::fs::create_dir_all(&o.work_dir).map_err(|e| comq_gpu::Error::io(&o.work_dir, e))?;
    let devices: Vec<&str> = [(!a.no_gpu).then_some("gpu"), (!a.no_cpu).then_some("cpu")]
        .into_iter()
        .flatten()
        .collect();
    let mut rows = Vec::new();
    for d in devices {
        let r = run_e2e(&o, d)?;
        print::e2e_run(&r, a.bits, &order, &o.run_args[1]);
        rows.push(r);
    }
    if let [g, c] = &rows[..] {
        println!(
            "GPU vs CPU (I/O excluded): {:.1}x",
            c.wall_seconds_without_io / g.wall_seconds_without_io.max(1e-9)
        );
    }
    if let Some(path) = &a.json {
        comq_gpu::io::writer::write_atomic(path, &serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

fn forward_bench_cmd(a: &BenchArgs, shape: &str) -> Result<()> {
    let gpu = bench_devices(a)?;
    let r = comq_gpu::bench::run_forward_bench(shape, a.images, gpu.as_ref(), !a.no_cpu)?;
    print::forward_table(&r);
    if let Some(path) = &a.json {
        comq_gpu::io::writer::write_atomic(path, &serde_json::to_vec_pretty(&r)?)?;
    }
    Ok(())
}

//! `comq-gpu run`: the flags as [`RunOptions`], the run behind a progress bar, the summary.

use anyhow::Result;
use comq_gpu::pipeline::{self, Progress, RunOptions, RunReport};
use comq_gpu::recipe::parse_size;
use indicatif::{ProgressBar, ProgressStyle};

use super::args::RunArgs;
use super::print;

pub(super) fn run_cmd(a: RunArgs, quiet: bool) -> Result<()> {
    let profile = a.profile;
    let opts = run_options(a)?;
    let report = with_progress(quiet, |p| pipeline::run(&opts, p))?;
    if let Some(p) = &opts.plot {
        let title = format!(
            "{} — W{} {} on {}",
            report.model,
            report.options.bits,
            if report.options.sym { "sym" } else { "asym" },
            report.device.split(" (").next().unwrap_or("")
        );
        comq_gpu::plot::plot_errors(p, &title, &report.layers)?;
        if !quiet {
            println!("wrote plot: {}", p.display());
        }
    }
    if !quiet {
        print::run_summary(&report, profile);
    }
    Ok(())
}

/// The run's options: the preset resolved with the flags, then every other flag as given.
fn run_options(a: RunArgs) -> Result<RunOptions> {
    let recipe = a.quant.recipe()?;
    let resolved = a.quant.resolve()?;
    let choose = a.quant.preset().choose(&a.quant.choices()?);
    if let Some(p) = &a.plot {
        comq_gpu::plot::check_path(p)?;
    }
    let out = match (&a.out, &a.dequantized) {
        (None, None) => Some(pipeline::default_out(&a.model, &resolved.config)),
        _ => a.out.clone(),
    };
    let max_shard_size = match &a.max_shard_size {
        Some(t) => parse_size(t)?,
        None => pipeline::DEFAULT_MAX_SHARD_BYTES,
    };
    let mut o = RunOptions::new(a.model, resolved);
    o.choose = choose;
    o.calib = a.calib;
    o.data_free = a.data_free;
    o.selection = a.quant.selection()?;
    o.out = out;
    o.dequantized = a.dequantized;
    o.report = a.report;
    o.plot = a.plot;
    o.recipe = a.quant.config.clone();
    o.device = a.device.unwrap_or_default();
    o.adapter = a.adapter;
    o.max_shard_size = max_shard_size;
    o.overrides = recipe.overrides()?;
    o.memory_limit = a.memory_limit.as_deref().map(parse_size).transpose()?;
    o.resume = a.resume;
    o.work_dir = a.work_dir;
    o.verify_cpu = a.verify_cpu;
    o.images = a.images.map(|path| pipeline::ImageOptions {
        path,
        count: a.calib_count,
        seed: a.seed,
        mode: a.calib_mode,
        resize: a.pre.resize,
        crop: a.pre.crop,
        bundled: false,
    });
    o.eval = a.eval.map(|path| pipeline::EvalOptions {
        path,
        count: a.eval_count,
    });
    o.target_bits = a.target_bits;
    if let Some(m) = a.mixed_objective {
        o.mixed_objective = m;
    }
    o.equalize = a.equalize;
    o.rotate = a.rotate;
    o.augment = a.augment;
    o.profile = a.profile;
    o.allow_unused_tensors = a.allow_unused_tensors;
    Ok(o)
}

/// Runs `f` with a progress bar on standard error (hidden with `--quiet`).
fn with_progress(
    quiet: bool,
    f: impl FnOnce(&mut dyn FnMut(Progress<'_>)) -> comq_gpu::Result<RunReport>,
) -> Result<RunReport> {
    let bar = ProgressBar::hidden();
    if !quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} layers (ETA {eta}) {msg}",
        )
        .expect("valid template"),
    );
    let report = f(&mut |p| match p {
        Progress::Start { layers, device } => {
            bar.set_length(layers as u64);
            bar.println(format!("quantizing {layers} layers on {device}"));
        }
        Progress::LayerStart { name } => bar.set_message(name.to_string()),
        Progress::Stage { name, stage } => bar.set_message(format!("{stage}: {name}")),
        Progress::LayerDone(_) => bar.inc(1),
        Progress::Writing => bar.set_message("finishing outputs"),
    });
    bar.finish_and_clear();
    Ok(report?)
}

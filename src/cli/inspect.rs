//! `comq-gpu inspect`: a model's tensors and sizes before and after, or with `--plan` the
//! preflight plan of a run (memory per layer, estimated time), refused when it cannot fit.

use anyhow::Result;
use comq_gpu::io::Checkpoint;
use comq_gpu::pipeline::{self, RunOptions, Selection};
use comq_gpu::quant::{QuantConfig, Resolved};
use comq_gpu::recipe::{parse_size, Recipe};

use super::args::InspectArgs;
use super::print;

pub(super) fn inspect_cmd(a: InspectArgs) -> Result<()> {
    let model = Checkpoint::open(&a.model)?;
    let recipe = a.quant.recipe()?;
    let cfg = a.quant.config()?;
    cfg.validate()?;
    let sel = a.quant.selection()?;
    if a.plan {
        return plan_cmd(&a, model, cfg, sel, &recipe);
    }
    let rows = pipeline::inspect(&model, &sel, &cfg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print::inspect_table(&rows, cfg.bits);
        // What calibration from images would run: the recognised layout, or why there is none.
        match comq_gpu::model::VitSpec::detect(&model) {
            Ok(spec) => {
                println!("forward pass: {}", spec.summary());
                match comq_gpu::model::rotate::seed_of(&model) {
                    Ok(Some(seed)) => println!("rotation: already rotated (seed {seed})"),
                    Err(e) => println!("rotation: {e}"),
                    Ok(None) => match comq_gpu::model::rotate::check(&spec, &model) {
                        Ok(()) => println!("rotation: --rotate can be folded into this model"),
                        Err(e) => println!("rotation: {e}"),
                    },
                }
            }
            Err(e) => println!("forward pass: none ({e}); quantize with --calib or --data-free"),
        }
    }
    Ok(())
}

/// The preflight of a plain run (no search) of the model with these options on the device.
fn plan_cmd(
    a: &InspectArgs,
    model: Checkpoint,
    cfg: QuantConfig,
    sel: Selection,
    recipe: &Recipe,
) -> Result<()> {
    let plain = Resolved {
        config: cfg,
        search: None,
        holdout: 0.0,
    };
    let mut opts = RunOptions::new(a.model.clone(), plain);
    opts.data_free = a.calib.is_none();
    opts.calib = a.calib.clone();
    opts.selection = sel;
    opts.recipe = a.quant.config.clone();
    opts.device = a.device.unwrap_or_default();
    opts.adapter = a.adapter.clone();
    opts.overrides = recipe.overrides()?;
    opts.memory_limit = a.memory_limit.as_deref().map(parse_size).transpose()?;
    let calib = opts
        .calib
        .as_deref()
        .map(comq_gpu::io::Calibration::open)
        .transpose()?;
    let jobs = pipeline::job_list(&model, &opts, calib.as_ref())?;
    let dev = comq_gpu::AnyDevice::select(opts.device, opts.adapter.as_deref())?;
    let plan = comq_gpu::plan::preflight(
        &jobs,
        calib.as_ref(),
        &dev,
        opts.memory_limit,
        Some((128, 256)),
        None,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print::plan_table(model.path(), &plan);
    }
    plan.check()?;
    Ok(())
}

//! `comq-gpu eval`: accuracy and feature fidelity of a model on labelled images.

use anyhow::Result;

use super::args::EvalArgs;

pub(super) fn eval_cmd(a: EvalArgs) -> Result<()> {
    let report = comq_gpu::eval::evaluate(
        &a.model,
        a.reference.as_deref(),
        &a.images,
        a.count,
        (a.pre.resize, a.pre.crop),
        a.device.unwrap_or_default(),
        a.adapter.as_deref(),
        a.allow_unused_tensors,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

//! Where a run writes: its inputs and outputs for the guard, the work directory, output paths
//! and the side files written beside a checkpoint directory.

use super::encode::{packed_layout, scale_dtype_for};
use super::jobs::Job;
use super::options::RunOptions;
use crate::error::Error;
use crate::error::Result;
use crate::io::guard;
use crate::io::hfconfig::{self, ModuleScheme};
use crate::io::writer::ShardedWriter;
use crate::io::Checkpoint;
use crate::io::{PlannedTensor, TensorMeta};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::path::PathBuf;

/// Where a `--out`/`--dequantized` path puts its tensors: a path ending in `.safetensors` is the
/// file itself; anything else is a directory (created) holding `model.safetensors`.
pub fn resolve_output(path: &Path) -> Result<PathBuf> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Ok(path.to_path_buf());
    }
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
    Ok(path.join("model.safetensors"))
}

pub(super) fn output_file(p: &Path) -> PathBuf {
    if p.extension().is_some_and(|e| e == "safetensors") {
        p.to_path_buf()
    } else {
        p.join("model.safetensors")
    }
}

/// The work directory of a run with outputs: `--work-dir`, or `<first output>.work`.
pub(super) fn work_dir_of(opts: &RunOptions) -> Option<PathBuf> {
    let first = opts.out.as_ref().or(opts.dequantized.as_ref())?;
    Some(opts.work_dir.clone().unwrap_or_else(|| {
        let mut d = first.as_os_str().to_owned();
        d.push(".work");
        PathBuf::from(d)
    }))
}

/// Every input of the run, for [`guard::check`]: the model's files and side files, the
/// calibration, the image sets, the recipe.
pub(super) fn run_inputs(opts: &RunOptions, model: &Checkpoint) -> Vec<guard::Input> {
    let mut v: Vec<guard::Input> = model
        .files()
        .into_iter()
        .map(|f| guard::Input::new("the model file", f))
        .collect();
    if opts.model.is_file() {
        v.push(guard::Input::new("the model", &opts.model));
    }
    for side in [
        "model.safetensors.index.json",
        "config.json",
        "preprocessor_config.json",
    ] {
        let p = model.dir().join(side);
        if p.is_file() {
            v.push(guard::Input::new("the model's", &p));
        }
    }
    let named = [
        ("--calib", opts.calib.as_deref()),
        (
            "--images",
            opts.images
                .as_ref()
                .filter(|i| !i.bundled)
                .map(|i| i.path.as_path()),
        ),
        ("--eval", opts.eval.as_ref().map(|e| e.path.as_path())),
        ("--config", opts.recipe.as_deref()),
    ];
    for (flag, p) in named {
        if let Some(p) = p {
            v.push(guard::Input::new(flag, p));
        }
    }
    v
}

/// Every output of the run, work directory included.
pub(super) fn run_outputs(opts: &RunOptions) -> Vec<guard::Output> {
    use guard::{Output, OutputKind};
    let mut v = Vec::new();
    if let Some(p) = &opts.out {
        v.push(Output::new("--out", p, OutputKind::Checkpoint));
    }
    if let Some(p) = &opts.dequantized {
        v.push(Output::new("--dequantized", p, OutputKind::Checkpoint));
    }
    if let Some(p) = &opts.report {
        v.push(Output::new("--report", p, OutputKind::File));
    }
    if let Some(p) = &opts.plot {
        v.push(Output::new("--plot", p, OutputKind::File));
    }
    if let Some(w) = work_dir_of(opts) {
        v.push(Output::new("--work-dir", &w, OutputKind::WorkDir));
    }
    v
}

/// Checks every output against every input, the work directory against its contract, and
/// locks every output for the run — all before any compute.
pub(super) fn claim_outputs(opts: &RunOptions, model: &Checkpoint) -> Result<Vec<guard::Lock>> {
    let inputs = run_inputs(opts, model);
    let outputs = run_outputs(opts);
    guard::check(&inputs, &outputs)?;
    if let Some(w) = work_dir_of(opts) {
        crate::resume::check_work_dir(&w)?;
    }
    outputs.iter().map(guard::Lock::acquire).collect()
}

/// The tensor files behind an output's destination (the file itself, or the shards of an index).
pub(super) fn shard_files(dest: &Path, shards: usize) -> Vec<PathBuf> {
    if shards <= 1 || !dest.to_string_lossy().ends_with(".index.json") {
        return vec![dest.to_path_buf()];
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    let stem = dest
        .file_name()
        .map(|f| {
            f.to_string_lossy()
                .trim_end_matches(".safetensors.index.json")
                .to_string()
        })
        .unwrap_or_default();
    (1..=shards)
        .map(|i| dir.join(format!("{stem}-{i:05}-of-{shards:05}.safetensors")))
        .collect()
}

/// Writes `config.json` (with `quantization_config` when given) and copies the input's
/// `preprocessor_config.json` beside an output — unless the output sits in the input's own
/// directory, whose files are never touched.
pub(super) fn write_side_files(
    dir_mode: bool,
    dest: &Path,
    input_dir: &Path,
    input_config: &Path,
    qc: Option<serde_json::Value>,
    outputs: &mut BTreeMap<String, String>,
) -> Result<()> {
    let out_dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir_mode {
        log::info!(
            "{} is a single file, so no config.json is written beside it; pass a directory \
             (--out DIR) for a checkpoint transformers can load",
            dest.display()
        );
        return Ok(());
    }
    if guard::same_file(out_dir, input_dir) {
        log::warn!(
            "{} is in the input's directory, so no config.json is written beside it; \
             pass an output directory (--out DIR) for a checkpoint transformers can load",
            dest.display()
        );
        return Ok(());
    }
    let has_input_config = input_config.is_file();
    match qc {
        Some(qc) => hfconfig::write_config(out_dir, Some(input_config), qc)?,
        None if has_input_config => {
            let bytes = std::fs::read(input_config).map_err(|e| Error::io(input_config, e))?;
            crate::io::writer::write_atomic(&out_dir.join("config.json"), &bytes)?;
        }
        None => return Ok(()),
    }
    outputs.insert(
        format!("config:{}", dest.display()),
        out_dir.join("config.json").display().to_string(),
    );
    let pre = input_dir.join("preprocessor_config.json");
    if pre.is_file() {
        let bytes = std::fs::read(&pre).map_err(|e| Error::io(&pre, e))?;
        crate::io::writer::write_atomic(&out_dir.join("preprocessor_config.json"), &bytes)?;
    }
    Ok(())
}

/// With no output named, the packed checkpoint goes to the working directory as
/// `<model stem>.<comq|rtn>-w<bits>.safetensors`.
pub fn default_out(model: &Path, config: &crate::quant::QuantConfig) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let suffix = match config.method {
        crate::quant::Method::Rtn => "rtn",
        crate::quant::Method::Comq => "comq",
    };
    PathBuf::from(format!("{stem}.{suffix}-w{}.safetensors", config.bits))
}

/// Opens the packed (`--out`) and dequantized (`--dequantized`) writers with every tensor
/// planned: the packed one lays each job's weight out as compressed-tensors tensors, the
/// dequantized one keeps the input's names, shapes and dtypes.
pub(super) fn open_writers(
    opts: &RunOptions,
    model: &Checkpoint,
    jobs: &[Job],
    meta: &BTreeMap<String, String>,
) -> Result<(Option<ShardedWriter>, Option<ShardedWriter>)> {
    let same = |t: &TensorMeta| PlannedTensor {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
    };
    let open = |path: &Path, planned: Vec<PlannedTensor>| -> Result<ShardedWriter> {
        ShardedWriter::create(&resolve_output(path)?, planned, opts.max_shard_size, meta)
    };
    let packed = match &opts.out {
        Some(path) => {
            let mut planned = Vec::new();
            for t in model.tensors() {
                match jobs.iter().find(|j| j.meta.name == t.name) {
                    Some(j) => planned.extend(packed_layout(
                        &j.prefix,
                        j.rows,
                        j.cols,
                        &j.config,
                        scale_dtype_for(t.dtype).1,
                    )),
                    None => planned.push(same(t)),
                }
            }
            Some(open(path, planned)?)
        }
        None => None,
    };
    let dequant = match &opts.dequantized {
        Some(path) => Some(open(path, model.tensors().iter().map(same).collect())?),
        None => None,
    };
    Ok((packed, dequant))
}

/// Finishes both writers (final metadata, sync, rename, index), writes the side files of a
/// checkpoint directory, and returns the outputs by kind and every file written.
pub(super) fn finish_writers(
    opts: &RunOptions,
    model: &Checkpoint,
    jobs: &[Job],
    packed: Option<ShardedWriter>,
    dequant: Option<ShardedWriter>,
    meta: &BTreeMap<String, String>,
) -> Result<(BTreeMap<String, String>, Vec<PathBuf>)> {
    let mut outputs = BTreeMap::new();
    let mut written: Vec<PathBuf> = Vec::new();
    let input_config = model.dir().join("config.json");
    if let Some(w) = packed {
        let dest = w.dest().to_path_buf();
        let shards = w.shards();
        w.finish(meta)?;
        outputs.insert("packed".into(), dest.display().to_string());
        written.extend(shard_files(&dest, shards));
        let modules: BTreeMap<String, ModuleScheme> = jobs
            .iter()
            .map(|j| {
                let s = ModuleScheme {
                    bits: j.config.bits,
                    group_size: j.config.group_size,
                    sym: j.config.sym,
                };
                (j.prefix.clone(), s)
            })
            .collect();
        let quantized: BTreeSet<&str> = jobs.iter().map(|j| j.meta.name.as_str()).collect();
        let ignore: Vec<String> = model
            .tensors()
            .iter()
            .filter(|t| {
                t.name.ends_with(".weight")
                    && t.shape.len() == 2
                    && !quantized.contains(t.name.as_str())
            })
            .map(|t| t.name.trim_end_matches(".weight").to_string())
            .collect();
        let qc = hfconfig::quantization_config(&modules, &ignore);
        let dir_mode = opts.out.as_deref().is_some_and(|p| output_file(p) != p);
        write_side_files(
            dir_mode,
            &dest,
            model.dir(),
            &input_config,
            Some(qc),
            &mut outputs,
        )?;
        if !opts.config.sym && dir_mode {
            log::warn!(
                "asymmetric pack-quantized output loads in vLLM and llm-compressor, but transformers' \
                 from_pretrained does not load it yet; pass --sym for a transformers-loadable checkpoint"
            );
        }
    }
    if let Some(w) = dequant {
        let dest = w.dest().to_path_buf();
        let shards = w.shards();
        w.finish(meta)?;
        outputs.insert("dequantized".into(), dest.display().to_string());
        written.extend(shard_files(&dest, shards));
        let dir_mode = opts
            .dequantized
            .as_deref()
            .is_some_and(|p| output_file(p) != p);
        write_side_files(
            dir_mode,
            &dest,
            model.dir(),
            &input_config,
            None,
            &mut outputs,
        )?;
    }
    Ok((outputs, written))
}

/// Opens both outputs (see [`open_writers`]) and writes every pass-through tensor straight
/// from the input map: all but the jobs' weights and the LayerNorms that `--equalize` folds
/// (`deferred`), which are written once their scales are known.
pub(super) fn open_outputs(
    opts: &RunOptions,
    model: &Checkpoint,
    jobs: &[Job],
    deferred: &std::collections::BTreeSet<String>,
    meta: &BTreeMap<String, String>,
    profile: &crate::profile::Profile,
) -> Result<(Option<ShardedWriter>, Option<ShardedWriter>)> {
    let (mut packed, mut dequant) = open_writers(opts, model, jobs, meta)?;
    let t = std::time::Instant::now();
    for t in model.tensors() {
        if jobs.iter().any(|j| j.meta.name == t.name) || deferred.contains(&t.name) {
            continue;
        }
        for w in [packed.as_mut(), dequant.as_mut()].into_iter().flatten() {
            w.write(&t.name, model.bytes(t))?;
        }
        model.release(t);
    }
    let pass = t.elapsed().as_secs_f64();
    profile.add("write", pass);
    profile.add("write wait", pass);
    Ok((packed, dequant))
}

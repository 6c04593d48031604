//! The `run` job: a safetensors model in, quantized checkpoints and a report out.
//!
//! Everything that can be checked before any compute is checked first — options, the layer
//! selection, every selected layer's shape and calibration, output paths — so a mistake costs
//! seconds, not an hour. Layers are then processed one at a time in file order: read (from the
//! map), Gram (from the calibration file), quantize (on the chosen device), write (at the planned
//! offsets). Peak memory is one layer's weights, Gram and outputs.

mod encode;
mod equalize;
mod evaluate;
pub mod jobs;
mod mixed;
pub mod options;
mod outputs;
pub mod preflight;
pub mod report;
mod vision;

pub use encode::scale_dtype_for;
use encode::{packed_plan, packed_tensors};
use equalize::{equalize_sites, site_scales};
use evaluate::evaluate;
pub use jobs::Job;
use mixed::allocate_bits;
use options::search_state;
pub use options::*;
pub use outputs::resolve_output;
use outputs::{claim_outputs, finish_writers, open_writers, work_dir_of};
pub use report::*;
use report::{calib_label, provenance};
use vision::{job_grams, Vision};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use safetensors::Dtype;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::calibrate::{Ahead, BlockGrams, CalibMode};
use crate::device::{AnyDevice, DeviceKind};
use crate::error::{Error, Result};
use crate::eval::Overrides;
use crate::io::calib::CalibKind;
use crate::io::writer::ShardedWriter;
use crate::io::{dtype, Calibration, Checkpoint};
use crate::model::Engine;
use crate::profile::Profile;
use crate::quant::search::Choice;
use crate::quant::{LayerOutcome, Method, QuantConfig, QuantizedLayer};

/// `g` on its own thread one block ahead when `fp` (see [`Ahead`]), else `g` itself.
fn ahead_of<'scope, 'env>(
    sc: &'scope std::thread::Scope<'scope, 'env>,
    g: Box<dyn BlockGrams + Send + 'env>,
    fp: bool,
    blocks: &[usize],
) -> Box<dyn BlockGrams + 'env> {
    if fp {
        Box::new(Ahead::spawn(sc, g, blocks.to_vec()))
    } else {
        g
    }
}

/// A message to the output writer thread.
enum Out {
    /// A tensor for both outputs, already encoded.
    Both(String, Vec<u8>),
    /// A quantized layer, packed by the writer.
    Packed {
        prefix: String,
        layer: QuantizedLayer,
        scale: Dtype,
        sym: bool,
    },
    /// A dequantized layer, encoded by the writer.
    Dequant {
        name: String,
        dtype: Dtype,
        values: Vec<f32>,
    },
}

impl Out {
    fn write(
        self,
        packed: Option<&mut ShardedWriter>,
        dequant: Option<&mut ShardedWriter>,
    ) -> Result<()> {
        match self {
            Out::Both(name, bytes) => {
                for w in [packed, dequant].into_iter().flatten() {
                    w.write(&name, &bytes)?;
                }
            }
            Out::Packed {
                prefix,
                layer,
                scale,
                sym,
            } => {
                if let Some(w) = packed {
                    for (name, bytes) in packed_tensors(&prefix, &layer, scale, sym)? {
                        w.write(&name, &bytes)?;
                    }
                }
            }
            Out::Dequant {
                name,
                dtype,
                values,
            } => {
                if let Some(w) = dequant {
                    let bytes =
                        dtype::from_f32(dtype, &values).expect("selected weights are float");
                    w.write(&name, &bytes)?;
                }
            }
        }
        Ok(())
    }
}

/// Progress events for a front end.
#[derive(Debug)]
pub enum Progress<'a> {
    /// The run starts with this many layers.
    Start {
        /// Layers to quantize.
        layers: usize,
        /// The device in use.
        device: &'a str,
    },
    /// A layer is about to start.
    LayerStart {
        /// Its name.
        name: &'a str,
    },
    /// A step within a layer: `read`, `calibration`, `quantize` or `write`.
    Stage {
        /// The layer.
        name: &'a str,
        /// The step.
        stage: &'static str,
    },
    /// A layer finished.
    LayerDone(&'a LayerReport),
    /// Outputs are being finished (metadata, sync, rename, hashes).
    Writing,
}

/// Plans the layers to quantize, checking everything that can be checked without compute.
pub fn plan(
    model: &Checkpoint,
    opts: &RunOptions,
    calib: Option<&Calibration>,
) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for t in model.tensors() {
        if opts.selection.decide(model.path(), t)? != Decision::Quantize {
            continue;
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let mut config = opts.config.clone();
        config.scale_dtype = scale_dtype_for(t.dtype).0;
        let mut skip = false;
        let mut bits_fixed = false;
        for o in opts
            .overrides
            .iter()
            .filter(|o| o.pattern.is_match(&t.name))
        {
            if let Some(b) = o.bits {
                config.bits = b;
                bits_fixed = true;
            }
            if let Some(g) = o.group_size {
                config.group_size = g;
            }
            skip |= o.skip;
        }
        if skip {
            continue;
        }
        config.validate()?;
        config.validate_for(&t.name, rows, cols)?;
        let prefix = t.name.trim_end_matches(".weight").to_string();
        let calib_kind = match calib {
            _ if opts.images.is_some() => Some(CalibKind::Images),
            Some(c) if c.kind(&prefix).is_some() || !opts.data_free => {
                Some(c.check(&prefix, cols)?)
            }
            _ if opts.data_free => None,
            _ => {
                return Err(Error::MissingCalibration {
                    layer: t.name.clone(),
                    prefix,
                    cols,
                })
            }
        };
        jobs.push(Job {
            meta: t.clone(),
            prefix,
            rows,
            cols,
            config,
            calib: calib_kind,
            block: None,
            bits_fixed,
        });
    }
    for o in &opts.overrides {
        if !model.tensors().iter().any(|t| o.pattern.is_match(&t.name)) {
            log::warn!(
                "recipe [[layer]] match '{}' matches no tensor of {}: it changes nothing",
                o.pattern.as_str(),
                model.path().display()
            );
        }
    }
    if jobs.is_empty() {
        return Err(Error::InvalidOption(format!(
            "no tensor of {} is selected for quantization (2-D float '*.weight' tensors not matching the skip pattern){}",
            model.path().display(),
            if opts.selection.only.is_some() { "; check --only" } else { "" }
        )));
    }
    Ok(jobs)
}

/// The options that decide a layer's codes, as one string for the resume fingerprint: every
/// field of [`RunOptions`] except those that only say where files go or what is reported, so
/// an option added later is covered unless it is listed here as harmless.
fn resume_identity(opts: &RunOptions) -> String {
    let mut o = opts.clone();
    // The inputs' paths and bytes are fingerprinted as files.
    o.model = PathBuf::new();
    o.calib = None;
    // Where outputs go, how they are split, what is reported and checked afterwards.
    o.out = None;
    o.dequantized = None;
    o.report = None;
    o.plot = None;
    o.recipe = None;
    o.max_shard_size = 0;
    o.resume = false;
    o.work_dir = None;
    o.verify_cpu = 0;
    o.eval = None;
    o.profile = false;
    // A smaller budget after an out-of-memory stop must still resume.
    o.memory_limit = None;
    format!("{o:?}")
}

/// Runs the whole job; `progress` receives events for a front end.
pub fn run(opts: &RunOptions, progress: &mut dyn FnMut(Progress<'_>)) -> Result<RunReport> {
    let started = Instant::now();
    let profile = Arc::new(Profile::new(opts.profile));
    opts.config.validate()?;
    let model = Checkpoint::open(&opts.model)?;
    let _locks = claim_outputs(opts, &model)?;
    let calib = opts.calib.as_deref().map(Calibration::open).transpose()?;
    let mut jobs = plan(&model, opts, calib.as_ref())?;
    // Images: the model's own forward pass produces the Gram matrices, block by block; the
    // layers are visited in block order. Image sets are opened before any compute so a bad
    // folder fails fast.
    let vision = if opts.images.is_some() || opts.eval.is_some() {
        Some(Vision::prepare(&model, opts, &mut jobs)?)
    } else {
        None
    };
    if opts.search.is_some() && opts.holdout > 0.0 && opts.images.is_none() {
        log::info!("--holdout needs --images; candidates are chosen on the calibration error");
    }
    let mut device = AnyDevice::select(opts.device, opts.adapter.as_deref())?;
    let mut device_name = device.describe();
    // Refuse before any compute when a layer cannot fit.
    self::preflight::preflight(
        &jobs,
        calib.as_ref(),
        &device,
        opts.memory_limit,
        None,
        search_state(opts),
    )?
    .check()?;
    let calib_memory = match (&vision, &opts.images) {
        (Some(v), Some(_)) => Some(self::preflight::check_calibration(opts, v, &jobs, &device)?),
        _ => None,
    };
    let mut mixed = None;
    if let Some(target) = opts.target_bits {
        progress(Progress::Stage {
            name: "mixed precision",
            stage: "probe",
        });
        let t_probe = Instant::now();
        let a = allocate_bits(
            opts,
            &model,
            calib.as_ref(),
            vision.as_ref(),
            &device,
            &jobs,
            target,
        )?;
        for (j, &b) in jobs.iter_mut().zip(&a.bits) {
            j.config.bits = b;
        }
        profile.add("probe", t_probe.elapsed().as_secs_f64());
        mixed = Some(a);
    }
    log::info!(
        "quantizing {} layers of {} on {device_name}",
        jobs.len(),
        model.path().display()
    );

    let mut meta = provenance(opts, &model, &device_name);
    meta.insert("comq.codes_sha256".into(), "0".repeat(64));
    let (mut packed, mut dequant) = open_writers(opts, &model, &jobs, &meta)?;
    // --equalize: the LayerNorms feeding fully selected qkv / fc1 layers are written once their
    // scales are known, not passed through.
    let eq_sites = equalize_sites(opts, vision.as_ref(), &jobs)?;
    let deferred: BTreeSet<String> = eq_sites
        .values()
        .flat_map(|site| [site.norm.0.clone(), site.norm.1.clone()])
        .collect();
    let mut eq_scales: HashMap<String, Vec<f32>> = HashMap::new();
    // Pass-through tensors go straight from the input map to the outputs.
    let t_pass = Instant::now();
    for t in model.tensors() {
        if jobs.iter().any(|j| j.meta.name == t.name) || deferred.contains(&t.name) {
            continue;
        }
        for w in [packed.as_mut(), dequant.as_mut()].into_iter().flatten() {
            w.write(&t.name, model.bytes(t))?;
        }
        model.release(t);
    }
    let pass = t_pass.elapsed().as_secs_f64();
    profile.add("write", pass);
    profile.add("write wait", pass);

    let work = match work_dir_of(opts) {
        Some(dir) => {
            let mut files: Vec<&Path> = model.files();
            files.extend(opts.calib.as_deref());
            files.extend(
                opts.images
                    .as_ref()
                    .map(|i| i.path.as_path())
                    .filter(|p| p.is_file()),
            );
            let fp = crate::resume::fingerprint(&files, &resume_identity(opts))?;
            Some(crate::resume::WorkDir::open(&dir, &fp, opts.resume)?)
        }
        None => None,
    };
    let verify_at: BTreeSet<usize> = if opts.verify_cpu > 0 && matches!(device, AnyDevice::Wgpu(_))
    {
        let k = opts.verify_cpu.min(jobs.len());
        (0..k)
            .map(|i| {
                if k == 1 {
                    0
                } else {
                    i * (jobs.len() - 1) / (k - 1)
                }
            })
            .collect()
    } else {
        if opts.verify_cpu > 0 {
            log::info!("--verify-cpu: the run is on the CPU already, nothing to verify");
        }
        BTreeSet::new()
    };
    progress(Progress::Start {
        layers: jobs.len(),
        device: &device_name,
    });
    let engine = match &vision {
        Some(_) => Some(Engine::for_device(&device)?),
        None => None,
    };
    let (grams_raw, holdout_raw) = match (&vision, &engine, &opts.images) {
        (Some(v), Some(e), Some(io)) => {
            progress(Progress::Stage {
                name: "calibration images",
                stage: "embed",
            });
            let (g, h) = v.calibrators(e, &model, io.mode, &profile)?;
            (Some(g), h)
        }
        _ => (None, None),
    };
    let mut comq_weights = Overrides::new();
    let mut rtn_weights = Overrides::new();
    let mut hasher = Sha256::new();
    let mut layers = Vec::with_capacity(jobs.len());
    // Full-precision calibration runs one block ahead on its own thread; the quantized mode
    // needs each block's quantized weights first, so it stays in step.
    let fp_mode = opts
        .images
        .as_ref()
        .is_some_and(|io| io.mode == CalibMode::Fp);
    let blocks_needed: Vec<usize> = jobs
        .iter()
        .filter_map(|j| j.block.map(|(b, _)| b))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let (has_packed, has_dequant) = (packed.is_some(), dequant.is_some());
    let (packed, dequant) = std::thread::scope(
        |sc| -> Result<(Option<ShardedWriter>, Option<ShardedWriter>)> {
            let mut grams = grams_raw.map(|g| ahead_of(sc, g, fp_mode, &blocks_needed));
            let mut holdout = holdout_raw.map(|g| ahead_of(sc, g, fp_mode, &blocks_needed));
            // The reader decodes the next layer's weights while this one is quantized (one ahead).
            let (read_tx, read_rx) = std::sync::mpsc::sync_channel::<Result<Vec<f32>>>(1);
            {
                let (jobs, model, profile) = (&jobs, &model, profile.clone());
                sc.spawn(move || {
                    for job in jobs {
                        let w = profile.time("read", || {
                            let w = model.read_f32(&job.meta);
                            model.release(&job.meta);
                            w
                        });
                        if read_tx.send(w).is_err() {
                            break;
                        }
                    }
                });
            }
            // The writer encodes and writes behind the quantization (two messages of slack).
            let (out_tx, out_rx) = std::sync::mpsc::sync_channel::<Out>(2);
            let writer = {
                let profile = profile.clone();
                let (mut packed, mut dequant) = (packed, dequant);
                sc.spawn(
                    move || -> Result<(Option<ShardedWriter>, Option<ShardedWriter>)> {
                        for msg in out_rx {
                            let t = Instant::now();
                            msg.write(packed.as_mut(), dequant.as_mut())?;
                            profile.add("write", t.elapsed().as_secs_f64());
                        }
                        Ok((packed, dequant))
                    },
                )
            };
            let send = |o: Out| -> Result<()> {
                let t = Instant::now();
                let sent = out_tx.send(o);
                profile.add("write wait", t.elapsed().as_secs_f64());
                sent.map_err(|_| Error::InvalidOption("the output writer stopped".into()))
            };
            let looped = (|| -> Result<()> {
                for (index, job) in jobs.iter().enumerate() {
                    progress(Progress::LayerStart {
                        name: &job.meta.name,
                    });
                    let fetched = {
                        let t = Instant::now();
                        let r = read_rx.recv();
                        profile.add("read wait", t.elapsed().as_secs_f64());
                        r.map_err(|_| Error::InvalidOption("the weight reader stopped".into()))?
                    };
                    let t0 = Instant::now();
                    // What a saved layer was computed from: a resume reuses it only for the
                    // same weight bytes (a same-size edit with the time stamp restored passes
                    // the file fingerprint, not this).
                    let weights_sha = match (&work, &fetched) {
                        (Some(_), Ok(w)) => Some(crate::resume::weights_digest(w)),
                        _ => None,
                    };
                    let saved = match (&work, opts.resume, &weights_sha) {
                        (Some(w), true, Some(h)) => {
                            w.load(index, &job.meta.name, job.rows, job.cols, h)?
                        }
                        _ => None,
                    };
                    let resumed = saved.is_some();
                    let mut verify = None;
                    let mut choice: Option<Choice> = None;
                    let (outcome, samples) = match saved {
                        Some(s) => {
                            log::info!("{}: resumed from the work directory", job.meta.name);
                            (s.outcome, s.samples)
                        }
                        None => {
                            progress(Progress::Stage {
                                name: &job.meta.name,
                                stage: "read",
                            });
                            let w = fetched?;
                            progress(Progress::Stage {
                                name: &job.meta.name,
                                stage: "calibration",
                            });
                            let t = Instant::now();
                            let (gram, held) =
                                job_grams(job, calib.as_ref(), &device, &mut grams, &mut holdout)?;
                            let secs = t.elapsed().as_secs_f64();
                            match job.calib {
                                // In step, the calibrator's own forward and gram stages hold this time.
                                Some(CalibKind::Images) if fp_mode => {
                                    profile.add("calibration wait", secs)
                                }
                                Some(CalibKind::Images) | None => {}
                                Some(_) => profile.add("gram", secs),
                            }
                            let t_quantize = Instant::now();
                            progress(Progress::Stage {
                                name: &job.meta.name,
                                stage: "quantize",
                            });
                            // RTN of the layer as it is in the input, for --eval's baseline row.
                            if opts.eval.is_some() {
                                let r = crate::quant::quantize_layer(
                                    &crate::device::CpuDevice::new(),
                                    &job.meta.name,
                                    &w,
                                    job.rows,
                                    job.cols,
                                    &gram,
                                    &QuantConfig {
                                        method: Method::Rtn,
                                        ..job.config.clone()
                                    },
                                )?;
                                rtn_weights.insert(job.meta.name.clone(), r.layer.dequantize());
                            }
                            let (w, gram, held) = match eq_sites.get(&job.prefix) {
                                Some(site) => {
                                    let key = site.norm.0.clone();
                                    if !eq_scales.contains_key(&key) {
                                        let s =
                                            site_scales(&model, site, &gram, &job.meta.name, &w)?;
                                        for (name, meta) in [&site.norm.0, &site.norm.1]
                                            .into_iter()
                                            .filter_map(|n| {
                                                model
                                                    .tensors()
                                                    .iter()
                                                    .find(|t| &t.name == n)
                                                    .map(|t| (n, t))
                                            })
                                        {
                                            let v = crate::quant::equalize::divide(
                                                &model.read_f32(meta)?,
                                                &s,
                                            );
                                            let bytes = dtype::from_f32(meta.dtype, &v).ok_or_else(|| {
                                    Error::InvalidOption(format!(
                                        "--equalize: LayerNorm tensor '{name}' is not a float tensor"
                                    ))
                                })?;
                                            send(Out::Both(name.clone(), bytes))?;
                                            comq_weights.insert(name.clone(), v);
                                        }
                                        eq_scales.insert(key.clone(), s);
                                    }
                                    let s = &eq_scales[&key];
                                    (
                                        crate::quant::equalize::scale_columns(&w, s),
                                        crate::quant::equalize::scale_gram(&gram, s),
                                        held.map(|h| crate::quant::equalize::scale_gram(&h, s)),
                                    )
                                }
                                None => (w, gram, held),
                            };
                            // A search needs data: with G = I every candidate is scored on the weights alone.
                            let plan = opts.search.as_ref().filter(|_| {
                                job.calib.is_some() && job.config.method == Method::Comq
                            });
                            let quantize =
                                |device: &AnyDevice| -> Result<(LayerOutcome, Option<Choice>)> {
                                    match plan {
                                        Some(p) => {
                                            let c = device.search(
                                                &job.meta.name,
                                                &w,
                                                job.rows,
                                                job.cols,
                                                &gram,
                                                held.as_ref(),
                                                &job.config,
                                                p,
                                            )?;
                                            Ok((c.outcome.clone(), Some(c)))
                                        }
                                        None => Ok((
                                            crate::quant::quantize_layer_any(
                                                device,
                                                &job.meta.name,
                                                &w,
                                                job.rows,
                                                job.cols,
                                                &gram,
                                                &job.config,
                                            )?,
                                            None,
                                        )),
                                    }
                                };
                            let (outcome, c) = match quantize(&device) {
                                Err(e @ Error::Gpu { .. }) if opts.device == DeviceKind::Auto => {
                                    log::warn!("{e}; --device auto continues on the CPU from this layer on");
                                    device = AnyDevice::Cpu(crate::device::CpuDevice::new());
                                    device_name = device.describe();
                                    quantize(&device)?
                                }
                                other => other?,
                            };
                            choice = c;
                            if verify_at.contains(&index) && matches!(device, AnyDevice::Wgpu(_)) {
                                let c =
                                    quantize(&AnyDevice::Cpu(crate::device::CpuDevice::new()))?.0;
                                let pairs = c.layer.codes.iter().zip(&outcome.layer.codes);
                                let differ = pairs.clone().filter(|(a, b)| a != b).count();
                                verify = Some(VerifyReport {
                                    code_disagreement: differ as f64
                                        / c.layer.codes.len().max(1) as f64,
                                    max_code_diff: pairs
                                        .map(|(a, b)| (a - b).abs())
                                        .max()
                                        .unwrap_or(0),
                                    rel_error_cpu: c.rel_error,
                                });
                            }
                            profile.add("quantize", t_quantize.elapsed().as_secs_f64());
                            if let Some(w) = &work {
                                w.save(
                                    index,
                                    &job.meta.name,
                                    &outcome,
                                    gram.samples,
                                    weights_sha.as_deref().unwrap_or_default(),
                                )?;
                            }
                            (outcome, gram.samples)
                        }
                    };
                    let q = &outcome.layer;
                    // The dequantized weights, computed once for whoever needs them.
                    let mut deq =
                        ((grams.is_some() && !fp_mode) || opts.eval.is_some() || has_dequant)
                            .then(|| q.dequantize());
                    if let (Some(g), Some((b, role)), Some(d)) = (grams.as_mut(), job.block, &deq) {
                        g.quantized(b, role, d);
                    }
                    if let (Some(g), Some((b, role)), Some(d)) = (holdout.as_mut(), job.block, &deq)
                    {
                        g.quantized(b, role, d);
                    }
                    if let (true, Some(d)) = (opts.eval.is_some(), &deq) {
                        comq_weights.insert(job.meta.name.clone(), d.clone());
                    }
                    progress(Progress::Stage {
                        name: &job.meta.name,
                        stage: "write",
                    });
                    hasher.update(job.meta.name.as_bytes());
                    hasher.update(
                        q.unsigned_codes()
                            .iter()
                            .map(|&c| c as u8)
                            .collect::<Vec<u8>>(),
                    );
                    if has_packed {
                        send(Out::Packed {
                            prefix: job.prefix.clone(),
                            // The report needs only the errors: the codes move.
                            layer: outcome.layer,
                            scale: scale_dtype_for(job.meta.dtype).1,
                            sym: job.config.sym,
                        })?;
                    }
                    if has_dequant {
                        send(Out::Dequant {
                            name: job.meta.name.clone(),
                            dtype: job.meta.dtype,
                            values: deq.take().expect("computed above"),
                        })?;
                    }
                    let report = LayerReport {
                        name: job.meta.name.clone(),
                        shape: [job.rows, job.cols],
                        bits: job.config.bits,
                        group_size: job.config.group_size,
                        rel_error: outcome.rel_error,
                        rel_error_rtn: outcome.rel_error_rtn,
                        loss_history: outcome.history.clone(),
                        seconds: t0.elapsed().as_secs_f64(),
                        device: device_name.clone(),
                        calibration: match job.calib {
                            Some(CalibKind::Input) => "input",
                            Some(CalibKind::Gram) => "gram",
                            Some(CalibKind::Images) => "images",
                            None => "identity",
                        },
                        samples,
                        peak_rss_bytes: peak_rss_bytes(),
                        resumed,
                        verify_cpu: verify,
                        chosen: choice.as_ref().map(|c| c.chosen.clone()),
                        rel_error_holdout: choice.as_ref().and_then(|c| c.rel_error_holdout),
                        rel_error_holdout_rtn: choice
                            .as_ref()
                            .and_then(|c| c.rel_error_holdout_rtn),
                        candidates: choice.map(|c| c.tried).unwrap_or_default(),
                    };
                    progress(Progress::LayerDone(&report));
                    layers.push(report);
                }
                Ok(())
            })();
            // Close the queues (the reader and the calibration threads stop at their next send), then
            // let the writer drain; its own error, if any, is the cause of a failed send.
            drop(out_tx);
            drop(read_rx);
            drop(grams);
            drop(holdout);
            let written = writer
                .join()
                .map_err(|_| Error::InvalidOption("the output writer panicked".into()))??;
            looped?;
            Ok(written)
        },
    )?;
    let t_eval = Instant::now();
    let eval = match (&vision, &engine, &opts.eval) {
        (Some(v), Some(e), Some(eo)) => {
            progress(Progress::Stage {
                name: "evaluation images",
                stage: "evaluate",
            });
            let bits = match &mixed {
                Some(m) => format!("{:.2} mixed", m.average_bits),
                None => opts.config.bits.to_string(),
            };
            Some(evaluate(
                v,
                e,
                eo,
                &model,
                &bits,
                &rtn_weights,
                &comq_weights,
            )?)
        }
        _ => None,
    };
    if eval.is_some() {
        profile.add("evaluate", t_eval.elapsed().as_secs_f64());
    }
    let codes_sha256: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    meta.insert("comq.codes_sha256".into(), codes_sha256.clone());
    progress(Progress::Writing);
    let t_finish = Instant::now();
    let (outputs, written) = finish_writers(opts, &model, &jobs, packed, dequant, &meta)?;
    if let Some(w) = work {
        w.remove()?;
    }
    let mut input_sha256 = BTreeMap::new();
    for f in model.files().into_iter().chain(opts.calib.as_deref()) {
        input_sha256.insert(f.display().to_string(), sha256_file(f)?);
    }
    let mut output_sha256 = BTreeMap::new();
    for f in &written {
        output_sha256.insert(f.display().to_string(), sha256_file(f)?);
    }
    profile.add("finish", t_finish.elapsed().as_secs_f64());
    let wall = started.elapsed().as_secs_f64();
    let n = layers.len() as f64;
    let report = RunReport {
        tool: "comq-gpu",
        version: env!("CARGO_PKG_VERSION"),
        model: opts.model.display().to_string(),
        device: device_name,
        options: opts.config.clone(),
        calibration: calib_label(opts),
        data_free: layers.iter().any(|l| l.calibration == "identity"),
        totals: Totals {
            layers: layers.len(),
            weights: layers.iter().map(|l| l.shape[0] * l.shape[1]).sum(),
            mean_rel_error: layers.iter().map(|l| l.rel_error).sum::<f64>() / n,
            mean_rel_error_rtn: layers.iter().map(|l| l.rel_error_rtn).sum::<f64>() / n,
            seconds: wall,
        },
        layers,
        codes_sha256,
        outputs,
        input_sha256,
        output_sha256,
        peak_rss_bytes: peak_rss_bytes(),
        eval,
        mixed_precision: mixed,
        search: opts.search.clone(),
        holdout: if vision.as_ref().is_some_and(|v| !v.holdout_idx.is_empty()) {
            opts.holdout
        } else {
            0.0
        },
        profile: profile.report(wall),
        calibration_memory: calib_memory,
    };
    if let Some(path) = &opts.report {
        let json = serde_json::to_vec_pretty(&report).expect("report serialises");
        crate::io::writer::write_atomic(path, &json)?;
    }
    Ok(report)
}

/// One tensor's line in `inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct InspectRow {
    /// Name.
    pub name: String,
    /// Dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Whether it would be quantized.
    pub quantize: bool,
    /// Why not, when not.
    pub reason: Option<&'static str>,
    /// Bytes in the input.
    pub bytes: usize,
    /// Bytes in the packed output.
    pub bytes_after: usize,
}

/// Lists the tensors of `model`, which would be quantized under `selection` and `cfg`, and sizes.
pub fn inspect(
    model: &Checkpoint,
    selection: &Selection,
    cfg: &QuantConfig,
) -> Result<Vec<InspectRow>> {
    let mut rows = Vec::new();
    for t in model.tensors() {
        let d = selection.decide(model.path(), t)?;
        let bytes = t.range.len();
        let (quantize, reason, after) = match d {
            Decision::Quantize => {
                let (r, c) = (t.shape[0], t.shape[1]);
                let mut lc = cfg.clone();
                if lc.group_size.is_some_and(|g| c % g != 0) {
                    lc.group_size = None;
                }
                let after = packed_plan("x", r, c, &lc, scale_dtype_for(t.dtype).1)
                    .iter()
                    .map(|p| p.nbytes())
                    .sum();
                (true, None, after)
            }
            Decision::Skip(why) => (false, Some(why), bytes),
        };
        rows.push(InspectRow {
            name: t.name.clone(),
            dtype: dtype::name(t.dtype),
            shape: t.shape.clone(),
            quantize,
            reason,
            bytes,
            bytes_after: after,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::search::SearchPlan;
    use regex::Regex;

    fn base() -> RunOptions {
        RunOptions {
            model: "m.safetensors".into(),
            calib: None,
            data_free: false,
            config: QuantConfig::default(),
            selection: Selection {
                only: None,
                skip: None,
            },
            out: Some("q.safetensors".into()),
            dequantized: None,
            report: None,
            plot: None,
            recipe: None,
            device: DeviceKind::Cpu,
            adapter: None,
            max_shard_size: DEFAULT_MAX_SHARD_BYTES,
            overrides: Vec::new(),
            resume: false,
            work_dir: None,
            verify_cpu: 0,
            memory_limit: None,
            images: Some(ImageOptions {
                path: "imgs".into(),
                count: 16,
                seed: 0,
                mode: CalibMode::Fp,
                resize: None,
                crop: None,
            }),
            eval: None,
            search: None,
            holdout: 0.0,
            target_bits: None,
            equalize: false,
            profile: false,
        }
    }

    #[test]
    fn every_option_that_changes_the_codes_changes_the_resume_identity() {
        let b = resume_identity(&base());
        type Change = fn(&mut RunOptions);
        let changes: Vec<(&str, Change)> = vec![
            ("data_free", |o| o.data_free = true),
            ("bits", |o| o.config.bits = 3),
            ("sym", |o| o.config.sym = true),
            ("group_size", |o| o.config.group_size = Some(32)),
            ("scalar", |o| o.config.scalar = 0.9),
            ("sweeps", |o| o.config.sweeps = 2),
            ("order", |o| {
                o.config.order = crate::quant::OrderKind::Natural
            }),
            ("scale_update", |o| o.config.scale_update = true),
            ("method", |o| o.config.method = Method::Rtn),
            ("damp", |o| o.config.damp = 0.5),
            ("act_order", |o| o.config.act_order = !o.config.act_order),
            ("only", |o| {
                o.selection.only = Some(Regex::new("qkv").unwrap())
            }),
            ("skip", |o| {
                o.selection.skip = Some(Regex::new("head").unwrap())
            }),
            ("device", |o| o.device = DeviceKind::Gpu),
            ("adapter", |o| o.adapter = Some("nvidia".into())),
            ("overrides", |o| {
                o.overrides.push(LayerOverride {
                    pattern: Regex::new("fc2").unwrap(),
                    bits: Some(8),
                    group_size: None,
                    skip: false,
                })
            }),
            ("images", |o| o.images = None),
            ("calib_count", |o| o.images.as_mut().unwrap().count = 8),
            ("seed", |o| o.images.as_mut().unwrap().seed = 1),
            ("calib_mode", |o| {
                o.images.as_mut().unwrap().mode = CalibMode::Quantized
            }),
            ("resize", |o| o.images.as_mut().unwrap().resize = Some(256)),
            ("crop", |o| o.images.as_mut().unwrap().crop = Some(224)),
            ("search", |o| {
                o.search = Some(SearchPlan::single(&QuantConfig::default()))
            }),
            ("holdout", |o| o.holdout = 0.15),
            ("target_bits", |o| o.target_bits = Some(3.0)),
            ("equalize", |o| o.equalize = true),
        ];
        for (name, change) in changes {
            let mut o = base();
            change(&mut o);
            assert_ne!(resume_identity(&o), b, "{name} must change the fingerprint");
        }
        let harmless: Vec<(&str, Change)> = vec![
            ("out", |o| o.out = Some("elsewhere".into())),
            ("report", |o| o.report = Some("r.json".into())),
            ("plot", |o| o.plot = Some("p.png".into())),
            ("max_shard_size", |o| o.max_shard_size = 1 << 20),
            ("resume", |o| o.resume = true),
            ("work_dir", |o| o.work_dir = Some("w".into())),
            ("verify_cpu", |o| o.verify_cpu = 2),
            ("memory_limit", |o| o.memory_limit = Some(1 << 30)),
            ("profile", |o| o.profile = true),
            ("eval", |o| {
                o.eval = Some(EvalOptions {
                    path: "e".into(),
                    count: None,
                })
            }),
        ];
        for (name, change) in harmless {
            let mut o = base();
            change(&mut o);
            assert_eq!(
                resume_identity(&o),
                b,
                "{name} must not change the fingerprint"
            );
        }
    }
}

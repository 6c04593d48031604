//! The streaming stage: every job through [`super::layer::quantize_job`] inside one thread
//! scope, with the weights read one layer ahead, full-precision calibration one block ahead,
//! and the outputs encoded and written behind, each on its own thread over a bounded queue.

use std::collections::BTreeSet;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Instant;

use safetensors::Dtype;
use sha2::{Digest, Sha256};

use super::encode::{packed_tensors, scale_dtype_for};
use super::jobs::Job;
use super::layer::{
    held_share, layer_report, quantize_job, Calibrators, GramsAhead, LayerEnv, LayerState,
};
use super::report::LayerReport;
use super::vision::RawCalibrators;
use super::Progress;
use crate::calibrate::{Ahead, BlockGrams, BlockHook};
use crate::error::{Error, Result};
use crate::eval::SwappedWeights;
use crate::io::writer::ShardedWriter;
use crate::io::{dtype, Checkpoint};
use crate::profile::Profile;
use crate::quant::QuantizedLayer;

/// The two outputs of a run: packed (`--out`) and dequantized (`--dequantized`).
pub(super) type Writers = (Option<ShardedWriter>, Option<ShardedWriter>);

/// What the streaming stage gives back.
pub(super) struct Streamed {
    /// The writers, every tensor written, not yet finished.
    pub(super) writers: Writers,
    /// One line per job, in job order.
    pub(super) layers: Vec<LayerReport>,
    /// SHA-256 over every layer's name and unsigned codes, in job order.
    pub(super) codes_sha256: String,
    /// The COMQ weights (dequantized, and folded LayerNorms) for `--eval`.
    pub(super) comq_weights: SwappedWeights,
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
    fn write(self, (packed, dequant): &mut Writers) -> Result<()> {
        match self {
            Out::Both(name, bytes) => {
                for w in [packed.as_mut(), dequant.as_mut()].into_iter().flatten() {
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
                    let bytes = dtype::from_f32(dtype, &values).ok_or_else(|| {
                        Error::Internal(format!(
                            "layer '{name}' was planned with a non-float dtype"
                        ))
                    })?;
                    w.write(&name, &bytes)?;
                }
            }
        }
        Ok(())
    }
}

/// `g` on its own thread one block ahead when `fp` (see [`Ahead`]), running `then` with each
/// block's Grams there, else `g` itself.
fn ahead_of<'scope, 'env>(
    sc: &'scope std::thread::Scope<'scope, 'env>,
    g: Box<dyn BlockGrams + Send + 'env>,
    fp: bool,
    blocks: &[usize],
    then: Option<Box<BlockHook<'env>>>,
) -> Box<dyn BlockGrams + 'env> {
    if fp {
        Box::new(Ahead::spawn_with(sc, g, blocks.to_vec(), then))
    } else {
        g
    }
}

/// The hook that builds a block's GPTQ factors on the calibration thread, ahead of its layers
/// (`None` when no layer searches from a GPTQ start): one per (input, damping) its layers'
/// searches use, into `env.factors`. A failure is left to the layer, which reports it by name.
fn prefactor<'env>(
    env: &'env LayerEnv<'env>,
    jobs: &'env [Job],
    profile: &Arc<Profile>,
) -> Option<Box<BlockHook<'env>>> {
    let plan = env.opts.search.as_ref()?;
    let uses = |j: &Job| j.block.is_some() && j.config.gptq_start();
    if !jobs.iter().any(uses) {
        return None;
    }
    let (profile, factors, on_device) = (profile.clone(), env.factors, env.device_factors);
    Some(Box::new(move |block, grams| {
        let build = || {
            crate::profile::record("factor ahead", || {
                // The dampings each input's layers search, gathered first, so an input that
                // several layers read (`q`, `k`, `v`) is digested and factored once.
                let mut wanted: Vec<(crate::model::Site, bool, Vec<f32>)> = Vec::new();
                for j in jobs.iter().filter(|j| uses(j)) {
                    let Some((_, role)) = j.block.filter(|(b, _)| *b == block) else {
                        continue;
                    };
                    let (site, act) = (role.site(), j.config.act_order);
                    let i = match wanted.iter().position(|w| w.0 == site && w.1 == act) {
                        Some(i) => i,
                        None => {
                            wanted.push((site, act, Vec::new()));
                            wanted.len() - 1
                        }
                    };
                    for &d in std::iter::once(&j.config.damp).chain(&plan.damps) {
                        if !wanted[i].2.contains(&d) {
                            wanted[i].2.push(d);
                        }
                    }
                }
                for (site, act, damps) in &wanted {
                    let Some(gram) = grams.get(site).filter(|g| g.n > on_device) else {
                        continue;
                    };
                    if let Err(e) = factors.build_ahead(block, gram, damps, *act) {
                        log::debug!("factor ahead for {site:?} of block {block}: {e}");
                    }
                }
            })
        };
        crate::profile::with_current(&profile, build)
    }))
}

/// What [`grams_ahead`] reads of the run (the parts of [`LayerEnv`] another thread may share).
struct FileAhead<'a> {
    opts: &'a super::RunOptions,
    calib: Option<&'a crate::io::Calibration>,
    factors: &'a crate::quant::prefactor::FactorCache,
    /// [`LayerEnv::device_factors`].
    device_factors: usize,
}

/// A calibration file's Grams of `job` (`None` for a layer calibrated otherwise) and, when its
/// search starts from GPTQ, their factors at each damping it tries, into `env.factors` under the
/// job's index: what the layer would build itself, built ahead of it. A factor that fails is left
/// to the layer, which reports it by name.
fn grams_ahead(
    env: &FileAhead<'_>,
    device: &crate::device::AnyDevice,
    profile: &Profile,
    index: usize,
    job: &Job,
) -> GramsAhead {
    use crate::io::calib::CalibKind;
    if !matches!(job.calib, Some(CalibKind::Input | CalibKind::Gram)) {
        return None;
    }
    let grams = profile.time("gram", || {
        super::vision::job_grams(
            job,
            env.calib,
            device,
            &mut None,
            &mut None,
            held_share(env.opts, job),
        )
    });
    if let (Ok((gram, _)), Some(plan)) = (&grams, &env.opts.search) {
        // A device that builds the factor itself needs none from the host.
        if job.config.gptq_start() && gram.n > env.device_factors {
            let mut damps = vec![job.config.damp];
            damps.extend(plan.damps.iter().filter(|&&d| d != job.config.damp));
            profile.time("factor ahead", || {
                if let Err(e) = env
                    .factors
                    .build_ahead(index, gram, &damps, job.config.act_order)
                {
                    log::debug!("factor ahead for {}: {e}", job.meta.name);
                }
            });
        }
    }
    Some(grams)
}

/// Quantizes every job in order and writes its codes behind, returning the writers with every
/// tensor in place. The full-precision calibrators (`env.fp_mode`) run one block ahead on their
/// own threads; the sequential mode needs each block's quantized weights first, so it stays in
/// step.
pub(super) fn quantize_all<'c>(
    env: &LayerEnv<'_>,
    state: &mut LayerState,
    jobs: &[Job],
    model: &Checkpoint,
    profile: &Arc<Profile>,
    raw: RawCalibrators<'c>,
    writers: Writers,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Streamed> {
    let blocks: Vec<usize> = jobs
        .iter()
        .filter_map(|j| j.block.map(|(b, _)| b))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let (has_packed, has_dequant) = (writers.0.is_some(), writers.1.is_some());
    let mut hasher = Sha256::new();
    let mut layers = Vec::with_capacity(jobs.len());
    let mut comq_weights = SwappedWeights::new();
    let writers = std::thread::scope(|sc| -> Result<Writers> {
        let mut cal = Calibrators {
            grams: raw
                .0
                .map(|g| ahead_of(sc, g, env.fp_mode, &blocks, prefactor(env, jobs, profile))),
            holdout: raw.1.map(|g| ahead_of(sc, g, env.fp_mode, &blocks, None)),
        };
        // The reader decodes the next layer's weights while this one is quantized (one ahead).
        let (read_tx, read_rx) = sync_channel::<Result<Vec<f32>>>(1);
        {
            let profile = profile.clone();
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
        // A calibration file's Grams (and their factors) are built one layer ahead on their
        // own thread, with a second handle on the device: the channel has no slack, so the
        // thread builds the next layer's while this one is quantized, and no further.
        let grams_rx = env.grams_ahead.then(|| {
            let (tx, rx) = sync_channel::<GramsAhead>(0);
            let device = state.device.handle();
            let profile = profile.clone();
            let shared = FileAhead {
                opts: env.opts,
                calib: env.calib,
                factors: env.factors,
                device_factors: env.device_factors,
            };
            sc.spawn(move || {
                for (index, job) in jobs.iter().enumerate() {
                    let ahead = grams_ahead(&shared, &device, &profile, index, job);
                    if tx.send(ahead).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        // The writer encodes and writes behind the quantization (two messages of slack).
        let (out_tx, out_rx) = sync_channel::<Out>(2);
        let writer = {
            let profile = profile.clone();
            let mut writers = writers;
            sc.spawn(move || -> Result<Writers> {
                for msg in out_rx {
                    let t = Instant::now();
                    msg.write(&mut writers)?;
                    profile.add("write", t.elapsed().as_secs_f64());
                }
                Ok(writers)
            })
        };
        let send = |o: Out| -> Result<()> {
            let t = Instant::now();
            let sent = out_tx.send(o);
            profile.add("write wait", t.elapsed().as_secs_f64());
            sent.map_err(|_| Error::WorkerStopped("output writer"))
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
                    r.map_err(|_| Error::WorkerStopped("weight reader"))?
                };
                let ahead = match &grams_rx {
                    Some(rx) => {
                        let t = Instant::now();
                        let r = rx.recv();
                        profile.add("calibration wait", t.elapsed().as_secs_f64());
                        r.map_err(|_| Error::WorkerStopped("calibration file reader"))?
                    }
                    None => None,
                };
                let t0 = Instant::now();
                let done = crate::profile::with_current(profile, || {
                    quantize_job(env, state, &mut cal, index, job, fetched, ahead, progress)
                })?;
                for f in &done.folded {
                    send(Out::Both(f.name.clone(), f.bytes.clone()))?;
                    comq_weights.insert(f.name.clone(), f.values.clone());
                }
                let q = &done.outcome.layer;
                // The dequantized weights, computed once for whoever needs them.
                let needs_deq =
                    (cal.grams.is_some() && !env.fp_mode) || env.opts.eval.is_some() || has_dequant;
                let mut deq = needs_deq.then(|| q.dequantize());
                if let Some(d) = &deq {
                    cal.quantized(job, d);
                    if env.opts.eval.is_some() {
                        comq_weights.insert(job.meta.name.clone(), d.clone());
                    }
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
                // Seconds are set once the layer is handed to the writer.
                let mut report = layer_report(job, &done, 0.0, &state.device_name);
                if has_packed {
                    send(Out::Packed {
                        prefix: job.prefix.clone(),
                        // The report has what it needs: the codes move.
                        layer: done.outcome.layer,
                        scale: scale_dtype_for(job.meta.dtype).1,
                        sym: job.config.sym,
                    })?;
                }
                if let (true, Some(values)) = (has_dequant, deq.take()) {
                    send(Out::Dequant {
                        name: job.meta.name.clone(),
                        dtype: job.meta.dtype,
                        values,
                    })?;
                }
                report.seconds = t0.elapsed().as_secs_f64();
                progress(Progress::LayerDone(&report));
                layers.push(report);
            }
            Ok(())
        })();
        // Close the queues (the reader and the calibration threads stop at their next send),
        // then let the writer drain; its own error, if any, is the cause of a failed send.
        drop(out_tx);
        drop(read_rx);
        drop(grams_rx);
        drop(cal);
        let written = writer
            .join()
            .map_err(|_| Error::WorkerPanicked("output writer"))??;
        looped?;
        Ok(written)
    })?;
    Ok(Streamed {
        writers,
        layers,
        codes_sha256: crate::util::hex(&hasher.finalize()),
        comq_weights,
    })
}

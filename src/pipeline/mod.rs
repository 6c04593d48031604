//! The `run` job: a safetensors model in, quantized checkpoints and a report out.
//!
//! Everything that can be checked before any compute is checked first — options, the layer
//! selection, every selected layer's shape and calibration, output paths, memory — so a
//! mistake costs seconds, not an hour. Layers are then streamed one at a time: read (from the
//! map, one ahead), Gram (from the calibration file or the images, one block ahead), quantize
//! (on the chosen device), write (at the planned offsets, behind). [`run`] is the list of those
//! stages; each file of this folder is one of them:
//!
//! | stage | file |
//! |---|---|
//! | options and the job list | `options.rs`, `jobs.rs` |
//! | the calibration when none is named (bundled photos for a known ViT) | `calibration.rs` |
//! | open and check the inputs, the device, memory | `inputs.rs`, `preflight.rs`, `vision.rs` |
//! | `--target-bits` probe | `mixed.rs` |
//! | outputs opened, pass-through tensors written | `outputs.rs`, `encode.rs` |
//! | work directory (`--resume`) | `work.rs` |
//! | one layer: resume, Grams, equalise, quantize, verify | `layer.rs`, `equalize.rs` |
//! | the thread scope: reader, calibrators, writer | `stream.rs` |
//! | `--eval` | `evaluate.rs` |
//! | outputs finished, hashes, the report | `finish.rs`, `report.rs` |

mod calibration;
mod encode;
mod equalize;
mod evaluate;
mod finish;
mod inputs;
pub mod jobs;
mod layer;
mod mixed;
pub mod options;
mod outputs;
pub mod preflight;
pub mod report;
mod stream;
mod vision;
mod work;

use encode::packed_layout;
pub use encode::scale_dtype_for;
use equalize::{deferred_norms, equalize_sites};
use evaluate::evaluate_run;
use finish::{finish, Finished};
use inputs::Inputs;
pub use jobs::{job_list, Job};
use layer::{verify_indices, LayerEnv, LayerState};
pub use options::*;
use outputs::open_outputs;
pub use outputs::{default_out, resolve_output};
use report::provenance;
pub use report::*;
use vision::open_calibrators;
use work::open_work_dir;

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::calibrate::CalibMode;
use crate::device::AnyOps;
use crate::error::Result;
use crate::io::{dtype, Checkpoint};
use crate::profile::Profile;
use crate::quant::QuantConfig;

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

/// Runs the whole job; `progress` receives events for a front end. Each line is one stage, in
/// the order the data flows; the files of this folder are the stages.
pub fn run(opts: &RunOptions, progress: &mut dyn FnMut(Progress<'_>)) -> Result<RunReport> {
    let started = Instant::now();
    let opts = &*calibration::with_default_calibration(opts)?;
    let profile = Arc::new(Profile::new(opts.profile));
    let (mut inputs, device) = Inputs::open(opts)?;
    let mixed = mixed::probe(opts, &mut inputs, &device, &profile, progress)?;
    let (model, jobs, vision) = (&inputs.model, &inputs.jobs, inputs.vision.as_ref());
    let device_name = device.describe();
    log::info!(
        "quantizing {} layers of {} on {device_name}",
        jobs.len(),
        model.path().display()
    );
    let mut meta = provenance(opts, model, &device_name);
    meta.insert("comq.codes_sha256".into(), "0".repeat(64));
    let eq_sites = equalize_sites(opts, vision, jobs)?;
    let writers = open_outputs(
        opts,
        model,
        jobs,
        &deferred_norms(&eq_sites),
        &meta,
        &profile,
    )?;
    let work = open_work_dir(opts, model)?;
    let verify_at = verify_indices(opts, &device, jobs.len());
    progress(Progress::Start {
        layers: jobs.len(),
        device: &device_name,
    });
    // The forward pass (calibration beside the quantization, then evaluation) on a handle of
    // its own: each layer's transfers are then the quantization's alone.
    let engine = vision
        .map(|_| AnyOps::for_device(&device.handle()))
        .transpose()?;
    let calibrators = open_calibrators(opts, vision, engine.as_ref(), model, &profile, progress)?;
    let factors = crate::quant::prefactor::FactorCache::with_cap(inputs.factors_ahead);
    let widest = crate::device::wgpu::FACTOR_MAX_COLS;
    let device_factors = if device.builds_factors(widest) {
        widest
    } else {
        0
    };
    let env = LayerEnv {
        device_factors,
        factors: &factors,
        grams_ahead: inputs.grams_ahead,
        opts,
        model,
        calib: inputs.calib.as_ref(),
        work: work.as_ref(),
        eq_sites: &eq_sites,
        verify_at: &verify_at,
        profile: &profile,
        fp_mode: opts
            .images
            .as_ref()
            .is_some_and(|io| io.mode == CalibMode::Fp),
    };
    let bits = evaluate::bits_label(jobs, opts.config.bits);
    let mut state = LayerState::new(device);
    let streamed = stream::quantize_all(
        &env,
        &mut state,
        jobs,
        model,
        &profile,
        calibrators,
        writers,
        progress,
    )?;
    let eval = evaluate_run(
        opts,
        vision,
        engine.as_ref(),
        model,
        bits,
        &state.rtn_weights,
        &streamed.comq_weights,
        &profile,
        progress,
    )?;
    let done = Finished {
        streamed,
        meta,
        work,
        eval,
        mixed,
        device: state.device_name,
        traffic: state.device.total_traffic(),
        started,
    };
    finish(opts, &inputs, done, &profile, progress)
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
                let after = packed_layout("x", r, c, &lc, scale_dtype_for(t.dtype).1)
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
    use crate::device::DeviceKind;
    use std::path::{Path, PathBuf};

    /// Options of a small run on the CPU; tests change what they need.
    pub(super) fn base() -> RunOptions {
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
                bundled: false,
            }),
            eval: None,
            search: None,
            holdout: 0.0,
            choose: crate::quant::search::ChooseBy::Auto,
            target_bits: None,
            mixed_objective: MixedObjective::Output,
            equalize: false,
            augment: Augment::Off,
            rotate: false,
            profile: false,
            allow_unused_tensors: false,
        }
    }

    /// A two-layer float model in `dir` (`fc.weight` 8 × 16, `proj.weight` 4 × 8, a bias and
    /// a norm to pass through), opened.
    pub(super) fn tiny_model(dir: &Path) -> Checkpoint {
        let path = dir.join("tiny.safetensors");
        let mut rng = crate::util::rng::SplitMix::new(7);
        let mut tensor = |shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = rng.normals(n);
            (shape, bytemuck::cast_slice::<f32, u8>(&v).to_vec())
        };
        let named = [
            ("fc.weight", tensor(vec![8, 16])),
            ("fc.bias", tensor(vec![8])),
            ("proj.weight", tensor(vec![4, 8])),
            ("norm.weight", tensor(vec![16])),
        ];
        let views: Vec<_> = named
            .iter()
            .map(|(n, (shape, bytes))| {
                let v = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )
                .unwrap();
                (n.to_string(), v)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &path).unwrap();
        Checkpoint::open(&path).unwrap()
    }

    /// The tiny model in `dir` and options of a data-free run of it.
    fn data_free_tiny(dir: &Path) -> (Checkpoint, RunOptions) {
        let model = tiny_model(dir);
        let mut opts = base();
        opts.model = model.path().to_path_buf();
        opts.images = None;
        opts.data_free = true;
        (model, opts)
    }

    #[test]
    fn a_run_in_process_writes_both_outputs_and_reports_every_layer() {
        let dir = tempfile::tempdir().unwrap();
        let (model, mut opts) = data_free_tiny(dir.path());
        opts.out = Some(dir.path().join("q.safetensors"));
        opts.dequantized = Some(dir.path().join("d.safetensors"));
        opts.report = Some(dir.path().join("r.json"));
        opts.profile = true;
        let mut events = Vec::new();
        let r = run(&opts, &mut |p| {
            events.push(match p {
                Progress::Start { layers, .. } => format!("start {layers}"),
                Progress::LayerStart { name } => format!("layer {name}"),
                Progress::Stage { stage, .. } => stage.to_string(),
                Progress::LayerDone(l) => format!("done {}", l.name),
                Progress::Writing => "writing".into(),
            })
        })
        .unwrap();
        let names: Vec<&str> = r.layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["fc.weight", "proj.weight"]);
        assert_eq!(
            events[..7],
            [
                "start 2",
                "layer fc.weight",
                "read",
                "calibration",
                "quantize",
                "write",
                "done fc.weight"
            ]
        );
        assert_eq!(events.last().unwrap(), "writing");
        assert!(r.data_free && r.layers.iter().all(|l| l.calibration == "identity"));
        // The algorithm's own parts of the quantize stage are in the profile; no GPU, no bytes.
        let prepare = r.profile.stages.iter().find(|s| s.stage == "  prepare");
        assert_eq!(prepare.map(|s| s.calls), Some(2));
        assert!(r.layers.iter().all(|l| l.device_bytes_up.is_none()));
        assert_eq!(r.output_sha256.len(), 2);
        // The codes digest is the one stored in the outputs, and a second run gives the same.
        let q = Checkpoint::open(opts.out.as_ref().unwrap()).unwrap();
        assert_eq!(q.metadata()["comq.codes_sha256"], r.codes_sha256);
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(opts.report.as_ref().unwrap()).unwrap()).unwrap();
        assert_eq!(report["codes_sha256"], r.codes_sha256.as_str());
        // Pass-through tensors are copied byte for byte; the dequantized output keeps names.
        let d = Checkpoint::open(opts.dequantized.as_ref().unwrap()).unwrap();
        for name in ["fc.bias", "norm.weight"] {
            let a = model.tensors().iter().find(|t| t.name == name).unwrap();
            let b = d.tensors().iter().find(|t| t.name == name).unwrap();
            assert_eq!(model.bytes(a), d.bytes(b), "{name}");
        }
        assert!(d.tensors().iter().any(|t| t.name == "fc.weight"));
        let again = run(&opts, &mut |_| {}).unwrap();
        assert_eq!(again.codes_sha256, r.codes_sha256);
    }

    #[test]
    fn a_run_that_selects_nothing_is_refused_before_any_output() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut opts) = data_free_tiny(dir.path());
        opts.selection = Selection::new(Some("nothing-is-called-this"), None).unwrap();
        opts.out = Some(dir.path().join("q.safetensors"));
        let e = run(&opts, &mut |_| {}).unwrap_err();
        assert!(
            matches!(&e, crate::Error::InvalidOption(m) if m.contains("no tensor")),
            "{e}"
        );
        assert!(!dir.path().join("q.safetensors").exists());
    }

    #[test]
    fn an_unnamed_output_is_named_after_the_model_method_and_bits() {
        let cfg = QuantConfig::default();
        assert_eq!(
            default_out(Path::new("models/vit.safetensors"), &cfg),
            Path::new("vit.comq-w4.safetensors")
        );
        let rtn = QuantConfig {
            method: crate::quant::Method::Rtn,
            bits: 3,
            ..cfg
        };
        assert_eq!(
            default_out(Path::new("vit"), &rtn),
            Path::new("vit.rtn-w3.safetensors")
        );
    }

    /// The bundled Fashion-MNIST ViT, every layer selected, calibrated on `count` of its images.
    fn bundled_model_on_images(count: usize) -> RunOptions {
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
        let mut opts = base();
        opts.model = assets.join("fmnist-vit");
        opts.selection = Selection::default();
        opts.images = Some(ImageOptions {
            count,
            ..ImageOptions::new(assets.join("fmnist-images/calib.safetensors"))
        });
        opts
    }

    #[test]
    fn an_images_run_in_process_calibrates_probes_equalises_and_evaluates() {
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
        let dir = tempfile::tempdir().unwrap();
        let mut opts = bundled_model_on_images(16);
        opts.eval = Some(EvalOptions {
            path: assets.join("fmnist-images/test.safetensors"),
            count: Some(32),
        });
        opts.target_bits = Some(3.5);
        opts.equalize = true;
        opts.out = Some(dir.path().join("q.safetensors"));
        opts.dequantized = Some(dir.path().join("d.safetensors"));
        let r = run(&opts, &mut |_| {}).unwrap();
        assert!(!r.layers.is_empty());
        for l in &r.layers {
            assert_eq!(l.calibration, "images", "{}", l.name);
            assert!(l.samples > 0, "{}", l.name);
        }
        let m = r.mixed_precision.as_ref().unwrap();
        assert!(m.average_bits <= 3.5 + 1e-9, "{}", m.average_bits);
        assert_eq!(r.eval.as_ref().unwrap().rows.len(), 3);
        // The equalised LayerNorms ship divided by their scales: not the input's bytes.
        let input = Checkpoint::open(&opts.model).unwrap();
        let out = Checkpoint::open(opts.dequantized.as_ref().unwrap()).unwrap();
        let norm = "blocks.0.norm1.weight";
        let a = input.tensors().iter().find(|t| t.name == norm).unwrap();
        let b = out.tensors().iter().find(|t| t.name == norm).unwrap();
        assert_ne!(input.bytes(a), out.bytes(b));
    }

    /// `--augment 2` with a search: every image of both sets brings two seeded views, the
    /// held-out images' views stay out of the calibration set (disjoint by image), the layers
    /// see three times the tokens, and the report says so.
    #[test]
    fn augmented_views_triple_the_inputs_and_keep_the_sets_disjoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = bundled_model_on_images(12);
        opts.search = Some(crate::quant::search::SearchPlan::single(&opts.config));
        opts.holdout = 0.25;
        let model = Checkpoint::open(&opts.model).unwrap();
        let mut jobs = Vec::new();
        let plain = vision::Vision::prepare(&model, &opts, &mut jobs).unwrap();
        opts.augment = Augment::Views(2);
        let v = vision::Vision::prepare(&model, &opts, &mut jobs).unwrap();
        assert_eq!((v.calib_idx.len(), v.holdout_idx.len()), (9, 3));
        assert_eq!(v.calib_idx, plain.calib_idx);
        let (cal, held) = (v.views(&v.calib_idx), v.views(&v.holdout_idx));
        assert_eq!((cal.len(), held.len()), (27, 9));
        assert!(cal.iter().all(|c| held.iter().all(|h| h.image != c.image)));
        assert_eq!(cal.iter().filter(|c| c.aug.is_none()).count(), 9);
        opts.out = Some(dir.path().join("q.safetensors"));
        let r = run(&opts, &mut |_| {}).unwrap();
        opts.augment = Augment::Off;
        let r0 = run(&opts, &mut |_| {}).unwrap();
        assert!(
            r.calibration.contains("2 augmented views per image"),
            "{}",
            r.calibration
        );
        for (a, b) in r.layers.iter().zip(&r0.layers) {
            assert_eq!(a.samples, 3 * b.samples, "{}", a.name);
        }
    }

    /// `--augment` without calibration images is refused before any output, naming the option.
    #[test]
    fn augment_without_images_is_refused() {
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
        let dir = tempfile::tempdir().unwrap();
        let mut opts = base();
        opts.model = assets.join("tiny-vit.safetensors");
        opts.calib = Some(assets.join("tiny-vit.calib.safetensors"));
        opts.images = None;
        opts.augment = Augment::Auto;
        opts.out = Some(dir.path().join("q.safetensors"));
        let e = run(&opts, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("--augment") && e.contains("--images"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_known_vit_without_calibration_calibrates_on_the_bundled_photos() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = bundled_model_on_images(0);
        opts.images = None;
        opts.config.bits = 3;
        opts.out = Some(dir.path().join("q.safetensors"));
        let r = run(&opts, &mut |_| {}).unwrap();
        assert!(
            r.calibration.contains(crate::io::images::BUNDLED_PHOTOS),
            "{}",
            r.calibration
        );
        let n = crate::io::images::ImageSet::bundled().unwrap().len();
        assert!(
            r.calibration.starts_with(&format!("{n} images")),
            "{}",
            r.calibration
        );
        assert!(r
            .layers
            .iter()
            .all(|l| l.calibration == "images" && l.samples > 0));
        // A model the forward pass does not know still needs a calibration named.
        let tiny = tiny_model(dir.path());
        opts.model = tiny.path().to_path_buf();
        opts.out = Some(dir.path().join("t.safetensors"));
        let e = run(&opts, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("--images") && e.contains("--data-free"), "{e}");
    }

    /// A calibration file beside the tiny model: `fc.input` (64 activation rows of 16) and
    /// `proj.gram` (8 × 8).
    fn tiny_calibration(dir: &Path) -> PathBuf {
        let path = dir.join("calib.safetensors");
        let mut rng = crate::util::rng::SplitMix::new(3);
        let x = rng.normals(64 * 16);
        let y = rng.normals(32 * 8);
        let mut g = vec![0.0f32; 64];
        for r in 0..32 {
            for i in 0..8 {
                for j in 0..8 {
                    g[i * 8 + j] += y[r * 8 + i] * y[r * 8 + j];
                }
            }
        }
        let xb = bytemuck::cast_slice::<f32, u8>(&x).to_vec();
        let gb = bytemuck::cast_slice::<f32, u8>(&g).to_vec();
        let f32s = safetensors::Dtype::F32;
        let views = vec![
            (
                "fc.input".to_string(),
                safetensors::tensor::TensorView::new(f32s, vec![64, 16], &xb).unwrap(),
            ),
            (
                "proj.gram".to_string(),
                safetensors::tensor::TensorView::new(f32s, vec![8, 8], &gb).unwrap(),
            ),
        ];
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    }

    #[test]
    fn a_search_on_activations_holds_their_last_rows_out_and_grams_choose_on_calibration() {
        use crate::device::{AnyDevice, CpuDevice};
        use crate::io::Calibration;
        use crate::quant::{Choices, Preset};
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let calib = tiny_calibration(dir.path());
        // The split: the two Grams are the whole one's rows, the held-out one the last.
        let c = Calibration::open(&calib).unwrap();
        let cpu = AnyDevice::Cpu(CpuDevice::new());
        let whole = c.gram("fc", 16, &cpu).unwrap();
        let (cal, held) = c.gram_with_holdout("fc", 16, &cpu, 0.25).unwrap();
        let held = held.unwrap();
        assert_eq!((cal.samples, held.samples), (48, 16));
        for ((a, b), w) in cal.data.iter().zip(&held.data).zip(&whole.data) {
            assert!(
                (a + b - w).abs() <= 1e-9 * w.abs().max(1.0),
                "{a} + {b} != {w}"
            );
        }
        // Too few rows left for a full-rank calibration Gram, a Gram file, or no share: none.
        assert!(c
            .gram_with_holdout("fc", 16, &cpu, 0.9)
            .unwrap()
            .1
            .is_none());
        assert!(c
            .gram_with_holdout("proj", 8, &cpu, 0.25)
            .unwrap()
            .1
            .is_none());
        assert!(c
            .gram_with_holdout("fc", 16, &cpu, 0.0)
            .unwrap()
            .1
            .is_none());

        // A default-recipe run: the activations' layer chooses on held-out rows, the Gram's on
        // its calibration error, and the report says a share was held out.
        let mut opts = RunOptions::new(
            model.path().to_path_buf(),
            Preset::Default.resolve(&Choices::default()).unwrap(),
        );
        opts.calib = Some(calib.clone());
        opts.selection = Selection::new(None, Some("nothing")).unwrap();
        opts.device = DeviceKind::Cpu;
        opts.out = Some(dir.path().join("q.safetensors"));
        let r = run(&opts, &mut |_| {}).unwrap();
        let fc = r.layers.iter().find(|l| l.name == "fc.weight").unwrap();
        let proj = r.layers.iter().find(|l| l.name == "proj.weight").unwrap();
        assert!(fc.rel_error_holdout.is_some() && fc.samples == 54, "{fc:?}");
        assert!(proj.rel_error_holdout.is_none());
        assert_eq!(r.holdout, opts.holdout);
        // The paper recipe holds nothing out.
        let mut paper = opts.clone();
        let p = Preset::Paper.resolve(&Choices::default()).unwrap();
        (paper.config, paper.search, paper.holdout) = (p.config, p.search, p.holdout);
        paper.out = Some(dir.path().join("p.safetensors"));
        let r = run(&paper, &mut |_| {}).unwrap();
        assert!(r.layers.iter().all(|l| l.rel_error_holdout.is_none()));
        assert_eq!(r.holdout, 0.0);
    }
}

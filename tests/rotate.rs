//! `--rotate`: the rotation is orthogonal and keeps the all-ones vector; the rotated model (the
//! overlay a run reads, every tensor f32) computes the original network's logits; models whose
//! features would come out rotated, or whose calibration could not follow, are refused; a run
//! leaves no temporary file behind.

mod common;

use std::path::{Path, PathBuf};

use comq_gpu::io::writer::TempFile;
use comq_gpu::io::Checkpoint;
use comq_gpu::model::cpu::CpuOps;
use comq_gpu::model::forward::{run_model, HostBlock, HostStem, Output};
use comq_gpu::model::rotate::{unrotate_features, write_rotated, Rotation};
use comq_gpu::model::{Family, VitSpec};

/// The rotated network's logits against the original's, relative (f32 weights rounded once
/// after an f64 rotation, then an f32 forward pass).
const SAME_FUNCTION_REL_TOL: f64 = 1e-5;

fn synthetic(dir: &Path, family: Family, classes: usize) -> PathBuf {
    common::small_vit(dir, family, classes, 4, 5, safetensors::Dtype::F32)
}

fn logits(model: &Checkpoint, pixels: &[f32], n: usize) -> Output {
    let spec = VitSpec::detect(model).unwrap();
    let stem = HostStem::load(model, &spec).unwrap();
    run_model(
        &CpuOps,
        &spec,
        &stem,
        &mut |b| HostBlock::load(model, &spec, &spec.blocks[b]),
        pixels,
        n,
    )
    .unwrap()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn the_rotation_is_orthogonal_and_keeps_the_ones_vector() {
    for (d, heads) in [(8, 2), (32, 4), (96, 3), (64, 1)] {
        let r = Rotation::new(d, heads, 3);
        let mut worst: f64 = 0.0;
        for i in 0..d {
            for j in 0..d {
                let dot: f64 = (0..d).map(|k| r.q[i * d + k] * r.q[j * d + k]).sum();
                worst = worst.max((dot - f64::from(u8::from(i == j))).abs());
            }
            let row: f64 = r.q[i * d..(i + 1) * d].iter().sum();
            assert!((row - 1.0).abs() < 1e-12, "Q·1 = 1 (row {i}: {row})");
        }
        assert!(worst < 1e-12, "QQᵀ = I within {worst:e}");
        assert_eq!(r.heads.len(), heads);
        let hd = d / heads;
        for rh in &r.heads {
            for i in 0..hd {
                for j in 0..hd {
                    let dot: f64 = (0..hd).map(|k| rh[i * hd + k] * rh[j * hd + k]).sum();
                    assert!((dot - f64::from(u8::from(i == j))).abs() < 1e-12);
                }
            }
        }
        // Not the identity: the rotation mixes every coordinate.
        assert!((0..d).all(|i| r.q[i * d + i].abs() < 0.99), "d = {d}");
        // Seeded: the same seed, the same matrix; another seed, another.
        assert_eq!(Rotation::new(d, heads, 3).q, r.q);
        assert_ne!(Rotation::new(d, heads, 4).q, r.q);
    }
}

fn check_same_function(path: &Path, px_side: usize, channels: usize) {
    check_same_function_within(path, px_side, channels, SAME_FUNCTION_REL_TOL)
}

fn check_same_function_within(path: &Path, px_side: usize, channels: usize, tol: f64) {
    let n = 3;
    let px = common::Rng::new(17).normals(n * channels * px_side * px_side);
    let original = Checkpoint::open(path).unwrap();
    let before = logits(&original, &px, n);
    let spec = VitSpec::detect(&original).unwrap();
    let mut rotated = Checkpoint::open(path).unwrap();
    let tmp_dir = tempfile::tempdir().unwrap();
    // Unique per call: tests run in parallel threads of one process (one pid).
    let temp = TempFile::in_temp_dir(&format!(
        "test-{}.safetensors",
        tmp_dir.path().file_name().unwrap().to_string_lossy()
    ));
    let dest = tmp_dir.path().join("rotated.safetensors");
    write_rotated(&original, &spec, 0, &dest).unwrap();
    std::fs::rename(&dest, temp.path()).unwrap();
    rotated.overlay(temp).unwrap();
    // Every tensor the forward pass reads changed (the rotation is not the identity)...
    for name in spec.used_tensors() {
        let (a, b) = (original.get(&name).unwrap(), rotated.get(&name).unwrap());
        assert_eq!(a.shape, b.shape, "{name}");
        let va = original.read_f32(a).unwrap();
        let vb = rotated.read_f32(b).unwrap();
        let unchanged = va == vb && !name.contains("norm") && !name.contains("layer_scale");
        assert!(
            !unchanged || va.iter().all(|v| *v == 0.0),
            "{name} was not rotated"
        );
    }
    // ...and the network is the same.
    let mut after = logits(&rotated, &px, n);
    assert!(!before.logits.is_empty());
    let e = rel(&after.logits, &before.logits);
    eprintln!("{}: logits {e:.2e}", path.display());
    assert!(e < tol, "{}: logits differ by {e:e}", path.display());
    // The pooled features are in the rotated basis until mapped back through the original's
    // final norm.
    assert!(rel(&after.cls, &before.cls) > 0.1);
    unrotate_features(&mut after.cls, &spec, &original, 0).unwrap();
    let e = rel(&after.cls, &before.cls);
    assert!(
        e < tol,
        "{}: features mapped back differ by {e:e}",
        path.display()
    );
}

#[test]
fn a_rotated_model_computes_the_original_logits() {
    for (family, classes) in [
        (Family::TimmVit, 5),
        (Family::TimmDeit, 5),
        (Family::HfVit, 3),
        (Family::HfDeit, 3),
        (Family::HfDinov2, 4),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = synthetic(dir.path(), family, classes);
        check_same_function(&path, 16, 3);
    }
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/fmnist-vit");
    let spec = VitSpec::detect(&Checkpoint::open(&bundled).unwrap()).unwrap();
    check_same_function(&bundled, spec.preprocess.crop, spec.preprocess.channels);
}

#[test]
fn a_bare_backbone_is_refused_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::HfDinov2, 0);
    let model = Checkpoint::open(&path).unwrap();
    let spec = VitSpec::detect(&model).unwrap();
    let err = write_rotated(&model, &spec, 0, &dir.path().join("r.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bare backbone"), "{err}");
    assert!(!dir.path().join("r.safetensors").exists());
}

#[test]
fn run_rotate_quantizes_and_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(&dir.path().join("m"), Family::TimmVit, 5);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = dir.path().join("q.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_comq-gpu"))
        .args([
            "run",
            common::s(&path),
            "--data-free",
            "--rotate",
            "--device",
            "cpu",
        ])
        .args(["--dequantized", common::s(&out)])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the rotated copy is removed"
    );
    let q = Checkpoint::open(&out).unwrap();
    assert_eq!(
        q.metadata().get("comq.rotation").map(String::as_str),
        Some("residual stream and values, seed 0")
    );
    // The output is the same architecture: every tensor of the model, same shapes.
    let m = Checkpoint::open(&path).unwrap();
    assert_eq!(q.tensors().len(), m.tensors().len());
    for t in m.tensors() {
        assert_eq!(
            q.get(&t.name).map(|x| &x.shape),
            Some(&t.shape),
            "{}",
            t.name
        );
    }
    // Grams captured from the model as it is no longer fit a rotated one.
    let o = common::run(&[
        "run",
        common::s(&path),
        "--rotate",
        "--calib",
        common::s(&path),
        "--out",
        common::s(&dir.path().join("x.safetensors")),
    ]);
    common::assert_refused(&o, "--rotate");
}

#[test]
fn eval_compares_a_rotated_output_with_the_original_in_one_basis() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(&dir.path().join("m"), Family::HfDinov2, 4);
    let images = dir.path().join("img");
    common::png_folder(&images, 12, 9);
    let report = dir.path().join("report.json");
    let run_to = |name: &str, rotate: bool| -> PathBuf {
        let out = dir.path().join(name);
        let mut args = vec!["run", common::s(&path), "--images", common::s(&images)];
        args.extend(["--bits", "8", "--preset", "paper", "--device", "cpu"]);
        args.extend(["--dequantized", common::s(&out)]);
        args.extend(["--eval", common::s(&images), "--report", common::s(&report)]);
        if rotate {
            args.push("--rotate");
        }
        let o = common::run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    // Output folders, so config.json travels with the weights.
    let plain = run_to("plain", false);
    let rotated = run_to("rotated", true);
    // The run's own evaluation maps the rotated features back too: it agrees with eval's.
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let in_run = r["eval"]["rows"][2]["fidelity"]["rel_mse"]
        .as_f64()
        .unwrap();
    let cosine = |model: &Path, reference: &Path| -> f64 {
        let o = common::run(&[
            "eval",
            common::s(model),
            "--reference",
            common::s(reference),
            "--images",
            common::s(&images),
            "--device",
            "cpu",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let f = &v["rows"][1]["fidelity"];
        if model == rotated.as_path() {
            let alone = f["rel_mse"].as_f64().unwrap();
            assert!(
                (alone - in_run).abs() <= 1e-3 * in_run.max(1e-12),
                "rel MSE: run {in_run}, eval {alone}"
            );
        }
        f["cls_cosine"].as_f64().unwrap()
    };
    // 8-bit weights: both outputs stay close to the original, in its basis, either way round.
    for (m, r) in [(&rotated, &path), (&path, &rotated), (&plain, &path)] {
        let c = cosine(m, r);
        assert!(
            c > 0.999,
            "{} against {}: CLS cosine {c}",
            m.display(),
            r.display()
        );
    }
}

#[test]
fn a_half_precision_model_stays_in_its_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    let path = common::small_vit(&m, Family::TimmVit, 5, 4, 5, safetensors::Dtype::BF16);
    // Rotated in f64, rounded once to bf16: the network within bf16's rounding.
    check_same_function_within(&path, 16, 3, 2e-2);
    let out = dir.path().join("dq");
    let o = common::run(&[
        "run",
        common::s(&path),
        "--data-free",
        "--rotate",
        "--dequantized",
        common::s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (q, m) = (
        Checkpoint::open(&out).unwrap(),
        Checkpoint::open(&path).unwrap(),
    );
    for t in m.tensors() {
        assert_eq!(q.get(&t.name).map(|x| x.dtype), Some(t.dtype), "{}", t.name);
    }
}

#[test]
fn rotate_with_no_layer_selected_exports_the_rotated_model_with_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(&dir.path().join("m"), Family::HfDinov2, 4);
    let out = dir.path().join("fp");
    let report = dir.path().join("r.json");
    let o = common::run(&[
        "run",
        common::s(&path),
        "--rotate",
        "--data-free",
        "--only",
        "^$",
        "--dequantized",
        common::s(&out),
        "--report",
        common::s(&report),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["totals"]["layers"], 0);
    assert_eq!(r["totals"]["mean_rel_error"], 0.0);
    // The exported model is the same network, in the original's dtypes.
    let (m, x) = (
        Checkpoint::open(&path).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let px = common::Rng::new(4).normals(2 * 3 * 16 * 16);
    let (a, b) = (logits(&m, &px, 2), logits(&x, &px, 2));
    let e = rel(&b.logits, &a.logits);
    assert!(e < SAME_FUNCTION_REL_TOL, "exported logits differ by {e:e}");
    for t in m.tensors() {
        assert_eq!(x.get(&t.name).map(|y| y.dtype), Some(t.dtype), "{}", t.name);
    }
    // Without --rotate an empty selection is still a mistake.
    let o = common::run(&[
        "run",
        common::s(&path),
        "--data-free",
        "--only",
        "^$",
        "--dequantized",
        common::s(&dir.path().join("none")),
    ]);
    common::assert_refused(&o, "no tensor");
}

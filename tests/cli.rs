//! The `comq-gpu` binary end to end on fixture files the tests write, good and bad.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use comq_gpu::io::{pack, Model};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_comq-gpu"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_bad_input(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert!(
        err.contains(needle),
        "stderr should mention '{needle}': {err}"
    );
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn run_writes_packed_and_dequantized_checkpoints_and_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 16, 1);
    let before = std::fs::read(&model).unwrap();
    let out = dir.path().join("q.safetensors");
    let deq = dir.path().join("dq.safetensors");
    let rep = dir.path().join("report.json");
    let o = run(&[
        "run",
        s(&model),
        "--calib",
        s(&calib),
        "--device",
        "cpu",
        "--bits",
        "4",
        "--sweeps",
        "2",
        "--out",
        s(&out),
        "--dequantized",
        s(&deq),
        "--report",
        s(&rep),
        "--profile",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&model).unwrap(),
        before,
        "the input is never touched"
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("blocks.1.mlp.fc2.weight"), "{stdout}");
    assert!(stdout.contains("without I/O"), "{stdout}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    // The profile: reading and writing happen on their own threads, quantization on this one.
    let stages = report["profile"]["stages"].as_array().unwrap();
    for (stage, calls) in [("read", 8), ("quantize", 8), ("gram", 8)] {
        let st = stages.iter().find(|s| s["stage"] == stage).unwrap();
        assert_eq!(st["calls"], calls, "{stage}");
    }
    assert!(
        report["profile"]["wall_seconds_without_io"]
            .as_f64()
            .unwrap()
            <= report["profile"]["wall_seconds"].as_f64().unwrap()
    );
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(
        layers.len(),
        8,
        "qkv, proj, fc1, fc2 in two blocks; head and patch_embed skipped"
    );
    for l in layers {
        let (e, r) = (
            l["rel_error"].as_f64().unwrap(),
            l["rel_error_rtn"].as_f64().unwrap(),
        );
        assert!(e < r, "{}: COMQ {e} should beat RTN {r}", l["name"]);
    }

    let packed = Model::open(&out).unwrap();
    let dq = Model::open(&deq).unwrap();
    assert!(
        packed.get("head.weight").is_some() && packed.get("blocks.0.attn.qkv.weight").is_none()
    );
    assert_eq!(
        packed.metadata()["comq.codes_sha256"],
        report["codes_sha256"].as_str().unwrap()
    );
    // Unpacking the codes and applying (q − zp)·scale reproduces the dequantized weights.
    for name in ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"] {
        let w = dq
            .read_f32(dq.get(&format!("{name}.weight")).unwrap())
            .unwrap();
        let shape = packed.bytes(packed.get(&format!("{name}.weight_shape")).unwrap());
        let rows = i64::from_le_bytes(shape[..8].try_into().unwrap()) as usize;
        let cols = i64::from_le_bytes(shape[8..].try_into().unwrap()) as usize;
        let words: Vec<i32> = packed
            .bytes(packed.get(&format!("{name}.weight_packed")).unwrap())
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let u = pack::unpack_rows(&words, rows, cols, 4);
        let scale = packed
            .read_f32(packed.get(&format!("{name}.weight_scale")).unwrap())
            .unwrap();
        let zpw: Vec<i32> = packed
            .bytes(packed.get(&format!("{name}.weight_zero_point")).unwrap())
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let zp = pack::unpack_columns(&zpw, rows, 1, 4);
        for r in 0..rows {
            for c in 0..cols {
                // Signed forms: q = u − 8, zp_signed = zp − 8, W = (q − zp)·scale.
                let v = (u[r * cols + c] as f32 - zp[r] as f32) * scale[r];
                assert_eq!(v, w[r * cols + c], "{name}[{r},{c}]");
            }
        }
    }
    // Pass-through tensors are byte-identical.
    let orig = Model::open(&model).unwrap();
    for t in [
        "cls_token",
        "blocks.0.attn.qkv.bias",
        "head.weight",
        "patch_embed.proj.weight",
    ] {
        assert_eq!(
            orig.bytes(orig.get(t).unwrap()),
            packed.bytes(packed.get(t).unwrap()),
            "{t}"
        );
    }
    assert!(files_in(dir.path())
        .iter()
        .all(|p| !p.to_string_lossy().ends_with(".tmp")));
}

#[test]
fn the_same_run_twice_gives_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 8, 2);
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    for o in [&a, &b] {
        let r = run(&[
            "run",
            s(&model),
            "--calib",
            s(&calib),
            "--device",
            "cpu",
            "--sym",
            "--out",
            s(o),
            "-q",
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn symmetric_group_output_has_no_zero_point_and_bf16_scales_for_bf16_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::Rng::new(3);
    let w = rng.normals(8 * 16);
    let model = dir.path().join("m.safetensors");
    common::write_safetensors(
        &model,
        &[("lin.weight".into(), common::bf16_tensor(&[8, 16], &w))],
    );
    let out = dir.path().join("o.safetensors");
    let r = run(&[
        "run",
        s(&model),
        "--data-free",
        "--sym",
        "--group-size",
        "8",
        "--bits",
        "3",
        "--out",
        s(&out),
        "-q",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = Model::open(&out).unwrap();
    assert!(m.get("lin.weight_zero_point").is_none());
    let sc = m.get("lin.weight_scale").unwrap();
    assert_eq!(sc.shape, vec![8, 2]);
    assert_eq!(comq_gpu::io::dtype::name(sc.dtype), "BF16");
    assert_eq!(m.get("lin.weight_packed").unwrap().shape, vec![8, 2]); // 16·3 bits = 48 bits → 2 words
}

#[test]
fn inspect_lists_what_would_be_quantized() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = common::tiny_vit(dir.path(), 8, 4);
    let o = run(&["inspect", s(&model)]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("8 to quantize"), "{text}");
    assert!(text.contains("matched by the skip pattern"), "{text}");
    // The layout calibration from images would run, or why there is none (this model has no
    // final norm).
    assert!(
        text.contains("forward pass: none (") && text.contains("no final LayerNorm"),
        "{text}"
    );
    let plain = dir.path().join("plain.safetensors");
    common::write_safetensors(
        &plain,
        &[(
            "layer.weight".to_string(),
            common::f32_tensor(&[4, 4], &[0.5; 16]),
        )],
    );
    let text = String::from_utf8_lossy(&run(&["inspect", s(&plain)]).stdout).to_string();
    assert!(
        text.contains("forward pass: none (") && text.contains("--calib"),
        "{text}"
    );
}

struct Bad {
    dir: tempfile::TempDir,
    model: PathBuf,
}

fn bad() -> Bad {
    let dir = tempfile::tempdir().unwrap();
    let (model, _calib) = common::tiny_vit(dir.path(), 8, 5);
    Bad { dir, model }
}

impl Bad {
    fn out(&self) -> PathBuf {
        self.dir.path().join("out.safetensors")
    }
    fn assert_nothing_written(&self) {
        let names: Vec<String> = files_in(self.dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n == "model.safetensors"
                || n == "calib.safetensors"
                || n.starts_with("in")),
            "unexpected files left behind: {names:?}"
        );
    }
}

#[test]
fn missing_model_file_is_a_clear_error() {
    let b = bad();
    let o = run(&[
        "run",
        s(&b.dir.path().join("nope.safetensors")),
        "--data-free",
        "--out",
        s(&b.out()),
    ]);
    assert_bad_input(&o, "nope.safetensors");
    b.assert_nothing_written();
}

#[test]
fn truncated_model_file_is_a_clear_error() {
    let b = bad();
    let bytes = std::fs::read(&b.model).unwrap();
    let p = b.dir.path().join("in-trunc.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let o = run(&["run", s(&p), "--data-free", "--out", s(&b.out())]);
    assert_bad_input(&o, "truncated");
    b.assert_nothing_written();
}

#[test]
fn header_length_larger_than_the_file_is_a_clear_error() {
    let b = bad();
    let mut bytes = std::fs::read(&b.model).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let p = b.dir.path().join("in-hdr.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    let o = run(&["run", s(&p), "--data-free", "--out", s(&b.out())]);
    assert_bad_input(&o, "header length");
    b.assert_nothing_written();
}

#[test]
fn header_with_offsets_past_the_end_is_a_clear_error() {
    let b = bad();
    let header = r#"{"a.weight":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    let p = b.dir.path().join("in-off.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    let o = run(&["run", s(&p), "--data-free", "--out", s(&b.out())]);
    assert_bad_input(&o, "a.weight");
    b.assert_nothing_written();
}

#[test]
fn header_that_is_not_json_is_a_clear_error() {
    let b = bad();
    let header = "this is not json";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let p = b.dir.path().join("in-json.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    let o = run(&["run", s(&p), "--data-free"]);
    assert_bad_input(&o, "not valid safetensors JSON");
}

#[test]
fn bits_out_of_range_is_a_clear_error() {
    let b = bad();
    let o = run(&[
        "run",
        s(&b.model),
        "--data-free",
        "--bits",
        "9",
        "--out",
        s(&b.out()),
    ]);
    assert_bad_input(&o, "--bits 9");
    b.assert_nothing_written();
}

#[test]
fn group_size_that_does_not_divide_the_row_is_a_clear_error() {
    let b = bad();
    let o = run(&[
        "run",
        s(&b.model),
        "--data-free",
        "--group-size",
        "3",
        "--out",
        s(&b.out()),
    ]);
    assert_bad_input(&o, "--group-size 3 does not divide");
    b.assert_nothing_written();
}

#[test]
fn out_equal_to_the_input_is_refused() {
    let b = bad();
    let before = std::fs::read(&b.model).unwrap();
    let o = run(&["run", s(&b.model), "--data-free", "--out", s(&b.model)]);
    assert_bad_input(&o, "never overwrites its inputs");
    assert_eq!(std::fs::read(&b.model).unwrap(), before);
}

#[test]
fn missing_calibration_names_the_layer_and_what_to_pass() {
    let b = bad();
    let o = run(&["run", s(&b.model), "--out", s(&b.out())]);
    assert_bad_input(&o, "--calib");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("layer 'blocks.0.attn.") && err.contains("--data-free"),
        "{err}"
    );
    b.assert_nothing_written();
}

#[test]
fn calibration_width_mismatch_is_a_clear_error() {
    let b = bad();
    let x = vec![0.5f32; 10 * 5];
    let p = b.dir.path().join("in-calib.safetensors");
    common::write_safetensors(
        &p,
        &[(
            "blocks.0.attn.qkv.input".into(),
            common::f32_tensor(&[10, 5], &x),
        )],
    );
    let o = run(&[
        "run",
        s(&b.model),
        "--calib",
        s(&p),
        "--data-free",
        "--out",
        s(&b.out()),
    ]);
    assert_bad_input(&o, "blocks.0.attn.qkv.input");
    b.assert_nothing_written();
}

#[test]
fn nan_weights_are_a_clear_error() {
    let b = bad();
    let mut w = vec![0.1f32; 4 * 8];
    w[13] = f32::NAN;
    let p = b.dir.path().join("in-nan.safetensors");
    common::write_safetensors(
        &p,
        &[("lin.weight".into(), common::f32_tensor(&[4, 8], &w))],
    );
    let o = run(&["run", s(&p), "--data-free", "--out", s(&b.out())]);
    assert_bad_input(&o, "lin.weight");
    b.assert_nothing_written();
}

#[test]
fn inf_activations_are_a_clear_error() {
    let b = bad();
    let w = vec![0.1f32; 4 * 8];
    let mut x = vec![1.0f32; 6 * 8];
    x[20] = f32::INFINITY;
    let p = b.dir.path().join("in-m.safetensors");
    let c = b.dir.path().join("in-c.safetensors");
    common::write_safetensors(
        &p,
        &[("lin.weight".into(), common::f32_tensor(&[4, 8], &w))],
    );
    common::write_safetensors(&c, &[("lin.input".into(), common::f32_tensor(&[6, 8], &x))]);
    let o = run(&["run", s(&p), "--calib", s(&c), "--out", s(&b.out())]);
    assert_bad_input(&o, "lin.input");
    b.assert_nothing_written();
}

#[test]
fn only_naming_a_1d_tensor_is_a_clear_error() {
    let b = bad();
    let o = run(&[
        "run",
        s(&b.model),
        "--data-free",
        "--only",
        "norm1",
        "--out",
        s(&b.out()),
    ]);
    assert_bad_input(&o, "only 2-D linear weights");
    b.assert_nothing_written();
}

#[path = "common/gpu.rs"]
mod gpu;

/// A calibration file's Grams (activations and Gram matrices alike) and their GPTQ factors are
/// built one layer ahead on their own thread: the codes are those of a run that builds them in
/// step (a `--resume` with nothing to resume builds them in step), on the CPU and on the GPU,
/// and the profile shows the factors built there and none in the layers' own preparation.
#[test]
fn a_calibration_files_grams_built_ahead_give_the_codes_built_in_step() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(tmp.path(), 32, 91);
    let mut devices = vec!["cpu"];
    if gpu::device().is_some() {
        devices.push("gpu");
    }
    for device in devices {
        let mut digests = Vec::new();
        for (i, resume) in [false, true].into_iter().enumerate() {
            let out = tmp.path().join(format!("{device}-{i}.safetensors"));
            let rep = tmp.path().join(format!("{device}-{i}.json"));
            let mut args = vec![
                "run",
                s(&model),
                "--calib",
                s(&calib),
                "--device",
                device,
                "--out",
                s(&out),
                "--report",
                s(&rep),
            ];
            if resume {
                args.push("--resume");
            }
            let o = run(&args);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
            let kinds: Vec<&str> = r["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["calibration"].as_str().unwrap())
                .collect();
            assert!(
                kinds.contains(&"input") && kinds.contains(&"gram"),
                "{kinds:?}"
            );
            let stage = |name: &str| {
                r["profile"]["stages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|s| s["stage"] == name)
                    .map(|s| s["calls"].as_u64().unwrap())
            };
            // A GPU with f64 builds each factor itself from its resident Gram: none is built
            // on the host, ahead or in step.
            let on_device = device == "gpu" && {
                use comq_gpu::Device;
                gpu::device().unwrap().builds_factors(64)
            };
            if resume || on_device {
                assert_eq!(stage("factor ahead"), None, "{device}");
            } else {
                assert_eq!(stage("factor ahead"), Some(8), "{device}: one per layer");
            }
            if !resume {
                assert_eq!(
                    stage("    factor"),
                    None,
                    "{device}: no layer built its own on the host"
                );
            }
            if on_device {
                assert!(
                    stage("    factor on device").is_some_and(|c| c >= 8),
                    "{device}: {}",
                    r["profile"]["stages"]
                );
            }
            digests.push(r["codes_sha256"].as_str().unwrap().to_string());
        }
        assert_eq!(digests[0], digests[1], "{device}");
        if device == "gpu" {
            // `COMQ_DEVICE_FACTOR=off`: every factor from the host again, built ahead.
            let rep = tmp.path().join("gpu-host-factor.json");
            let out = tmp.path().join("gpu-host-factor.safetensors");
            let o = bin()
                .env("COMQ_DEVICE_FACTOR", "off")
                .args([
                    "run",
                    s(&model),
                    "--calib",
                    s(&calib),
                    "--device",
                    "gpu",
                    "--out",
                    s(&out),
                    "--report",
                    s(&rep),
                ])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
            let stages: Vec<&str> = r["profile"]["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["stage"].as_str().unwrap())
                .collect();
            assert!(stages.contains(&"factor ahead"), "{stages:?}");
            assert!(!stages.contains(&"    factor on device"), "{stages:?}");
        }
    }
}

#[test]
fn run_on_the_gpu_agrees_with_the_cpu() {
    if gpu::device().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 16, 9);
    let mut reports = Vec::new();
    for dev in ["cpu", "gpu"] {
        let rep = dir.path().join(format!("{dev}.json"));
        let out = dir.path().join(format!("{dev}.safetensors"));
        let o = run(&[
            "run",
            s(&model),
            "--calib",
            s(&calib),
            "--device",
            dev,
            "--sweeps",
            "2",
            "--scale-update",
            "--out",
            s(&out),
            "--report",
            s(&rep),
            "-q",
        ]);
        assert!(
            o.status.success(),
            "{dev}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        reports.push(
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(&rep).unwrap()).unwrap(),
        );
    }
    assert!(
        reports[1]["device"].as_str().unwrap().starts_with("gpu:"),
        "{}",
        reports[1]["device"]
    );
    for (c, g) in reports[0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reports[1]["layers"].as_array().unwrap())
    {
        let (ec, eg) = (
            c["rel_error"].as_f64().unwrap(),
            g["rel_error"].as_f64().unwrap(),
        );
        assert!(
            (ec - eg).abs() <= 1e-3 * ec,
            "{}: CPU {ec} vs GPU {eg}",
            c["name"]
        );
    }
}

#[test]
fn bench_quick_compares_cpu_and_gpu() {
    if gpu::device().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let o = run(&["bench", "--quick", "--json", s(&json)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for r in rows.as_array().unwrap() {
        assert!(r["cpu_seconds"].as_f64().is_some() && r["gpu_seconds"].as_f64().is_some());
        assert!(r["code_disagreement"].as_f64().unwrap() <= 1e-3, "{r}");
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains("speed-up"));
}

#[test]
fn bench_kernels_times_the_gram_and_both_sweeps_with_their_work() {
    if gpu::device().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("kernels.json");
    let o = run(&[
        "bench",
        "--kernels",
        "--quick",
        "--gram-rows",
        "256",
        "--json",
        s(&json),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    // Two shapes on the GPU and on the CPU.
    assert_eq!(rows.len(), 4);
    for r in rows {
        let [m, n] = [
            r["shape"][0].as_f64().unwrap(),
            r["shape"][1].as_f64().unwrap(),
        ];
        assert_eq!(r["sweep_greedy_bytes"].as_f64().unwrap(), 4.0 * m * n * n);
        assert!(r["gram_seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["sweep_shared_flops"].as_f64().unwrap() >= 2.0 * m * n * n);
    }
}

#[test]
fn bench_model_runs_the_whole_pipeline_in_a_child_with_its_profile() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("e2e.json");
    // One device's run of the tiny shape (`skip`: the other device's flag); its JSON row.
    let bench_model = |skip: &str| -> serde_json::Value {
        let o = run(&[
            "bench",
            "--model",
            "tiny",
            "--images",
            "6",
            skip,
            "--order",
            "shared",
            "--work-dir",
            s(dir.path()),
            "--json",
            s(&json),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rows: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        rows.as_array().unwrap()[0].clone()
    };
    let r = &bench_model("--no-gpu");
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["images"], 6);
    assert_eq!(r["linear_params"], 2 * (4 * 64 * 64 + 2 * 64 * 256));
    let stages: Vec<&str> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    for stage in [
        "read", "embed", "forward", "gram", "quantize", "write", "finish",
    ] {
        assert!(stages.contains(&stage), "{stage} missing from {stages:?}");
    }
    let wall = r["wall_seconds"].as_f64().unwrap();
    let without = r["wall_seconds_without_io"].as_f64().unwrap();
    assert!(without > 0.0 && without <= wall, "{without} vs {wall}");
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
    // The synthetic model and the image pack stay for the next run; the outputs do not.
    assert!(dir.path().join("tiny-2b-f32/model.safetensors").exists());
    assert!(dir.path().join("images-6-32px.safetensors").exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("out-")));

    // The same run on the GPU (the calibration thread and the quantization share the device)
    // reaches the CPU's errors.
    if gpu::device().is_none() {
        return;
    }
    let g = &bench_model("--no-cpu");
    assert_eq!(g["device"], "gpu");
    assert!(g["calibration_memory"]["device_bytes"].as_u64().unwrap() > 0);
    let (ec, eg) = (
        r["mean_rel_error"].as_f64().unwrap(),
        g["mean_rel_error"].as_f64().unwrap(),
    );
    assert!((ec - eg).abs() <= 1e-3 * ec, "CPU {ec} vs GPU {eg}");
}

#[test]
fn devices_lists_the_adapters() {
    if gpu::device().is_none() {
        return;
    }
    let o = run(&["devices", "--json"]);
    assert!(o.status.success());
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let first = &list.as_array().unwrap()[0];
    assert!(first["name"].as_str().is_some() && first["max_storage_binding"].as_u64().unwrap() > 0);
}

#[test]
fn gpu_requested_without_an_adapter_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 8, 10);
    let out = dir.path().join("o.safetensors");
    let o = bin()
        .args([
            "run",
            s(&model),
            "--calib",
            s(&calib),
            "--device",
            "gpu",
            "--out",
            s(&out),
        ])
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .output()
        .unwrap();
    assert_bad_input(&o, "no GPU adapter");
    assert!(!out.exists());
}

#[test]
fn an_unsupported_dtype_asked_to_be_quantized_is_a_clear_error() {
    let b = bad();
    let p = b.dir.path().join("in-int.safetensors");
    let t = common::Owned {
        dtype: safetensors::Dtype::I32,
        shape: vec![2, 4],
        data: vec![0u8; 32],
    };
    common::write_safetensors(&p, &[("lin.weight".into(), t)]);
    let o = run(&[
        "run",
        s(&p),
        "--data-free",
        "--only",
        "lin",
        "--out",
        s(&b.out()),
    ]);
    assert_bad_input(&o, "dtype I32 is not a float type");
    b.assert_nothing_written();
    // Without --only it is not a candidate, and nothing else is either.
    let o = run(&["run", s(&p), "--data-free", "--out", s(&b.out())]);
    assert_bad_input(&o, "no tensor");
    b.assert_nothing_written();
}

#[test]
fn inspect_plan_refuses_a_plan_that_cannot_fit_and_names_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 16, 11);
    let ok = run(&[
        "inspect",
        s(&model),
        "--calib",
        s(&calib),
        "--plan",
        "--device",
        "cpu",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("peak device memory") && text.contains("estimated time"),
        "{text}"
    );
    let no = run(&[
        "inspect",
        s(&model),
        "--plan",
        "--device",
        "cpu",
        "--memory-limit",
        "20kB",
    ]);
    assert_bad_input(&no, "cannot fit");
    assert!(String::from_utf8_lossy(&no.stderr).contains("--skip"));
    // run refuses the same plan before computing anything.
    let out = dir.path().join("o.safetensors");
    let r = run(&[
        "run",
        s(&model),
        "--calib",
        s(&calib),
        "--device",
        "cpu",
        "--memory-limit",
        "20kB",
        "--out",
        s(&out),
    ]);
    assert_bad_input(&r, "nothing was computed");
    assert!(!out.exists());
}

#[test]
fn an_output_directory_gets_config_json_and_large_outputs_are_sharded_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 16, 12);
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "vit", "hidden_size": 16}"#,
    )
    .unwrap();
    let out = dir.path().join("packed");
    let deq = dir.path().join("deq");
    let o = run(&[
        "run",
        s(&model),
        "--calib",
        s(&calib),
        "--device",
        "cpu",
        "--sym",
        "--out",
        s(&out),
        "--dequantized",
        s(&deq),
        "--max-shard-size",
        "4kB",
        "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["model_type"], "vit",
        "the input's config.json is extended"
    );
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["format"], "pack-quantized");
    assert_eq!(qc["config_groups"]["group_0"]["weights"]["num_bits"], 4);
    assert_eq!(qc["config_groups"]["group_0"]["weights"]["symmetric"], true);
    assert!(qc["ignore"].as_array().unwrap().iter().any(|v| v == "head"));
    // Sharded: an index and several shards, readable as one checkpoint.
    let index = out.join("model.safetensors.index.json");
    assert!(index.exists());
    let shards = files_in(&out)
        .iter()
        .filter(|p| p.to_string_lossy().contains("-of-"))
        .count();
    assert!(shards > 1, "expected several shards, found {shards}");
    let ck = comq_gpu::io::Checkpoint::open(&out).unwrap();
    assert!(ck.get("blocks.1.mlp.fc2.weight_packed").is_some() && ck.get("head.weight").is_some());
    // The dequantized shards quantize again as an input (sharded in).
    let again = dir.path().join("again.safetensors");
    let o = run(&[
        "run",
        s(&deq),
        "--data-free",
        "--device",
        "cpu",
        "--out",
        s(&again),
        "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(Model::open(&again)
        .unwrap()
        .get("blocks.0.attn.qkv.weight_packed")
        .is_some());
}

#[test]
fn a_recipe_sets_options_and_per_layer_overrides_while_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 16, 13);
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        "bits = 3\nsweeps = 2\n[[layer]]\nmatch = 'mlp\\.fc2'\nbits = 8\n[[layer]]\nmatch = 'blocks\\.1\\.attn\\.proj'\nskip = true\n",
    )
    .unwrap();
    let rep = dir.path().join("r.json");
    let out = dir.path().join("o.safetensors");
    let o = run(&[
        "run",
        s(&model),
        "--calib",
        s(&calib),
        "--config",
        s(&recipe),
        "--device",
        "cpu",
        "--bits",
        "2",
        "--out",
        s(&out),
        "--report",
        s(&rep),
        "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 7, "one layer skipped by the recipe");
    for l in layers {
        let name = l["name"].as_str().unwrap();
        let want = if name.contains("fc2") { 8 } else { 2 };
        assert_eq!(
            l["bits"], want,
            "{name}: the flag --bits 2 wins over the recipe, the override over both"
        );
        assert_eq!(
            l["loss_history"].as_array().unwrap().len(),
            2,
            "sweeps = 2 from the recipe"
        );
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "bitz = 3\n").unwrap();
    assert_bad_input(
        &run(&["run", s(&model), "--data-free", "--config", s(&bad)]),
        "bitz",
    );
}

#[test]
fn plot_draws_a_png_and_refuses_other_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 16, 14);
    let png = dir.path().join("errors.png");
    let out = dir.path().join("o.safetensors");
    let o = run(&[
        "run",
        s(&model),
        "--calib",
        s(&calib),
        "--device",
        "cpu",
        "--out",
        s(&out),
        "--plot",
        s(&png),
        "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(bytes.len() > 10_000, "a real chart, not an empty image");
    let o = run(&[
        "run",
        s(&model),
        "--calib",
        s(&calib),
        "--device",
        "cpu",
        "--out",
        s(&out),
        "--plot",
        "x.svg",
    ]);
    assert_bad_input(&o, "must end in .png");
}

/// A model of `layers` linear layers `[rows, cols]` that takes a while to quantize.
fn slow_model(dir: &Path, layers: usize, rows: usize, cols: usize) -> PathBuf {
    let mut rng = common::Rng::new(77);
    let tensors: Vec<(String, common::Owned)> = (0..layers)
        .map(|i| {
            (
                format!("layers.{i:02}.weight"),
                common::f32_tensor(&[rows, cols], &rng.normals(rows * cols)),
            )
        })
        .collect();
    let p = dir.join("slow.safetensors");
    common::write_safetensors(&p, &tensors);
    p
}

#[test]
fn a_killed_run_leaves_no_output_and_resume_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = slow_model(dir.path(), 24, 384, 192);
    let out = dir.path().join("out.safetensors");
    let work = dir.path().join("out.safetensors.work");
    let args = ["--data-free", "--device", "cpu", "--sweeps", "12", "-q"];
    let mut child = bin()
        .args(["run", s(&model), "--out", s(&out)])
        .args(args)
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let saved = std::fs::read_dir(&work)
            .map(|d| {
                d.filter(|e| {
                    let n = e
                        .as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .into_owned();
                    n.starts_with("layer-") && n.ends_with(".safetensors")
                })
                .count()
            })
            .unwrap_or(0);
        if saved >= 3 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed; make it slower"
        );
        assert!(
            started.elapsed().as_secs() < 120,
            "no layer checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.exists(), "a killed run must not leave an output");
    // A different fingerprint is refused.
    let o = run(&[
        "run",
        s(&model),
        "--out",
        s(&out),
        "--resume",
        "--bits",
        "3",
        "--data-free",
        "--device",
        "cpu",
        "--sweeps",
        "12",
    ]);
    assert_bad_input(&o, "refusing to resume");
    // Resume with the same inputs and options.
    let rep = dir.path().join("r.json");
    let o = bin()
        .args([
            "run",
            s(&model),
            "--out",
            s(&out),
            "--resume",
            "--report",
            s(&rep),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    let resumed = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["resumed"] == true)
        .count();
    assert!(resumed >= 3, "only {resumed} layers were resumed");
    assert!(
        !work.exists(),
        "the work directory is removed after a complete run"
    );
    let fresh = dir.path().join("fresh.safetensors");
    let o = bin()
        .args(["run", s(&model), "--out", s(&fresh)])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&fresh).unwrap(),
        "resumed and uninterrupted runs write the same bytes"
    );
}

#[test]
fn a_3d_tensor_asked_to_be_quantized_is_a_clear_error() {
    let b = bad();
    let p = b.dir.path().join("in-3d.safetensors");
    common::write_safetensors(
        &p,
        &[(
            "conv.weight".into(),
            common::f32_tensor(&[2, 3, 4], &[0.5; 24]),
        )],
    );
    let o = run(&[
        "run",
        s(&p),
        "--data-free",
        "--only",
        "conv",
        "--out",
        s(&b.out()),
    ]);
    assert_bad_input(&o, "is 3-D [2, 3, 4]");
    b.assert_nothing_written();
}

#[test]
fn an_output_directory_that_cannot_exist_is_a_clear_error() {
    let b = bad();
    let blocker = b.dir.path().join("in-file");
    std::fs::write(&blocker, b"x").unwrap();
    let out = blocker.join("o.safetensors");
    let o = run(&["run", s(&b.model), "--data-free", "--out", s(&out)]);
    assert_bad_input(&o, "does not exist");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"x");
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_no_file() {
    use std::os::unix::process::CommandExt;
    let b = bad();
    let mut cmd = bin();
    cmd.args([
        "run",
        s(&b.model),
        "--data-free",
        "--device",
        "cpu",
        "--out",
        s(&b.out()),
    ]);
    // SAFETY: setrlimit is async-signal-safe; it only limits the child's file sizes to 4 kB, so
    // writing the output fails as on a full disk.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 4096,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    assert_bad_input(&o, "out.safetensors");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("too large"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    b.assert_nothing_written();
}

#[test]
fn constant_rows_and_all_zero_input_channels_quantize_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols, n) = (6, 16, 64);
    let mut rng = common::Rng::new(21);
    let mut w = rng.normals(rows * cols);
    for c in 0..cols {
        w[2 * cols + c] = 0.25; // a constant row
        w[4 * cols + c] = 0.0; // an all-zero row
    }
    let mut x = common::correlated_x(&mut rng, n, cols);
    for r in 0..n {
        x[r * cols + 5] = 0.0; // a dead input channel
    }
    let m = dir.path().join("m.safetensors");
    let c = dir.path().join("c.safetensors");
    common::write_safetensors(
        &m,
        &[("lin.weight".into(), common::f32_tensor(&[rows, cols], &w))],
    );
    common::write_safetensors(
        &c,
        &[("lin.input".into(), common::f32_tensor(&[n, cols], &x))],
    );
    let deq = dir.path().join("d.safetensors");
    let o = run(&[
        "run",
        s(&m),
        "--calib",
        s(&c),
        "--device",
        "cpu",
        "--dequantized",
        s(&deq),
        "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = Model::open(&deq).unwrap();
    let q = d.read_f32(d.get("lin.weight").unwrap()).unwrap();
    assert!(q.iter().all(|v| v.is_finite()));
    assert!(
        q[2 * cols..3 * cols].iter().all(|&v| v == 0.25),
        "a constant row stays exact"
    );
    assert!(
        q[4 * cols..5 * cols].iter().all(|&v| v == 0.0),
        "an all-zero row stays zero"
    );
}

fn raw_file(dir: &Path, name: &str, header: &str, data_len: usize) -> PathBuf {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    let p = dir.join(name);
    std::fs::write(&p, &bytes).unwrap();
    p
}

#[test]
fn overlapping_offsets_are_a_clear_error() {
    let b = bad();
    let header = r#"{"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}"#;
    let p = raw_file(b.dir.path(), "in-overlap.safetensors", header, 24);
    let o = run(&["run", s(&p), "--data-free", "--out", s(&b.out())]);
    assert_bad_input(&o, "overlap");
    b.assert_nothing_written();
}

#[test]
fn a_byte_length_that_does_not_match_dtype_and_shape_is_a_clear_error() {
    let b = bad();
    let header = r#"{"a.weight":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,16]}}"#;
    let p = raw_file(b.dir.path(), "in-len.safetensors", header, 16);
    let o = run(&["run", s(&p), "--data-free", "--out", s(&b.out())]);
    assert_bad_input(&o, "tensor 'a.weight' (BF16 [2, 3]) needs 12 bytes");
    b.assert_nothing_written();
}

#[test]
fn the_report_and_plot_folders_are_checked_before_compute() {
    let b = bad();
    let file = b.dir.path().join("in-file");
    std::fs::write(&file, b"x").unwrap();
    for (flag, target) in [
        ("--report", b.dir.path().join("missing/r.json")),
        ("--plot", b.dir.path().join("missing/p.png")),
        ("--report", file.join("r.json")),
        ("--plot", file.join("p.png")),
    ] {
        let t = std::time::Instant::now();
        let o = run(&[
            "run",
            s(&b.model),
            "--data-free",
            "--device",
            "cpu",
            "--out",
            s(&b.out()),
            flag,
            s(&target),
        ]);
        assert_bad_input(&o, "does not exist");
        assert_bad_input(&o, flag);
        b.assert_nothing_written();
        assert!(t.elapsed().as_secs() < 10);
    }
}

#[test]
fn a_known_vit_runs_with_no_data_and_says_how_it_calibrated() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/fmnist-vit");
    let out = dir.path().join("q.safetensors");
    let report = dir.path().join("r.json");
    let o = run(&[
        "run",
        s(&model),
        "--preset",
        "paper",
        "--out",
        s(&out),
        "--report",
        s(&report),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("bundled generic photos") && err.contains("--images DIR"),
        "{err}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(
        r["calibration"]
            .as_str()
            .unwrap()
            .contains("bundled generic photos"),
        "{}",
        r["calibration"]
    );
    // An unrecognised model without calibration is told every way to give one.
    let b = bad();
    let o = run(&["run", s(&b.model), "--out", s(&b.out())]);
    assert_bad_input(&o, "--images");
}

/// A GPU run reports the bytes it moved, in total and per layer, and `--profile` prints them:
/// each layer uploads at least its weights (its Grams, accumulated on the device from the file's
/// activations, are copied there and need not go up) and reads back at least its codes.
#[test]
fn a_gpu_run_reports_its_transfers_in_total_and_per_layer() {
    if gpu::device().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 16, 9);
    let rep = dir.path().join("r.json");
    let out = dir.path().join("q.safetensors");
    let o = run(&[
        "run",
        s(&model),
        "--calib",
        s(&calib),
        "--device",
        "gpu",
        "--out",
        s(&out),
        "--report",
        s(&rep),
        "--profile",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("GPU transfers:"), "{stdout}");
    assert!(stdout.contains("GPU transfers of the layers:"), "{stdout}");
    assert!(stdout.contains("candidates tried:"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    let total_up = r["profile"]["device_bytes_up"].as_u64().unwrap();
    let mut sum_up = 0;
    for l in r["layers"].as_array().unwrap() {
        let (rows, cols) = (
            l["shape"][0].as_u64().unwrap(),
            l["shape"][1].as_u64().unwrap(),
        );
        let up = l["device_bytes_up"].as_u64().unwrap();
        let down = l["device_bytes_down"].as_u64().unwrap();
        assert!(up >= 4 * rows * cols, "{}: {up}", l["name"]);
        assert!(down >= 4 * rows * cols, "{}: {down}", l["name"]);
        sum_up += up;
    }
    assert!(total_up >= sum_up, "{total_up} < {sum_up}");
}

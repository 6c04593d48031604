//! `run --images`, `run --eval` and `eval` end to end, and the bad-input rows of image inputs.

mod common;
#[path = "common/gpu.rs"]
mod gpu;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use comq_gpu::model::Family;
use serde_json::Value;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_comq-gpu"))
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .expect("binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "failed: {err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_bad_input(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert!(
        err.contains(needle),
        "stderr should mention '{needle}': {err}"
    );
}

fn synthetic(dir: &Path, family: Family, classes: usize) -> PathBuf {
    common::small_vit(dir, family, classes, 2, 5, safetensors::Dtype::F32)
}

/// `n` random RGB PNGs of odd sizes in two class folders (and one JPEG).
fn photos(dir: &Path, n: usize) -> PathBuf {
    let mut r = common::Rng::new(9);
    for i in 0..n {
        let class = dir.join(if i % 2 == 0 { "cats" } else { "dogs" });
        std::fs::create_dir_all(&class).unwrap();
        let (w, h) = (18 + (i as u32 % 5), 22 + (i as u32 % 3));
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let b = (r.next_u64() % 64) as u8;
            image::Rgb([
                b + (x * 5) as u8,
                b + (y * 4) as u8,
                b.wrapping_add((i * 20) as u8),
            ])
        });
        let ext = if i == 0 { "jpg" } else { "png" };
        img.save(class.join(format!("{i}.{ext}"))).unwrap();
    }
    dir.to_path_buf()
}

fn report(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn run_from_images_quantizes_every_block_linear_in_block_order_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(&dir.path().join("m"), Family::HfDinov2, 2);
    let imgs = photos(&dir.path().join("photos"), 6);
    let rep = dir.path().join("r.json");
    let out = dir.path().join("q.safetensors");
    let deq = dir.path().join("dq");
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&imgs),
        "--calib-count",
        "4",
        "--eval",
        s(&imgs),
        "--device",
        "cpu",
        "--out",
        s(&out),
        "--dequantized",
        s(&deq),
        "--report",
        s(&rep),
    ]);
    let stdout = ok(&o);
    assert!(
        stdout.contains("COMQ W4") && stdout.contains("RTN W4") && stdout.contains("FP32"),
        "{stdout}"
    );
    let r = report(&rep);
    let layers = r["layers"].as_array().unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(
        names.len(),
        12,
        "2 blocks x (query, key, value, dense, fc1, fc2): {names:?}"
    );
    assert!(names[0].contains("layer.0.attention.attention.query"));
    assert!(names[11].contains("layer.1.mlp.fc2"));
    for l in layers {
        assert_eq!(l["calibration"], "images");
        // One of the four images is held out to choose among the candidates.
        assert_eq!(l["samples"], 3 * 17, "3 images x 17 tokens");
        assert!(l["rel_error"].as_f64().unwrap() <= l["rel_error_rtn"].as_f64().unwrap() * 1.0001);
        let held = l["rel_error_holdout"].as_f64().unwrap();
        assert!(held <= l["rel_error_holdout_rtn"].as_f64().unwrap());
        assert!(l["candidates"].as_array().unwrap().len() > 2);
        assert!(l["chosen"].is_string());
    }
    let rows = r["eval"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(r["eval"]["count"], 6);
    for row in &rows[1..] {
        let cos = row["fidelity"]["cls_cosine"].as_f64().unwrap();
        assert!(cos > 0.5 && cos <= 1.0 + 1e-9, "{cos}");
        assert!(
            row["accuracy"]["top1"].as_f64().is_some(),
            "labels come from the class folders"
        );
    }
    assert!(r["calibration"].as_str().unwrap().contains("4 images"));
    // The GPTQ factors were built on the calibration thread, once per block, and every layer
    // found its own there (no factor built while quantizing).
    let stages = r["profile"]["stages"].as_array().unwrap();
    let stage = |name: &str| stages.iter().find(|st| st["stage"] == name);
    assert_eq!(stage("factor ahead").expect("factors ahead")["calls"], 2);
    assert!(stage("    factor").is_none(), "{stages:?}");

    // `eval` of the dequantized output against the original reproduces the COMQ row.
    let e = run(&[
        "eval",
        s(&deq),
        "--images",
        s(&imgs),
        "--reference",
        s(&model),
        "--device",
        "cpu",
        "--json",
    ]);
    let ev: Value = serde_json::from_str(&ok(&e)).unwrap();
    let cos_eval = ev["rows"][1]["fidelity"]["cls_cosine"].as_f64().unwrap();
    let cos_run = rows[2]["fidelity"]["cls_cosine"].as_f64().unwrap();
    assert!((cos_eval - cos_run).abs() < 1e-9, "{cos_eval} vs {cos_run}");
    // A model against itself: perfect fidelity.
    let e = run(&[
        "eval",
        s(&model),
        "--images",
        s(&imgs),
        "--reference",
        s(&model),
        "--device",
        "cpu",
        "--json",
    ]);
    let ev: Value = serde_json::from_str(&ok(&e)).unwrap();
    let f = &ev["rows"][1]["fidelity"];
    assert!((f["cls_cosine"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    assert_eq!(f["rel_mse"].as_f64().unwrap(), 0.0);
    assert_eq!(f["nn_agreement"].as_f64().unwrap(), 1.0);
}

/// Runs `model` calibrated on `imgs` in calibration mode `mode` at `bits` on `device`; returns
/// the report's calibration field and each layer's relative error.
fn calibrated_run(
    dir: &Path,
    model: &Path,
    imgs: &Path,
    mode: &str,
    bits: &str,
    device: &str,
) -> (String, Vec<f64>) {
    let rep = dir.join(format!("{mode}-{bits}-{device}.json"));
    let out = dir.join(format!("{mode}-{bits}-{device}.safetensors"));
    ok(&run(&[
        "run",
        s(model),
        "--images",
        s(imgs),
        "--calib-mode",
        mode,
        "--bits",
        bits,
        "--device",
        device,
        "--out",
        s(&out),
        "--report",
        s(&rep),
    ]));
    let r = report(&rep);
    let errs = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["rel_error"].as_f64().unwrap())
        .collect();
    (r["calibration"].as_str().unwrap().to_string(), errs)
}

#[test]
fn sequential_calibration_differs_from_fp_calibration_after_the_first_layer() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(&dir.path().join("m"), Family::TimmVit, 0);
    let imgs = photos(&dir.path().join("photos"), 4);
    let mut errs = Vec::new();
    for mode in ["fp", "quantized"] {
        let (calibration, e) = calibrated_run(dir.path(), &model, &imgs, mode, "2", "cpu");
        errs.push(e);
        assert!(calibration.contains(if mode == "fp" {
            "full-precision"
        } else {
            "quantized"
        }));
    }
    // The first layer sees the same inputs either way; later ones see the quantized prefix.
    assert_eq!(errs[0][0], errs[1][0]);
    assert!(errs[0][1..].iter().zip(&errs[1][1..]).any(|(a, b)| a != b));
}

/// `--calib-mode corrected`: the first layer's inputs have not moved, so its target is its own
/// weights and its error is the quantized mode's; later layers fit the full-precision outputs
/// and differ. The same run on a GPU gives the CPU's layer errors.
#[test]
fn corrected_calibration_keeps_the_first_layer_and_corrects_the_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(&dir.path().join("m"), Family::TimmVit, 0);
    let imgs = photos(&dir.path().join("photos"), 4);
    let devices: &[&str] = if gpu::device().is_some() {
        &["cpu", "gpu"]
    } else {
        &["cpu"]
    };
    let mut errs = Vec::new();
    for (mode, dev) in [("quantized", "cpu")]
        .into_iter()
        .chain(devices.iter().map(|d| ("corrected", *d)))
    {
        let (calibration, e) = calibrated_run(dir.path(), &model, &imgs, mode, "3", dev);
        if mode == "corrected" {
            assert!(calibration.contains("corrected"));
        }
        errs.push(e);
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * a.max(1e-6) + 1e-7;
    assert!(
        close(errs[0][0], errs[1][0]),
        "{} vs {}",
        errs[0][0],
        errs[1][0]
    );
    assert!(errs[0][1..]
        .iter()
        .zip(&errs[1][1..])
        .any(|(a, b)| !close(*a, *b)));
    if let Some(g) = errs.get(2) {
        for (i, (a, b)) in errs[1].iter().zip(g).enumerate() {
            assert!(close(*a, *b), "layer {i}: cpu {a} vs gpu {b}");
        }
    }
}

/// The calibration's forward pass runs on the same GPU beside the quantization, on a handle of
/// its own: each layer's transfers are the search's alone (its upload within 1.2× of one upload
/// of `W` and `G`), and the run's total holds the forward pass's besides.
#[test]
fn each_layer_counts_its_own_transfers_beside_the_calibration_forward() {
    if gpu::device().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Layers 128 wide: a candidate's grid (two values per row) is then a small part of a row of
    // `W`, as on any real model; at 32 inputs the grids alone would pass the bound.
    let mdir = dir.path().join("m");
    comq_gpu::model::synthetic::SyntheticVit {
        family: Family::TimmVit,
        dim: 128,
        depth: 2,
        heads: 2,
        mlp: 256,
        patch: 8,
        img: 32,
        channels: 3,
        classes: 3,
        seed: 4,
    }
    .write_as(&mdir, safetensors::Dtype::F32)
    .unwrap();
    let model = mdir.join("model.safetensors");
    let imgs = photos(&dir.path().join("photos"), 8);
    let rep = dir.path().join("r.json");
    let out = ok(&run(&[
        "run",
        s(&model),
        "--images",
        s(&imgs),
        "--device",
        "gpu",
        "--out",
        s(&dir.path().join("q.safetensors")),
        "--report",
        s(&rep),
        "--profile",
    ]));
    assert!(out.contains("GPU transfers of the layers:"), "{out}");
    let r = report(&rep);
    let (mut up_sum, mut down_sum) = (0u64, 0u64);
    for l in r["layers"].as_array().unwrap() {
        let (m, n) = (
            l["shape"][0].as_u64().unwrap(),
            l["shape"][1].as_u64().unwrap(),
        );
        let up = l["device_bytes_up"].as_u64().unwrap();
        let down = l["device_bytes_down"].as_u64().unwrap();
        let floor = 4 * (m * n + n * n);
        assert!(
            up as f64 <= 1.2 * floor as f64,
            "{}: {up} bytes up against {floor} for W and G",
            l["name"]
        );
        assert!(down >= 4 * m * n, "{}: {down}", l["name"]);
        eprintln!("{}: up {:.3}× W + G", l["name"], up as f64 / floor as f64);
        up_sum += up;
        down_sum += down;
    }
    // The forward pass uploaded the images and the blocks' weights, and read Grams back.
    let total_up = r["profile"]["device_bytes_up"].as_u64().unwrap();
    let total_down = r["profile"]["device_bytes_down"].as_u64().unwrap();
    assert!(total_up > up_sum, "{total_up} <= {up_sum}");
    assert!(total_down > down_sum, "{total_down} <= {down_sum}");
}

#[test]
fn gpu_calibration_matches_cpu_calibration() {
    if gpu::device().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(&dir.path().join("m"), Family::TimmDeit, 3);
    let imgs = photos(&dir.path().join("photos"), 4);
    let mut reps = Vec::new();
    for dev in ["cpu", "gpu"] {
        let rep = dir.path().join(format!("{dev}.json"));
        let out = dir.path().join(format!("{dev}.safetensors"));
        ok(&run(&[
            "run",
            s(&model),
            "--images",
            s(&imgs),
            "--eval",
            s(&imgs),
            "--device",
            dev,
            "--out",
            s(&out),
            "--report",
            s(&rep),
        ]));
        reps.push(report(&rep));
    }
    let (c, g) = (&reps[0], &reps[1]);
    for (a, b) in c["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["layers"].as_array().unwrap())
    {
        let (x, y) = (
            a["rel_error"].as_f64().unwrap(),
            b["rel_error"].as_f64().unwrap(),
        );
        assert!(
            (x - y).abs() <= 1e-3 * x.max(1e-6) + 1e-7,
            "{}: {x} vs {y}",
            a["name"]
        );
    }
    let cc = c["eval"]["rows"][2]["fidelity"]["cls_cosine"]
        .as_f64()
        .unwrap();
    let gc = g["eval"]["rows"][2]["fidelity"]["cls_cosine"]
        .as_f64()
        .unwrap();
    assert!((cc - gc).abs() < 1e-3, "{cc} vs {gc}");
}

#[test]
fn an_empty_image_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(&dir.path().join("m"), Family::TimmVit, 0);
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    std::fs::write(empty.join("notes.txt"), "not an image").unwrap();
    let out = dir.path().join("q.safetensors");
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&empty),
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert_bad_input(&o, "no PNG or JPEG images");
    assert!(!out.exists());
}

/// `bytes` written as `cats/<name>` among good photos: `run` refuses it naming the file and
/// saying `why`, leaves no output and the file as it was; `eval` names it too.
fn a_bad_image_is_refused(name: &str, bytes: &[u8], why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(&dir.path().join("m"), Family::TimmVit, 0);
    let imgs = photos(&dir.path().join("photos"), 3);
    let path = imgs.join("cats").join(name);
    std::fs::write(&path, bytes).unwrap();
    let out = dir.path().join("q.safetensors");
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&imgs),
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert_bad_input(&o, name);
    assert_bad_input(&o, why);
    assert!(!out.exists());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the input is untouched"
    );
    let o = run(&["eval", s(&model), "--images", s(&imgs), "--device", "cpu"]);
    assert_bad_input(&o, name);
}

#[test]
fn an_unreadable_image_is_a_clear_error_naming_the_file() {
    a_bad_image_is_refused(
        "broken.png",
        b"\x89PNG\r\n\x1a\nnot really",
        "cannot decode",
    );
}

#[test]
fn a_truncated_jpeg_is_a_clear_error_naming_the_file() {
    let img = image::RgbImage::from_fn(48, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, 90]));
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    // Cut in the middle of its scan: the decoder alone would fill the rest with grey.
    let cut = &bytes[..bytes.len() - bytes.len() / 4];
    a_bad_image_is_refused("cut.jpg", cut, "truncated");
}

#[test]
fn images_for_an_unknown_layout_or_a_non_block_layer_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = common::tiny_vit(dir.path(), 8, 1);
    let imgs = photos(&dir.path().join("photos"), 2);
    let o = run(&["run", s(&model), "--images", s(&imgs), "--device", "cpu"]);
    assert_bad_input(&o, "--calib");
    let model = synthetic(&dir.path().join("m"), Family::TimmVit, 4);
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&imgs),
        "--device",
        "cpu",
        "--skip",
        "^$",
    ]);
    assert_bad_input(&o, "not a linear layer of an encoder block");
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&imgs),
        "--device",
        "cpu",
        "--crop",
        "15",
    ]);
    assert_bad_input(&o, "multiple of the patch size");
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&dir.path().join("nope")),
        "--device",
        "cpu",
    ]);
    assert_bad_input(&o, "no such image folder");
}

#[test]
fn the_bundled_model_keeps_its_accuracy_at_4_bits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let rep = dir.path().join("r.json");
    let out = dir.path().join("q.safetensors");
    ok(&run(&[
        "run",
        s(&root.join("assets/fmnist-vit")),
        "--images",
        s(&root.join("assets/fmnist-images/calib.safetensors")),
        "--calib-count",
        "128",
        "--eval",
        s(&root.join("assets/fmnist-images/test.safetensors")),
        "--eval-count",
        "600",
        "--device",
        "cpu",
        "--out",
        s(&out),
        "--report",
        s(&rep),
    ]));
    let r = report(&rep);
    let rows = r["eval"]["rows"].as_array().unwrap();
    let top1 = |i: usize| rows[i]["accuracy"]["top1"].as_f64().unwrap();
    eprintln!("FP {:.4} RTN {:.4} COMQ {:.4}", top1(0), top1(1), top1(2));
    assert!(top1(0) > 0.8, "the bundled model is trained");
    assert!(top1(2) >= top1(0) - 0.03, "COMQ W4 keeps the accuracy");
    assert_eq!(r["layers"].as_array().unwrap().len(), 16);
}

#[test]
fn dinov2_small_quantizes_all_72_encoder_layers_from_real_photos() {
    let dir = std::env::var_os("COMQ_DINOV2_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/comq-gpu/dinov2"))
        })
        .unwrap();
    if !dir.join("dinov2-small/model.safetensors").is_file() {
        assert!(
            std::env::var("COMQ_REQUIRE_DINOV2").map_or(true, |v| v != "1"),
            "COMQ_REQUIRE_DINOV2=1 but DINOv2-S is not prepared in {}",
            dir.display()
        );
        eprintln!("SKIP: DINOv2-S not prepared (scripts/prepare-dinov2.sh)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let rep = tmp.path().join("r.json");
    let out = tmp.path().join("q.safetensors");
    ok(&run(&[
        "run",
        s(&dir.join("dinov2-small")),
        "--images",
        s(&dir.join("photos")),
        "--calib-count",
        "6",
        "--preset",
        "paper",
        "--device",
        "cpu",
        "--out",
        s(&out),
        "--report",
        s(&rep),
    ]));
    let r = report(&rep);
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 72);
    for suffix in ["query", "key", "value", "output.dense", "fc1", "fc2"] {
        assert_eq!(
            layers
                .iter()
                .filter(|l| l["name"].as_str().unwrap().contains(suffix))
                .count(),
            12,
            "{suffix}"
        );
    }
    let t = &r["totals"];
    assert!(
        t["mean_rel_error"].as_f64().unwrap() < 0.7 * t["mean_rel_error_rtn"].as_f64().unwrap()
    );
}

#[test]
fn a_calibration_set_that_cannot_fit_the_memory_budget_is_refused_before_compute() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(&dir.path().join("m"), Family::TimmVit, 0);
    let imgs = photos(&dir.path().join("photos"), 200);
    let out = dir.path().join("q.safetensors");
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&imgs),
        "--device",
        "cpu",
        "--memory-limit",
        "1MB",
        "--out",
        s(&out),
    ]);
    assert_bad_input(&o, "lower --calib-count");
    assert!(!out.exists());
    // The same run with fewer images fits.
    ok(&run(&[
        "run",
        s(&model),
        "--images",
        s(&imgs),
        "--calib-count",
        "20",
        "--device",
        "cpu",
        "--memory-limit",
        "1MB",
        "--out",
        s(&out),
    ]));
}

/// `--preset paper` reproduces the core implementation bit for bit: the SHA-256 over every
/// layer's name and codes, as the core implementation wrote it for these runs (CPU).
#[test]
fn the_paper_preset_reproduces_the_core_codes_exactly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "assets/tiny-vit.safetensors",
                "--calib",
                "assets/tiny-vit.calib.safetensors",
            ],
            "bcb953c78a834ec13753052736c4c37a259095b8f94d7f3ce6251a20d9a5f070",
        ),
        (
            &[
                "assets/tiny-vit.safetensors",
                "--calib",
                "assets/tiny-vit.calib.safetensors",
                "--bits",
                "3",
                "--sweeps",
                "2",
                "--scale-update",
            ],
            "8e1bb61e1ec0c32f3278ea88bf500e55aef38a66a48d78e725e72bff4d367421",
        ),
        (
            &[
                "assets/fmnist-vit",
                "--images",
                "assets/fmnist-images/calib.safetensors",
            ],
            "c53bd5a3227f421f7d571beab45917287df2ec3fcbd94a4c02141a17e65f3ea6",
        ),
    ];
    for (i, (args, sha)) in cases.iter().enumerate() {
        let rep = tmp.path().join(format!("r{i}.json"));
        let out = tmp.path().join(format!("q{i}.safetensors"));
        let mut a = vec!["run"];
        let abs: Vec<String> = args
            .iter()
            .map(|x| {
                if x.starts_with("assets/") {
                    root.join(x).to_str().unwrap().to_string()
                } else {
                    x.to_string()
                }
            })
            .collect();
        a.extend(abs.iter().map(|x| x.as_str()));
        a.extend([
            "--preset",
            "paper",
            "--device",
            "cpu",
            "--out",
            s(&out),
            "--report",
            s(&rep),
        ]);
        ok(&run(&a));
        assert_eq!(report(&rep)["codes_sha256"], *sha, "case {i}: {args:?}");
    }
}

/// The default recipe on the bundled model: every layer chose on held-out images and is no
/// worse than RTN there; `--target-bits` meets its budget with mixed widths.
/// `--choose`: by default (`auto`) the layers whose held-out images give at least 4 rows per
/// input ship each row from its best candidate, the others a whole candidate; the mix is the
/// last candidate listed and has the lowest held-out error of them; `--choose layer` and the
/// paper preset ship whole candidates.
#[test]
fn the_default_chooses_rows_where_the_held_out_images_allow() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let model = root.join("assets/fmnist-vit");
    let calib = root.join("assets/fmnist-images/calib.safetensors");
    let rep = tmp.path().join("r.json");
    let out = tmp.path().join("q.safetensors");
    let common = [
        "run",
        s(&model),
        "--images",
        s(&calib),
        "--calib-count",
        "64",
        "--bits",
        "3",
        "--device",
        "cpu",
        "--out",
        s(&out),
        "--report",
        s(&rep),
    ];
    let stdout = ok(&run(&common));
    assert!(
        stdout.contains("ship each row from its best candidate"),
        "{stdout}"
    );
    let r = report(&rep);
    let (mut by_row, mut whole) = (0, 0);
    for l in r["layers"].as_array().unwrap() {
        let cols = l["shape"][1].as_u64().unwrap();
        // 10 held-out images of 50 tokens: rows for the 64-wide inputs, not the 256-wide.
        let rows_from = l["rows_from"].as_array().unwrap();
        if 500 < 4 * cols {
            assert!(rows_from.is_empty(), "{}", l["name"]);
        }
        let candidates = l["candidates"].as_array().unwrap();
        let held = l["rel_error_holdout"].as_f64().unwrap();
        let best = candidates
            .iter()
            .map(|c| c["rel_error_holdout"].as_f64().unwrap())
            .fold(f64::INFINITY, f64::min);
        assert_eq!(held, best);
        assert!(held <= l["rel_error_holdout_rtn"].as_f64().unwrap());
        if rows_from.is_empty() {
            whole += 1;
            continue;
        }
        by_row += 1;
        let last = candidates.last().unwrap();
        assert_eq!(last["label"], l["chosen"]);
        assert!(l["chosen"].as_str().unwrap().starts_with("rows: "));
        let rows: u64 = rows_from.iter().map(|e| e[1].as_u64().unwrap()).sum();
        assert_eq!(rows, l["shape"][0].as_u64().unwrap());
        // Every row came from a candidate that was tried.
        for e in rows_from {
            assert!(candidates.iter().any(|c| c["label"] == e[0]), "{e}");
        }
    }
    assert!(by_row > 0 && whole > 0, "{by_row} by row, {whole} whole");
    // The report and the output's metadata say how the search chose.
    assert_eq!(r["choose"], "auto");
    let meta = comq_gpu::io::Checkpoint::open(&out)
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(meta["comq.choose"], "auto");
    for extra in [
        &["--choose", "layer"][..],
        &["--preset", "paper", "--holdout", "0.15"],
    ] {
        let mut a = common.to_vec();
        a.extend(extra);
        ok(&run(&a));
        for l in report(&rep)["layers"].as_array().unwrap() {
            assert!(l["rows_from"].as_array().unwrap().is_empty(), "{extra:?}");
        }
    }
    let mut bad = common.to_vec();
    bad.extend(["--choose", "rows"]);
    assert_eq!(run(&bad).status.code(), Some(2));
}

#[test]
fn the_default_recipe_guards_every_layer_and_target_bits_mixes_widths() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let model = root.join("assets/fmnist-vit");
    let calib = root.join("assets/fmnist-images/calib.safetensors");
    let rep = tmp.path().join("r.json");
    let out = tmp.path().join("q.safetensors");
    let common = [
        "run",
        s(&model),
        "--images",
        s(&calib),
        "--calib-count",
        "64",
        "--device",
        "cpu",
        "--out",
        s(&out),
        "--report",
        s(&rep),
    ];
    let stdout = ok(&run(&common));
    assert!(stdout.contains("held COMQ"), "{stdout}");
    let r = report(&rep);
    assert!(r["calibration"].as_str().unwrap().contains("held out"));
    for l in r["layers"].as_array().unwrap() {
        // 64 images: 54 calibrate, 10 are held out (50 tokens each).
        assert_eq!(l["samples"], 54 * 50);
        let held = l["rel_error_holdout"].as_f64().unwrap();
        let held_rtn = l["rel_error_holdout_rtn"].as_f64().unwrap();
        assert!(held <= held_rtn, "{}: {held} vs RTN {held_rtn}", l["name"]);
        let best = l["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["rel_error_holdout"].as_f64().unwrap())
            .fold(f64::INFINITY, f64::min);
        assert_eq!(held, best);
    }
    // The output says the shrink was chosen per layer, and by which search.
    let meta = comq_gpu::io::Checkpoint::open(&out)
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(meta["comq.scalar"], "auto");
    let plan: serde_json::Value = serde_json::from_str(&meta["comq.search"]).unwrap();
    assert_eq!(plan["line_search"], true);
    assert_eq!(plan["paper"], false);
    assert_eq!(plan["scalars"].as_array().unwrap().len(), 1);
    let mut full = common.to_vec();
    full.extend(["--search", "full"]);
    ok(&run(&full));
    let plan: serde_json::Value = serde_json::from_str(
        &comq_gpu::io::Checkpoint::open(&out).unwrap().metadata()["comq.search"],
    )
    .unwrap();
    assert_eq!(plan["paper"], true);
    assert_eq!(plan["scalars"].as_array().unwrap().len(), 5);
    // More candidates per layer, each layer still no worse than RTN on the held-out images.
    for l in report(&rep)["layers"].as_array().unwrap() {
        assert!(l["candidates"].as_array().unwrap().len() >= 12);
        let held = l["rel_error_holdout"].as_f64().unwrap();
        assert!(held <= l["rel_error_holdout_rtn"].as_f64().unwrap());
    }
    let mut a = common.to_vec();
    a.extend(["--target-bits", "3"]);
    ok(&run(&a));
    let r = report(&rep);
    let m = &r["mixed_precision"];
    assert!(m["average_bits"].as_f64().unwrap() <= 3.0 + 1e-9);
    let bits: Vec<u64> = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["bits"].as_u64().unwrap())
        .collect();
    assert!(bits.iter().any(|&b| b != 3), "{bits:?}");
    assert!(bits.iter().all(|&b| (2..=8).contains(&b)));
    // With images the objective weighs each layer by its measured effect on the features.
    assert_eq!(m["objective"], "output");
    assert_eq!(m["probe_bits"], 3);
    assert!(m["feature_seconds"].as_f64().unwrap() > 0.0);
    let sens = m["sensitivity"].as_array().unwrap();
    assert_eq!(sens.len(), bits.len());
    for v in sens {
        let v = v.as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{sens:?}");
    }
    // The layer objective sums the errors as measured.
    a.extend(["--mixed-objective", "layer"]);
    ok(&run(&a));
    let r = report(&rep);
    let m = &r["mixed_precision"];
    assert_eq!(m["objective"], "layer");
    assert!(m["probe_bits"].is_null());
    assert!(m["sensitivity"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v.is_null()));
    assert!(m["average_bits"].as_f64().unwrap() <= 3.0 + 1e-9);
    // Bad values are exit 2 with the option named.
    for (flag, value) in [
        ("--target-bits", "9"),
        ("--mixed-objective", "features"),
        ("--holdout", "1.5"),
        ("--scalar", "big"),
        ("--damp", "nan"),
    ] {
        let mut a = common.to_vec();
        a.extend([flag, value]);
        assert_bad_input(&run(&a), flag);
    }
}

/// `--equalize` folds its scales into the LayerNorms: the dequantized output, loaded as a plain
/// model, scores exactly what the run measured, and its LayerNorms differ from the input's.
#[test]
fn equalize_folds_into_the_layernorms_and_the_output_is_a_plain_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let model = root.join("assets/fmnist-vit");
    let calib = root.join("assets/fmnist-images/calib.safetensors");
    let test = root.join("assets/fmnist-images/test.safetensors");
    let deq = tmp.path().join("dq");
    let rep = tmp.path().join("r.json");
    ok(&run(&[
        "run",
        s(&model),
        "--images",
        s(&calib),
        "--calib-count",
        "64",
        "--equalize",
        "--bits",
        "3",
        "--eval",
        s(&test),
        "--eval-count",
        "100",
        "--device",
        "cpu",
        "--dequantized",
        s(&deq),
        "--report",
        s(&rep),
    ]));
    let r = report(&rep);
    let comq = &r["eval"]["rows"][2];
    let stdout = ok(&run(&[
        "eval",
        s(&deq),
        "--images",
        s(&test),
        "--count",
        "100",
        "--reference",
        s(&model),
        "--device",
        "cpu",
        "--json",
    ]));
    let e: Value = serde_json::from_str(&stdout).unwrap();
    let got = e["rows"][1]["fidelity"]["cls_cosine"].as_f64().unwrap();
    let want = comq["fidelity"]["cls_cosine"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-6,
        "standalone {got} vs in-run {want}"
    );
    assert!(want > 0.99, "{want}");
    let a = comq_gpu::io::Checkpoint::open(&model).unwrap();
    let b = comq_gpu::io::Checkpoint::open(&deq).unwrap();
    let norm = |c: &comq_gpu::io::Checkpoint, n: &str| {
        let t = c.tensors().iter().find(|t| t.name == n).unwrap().clone();
        c.read_f32(&t).unwrap()
    };
    assert_ne!(
        norm(&a, "blocks.0.norm1.weight"),
        norm(&b, "blocks.0.norm1.weight")
    );
    assert_ne!(
        norm(&a, "blocks.2.norm2.bias"),
        norm(&b, "blocks.2.norm2.bias")
    );
    // Without images there is no LayerNorm to fold into; the sequential mode is refused.
    let tiny = root.join("assets/tiny-vit.safetensors");
    let tcal = root.join("assets/tiny-vit.calib.safetensors");
    let out = tmp.path().join("q.safetensors");
    assert_bad_input(
        &run(&[
            "run",
            s(&tiny),
            "--calib",
            s(&tcal),
            "--equalize",
            "--out",
            s(&out),
        ]),
        "--equalize needs --images",
    );
    assert_bad_input(
        &run(&[
            "run",
            s(&model),
            "--images",
            s(&calib),
            "--equalize",
            "--calib-mode",
            "quantized",
            "--out",
            s(&out),
        ]),
        "--calib-mode fp",
    );
}

/// The evaluation rows name the widths the layers got: a recipe giving some layers other bits
/// makes them "mixed" with the average over the weights, not the default width.
#[test]
fn evaluation_rows_name_the_average_of_recipe_widths() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("r.toml");
    std::fs::write(&recipe, "[[layer]]\nmatch = 'fc2'\nbits = 2\n").unwrap();
    let rep = tmp.path().join("r.json");
    let calib = root.join("assets/fmnist-images/calib.safetensors");
    let test = root.join("assets/fmnist-images/test.safetensors");
    ok(&run(&[
        "run",
        s(&root.join("assets/fmnist-vit")),
        "--images",
        s(&calib),
        "--calib-count",
        "32",
        "--eval",
        s(&test),
        "--eval-count",
        "50",
        "--config",
        s(&recipe),
        "--preset",
        "paper",
        "--device",
        "cpu",
        "--out",
        s(&tmp.path().join("q.safetensors")),
        "--report",
        s(&rep),
    ]));
    let r = report(&rep);
    let layers = r["layers"].as_array().unwrap();
    let (mut sum, mut n) = (0.0, 0.0);
    for l in layers {
        let w = (l["shape"][0].as_u64().unwrap() * l["shape"][1].as_u64().unwrap()) as f64;
        sum += w * l["bits"].as_f64().unwrap();
        n += w;
    }
    let want = format!("COMQ W{:.2} mixed", sum / n);
    let rows: Vec<&str> = r["eval"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["model"].as_str().unwrap())
        .collect();
    assert!(rows.contains(&want.as_str()), "{rows:?} lacks {want}");
}

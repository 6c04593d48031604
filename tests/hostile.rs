//! Hostile inputs that used to give silently wrong numbers or unbounded work: every one is now a
//! clear refusal (exit 2, the culprit named) or a number that means what it says.

mod common;

use common::{assert_refused, run, s};

use std::path::{Path, PathBuf};
use std::process::Command;

use comq_gpu::model::synthetic::SyntheticVit;
use comq_gpu::model::Family;

/// A 2-class timm ViT on 16-px images in `dir/vit/`, with `edit` applied to its tensors.
fn vit(dir: &Path, edit: impl Fn(&str, &mut Vec<f32>)) -> PathBuf {
    let m = dir.join("vit");
    SyntheticVit {
        family: Family::TimmVit,
        dim: 32,
        depth: 1,
        heads: 2,
        mlp: 64,
        patch: 4,
        img: 16,
        channels: 3,
        classes: 2,
        seed: 5,
    }
    .write(&m)
    .unwrap();
    let path = m.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let mut v: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
        edit(&name, &mut v);
        tensors.push((name.to_string(), common::f32_tensor(t.shape(), &v)));
    }
    drop(st);
    common::write_safetensors(&path, &tensors);
    path
}

/// An image pack of `n` 16-px images labelled 0, 1, 0, 1, …
fn labelled_pack(dir: &Path, n: usize) -> PathBuf {
    let labels: Vec<i64> = (0..n as i64).map(|i| i % 2).collect();
    pack_with_labels(dir, &labels, None)
}

/// An image pack of 16-px images with these labels (and class names, when given).
fn pack_with_labels(dir: &Path, labels: &[i64], classes: Option<&[&str]>) -> PathBuf {
    let n = labels.len();
    let p = dir.join("labels.safetensors");
    let px: Vec<u8> = (0..n * 16 * 16 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let lb: Vec<u8> = bytemuck::cast_slice(labels).to_vec();
    let views = [
        (
            "images",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![n, 16, 16, 3], &px)
                .unwrap(),
        ),
        (
            "labels",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![n], &lb).unwrap(),
        ),
    ];
    let meta = classes.map(|c| {
        std::collections::HashMap::from([(
            "classes".to_string(),
            serde_json::to_string(c).unwrap(),
        )])
    });
    safetensors::serialize_to_file(views, meta, &p).unwrap();
    p
}

#[test]
fn a_label_the_head_does_not_have_is_refused_not_left_out_of_top1() {
    let dir = tempfile::tempdir().unwrap();
    // Two head classes; the label 7 (no class names) and a third class folder are beyond it.
    let model = vit(dir.path(), |_, _| {});
    let pack = pack_with_labels(dir.path(), &[0, 1, 7, 0], None);
    let o = run(&["eval", s(&model), "--images", s(&pack), "--device", "cpu"]);
    assert_refused(&o, "label 7");
    assert_refused(&o, "labels.safetensors[2]");
    assert_refused(&o, "2 classes");
    let pack = pack_with_labels(dir.path(), &[0, 1, 2, 0], Some(&["a", "b", "c"]));
    let out = dir.path().join("q.safetensors");
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&pack),
        "--eval",
        s(&pack),
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert_refused(&o, "class 'c'");
    assert!(!out.exists());
    // A negative label marks an image without one: it is not scored, and not refused.
    let pack = pack_with_labels(dir.path(), &[0, 1, -1, 0], None);
    let o = run(&["eval", s(&model), "--images", s(&pack), "--device", "cpu"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_nan_layernorm_parameter_is_an_error_naming_the_model_not_a_perfect_score() {
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |name, v| {
        if name == "norm.bias" {
            v[3] = f32::NAN;
        }
    });
    let pack = labelled_pack(dir.path(), 4);
    let o = run(&["eval", s(&model), "--images", s(&pack), "--device", "cpu"]);
    assert_refused(&o, "non-finite");
    assert_refused(&o, "norm.bias");
    // Calibration names the tensor too, not the Gram or the damping.
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&pack),
        "--device",
        "cpu",
        "--out",
        s(&dir.path().join("q.safetensors")),
    ]);
    assert_refused(&o, "norm.bias");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("--damp"));
}

#[test]
fn non_finite_features_are_an_error_naming_the_model() {
    // Finite weights whose activations overflow: a head scaled to 1e38.
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |name, v| {
        if name == "head.weight" {
            v.iter_mut().for_each(|x| *x = 3e38);
        }
    });
    let pack = labelled_pack(dir.path(), 4);
    let o = run(&["eval", s(&model), "--images", s(&pack), "--device", "cpu"]);
    assert_refused(&o, "non-finite logits");
    assert_refused(&o, s(&model));
}

#[test]
fn tied_logits_score_no_hit() {
    let dir = tempfile::tempdir().unwrap();
    // A head of zeros: every logit is 0, every class ties.
    let model = vit(dir.path(), |name, v| {
        if name.starts_with("head.") {
            v.iter_mut().for_each(|x| *x = 0.0);
        }
    });
    let pack = labelled_pack(dir.path(), 4);
    let o = run(&[
        "eval",
        s(&model),
        "--images",
        s(&pack),
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let top1 = v["rows"][0]["accuracy"]["top1"].as_f64().unwrap();
    assert_eq!(top1, 0.0, "{v}");
}

#[test]
fn class_folders_that_mix_label_names_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |_, _| {});
    // The model's labels, as a config.json with id2label would give them.
    let cfg_path = model.parent().unwrap().join("config.json");
    let mut cfg: serde_json::Value = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    cfg["id2label"] = serde_json::json!({"0": "cat", "1": "dog"});
    cfg["num_labels"] = serde_json::json!(2);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let imgs = dir.path().join("imgs");
    for class in ["cat", "doggo"] {
        std::fs::create_dir_all(imgs.join(class)).unwrap();
        image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 9, 7]))
            .save(imgs.join(class).join("a.png"))
            .unwrap();
    }
    let o = run(&["eval", s(&model), "--images", s(&imgs), "--device", "cpu"]);
    assert_refused(&o, "doggo");
}

#[test]
fn zero_evaluation_or_calibration_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |_, _| {});
    let pack = labelled_pack(dir.path(), 4);
    for args in [
        vec!["eval", s(&model), "--images", s(&pack), "--count", "0"],
        vec!["run", s(&model), "--images", s(&pack), "--calib-count", "0"],
        vec![
            "run",
            s(&model),
            "--images",
            s(&pack),
            "--eval",
            s(&pack),
            "--eval-count",
            "0",
        ],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("0"), "{args:?}");
    }
}

#[test]
fn gram_matrices_that_cannot_be_x_transpose_x_are_refused_with_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let n = 8;
    let mut rng = common::Rng::new(3);
    let w: Vec<f32> = rng.normals(4 * n);
    let model = dir.path().join("m.safetensors");
    common::write_safetensors(
        &model,
        &[("lin.weight".to_string(), common::f32_tensor(&[4, n], &w))],
    );
    let x = common::correlated_x(&mut rng, 64, n);
    let good = common::gram_of(&x, 64, n);
    let good: Vec<f32> = good.data.iter().map(|&v| v as f32).collect();
    type Edit = Box<dyn Fn(&mut Vec<f32>)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "all zero",
            Box::new(|g| g.iter_mut().for_each(|v| *v = 0.0)),
        ),
        ("not symmetric", Box::new(move |g| g[1] += 10.0 * g[0])),
        ("negative diagonal", Box::new(move |g| g[n + 1] = -1.0)),
        (
            "positive semi-definite",
            Box::new(move |g| {
                let big = 10.0 * (g[0] * g[n + 1]).sqrt();
                g[1] = big;
                g[n] = big;
            }),
        ),
    ];
    for (needle, edit) in cases {
        let mut g = good.clone();
        edit(&mut g);
        let calib = dir.path().join("c.safetensors");
        common::write_safetensors(
            &calib,
            &[("lin.gram".to_string(), common::f32_tensor(&[n, n], &g))],
        );
        let out = dir.path().join("q.safetensors");
        let o = run(&[
            "run",
            s(&model),
            "--calib",
            s(&calib),
            "--device",
            "cpu",
            "--out",
            s(&out),
        ]);
        assert_refused(&o, needle);
        assert_refused(&o, "lin.gram");
        assert!(!out.exists());
    }
    // Activations whose Gram overflows f32 are refused too, not reported as error 0.
    let huge: Vec<f32> = x.iter().map(|v| v * 1e30).collect();
    let calib = dir.path().join("c.safetensors");
    common::write_safetensors(
        &calib,
        &[("lin.input".to_string(), common::f32_tensor(&[64, n], &huge))],
    );
    let o = run(&[
        "run",
        s(&model),
        "--calib",
        s(&calib),
        "--device",
        "cpu",
        "--out",
        s(&dir.path().join("q.safetensors")),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A 60-byte PNG whose header claims `w × h` pixels (no pixel data at all).
fn claimed_png(path: &Path, w: u32, h: u32) {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grey, deflate, no filter, no interlace
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c]);
    chunk(b"IEND", &[]);
    std::fs::write(path, png).unwrap();
}

#[test]
fn images_too_large_or_too_thin_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |_, _| {});
    for (w, h, needle) in [(2_000_000, 1, "aspect ratio"), (100_000, 100_000, "limit")] {
        let imgs = dir.path().join(format!("imgs-{w}"));
        std::fs::create_dir_all(&imgs).unwrap();
        claimed_png(&imgs.join("a.png"), w, h);
        let t = std::time::Instant::now();
        let o = run(&["eval", s(&model), "--images", s(&imgs), "--device", "cpu"]);
        assert_refused(&o, needle);
        assert_refused(&o, "a.png");
        assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    }
}

#[cfg(unix)]
#[test]
fn the_image_walk_skips_fifos_and_link_loops() {
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |_, _| {});
    let imgs = dir.path().join("imgs");
    std::fs::create_dir_all(imgs.join("a")).unwrap();
    image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 9, 7]))
        .save(imgs.join("a/0.png"))
        .unwrap();
    // A loop back to the root and a FIFO named like an image.
    std::os::unix::fs::symlink(&imgs, imgs.join("a/loop")).unwrap();
    let fifo = std::ffi::CString::new(s(&imgs.join("a/1.png"))).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_comq-gpu"))
        .args(["eval", s(&model), "--images", s(&imgs), "--device", "cpu"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed().as_secs() > 30 {
            child.kill().unwrap();
            panic!("the image walk did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn an_os_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let o = run(&["inspect", s(&file.join("model.safetensors"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let first = err.find("os error").expect("an OS error");
    assert!(!err[first + 1..].contains("os error"), "{err}");
}

#[test]
fn side_file_values_are_checked_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |_, _| {});
    let pack = labelled_pack(dir.path(), 2);
    let cfg_path = model.parent().unwrap().join("config.json");
    let cases = [
        (
            serde_json::json!({"num_heads": 2, "pretrained_cfg": {"input_size": [3, 0, 0]}}),
            "crop",
        ),
        (
            serde_json::json!({"num_heads": 2, "pretrained_cfg": {"crop_pct": 0.0}}),
            "crop_pct",
        ),
        (
            serde_json::json!({"num_heads": 2, "pretrained_cfg": {"std": [0.5, 0.0, 0.5]}}),
            "std",
        ),
        (
            serde_json::json!({"num_heads": 2, "pretrained_cfg": {"mean": []}}),
            "'mean' has 0 values",
        ),
        (
            serde_json::json!({"num_heads": 2, "layer_norm_eps": -1.0}),
            "layer_norm_eps",
        ),
        (
            serde_json::json!({"num_heads": 2, "pretrained_cfg": {"input_size": [3, 100000, 100000]}}),
            "crop",
        ),
        // Width 32 with no head count: no safe guess.
        (serde_json::json!({}), "num_heads"),
        // A non-square input whose grid the position embedding does not hold would run as a
        // square network of another grid.
        (
            serde_json::json!({"num_heads": 2, "pretrained_cfg": {"input_size": [3, 16, 24]}}),
            "'pretrained_cfg.input_size' is 16x24, a non-square input, but the position embedding",
        ),
        (
            serde_json::json!({"model_args": {"num_heads": 2, "img_size": [24, 16]}}),
            "'model_args.img_size' is 24x16",
        ),
    ];
    for (cfg, needle) in cases {
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let o = run(&["eval", s(&model), "--images", s(&pack), "--device", "cpu"]);
        assert_refused(&o, needle);
    }
    // `run` refuses it too, before writing anything.
    let out = dir.path().join("q.safetensors");
    let o = run(&["run", s(&model), "--images", s(&pack), "--out", s(&out)]);
    assert_refused(&o, "non-square");
    assert!(!out.exists());
}

#[test]
fn the_vulkan_loader_stays_quiet_without_xdg_runtime_dir() {
    let o = Command::new(env!("CARGO_BIN_EXE_comq-gpu"))
        .env_remove("XDG_RUNTIME_DIR")
        .args(["devices"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}

/// A safetensors file from a raw header JSON and data.
fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn safetensors_messages_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    // A header length beyond the format's limit.
    let big = dir.path().join("big.safetensors");
    let mut b = (200_000_000u64).to_le_bytes().to_vec();
    b.extend(b"{}");
    std::fs::write(&big, b).unwrap();
    assert_refused(&run(&["inspect", s(&big)]), "100 MB limit");
    // The same name twice.
    let dup = dir.path().join("dup.safetensors");
    raw_safetensors(
        &dup,
        r#"{"a.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a.weight":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
        &[0u8; 16],
    );
    assert_refused(&run(&["inspect", s(&dup)]), "twice");
    // An F8 weight: a float format not read yet, said so.
    let f8 = dir.path().join("f8.safetensors");
    raw_safetensors(
        &f8,
        r#"{"lin.weight":{"dtype":"F8_E4M3","shape":[8,8],"data_offsets":[0,64]}}"#,
        &[0x38u8; 64],
    );
    let o = run(&[
        "run",
        s(&f8),
        "--data-free",
        "--device",
        "cpu",
        "--out",
        s(&dir.path().join("q.safetensors")),
    ]);
    assert_refused(&o, "does not read yet");
}

#[test]
fn a_recipe_takes_every_flag_and_names_its_own_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = common::tiny_vit(dir.path(), 16, 13);
    let rep = dir.path().join("r.json");
    let out = dir.path().join("o.safetensors");
    let go = |recipe: &str| {
        let r = dir.path().join("r.toml");
        std::fs::write(&r, recipe).unwrap();
        run(&[
            "run",
            s(&model),
            "--calib",
            s(&calib),
            "--config",
            s(&r),
            "--device",
            "cpu",
            "--out",
            s(&out),
            "--report",
            s(&rep),
        ])
    };
    // Keys that used to be refused: damp, holdout, memory_limit, preset, scalar, no_act_order.
    let o = go(
        "damp = 0.05\nholdout = 0.0\nmemory_limit = \"8GB\"\npreset = \"paper\"\nscalar = \"1.0\"\nno_act_order = true\nverify_cpu = 0\n",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    assert_eq!(
        r["options"]["damp"].as_f64().unwrap() as f32,
        0.05,
        "{}",
        r["options"]
    );
    // A key that is no flag: named with its line.
    let o = go("bits = 3\n\nbitz = 3\n");
    assert_refused(&o, "line 3");
    assert_refused(&o, "bitz");
    // A bad per-layer value names the rule, not a flag.
    let o = go("[[layer]]\nmatch = 'fc2'\nbits = 99\n");
    assert_refused(&o, "[[layer]] #1 (match 'fc2')");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("--bits"));
    // A rule that matches nothing is said.
    let o = go("[[layer]]\nmatch = 'no_such_layer'\nbits = 8\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("matches no tensor"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn input_sizes_from_flags_and_packs_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |_, _| {});
    let pack = labelled_pack(dir.path(), 2);
    for (flag, v, needle) in [
        ("--crop", "8192", "at most 4096"),
        ("--resize", "100000", "over the limit"),
    ] {
        let o = run(&[
            "eval",
            s(&model),
            "--images",
            s(&pack),
            "--device",
            "cpu",
            flag,
            v,
        ]);
        assert_refused(&o, needle);
    }
    // A pack of 1 × 64 images: an aspect ratio no photo has.
    let thin = dir.path().join("thin.safetensors");
    let px = vec![128u8; 2 * 64 * 3];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![2, 1, 64, 3], &px)
        .unwrap();
    safetensors::serialize_to_file([("images", view)], None, &thin).unwrap();
    let o = run(&["eval", s(&model), "--images", s(&thin), "--device", "cpu"]);
    assert_refused(&o, "aspect ratio");
}

#[path = "common/gpu.rs"]
mod gpu;

#[test]
fn a_gpu_wait_past_its_limit_is_an_error_not_a_hang() {
    if gpu::device().is_none() {
        return;
    }
    let t = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_comq-gpu"))
        .env("RUST_LOG", "warn")
        .env("COMQ_GPU_TIMEOUT", "0")
        .args([
            "bench",
            "--kernels",
            "--no-cpu",
            "--shapes",
            "512x512",
            "--gram-rows",
            "8192",
        ])
        .output()
        .unwrap();
    assert_refused(&o, "COMQ_GPU_TIMEOUT");
    assert!(t.elapsed().as_secs() < 120);
}

#[test]
fn equalize_refusals_read_as_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |_, _| {});
    let pack = labelled_pack(dir.path(), 4);
    let out = dir.path().join("q.safetensors");
    for (extra, needle) in [
        (vec!["--resume"], "cannot be combined with --resume"),
        (vec!["--calib-mode", "quantized"], "--calib-mode fp only"),
        (vec!["--calib-mode", "corrected"], "--calib-mode fp only"),
    ] {
        let mut args = vec![
            "run",
            s(&model),
            "--images",
            s(&pack),
            "--device",
            "cpu",
            "--equalize",
            "--out",
            s(&out),
        ];
        args.extend(extra);
        let o = run(&args);
        assert_refused(&o, needle);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("  "), "a run of spaces in: {err}");
    }
}

/// A model with a tensor the forward pass would not read (here a query norm without the key
/// norm that timm's `qk_norm=True` always has beside it) is refused by `run --images` and `eval`, naming
/// the tensor, instead of being calibrated as another network; `--allow-unused-tensors` goes on
/// with a warning.
#[test]
fn a_tensor_the_forward_pass_does_not_read_is_refused_by_run_and_eval() {
    let dir = tempfile::tempdir().unwrap();
    let model = vit(dir.path(), |_, _| {});
    let bytes = std::fs::read(&model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, common::Owned)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
            (n.to_string(), common::f32_tensor(t.shape(), &v))
        })
        .collect();
    drop(st);
    tensors.push((
        "blocks.0.attn.q_norm.weight".into(),
        common::f32_tensor(&[8], &[1.0; 8]),
    ));
    common::write_safetensors(&model, &tensors);
    let pack = labelled_pack(dir.path(), 4);
    let out = dir.path().join("q.safetensors");
    let o = run(&["run", s(&model), "--images", s(&pack), "--out", s(&out)]);
    assert_refused(
        &o,
        "'blocks.0.attn.q_norm.weight' is not used by its forward pass",
    );
    assert!(!out.exists());
    let o = run(&["eval", s(&model), "--images", s(&pack)]);
    assert_refused(&o, "--allow-unused-tensors");
    let o = run(&[
        "run",
        s(&model),
        "--images",
        s(&pack),
        "--out",
        s(&out),
        "--allow-unused-tensors",
        "--preset",
        "paper",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("blocks.0.attn.q_norm.weight"));
}

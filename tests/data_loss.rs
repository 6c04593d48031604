//! Nothing a user owns is lost: work directories, outputs against inputs, concurrent runs and
//! outputs that replace earlier ones. Every case checks the exit code, the message, what is left
//! on disk and that the inputs' bytes are unchanged.

mod common;

use common::{assert_refused, run, s};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use comq_gpu::io::guard::{Lock, Output as GuardOutput, OutputKind};
use comq_gpu::model::synthetic::SyntheticVit;
use comq_gpu::model::Family;

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                m.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    m
}

/// A tiny timm ViT in `dir/model/`, and the folder itself.
fn tiny(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let (model, _calib) = common::tiny_vit(&m, 16, 3);
    model
}

/// A ViT that calibrates from images, its image pack and a folder of PNGs.
fn vision(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
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
    let pack = dir.join("pack.safetensors");
    comq_gpu::bench::write_image_pack(&pack, 4, 16, 3).unwrap();
    let folder = dir.join("photos");
    std::fs::create_dir_all(&folder).unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_fn(16, 16, |x, y| {
            image::Rgb([x as u8 * 9, y as u8 * 7, i * 40])
        })
        .save(folder.join(format!("{i}.png")))
        .unwrap();
    }
    (m.join("model.safetensors"), pack, folder)
}

#[test]
fn a_work_dir_that_holds_user_files_is_refused_before_any_compute() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
    let before = snapshot(dir.path());
    let out = dir.path().join("out/q.safetensors");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    // `--work-dir .`-like: the directory that holds the model and the user's files.
    for resume in [false, true] {
        let mut args = vec![
            "run",
            s(&model),
            "--data-free",
            "--device",
            "cpu",
            "--out",
            s(&out),
            "--work-dir",
            s(dir.path()),
        ];
        if resume {
            args.push("--resume");
        }
        let o = run(&args);
        // The model lies inside: named as such; else the unmarked directory is refused.
        assert_refused(&o, "--work-dir");
        let mut after = snapshot(dir.path());
        after.retain(|p, _| !p.starts_with(dir.path().join("out")));
        assert_eq!(after, before, "resume {resume}");
        assert!(!out.exists());
    }
    // A directory without the model in it, holding a user file.
    let wd = dir.path().join("wd");
    std::fs::create_dir(&wd).unwrap();
    std::fs::write(wd.join("keep.bin"), b"keep").unwrap();
    let o = run(&[
        "run",
        s(&model),
        "--data-free",
        "--device",
        "cpu",
        "--out",
        s(&out),
        "--work-dir",
        s(&wd),
    ]);
    assert_refused(&o, "did not create");
    assert_eq!(std::fs::read(wd.join("keep.bin")).unwrap(), b"keep");
    assert!(!out.exists());
}

#[test]
fn the_work_dir_keeps_what_the_tool_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("q.safetensors");
    let run_with = |wd: &Path| {
        run(&[
            "run",
            s(&model),
            "--data-free",
            "--device",
            "cpu",
            "--out",
            s(&out),
            "--work-dir",
            s(wd),
        ])
    };
    // A new directory: created, then removed whole (the tool made it).
    let new = dir.path().join("new/work");
    ok(&run_with(&new));
    assert!(!new.exists());
    assert!(
        dir.path().join("new").is_dir(),
        "the parent is not the tool's to remove"
    );
    // An empty directory of the user's: used, emptied of the tool's files, kept.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    ok(&run_with(&empty));
    assert!(empty.is_dir());
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    // A marked work directory in which the user put a file: only the tool's files go.
    let marked = dir.path().join("marked");
    std::fs::create_dir(&marked).unwrap();
    std::fs::write(
        marked.join("comq-gpu-work.json"),
        br#"{"created_dir":true}"#,
    )
    .unwrap();
    std::fs::write(marked.join("layer-00000.safetensors"), b"stale").unwrap();
    std::fs::write(marked.join("mine.txt"), b"mine").unwrap();
    ok(&run_with(&marked));
    assert_eq!(std::fs::read(marked.join("mine.txt")).unwrap(), b"mine");
    assert!(!marked.join("layer-00000.safetensors").exists());
    assert!(!marked.join("comq-gpu-work.json").exists());
    assert!(out.exists());
}

#[test]
fn a_work_dir_equal_to_the_output_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("outdir");
    let o = run(&[
        "run",
        s(&model),
        "--data-free",
        "--device",
        "cpu",
        "--out",
        s(&out),
        "--work-dir",
        s(&out),
    ]);
    assert_refused(&o, "overlap");
    assert!(!out.exists());
}

#[test]
fn outputs_onto_image_packs_folders_and_eval_sets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model, pack, folder) = vision(dir.path());
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&pack, &link).unwrap();
    let hard = dir.path().join("hard.safetensors");
    std::fs::hard_link(&pack, &hard).unwrap();
    let before = snapshot(dir.path());
    let out = dir.path().join("q.safetensors");
    let img0 = folder.join("0.png");
    let inside = folder.join("r.json");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--images", s(&pack), "--report", s(&pack)], "--images"),
        (vec!["--images", s(&pack), "--out", s(&pack)], "--images"),
        (
            vec![
                "--images",
                s(&pack),
                "--eval",
                s(&folder),
                "--dequantized",
                s(&img0),
            ],
            "--eval",
        ),
        (vec!["--images", s(&folder), "--plot", s(&img0)], "--images"),
        (
            vec!["--images", s(&folder), "--report", s(&img0)],
            "--images",
        ),
        (
            vec!["--images", s(&folder), "--report", s(&inside)],
            "inside the input folder",
        ),
        (vec!["--images", s(&link), "--report", s(&pack)], "--images"),
        (vec!["--images", s(&pack), "--report", s(&link)], "--images"),
        (vec!["--images", s(&hard), "--report", s(&pack)], "--images"),
        (
            vec![
                "--images",
                s(&pack),
                "--eval",
                s(&hard),
                "--report",
                s(&pack),
            ],
            "never overwrites its inputs",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["run", s(&model), "--device", "cpu"];
        if !extra.contains(&"--out") {
            args.extend(["--out", s(&out)]);
        }
        args.extend(extra.iter().copied());
        let o = run(&args);
        assert_refused(&o, needle);
        assert_eq!(snapshot(dir.path()), before, "{extra:?}");
    }
}

#[test]
fn a_second_run_on_a_locked_output_is_refused_with_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("q.safetensors");
    let held = Lock::acquire(&GuardOutput::new("--out", &out, OutputKind::Checkpoint)).unwrap();
    let o = run(&[
        "run",
        s(&model),
        "--data-free",
        "--device",
        "cpu",
        "--out",
        s(&out),
    ]);
    assert_refused(&o, &format!("process {}", std::process::id()));
    assert!(!out.exists());
    drop(held);
    ok(&run(&[
        "run",
        s(&model),
        "--data-free",
        "--device",
        "cpu",
        "--out",
        s(&out),
    ]));
    // No lock file, temporary or work directory is left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["model", "q.safetensors"]);
}

#[test]
fn a_new_output_removes_the_files_of_the_one_it_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("out");
    let shard_args = |size: &str| {
        run(&[
            "run",
            s(&model),
            "--data-free",
            "--device",
            "cpu",
            "--out",
            s(&out),
            "--max-shard-size",
            size,
        ])
    };
    let safetensors_in = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".safetensors"))
            .collect();
        v.sort();
        v
    };
    ok(&shard_args("2KB"));
    let sharded = safetensors_in(&out);
    assert!(sharded.len() > 2, "{sharded:?}");
    assert!(sharded.contains(&"model.safetensors.index.json".to_string()));
    // Into the same directory as one file: the shards and the index go.
    ok(&shard_args("1GB"));
    assert_eq!(safetensors_in(&out), ["model.safetensors"]);
    comq_gpu::io::Checkpoint::open(&out).unwrap();
    // And back: the single file goes.
    ok(&shard_args("2KB"));
    assert!(!safetensors_in(&out).contains(&"model.safetensors".to_string()));
    comq_gpu::io::Checkpoint::open(&out).unwrap();
}

#[test]
fn a_directory_with_both_an_index_and_a_single_file_is_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("out");
    ok(&run(&[
        "run",
        s(&model),
        "--data-free",
        "--device",
        "cpu",
        "--dequantized",
        s(&out),
        "--max-shard-size",
        "2KB",
    ]));
    std::fs::copy(&model, out.join("model.safetensors")).unwrap();
    let o = run(&["inspect", s(&out)]);
    assert_refused(&o, "ambiguous");
}

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

fn saved_layers(work: &Path) -> usize {
    std::fs::read_dir(work)
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
        .unwrap_or(0)
}

/// Starts a slow run into `out` and returns it once `layers` layers are saved.
fn started_run(model: &Path, out: &Path, layers: usize) -> std::process::Child {
    let work = PathBuf::from(format!("{}.work", out.display()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_comq-gpu"))
        .env("RUST_LOG", "warn")
        .args(["run", s(model), "--out", s(out)])
        .args(["--data-free", "--device", "cpu", "--sweeps", "12", "-q"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while saved_layers(&work) < layers {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be interrupted; make it slower"
        );
        assert!(
            started.elapsed().as_secs() < 120,
            "no layer checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child
}

#[test]
fn an_interrupt_removes_temporaries_keeps_the_work_and_says_how_to_resume() {
    for (sig, code) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = slow_model(dir.path(), 24, 384, 192);
        let out = dir.path().join("out.safetensors");
        let child = started_run(&model, &out, 2);
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{err}");
        assert!(err.contains("--resume"), "{err}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.ends_with(".tmp") || n.ends_with(".lock")),
            "{names:?}"
        );
        assert!(!out.exists());
        assert!(saved_layers(&dir.path().join("out.safetensors.work")) >= 2);
    }
}

#[test]
fn a_resume_after_the_weights_changed_in_place_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = slow_model(dir.path(), 24, 384, 192);
    let out = dir.path().join("out.safetensors");
    let mut child = started_run(&model, &out, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    // The same size, one weight of the first layer changed, the time stamp put back.
    let mtime = std::fs::metadata(&model).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&model).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let first = 8 + header;
    let data_of = |b: &[u8]| -> Vec<u8> { b[first..first + 16].to_vec() };
    let before = data_of(&bytes);
    // Every tensor is [384, 192] f32, laid out by name: the first data bytes are layer 00's.
    bytes[first + 1] ^= 0x40;
    assert_ne!(data_of(&bytes), before);
    std::fs::write(&model, &bytes).unwrap();
    let f = std::fs::File::options().write(true).open(&model).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let o = run(&[
        "run",
        s(&model),
        "--out",
        s(&out),
        "--resume",
        "--data-free",
        "--device",
        "cpu",
        "--sweeps",
        "12",
    ]);
    assert_refused(&o, "other weights");
    assert!(!out.exists());
}

#[test]
fn a_model_truncated_while_it_is_read_is_a_clear_error_that_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = slow_model(dir.path(), 24, 384, 192);
    let out = dir.path().join("out.safetensors");
    let child = started_run(&model, &out, 2);
    // Another process cuts the model short under the running job.
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("truncated"), "{err}");
    assert!(!out.exists());
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with(".tmp") || n.ends_with(".lock")),
        "{names:?}"
    );
}

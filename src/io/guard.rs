//! What a run may touch: no output lands on an input, and no two runs write the same output.
//!
//! Every output of a run (the packed and dequantized checkpoints with every file their format
//! names — shards, index, `config.json`, `preprocessor_config.json` — the report, the plot and
//! the work directory) is checked against every input (the model's files and side files, the
//! calibration file, image packs and folders, evaluation sets, the recipe) before any compute.
//! Paths are compared canonically (so symbolic links and `..` do not hide a clash) and, for
//! files that exist, by device and inode (so a hard link does not either). An output inside an
//! input folder is refused too: it would join the inputs of the next run.
//!
//! Each output and the work directory is then held under an advisory lock on `<path>.lock`
//! for the whole run, so a second run naming the same path is refused with the first run's
//! process id instead of interleaving its layers with the first one's.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What an output path holds, which decides the files it may write or replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A checkpoint: a `.safetensors` file (with shards and an index beside it when large) or a
    /// directory that receives `model.safetensors` (or its shards) and the side files.
    Checkpoint,
    /// One plain file (report, plot).
    File,
    /// The work directory of per-layer checkpoints.
    WorkDir,
}

/// One output of a run.
#[derive(Debug, Clone)]
pub struct Output {
    /// The flag that named it (for messages).
    pub flag: String,
    /// The path as given.
    pub path: PathBuf,
    /// What it holds.
    pub kind: OutputKind,
}

/// One input of a run.
#[derive(Debug, Clone)]
pub struct Input {
    /// The flag that named it (for messages).
    pub flag: String,
    /// The path: a file, or a folder whose every file is an input.
    pub path: PathBuf,
}

impl Output {
    /// An output named by `flag`.
    pub fn new(flag: &str, path: &Path, kind: OutputKind) -> Output {
        Output {
            flag: flag.into(),
            path: path.into(),
            kind,
        }
    }
}

impl Input {
    /// An input named by `flag`.
    pub fn new(flag: &str, path: &Path) -> Input {
        Input {
            flag: flag.into(),
            path: path.into(),
        }
    }
}

fn parent_of(p: &Path) -> &Path {
    p.parent()
        .filter(|x| !x.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The canonical form of `p`: itself when it exists, else its deepest existing ancestor's
/// canonical form joined with the rest (so a path that does not exist yet still compares
/// equal to one reached through a symbolic link).
pub fn canonical(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let mut rest = Vec::new();
    let mut at = abs.as_path();
    loop {
        if let Ok(c) = at.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                at = parent;
            }
            _ => return abs,
        }
    }
}

/// Whether `a` and `b` are the same file: the same canonical path, or (both existing) the same
/// identity (device and inode; volume and file index on Windows).
pub fn same_file(a: &Path, b: &Path) -> bool {
    if canonical(a) == canonical(b) {
        return true;
    }
    matches!((crate::platform::file_id(a), crate::platform::file_id(b)), (Some(x), Some(y)) if x == y)
}

/// Where a checkpoint output's files go and the stem they are named from: `dir/model` for a
/// directory, `parent/stem` for `stem.safetensors`.
pub fn checkpoint_stem(p: &Path) -> (PathBuf, String) {
    let is_file = p.extension().is_some_and(|e| e == "safetensors");
    if is_file {
        let stem = p
            .file_name()
            .map(|f| {
                f.to_string_lossy()
                    .trim_end_matches(".safetensors")
                    .to_string()
            })
            .unwrap_or_else(|| "model".into());
        (parent_of(p).to_path_buf(), stem)
    } else {
        (p.to_path_buf(), "model".into())
    }
}

/// Whether `name` is a shard of `stem` (`stem-00001-of-00003.safetensors`); returns the shard
/// count it names.
pub fn shard_of(name: &str, stem: &str) -> Option<usize> {
    let rest = name.strip_prefix(stem)?.strip_prefix('-')?;
    let rest = rest.strip_suffix(".safetensors")?;
    let (i, n) = rest.split_once("-of-")?;
    let ok = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    (ok(i) && ok(n)).then(|| n.parse().ok()).flatten()
}

/// Every file a checkpoint output at `p` may write, or remove as part of an earlier output it
/// replaces: the single file, its index, the shards already there, and in directory form the
/// side files.
pub fn checkpoint_files(p: &Path) -> Vec<PathBuf> {
    let (dir, stem) = checkpoint_stem(p);
    let mut v = vec![
        dir.join(format!("{stem}.safetensors")),
        dir.join(format!("{stem}.safetensors.index.json")),
    ];
    if p.extension().is_none_or(|e| e != "safetensors") {
        v.push(dir.join("config.json"));
        v.push(dir.join("preprocessor_config.json"));
    }
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            if shard_of(&e.file_name().to_string_lossy(), &stem).is_some() {
                v.push(e.path());
            }
        }
    }
    v
}

/// The files and folders an output claims.
fn claimed(o: &Output) -> Vec<PathBuf> {
    match o.kind {
        OutputKind::Checkpoint => {
            let mut v = checkpoint_files(&o.path);
            v.push(o.path.clone());
            v
        }
        OutputKind::File | OutputKind::WorkDir => vec![o.path.clone()],
    }
}

/// Refuses, before any compute, an output that would write, replace or remove an input, an
/// output inside an input folder, a work directory that holds an input or an output, and two
/// outputs that name the same file. Also refuses an output whose folder does not exist.
pub fn check(inputs: &[Input], outputs: &[Output]) -> Result<()> {
    let inputs: Vec<(&Input, PathBuf, bool)> = inputs
        .iter()
        .map(|i| (i, canonical(&i.path), i.path.is_dir()))
        .collect();
    for (k, o) in outputs.iter().enumerate() {
        let here = canonical(&o.path);
        for (i, ci, is_dir) in &inputs {
            let clash = claimed(o).iter().any(|f| same_file(f, &i.path))
                || (*is_dir && here.starts_with(ci))
                || (o.kind == OutputKind::WorkDir && ci.starts_with(&here));
            if clash {
                let how = if *is_dir && here.starts_with(ci) && !same_file(&o.path, &i.path) {
                    "lies inside the input folder"
                } else if o.kind == OutputKind::WorkDir && ci.starts_with(&here) {
                    "holds the input"
                } else {
                    "would overwrite the input"
                };
                return Err(Error::InvalidOption(format!(
                    "{} {} {how} {} {}; comq-gpu never overwrites its inputs or writes into their folders",
                    o.flag,
                    o.path.display(),
                    i.flag,
                    i.path.display()
                )));
            }
        }
        for o2 in &outputs[..k] {
            let there = canonical(&o2.path);
            let inside = |a: &Output, ca: &PathBuf, b: &PathBuf| {
                a.kind != OutputKind::File && b.starts_with(ca) && b != ca
            };
            let clash = same_file(&o.path, &o2.path)
                || claimed(o)
                    .iter()
                    .any(|f| claimed(o2).iter().any(|g| same_file(f, g)))
                || (o.kind == OutputKind::WorkDir && inside(o, &here, &there))
                || (o2.kind == OutputKind::WorkDir && inside(o2, &there, &here));
            if clash {
                return Err(Error::InvalidOption(format!(
                    "{} {} and {} {} overlap: each output needs a place of its own",
                    o.flag,
                    o.path.display(),
                    o2.flag,
                    o2.path.display()
                )));
            }
        }
        let parent = parent_of(&o.path);
        if o.kind != OutputKind::WorkDir && !parent.is_dir() {
            return Err(Error::InvalidOption(format!(
                "{} {}: the directory {} does not exist",
                o.flag,
                o.path.display(),
                parent.display()
            )));
        }
        if o.path.is_dir() && o.kind == OutputKind::File {
            return Err(Error::InvalidOption(format!(
                "{} {} is a directory; name a file",
                o.flag,
                o.path.display()
            )));
        }
        if o.path.exists() && !o.path.is_dir() && o.kind == OutputKind::WorkDir {
            return Err(Error::InvalidOption(format!(
                "{} {} is a file, not a directory",
                o.flag,
                o.path.display()
            )));
        }
    }
    Ok(())
}

/// An advisory lock on `<path>.lock`, held until dropped; the lock file is removed then.
#[derive(Debug)]
pub struct Lock {
    file: File,
    path: PathBuf,
}

/// The lock file of `p`.
pub fn lock_path(p: &Path) -> PathBuf {
    let mut s = canonical(p).into_os_string();
    s.push(".lock");
    PathBuf::from(s)
}

impl Lock {
    /// Takes the lock of output `o`, or refuses with the holder's process id. Creating the lock
    /// file also proves, before any compute, that the output's folder is writable.
    pub fn acquire(o: &Output) -> Result<Lock> {
        let path = lock_path(&o.path);
        if o.kind == OutputKind::WorkDir {
            // A work directory may be named anywhere new; its lock file goes beside it.
            let parent = parent_of(&path);
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        // A run that removes its lock file while another waits on the old inode would let a
        // third take a fresh one: after locking, the path must still be the locked file.
        for _ in 0..16 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| {
                    Error::InvalidOption(format!(
                        "{} {}: cannot create the lock file {} ({e}); is the folder writable?",
                        o.flag,
                        o.path.display(),
                        path.display()
                    ))
                })?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let pid = text.trim();
                    return Err(Error::InvalidOption(format!(
                        "{} {} is in use by another comq-gpu run ({}); wait for it to end or \
                         choose another path",
                        o.flag,
                        o.path.display(),
                        if pid.is_empty() {
                            "process unknown".to_string()
                        } else {
                            format!("process {pid}")
                        }
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            // The lock file may have been replaced between opening and locking it: lock again.
            let same = match crate::platform::open_file_id(&file) {
                Some(id) => crate::platform::file_id(&path) == Some(id),
                None => path.exists(),
            };
            if !same {
                continue;
            }
            crate::interrupt::track(&path);
            let _ = file.set_len(0);
            let _ = file.rewind();
            let _ = writeln!(file, "{}", std::process::id());
            let _ = file.flush();
            return Ok(Lock { file, path });
        }
        Err(Error::InvalidOption(format!(
            "{}: the lock file keeps being replaced by another process",
            path.display()
        )))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held, so no other run can hold a lock on the removed inode.
        let _ = std::fs::remove_file(&self.path);
        crate::interrupt::untrack(&self.path);
        let _ = self.file.unlock();
    }
}

/// Checks `outputs` against `inputs` ([`check`]) and locks every output.
pub fn claim(inputs: &[Input], outputs: &[Output]) -> Result<Vec<Lock>> {
    check(inputs, outputs)?;
    outputs.iter().map(Lock::acquire).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        assert_eq!(
            shard_of("model-00001-of-00003.safetensors", "model"),
            Some(3)
        );
        assert_eq!(shard_of("model-1-of-3.safetensors", "model"), None);
        assert_eq!(shard_of("modelx-00001-of-00003.safetensors", "model"), None);
        assert_eq!(shard_of("model.safetensors", "model"), None);
    }

    #[test]
    fn canonical_of_a_missing_path_goes_through_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("real")).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
            assert_eq!(
                canonical(&d.path().join("link/new/x")),
                canonical(&d.path().join("real/new/x"))
            );
        }
    }

    #[test]
    fn hard_links_are_the_same_file() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        std::fs::hard_link(&a, d.path().join("b")).unwrap();
        assert!(same_file(&a, &d.path().join("b")));
        assert!(!same_file(&a, &d.path().join("c")));
    }

    #[test]
    fn outputs_in_an_input_folder_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let imgs = d.path().join("imgs");
        std::fs::create_dir(&imgs).unwrap();
        std::fs::write(imgs.join("a.png"), b"x").unwrap();
        let inputs = [Input::new("--images", &imgs)];
        for kind in [OutputKind::File, OutputKind::Checkpoint] {
            let e = check(
                &inputs,
                &[Output::new("--report", &imgs.join("a.png"), kind)],
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("--images"), "{e}");
        }
        let e = check(
            &inputs,
            &[Output::new(
                "--report",
                &imgs.join("new.json"),
                OutputKind::File,
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("inside the input folder"), "{e}");
        check(
            &inputs,
            &[Output::new(
                "--report",
                &d.path().join("r.json"),
                OutputKind::File,
            )],
        )
        .unwrap();
    }

    #[test]
    fn a_work_dir_holding_an_input_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m.safetensors");
        std::fs::write(&m, b"x").unwrap();
        let e = check(
            &[Input::new("model", &m)],
            &[Output::new("--work-dir", d.path(), OutputKind::WorkDir)],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("holds the input"), "{e}");
    }

    #[test]
    fn a_shard_of_the_output_that_is_an_input_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let shard = d.path().join("model-00001-of-00002.safetensors");
        std::fs::write(&shard, b"x").unwrap();
        let e = check(
            &[Input::new("model", &shard)],
            &[Output::new("--out", d.path(), OutputKind::Checkpoint)],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("would overwrite the input"), "{e}");
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let o = Output::new(
            "--out",
            &d.path().join("o.safetensors"),
            OutputKind::Checkpoint,
        );
        let l = Lock::acquire(&o).unwrap();
        let e = Lock::acquire(&o).unwrap_err().to_string();
        assert!(
            e.contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        drop(l);
        assert!(!lock_path(&o.path).exists());
        let _again = Lock::acquire(&o).unwrap();
    }
}

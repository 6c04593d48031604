//! Per-layer checkpoints, so a killed run can be resumed.
//!
//! During a run every finished layer's codes, steps and statistics are saved atomically to a
//! work directory (`<first output>.work/` unless `--work-dir` names one), next to a fingerprint
//! of the model, the calibration and the options. `--resume` reloads the layers saved under the
//! same fingerprint instead of recomputing them, so the outputs are byte-identical to an
//! uninterrupted run; a different fingerprint is refused. The work directory is removed when the
//! run completes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::io::writer::SafetensorsWriter;
use crate::io::{Model, PlannedTensor};
use crate::quant::{Grid, LayerOutcome, QuantizedLayer};

/// A layer saved in the work directory.
#[derive(Debug, Clone)]
pub struct SavedLayer {
    /// The outcome as the run computed it (`seconds` as first measured).
    pub outcome: LayerOutcome,
    /// Activation rows behind its Gram matrix.
    pub samples: u64,
}

/// The work directory of one run.
#[derive(Debug)]
pub struct WorkDir {
    dir: PathBuf,
    fingerprint: String,
    /// Layers saved by this run or found from an earlier one; a failed run that saved nothing
    /// leaves no work directory behind.
    saved: std::cell::Cell<usize>,
    done: bool,
    /// Whether this tool created the directory (then it removes it once its own files are gone).
    created: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.done && self.saved.get() == 0 {
            let _ = self.clean();
        }
    }
}

/// The file that marks a directory as a comq-gpu work directory. Its content says whether the
/// tool created the directory itself (then it may remove the directory once empty).
pub const MARKER: &str = "comq-gpu-work.json";

/// Whether `name` is a file comq-gpu writes into a work directory (the marker, the fingerprint,
/// the saved layers and their temporaries). Nothing else there is ever removed.
fn is_own_file(name: &str) -> bool {
    let base = name
        .strip_suffix(".tmp")
        .map(|b| b.rsplit_once('.').map_or(b, |(head, _pid)| head))
        .unwrap_or(name);
    base == MARKER
        || base == "fingerprint"
        || base
            .strip_prefix("layer-")
            .and_then(|r| r.strip_suffix(".safetensors"))
            .is_some_and(|d| d.len() == 5 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Refuses, before any compute, a work directory the tool may not use: a file, or a directory
/// that holds anything without the marker of a comq-gpu work directory.
pub fn check_work_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(Error::InvalidOption(format!(
            "--work-dir {} is a file, not a directory",
            dir.display()
        )));
    }
    let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    if entries.next().is_some() && !dir.join(MARKER).is_file() {
        return Err(Error::InvalidOption(format!(
            "work directory {} already holds files that comq-gpu did not create (no {MARKER}); \
             name a new or empty directory with --work-dir",
            dir.display()
        )));
    }
    Ok(())
}

/// SHA-256 of the identifying facts of the inputs and options: for every input file its path,
/// size, modification time and header; the options as JSON; the tool version.
pub fn fingerprint(files: &[&Path], options_json: &str) -> Result<String> {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(options_json.as_bytes());
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        h.update(f.display().to_string().as_bytes());
        h.update(meta.len().to_le_bytes());
        if let Ok(t) = meta.modified() {
            if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                h.update(d.as_nanos().to_le_bytes());
            }
        }
        // The safetensors header (names, dtypes, shapes, offsets), not the data.
        use std::io::Read;
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        let mut len = [0u8; 8];
        if file.read_exact(&mut len).is_ok() {
            let n = u64::from_le_bytes(len).min(100 << 20);
            let mut header = Vec::new();
            let _ = file.take(n).read_to_end(&mut header);
            h.update(&header);
        }
    }
    Ok(crate::util::hex(&h.finalize()))
}

/// SHA-256 of a layer's weights as the run read them (f32), the bytes its codes were computed
/// from.
pub fn weights_digest(w: &[f32]) -> String {
    let h = Sha256::digest(bytemuck::cast_slice::<f32, u8>(w));
    crate::util::hex(&h)
}

impl WorkDir {
    /// Opens the work directory: with `resume`, an existing one must carry `fingerprint`;
    /// without, any previous content is discarded.
    ///
    /// A directory that holds anything but a comq-gpu work directory's files is refused
    /// ([`check_work_dir`]); only the tool's own files are ever removed from it.
    pub fn open(dir: &Path, fingerprint: &str, resume: bool) -> Result<WorkDir> {
        check_work_dir(dir)?;
        let fp_file = dir.join("fingerprint");
        let marker = dir.join(MARKER);
        let created = if marker.is_file() {
            std::fs::read_to_string(&marker)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["created_dir"].as_bool())
                .unwrap_or(false)
        } else {
            !dir.exists()
        };
        if resume {
            match std::fs::read_to_string(&fp_file) {
                Ok(old) if old.trim() == fingerprint => {}
                Ok(_) => {
                    return Err(Error::InvalidOption(format!(
                        "refusing to resume: {} was written for a different model, calibration or \
                         options (fingerprint mismatch); remove it or run without --resume",
                        dir.display()
                    )))
                }
                Err(_) => log::info!(
                    "--resume: no previous work in {}, starting fresh",
                    dir.display()
                ),
            }
        } else if dir.exists() {
            remove_own_files(dir)?;
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let note = serde_json::json!({
            "tool": "comq-gpu",
            "what": "per-layer checkpoints of a run, for --resume",
            "created_dir": created,
        });
        crate::io::writer::write_atomic(&marker, note.to_string().as_bytes())?;
        crate::io::writer::write_atomic(&fp_file, fingerprint.as_bytes())?;
        let previous = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                    .count()
            })
            .unwrap_or(0);
        crate::interrupt::track_work_dir(dir);
        Ok(WorkDir {
            dir: dir.into(),
            fingerprint: fingerprint.into(),
            saved: std::cell::Cell::new(previous),
            done: false,
            created,
        })
    }

    fn layer_path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("layer-{index:05}.safetensors"))
    }

    /// Saves layer `index` atomically, with the digest of the weights it was computed from
    /// ([`weights_digest`]).
    pub fn save(
        &self,
        index: usize,
        name: &str,
        out: &LayerOutcome,
        samples: u64,
        weights_sha256: &str,
    ) -> Result<()> {
        let q = &out.layer;
        let slots = q.grid.delta.len();
        let plan = vec![
            PlannedTensor {
                name: "codes".into(),
                dtype: Dtype::I32,
                shape: vec![q.rows, q.cols],
            },
            PlannedTensor {
                name: "delta".into(),
                dtype: Dtype::F32,
                shape: vec![slots],
            },
            PlannedTensor {
                name: "lo".into(),
                dtype: Dtype::I32,
                shape: vec![slots],
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("name".to_string(), name.to_string());
        meta.insert("fingerprint".to_string(), self.fingerprint.clone());
        meta.insert("weights_sha256".to_string(), weights_sha256.to_string());
        let stats = serde_json::json!({
            "bits": q.bits, "group_size": q.grid.group_size, "rel_error": out.rel_error,
            "rel_error_rtn": out.rel_error_rtn, "energy": out.energy, "history": out.history,
            "seconds": out.seconds, "samples": samples,
        });
        meta.insert("stats".to_string(), stats.to_string());
        let mut w = SafetensorsWriter::create(&self.layer_path(index), plan, &meta)?;
        w.write("codes", bytemuck::cast_slice(&q.codes))?;
        w.write("delta", bytemuck::cast_slice(&q.grid.delta))?;
        w.write("lo", bytemuck::cast_slice(&q.grid.lo))?;
        w.finish(&meta)?;
        self.saved.set(self.saved.get() + 1);
        Ok(())
    }

    /// Loads layer `index` if it was saved for `name` with this fingerprint. A layer saved
    /// from other weights than `weights_sha256` (the model changed in place since the
    /// interrupted run) refuses the resume.
    pub fn load(
        &self,
        index: usize,
        name: &str,
        rows: usize,
        cols: usize,
        weights_sha256: &str,
    ) -> Result<Option<SavedLayer>> {
        let path = self.layer_path(index);
        if !path.is_file() {
            return Ok(None);
        }
        let m = Model::open(&path)?;
        let md = m.metadata();
        if md.get("name").map(String::as_str) != Some(name)
            || md.get("fingerprint") != Some(&self.fingerprint)
        {
            return Ok(None);
        }
        if md.get("weights_sha256").map(String::as_str) != Some(weights_sha256) {
            return Err(Error::InvalidOption(format!(
                "refusing to resume: layer '{name}' in {} was computed from other weights than \
                 the model holds now (the model changed since the interrupted run); run without \
                 --resume",
                self.dir.display()
            )));
        }
        let stats: serde_json::Value =
            serde_json::from_str(md.get("stats").map_or("{}", String::as_str))
                .map_err(|e| Error::tensor(&path, "stats", e.to_string()))?;
        let get = |t: &str| {
            m.get(t)
                .ok_or_else(|| Error::tensor(&path, t, "missing from a saved layer"))
        };
        let codes: Vec<i32> = bytemuck::pod_collect_to_vec(m.bytes(get("codes")?));
        let delta: Vec<f32> = bytemuck::pod_collect_to_vec(m.bytes(get("delta")?));
        let lo: Vec<i32> = bytemuck::pod_collect_to_vec(m.bytes(get("lo")?));
        if codes.len() != rows * cols {
            return Ok(None);
        }
        let f = |k: &str| stats[k].as_f64().unwrap_or(0.0);
        let bits = stats["bits"].as_u64().unwrap_or(0).min(64) as u32;
        let group_size = stats["group_size"].as_u64().unwrap_or(cols as u64) as usize;
        // A saved layer is untrusted like any file: one that does not describe a valid grid
        // and codes on it is recomputed, not shipped.
        let corrupt = |why: String| -> Result<Option<SavedLayer>> {
            log::warn!(
                "{}: saved layer '{name}' is not usable ({why}); computing it again",
                path.display()
            );
            Ok(None)
        };
        if !(2..=8).contains(&bits) {
            return corrupt(format!("bits {bits}"));
        }
        if group_size == 0 || !cols.is_multiple_of(group_size) {
            return corrupt(format!("group size {group_size} for {cols} columns"));
        }
        let slots = rows * (cols / group_size);
        if delta.len() != slots || lo.len() != slots {
            return corrupt(format!(
                "{} steps and {} zero points for {slots} groups",
                delta.len(),
                lo.len()
            ));
        }
        if let Some(d) = delta.iter().find(|d| !(d.is_finite() && **d >= 0.0)) {
            return corrupt(format!("step {d}"));
        }
        let levels = 1i64 << bits;
        let off_grid = codes.iter().enumerate().position(|(t, &k)| {
            let slot = (t / cols) * (cols / group_size) + (t % cols) / group_size;
            let rel = k as i64 - lo[slot] as i64;
            !(0..levels).contains(&rel)
        });
        if let Some(t) = off_grid {
            return corrupt(format!("code {} at {t} is off its grid", codes[t]));
        }
        let history = stats["history"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
            .unwrap_or_default();
        Ok(Some(SavedLayer {
            outcome: LayerOutcome {
                layer: QuantizedLayer {
                    rows,
                    cols,
                    bits,
                    codes,
                    grid: Grid {
                        bits,
                        rows,
                        cols,
                        group_size,
                        delta,
                        lo,
                    },
                },
                rel_error: f("rel_error"),
                rel_error_rtn: f("rel_error_rtn"),
                energy: f("energy"),
                history,
                rel_error_start: None,
                seconds: f("seconds"),
            },
            samples: stats["samples"].as_u64().unwrap_or(0),
        }))
    }

    /// Removes the work directory's own files (after a complete run), and the directory itself
    /// when this tool created it and nothing else is left in it.
    pub fn remove(mut self) -> Result<()> {
        self.done = true;
        self.clean()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn clean(&self) -> Result<()> {
        crate::interrupt::untrack_work_dir(&self.dir);
        remove_own_files(&self.dir)?;
        if self.created {
            if let Err(e) = std::fs::remove_dir(&self.dir) {
                log::info!(
                    "work directory {} kept: {e} (it holds files comq-gpu did not write)",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }
}

/// Removes the files comq-gpu writes into a work directory, and nothing else.
fn remove_own_files(dir: &Path) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    // The marker goes last, so an interrupted clean-up leaves a directory still known as ours.
    let mut marker = None;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if !is_file || !is_own_file(&name) {
            continue;
        }
        if name == MARKER {
            marker = Some(e.path());
            continue;
        }
        std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
    }
    if let Some(m) = marker {
        std::fs::remove_file(&m).map_err(|e| Error::io(&m, e))?;
    }
    Ok(())
}

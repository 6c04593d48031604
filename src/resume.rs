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
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.done && self.saved.get() == 0 {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
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
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl WorkDir {
    /// Opens the work directory: with `resume`, an existing one must carry `fingerprint`;
    /// without, any previous content is discarded.
    pub fn open(dir: &Path, fingerprint: &str, resume: bool) -> Result<WorkDir> {
        let fp_file = dir.join("fingerprint");
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
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::io::writer::write_atomic(&fp_file, fingerprint.as_bytes())?;
        let previous = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                    .count()
            })
            .unwrap_or(0);
        Ok(WorkDir {
            dir: dir.into(),
            fingerprint: fingerprint.into(),
            saved: std::cell::Cell::new(previous),
            done: false,
        })
    }

    fn layer_path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("layer-{index:05}.safetensors"))
    }

    /// Saves layer `index` atomically.
    pub fn save(&self, index: usize, name: &str, out: &LayerOutcome, samples: u64) -> Result<()> {
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

    /// Loads layer `index` if it was saved for `name` with this fingerprint.
    pub fn load(
        &self,
        index: usize,
        name: &str,
        rows: usize,
        cols: usize,
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
        let bits = stats["bits"].as_u64().unwrap_or(4) as u32;
        let group_size = stats["group_size"].as_u64().unwrap_or(cols as u64) as usize;
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

    /// Removes the work directory (after a complete run).
    pub fn remove(mut self) -> Result<()> {
        self.done = true;
        std::fs::remove_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }
}

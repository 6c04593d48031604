//! A model as users have it: one safetensors file, or shards listed by a
//! `model.safetensors.index.json`, or a directory holding either.
//!
//! Every shard is memory-mapped and validated on open; tensors keep the index of their shard,
//! so reading one costs only its pages, whichever file it is in.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{Model, TensorMeta};
use crate::error::{Error, Result};

/// An opened (possibly sharded) checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    dir: PathBuf,
    shards: Vec<Model>,
    tensors: Vec<TensorMeta>,
    index: HashMap<String, usize>,
    metadata: HashMap<String, String>,
    /// Shards from here on are overlays ([`Checkpoint::overlay`]), not the user's files.
    own_shards: usize,
    /// The overlays' files, removed when the checkpoint (and its maps, dropped first) goes.
    temps: Vec<super::writer::TempFile>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadSafetensors {
        path: path.into(),
        reason: reason.into(),
    }
}

impl Checkpoint {
    /// Opens `path`: a `.safetensors` file, a `*.safetensors.index.json`, or a directory with
    /// `model.safetensors.index.json`, `model.safetensors` or exactly one `*.safetensors`. A
    /// directory with both an index and `model.safetensors` is refused as ambiguous.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let file = if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            let single = path.join("model.safetensors");
            if index.is_file() && single.is_file() {
                return Err(bad(
                    path,
                    "the directory holds both model.safetensors and model.safetensors.index.json, \
                     so which one is the model is ambiguous; pass the file you mean",
                ));
            } else if index.is_file() {
                index
            } else if single.is_file() {
                single
            } else {
                let found: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|e| Error::io(path, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                match found.as_slice() {
                    [one] => one.clone(),
                    [] => return Err(bad(path, "the directory holds no .safetensors file")),
                    _ => {
                        return Err(bad(
                            path,
                            "the directory holds several .safetensors files but no model.safetensors.index.json",
                        ))
                    }
                }
            }
        } else {
            path.to_path_buf()
        };
        let dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let names = if file.to_string_lossy().ends_with(".json") {
            read_index(&file)?
        } else {
            vec![file.clone()]
        };
        let mut shards = Vec::new();
        let mut tensors = Vec::new();
        let mut index = HashMap::new();
        let mut metadata = HashMap::new();
        for (i, shard) in names.iter().enumerate() {
            let m = Model::open(shard)?;
            for t in m.tensors() {
                if index.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(bad(
                        shard,
                        format!("tensor '{}' appears in two shards", t.name),
                    ));
                }
                tensors.push(TensorMeta {
                    file: i,
                    ..t.clone()
                });
            }
            for (k, v) in m.metadata() {
                metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
            shards.push(m);
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            dir,
            own_shards: shards.len(),
            shards,
            tensors,
            index,
            metadata,
            temps: Vec::new(),
        })
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory holding the weights (where `config.json` would be).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shard files (the user's: not an overlay's).
    pub fn files(&self) -> Vec<&Path> {
        self.shards[..self.own_shards]
            .iter()
            .map(|m| m.path())
            .collect()
    }

    /// Reads the tensors of the safetensors file `temp` in place of this checkpoint's tensors
    /// of the same names and element counts (a transformed copy of some of them: `--rotate`).
    /// Names, order, path, directory and metadata stay the checkpoint's; the file is the
    /// tool's own and is removed with the checkpoint.
    pub fn overlay(&mut self, temp: super::writer::TempFile) -> Result<()> {
        let m = Model::open(temp.path())?;
        let file = self.shards.len();
        for t in m.tensors() {
            let Some(&i) = self.index.get(&t.name) else {
                return Err(Error::Internal(format!(
                    "overlay tensor '{}' is not in {}",
                    t.name,
                    self.path.display()
                )));
            };
            let own = &self.tensors[i];
            let count = |s: &[usize]| s.iter().product::<usize>();
            if count(&own.shape) != count(&t.shape) {
                return Err(Error::Internal(format!(
                    "overlay tensor '{}' has shape {:?}, the model's {:?}",
                    t.name, t.shape, own.shape
                )));
            }
            let shape = own.shape.clone();
            self.tensors[i] = TensorMeta {
                file,
                shape,
                ..t.clone()
            };
        }
        self.shards.push(m);
        self.temps.push(temp);
        Ok(())
    }

    /// All tensors, shard by shard in file order.
    pub fn tensors(&self) -> &[TensorMeta] {
        &self.tensors
    }

    /// The first shard's `__metadata__` merged with the others'.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Raw bytes of a tensor.
    pub fn bytes(&self, t: &TensorMeta) -> &[u8] {
        self.shards[t.file].bytes(t)
    }

    /// Releases a tensor's pages from this process's resident set (see [`Model::release`]).
    pub fn release(&self, t: &TensorMeta) {
        self.shards[t.file].release(t.range.clone());
    }

    /// A float tensor as f32.
    pub fn read_f32(&self, t: &TensorMeta) -> Result<Vec<f32>> {
        self.shards[t.file].read_f32(t)
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.range.len()).sum()
    }
}

/// The distinct shard files of an index, in first-appearance order of the sorted weight map.
fn read_index(path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(path, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad(path, "no \"weight_map\" object"))?;
    let sorted: BTreeMap<&String, &serde_json::Value> = map.iter().collect();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, f) in sorted {
        let f = f.as_str().ok_or_else(|| {
            bad(
                path,
                format!("weight_map entry '{name}' is not a file name"),
            )
        })?;
        if f.contains('/') || f.contains('\\') || f == ".." {
            return Err(bad(
                path,
                format!("weight_map entry '{name}' points outside the directory: '{f}'"),
            ));
        }
        let p = dir.join(f);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(bad(path, "the weight_map is empty"));
    }
    files.sort();
    Ok(files)
}

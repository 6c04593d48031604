//! Atomic, streaming safetensors writer.
//!
//! The whole layout is planned before the first byte of data exists: names, dtypes and shapes
//! give every tensor its offset. Tensors are laid out by descending element size and then by
//! name (as the `safetensors` crate does), so every tensor is aligned to its element size for
//! readers that cast in place. Data is written at its offset as soon as it is ready, so at most
//! one layer's output is ever in memory. The file is `<out>.<pid>.tmp` until [`SafetensorsWriter::finish`]
//! rewrites the header with the final metadata (room for it is reserved), syncs and renames it
//! into place; dropping an unfinished writer removes the temporary file.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::dtype;
use crate::error::{Error, Result};

/// Spare header bytes reserved for metadata that is only known at the end (hashes, timings).
const HEADER_RESERVE_BYTES: usize = 4096;

/// One tensor of a planned output.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    /// Byte length.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * dtype::size_of(self.dtype).unwrap_or(0)
    }
}

/// A safetensors file being written (see the module doc).
#[derive(Debug)]
pub struct SafetensorsWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    tensors: Vec<PlannedTensor>,
    offsets: HashMap<String, (usize, usize)>,
    written: HashMap<String, bool>,
    header_capacity: usize,
    data_start: u64,
}

impl SafetensorsWriter {
    /// Creates `<dest>.<pid>.tmp` sized for `tensors`, with `metadata` as a first header.
    pub fn create(
        dest: &Path,
        mut tensors: Vec<PlannedTensor>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<SafetensorsWriter> {
        tensors.sort_by(|a, b| {
            let (sa, sb) = (dtype::size_of(a.dtype), dtype::size_of(b.dtype));
            sb.cmp(&sa).then_with(|| a.name.cmp(&b.name))
        });
        let mut offsets = HashMap::new();
        let mut at = 0usize;
        for t in &tensors {
            if offsets
                .insert(t.name.clone(), (at, at + t.nbytes()))
                .is_some()
            {
                return Err(Error::InvalidOption(format!(
                    "output {} would hold tensor '{}' twice",
                    dest.display(),
                    t.name
                )));
            }
            at += t.nbytes();
        }
        let data_len = at;
        let first = header_json(&tensors, &offsets, metadata);
        let header_capacity = (first.len() + HEADER_RESERVE_BYTES).next_multiple_of(8);
        let tmp = tmp_path(dest);
        crate::interrupt::track(&tmp);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let w = SafetensorsWriter {
            file: Some(file),
            tmp,
            dest: dest.into(),
            written: tensors.iter().map(|t| (t.name.clone(), false)).collect(),
            tensors,
            offsets,
            header_capacity,
            data_start: 8 + header_capacity as u64,
        };
        let total = w.data_start + data_len as u64;
        w.file().set_len(total).map_err(|e| Error::io(&w.tmp, e))?;
        w.write_header(metadata)?;
        Ok(w)
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("writer used after finish")
    }

    fn write_header(&self, metadata: &BTreeMap<String, String>) -> Result<()> {
        let mut json = header_json(&self.tensors, &self.offsets, metadata).into_bytes();
        if json.len() > self.header_capacity {
            return Err(Error::Internal(format!(
                "metadata for {} exceeds the reserved header space ({} > {} bytes)",
                self.dest.display(),
                json.len(),
                self.header_capacity
            )));
        }
        json.resize(self.header_capacity, b' ');
        let mut buf = (self.header_capacity as u64).to_le_bytes().to_vec();
        buf.extend_from_slice(&json);
        crate::platform::write_all_at(self.file(), &buf, 0).map_err(|e| Error::io(&self.tmp, e))
    }

    /// Writes the data of tensor `name` (exactly its planned byte length).
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let &(s, e) = self.offsets.get(name).ok_or_else(|| {
            Error::Internal(format!("tensor '{name}' is not in the planned output"))
        })?;
        assert_eq!(bytes.len(), e - s, "tensor '{name}' must be written whole");
        crate::platform::write_all_at(self.file(), bytes, self.data_start + s as u64)
            .map_err(|e| Error::io(&self.tmp, e))?;
        self.written.insert(name.to_string(), true);
        Ok(())
    }

    /// The destination path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Rewrites the header with `metadata`, syncs and renames the file into place.
    pub fn finish(mut self, metadata: &BTreeMap<String, String>) -> Result<()> {
        if let Some((name, _)) = self.written.iter().find(|(_, &w)| !w) {
            return Err(Error::Internal(format!(
                "output {} is incomplete: tensor '{name}' was never written",
                self.dest.display()
            )));
        }
        self.write_header(metadata)?;
        let mut file = self.file.take().expect("finish is called once");
        file.flush().map_err(|e| Error::io(&self.tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        crate::interrupt::untrack(&self.tmp);
        Ok(())
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
            crate::interrupt::untrack(&self.tmp);
        }
    }
}

fn header_json(
    tensors: &[PlannedTensor],
    offsets: &HashMap<String, (usize, usize)>,
    metadata: &BTreeMap<String, String>,
) -> String {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("string map"),
        );
    }
    for t in tensors {
        let (s, e) = offsets[&t.name];
        map.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": dtype::name(t.dtype),
                "shape": t.shape,
                "data_offsets": [s, e],
            }),
        );
    }
    serde_json::Value::Object(map).to_string()
}

/// The temporary name of `dest` while it is written: `<dest>.<pid>.tmp`, unique per process so
/// two runs never write into one temporary file.
pub fn tmp_path(dest: &Path) -> PathBuf {
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    PathBuf::from(tmp)
}

/// A file the tool makes for itself for the length of a run (a transformed copy of the model):
/// removed when dropped, and on an interrupt.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// A fresh name in the system's temporary folder, unique to this process: `comq-gpu-<pid>-<what>`.
    pub fn in_temp_dir(what: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("comq-gpu-{}-{what}", std::process::id()));
        crate::interrupt::track(&path);
        TempFile { path }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        crate::interrupt::untrack(&self.path);
    }
}

/// Writes `bytes` to `dest` atomically (temp file, sync, rename).
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(dest);
    crate::interrupt::track(&tmp);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        crate::interrupt::untrack(&tmp);
        return Err(Error::io(dest, e));
    }
    let renamed = std::fs::rename(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(dest, e)
    });
    crate::interrupt::untrack(&tmp);
    renamed
}

/// Removes, beside a finished output (`kept`: the files it consists of), the files that an
/// earlier output of the same stem left and this one replaces: a single `stem.safetensors`, the
/// `stem.safetensors.index.json` and `stem-NNNNN-of-NNNNN.safetensors` shards. Only those names,
/// which the output format defines, are ever removed, so a reader never finds a stale index or
/// stale shards beside a new output.
pub fn remove_replaced(kept: &[PathBuf]) -> Result<()> {
    let Some(first) = kept.first() else {
        return Ok(());
    };
    let dir = first
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = first.file_name().map(|f| f.to_string_lossy().into_owned());
    let Some(name) = name else { return Ok(()) };
    // The stem: `stem.safetensors`, `stem-00001-of-0000N.safetensors` or an index.
    let stem = match name.strip_suffix(".safetensors.index.json") {
        Some(s) => s.to_string(),
        None => {
            let base = name.trim_end_matches(".safetensors");
            base.rsplit_once("-of-")
                .and_then(|(head, _)| head.rsplit_once('-'))
                .map(|(s, _)| s)
                .filter(|s| crate::io::guard::shard_of(&name, s).is_some())
                .unwrap_or(base)
                .to_string()
        }
    };
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(_) => return Ok(()),
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let ours = n == format!("{stem}.safetensors")
            || n == format!("{stem}.safetensors.index.json")
            || crate::io::guard::shard_of(&n, &stem).is_some();
        if ours
            && e.file_type().is_ok_and(|t| t.is_file())
            && !kept
                .iter()
                .any(|k| k.file_name() == Some(e.file_name().as_os_str()))
        {
            log::info!("removing {} of an earlier output this one replaces", n);
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_file_reads_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("o.safetensors");
        let plan = vec![
            PlannedTensor {
                name: "b".into(),
                dtype: Dtype::F16,
                shape: vec![3],
            },
            PlannedTensor {
                name: "a".into(),
                dtype: Dtype::I64,
                shape: vec![2],
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        let mut w = SafetensorsWriter::create(&dest, plan, &meta).unwrap();
        w.write("b", &[1, 0, 2, 0, 3, 0]).unwrap();
        w.write("a", &[7u8; 16]).unwrap();
        meta.insert("hash".to_string(), "x".repeat(64));
        w.finish(&meta).unwrap();
        let bytes = std::fs::read(&dest).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &[1, 0, 2, 0, 3, 0]);
        assert_eq!(st.tensor("a").unwrap().data(), &[7u8; 16]);
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["hash"], "x".repeat(64));
        assert!(!tmp_path(&dir.path().join("o.safetensors")).exists());
    }

    #[test]
    fn an_unfinished_writer_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("o.safetensors");
        let plan = vec![PlannedTensor {
            name: "a".into(),
            dtype: Dtype::F32,
            shape: vec![1],
        }];
        let w = SafetensorsWriter::create(&dest, plan, &BTreeMap::new()).unwrap();
        drop(w);
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }
}

/// A planned output that may be split into shards (HF layout: `stem-00001-of-0000N.safetensors`
/// plus `stem.safetensors.index.json`) when it exceeds `max_shard_bytes`. Tensors keep their
/// planned order across shards; each shard is a [`SafetensorsWriter`], so every file is written
/// at planned offsets and renamed into place only when the whole set is complete.
#[derive(Debug)]
pub struct ShardedWriter {
    dest: PathBuf,
    writers: Vec<SafetensorsWriter>,
    route: HashMap<String, usize>,
    index: Option<(PathBuf, BTreeMap<String, String>, usize)>,
}

impl ShardedWriter {
    /// Plans `tensors` into one file at `dest`, or shards beside it when larger than
    /// `max_shard_bytes` (a tensor larger than the limit gets a shard of its own).
    pub fn create(
        dest: &Path,
        tensors: Vec<PlannedTensor>,
        max_shard_bytes: u64,
        metadata: &BTreeMap<String, String>,
    ) -> Result<ShardedWriter> {
        let total: usize = tensors.iter().map(|t| t.nbytes()).sum();
        if total as u64 <= max_shard_bytes {
            let w = SafetensorsWriter::create(dest, tensors.clone(), metadata)?;
            let route = tensors.iter().map(|t| (t.name.clone(), 0)).collect();
            return Ok(ShardedWriter {
                dest: dest.into(),
                writers: vec![w],
                route,
                index: None,
            });
        }
        let mut groups: Vec<Vec<PlannedTensor>> = vec![Vec::new()];
        let mut size = 0u64;
        for t in tensors {
            let b = t.nbytes() as u64;
            if size > 0 && size + b > max_shard_bytes {
                groups.push(Vec::new());
                size = 0;
            }
            size += b;
            groups.last_mut().expect("one group").push(t);
        }
        let n = groups.len();
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let stem = dest
            .file_name()
            .map(|f| {
                f.to_string_lossy()
                    .trim_end_matches(".safetensors")
                    .to_string()
            })
            .unwrap_or_else(|| "model".into());
        let mut writers = Vec::new();
        let mut route = HashMap::new();
        let mut weight_map = BTreeMap::new();
        for (i, g) in groups.into_iter().enumerate() {
            let file = format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1);
            for t in &g {
                route.insert(t.name.clone(), i);
                weight_map.insert(t.name.clone(), file.clone());
            }
            writers.push(SafetensorsWriter::create(&dir.join(&file), g, metadata)?);
        }
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        Ok(ShardedWriter {
            dest: index.clone(),
            writers,
            route,
            index: Some((index, weight_map, total)),
        })
    }

    /// Writes tensor `name`'s bytes into its shard.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let i = *self.route.get(name).ok_or_else(|| {
            Error::Internal(format!("tensor '{name}' is not in the planned output"))
        })?;
        self.writers[i].write(name, bytes)
    }

    /// The file a loader opens: the single file, or the index of the shards.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Number of files holding tensors.
    pub fn shards(&self) -> usize {
        self.writers.len()
    }

    /// Finishes every shard (final metadata, sync, rename), then writes the index, then removes
    /// the files of an earlier output of the same name that this one replaces (see
    /// [`remove_replaced`]).
    pub fn finish(self, metadata: &BTreeMap<String, String>) -> Result<()> {
        let written: Vec<PathBuf> = self
            .writers
            .iter()
            .map(|w| w.dest().to_path_buf())
            .collect();
        for w in self.writers {
            w.finish(metadata)?;
        }
        let mut kept = written;
        if let Some((path, weight_map, total)) = self.index {
            let json = serde_json::json!({
                "metadata": { "total_size": total },
                "weight_map": weight_map,
            });
            write_atomic(
                &path,
                serde_json::to_string_pretty(&json)
                    .expect("json")
                    .as_bytes(),
            )?;
            kept.push(path);
        }
        remove_replaced(&kept)
    }
}

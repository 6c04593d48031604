//! Reading safetensors files by memory map.
//!
//! The header is parsed and validated by the `safetensors` crate (offsets contiguous and inside
//! the file, byte lengths matching dtype × shape) before anything else looks at the file; its
//! errors are turned into messages that name the file. Tensor data is then read straight from
//! the map, one tensor or one row range at a time.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::dtype;
use crate::error::{Error, Result};

/// Name, dtype, shape and location of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: std::ops::Range<usize>,
    /// Index of the shard holding it (0 for a single file).
    pub file: usize,
}

impl TensorMeta {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where a model's bytes live: a memory map of a file, or a buffer (tests, fuzzing).
enum Storage {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Map(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A memory-mapped safetensors file.
pub struct Model {
    path: PathBuf,
    map: Storage,
    tensors: Vec<TensorMeta>,
    index: HashMap<String, usize>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Model {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Model> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::BadSafetensors {
                path: path.into(),
                reason: "not a regular file".into(),
            });
        }
        if meta.len() < 8 {
            return Err(Error::BadSafetensors {
                path: path.into(),
                reason: format!(
                    "the file has {} bytes, fewer than the 8-byte header length",
                    meta.len()
                ),
            });
        }
        // SAFETY: the map is read-only and private to this process. A concurrent writer to the
        // input file could change the bytes under us; comq-gpu never writes its inputs, and a
        // user who truncates a file mid-run gets a SIGBUS, as with any mmap-based reader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Model::from_storage(path, Storage::Map(map))
    }

    /// Parses and validates a safetensors file held in memory; `name` stands for its path in
    /// messages. (The reader the fuzz targets exercise.)
    pub fn from_bytes(name: &Path, bytes: Vec<u8>) -> Result<Model> {
        if bytes.len() < 8 {
            return Err(Error::BadSafetensors {
                path: name.into(),
                reason: format!(
                    "the file has {} bytes, fewer than the 8-byte header length",
                    bytes.len()
                ),
            });
        }
        Model::from_storage(name, Storage::Owned(bytes))
    }

    fn from_storage(path: &Path, map: Storage) -> Result<Model> {
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| Error::BadSafetensors {
                path: path.into(),
                reason: describe_error(&e, &map),
            })?;
        let data_start = 8 + header_len;
        let mut tensors = Vec::new();
        for name in metadata.offset_keys() {
            let info = metadata
                .info(&name)
                .expect("offset_keys lists known tensors");
            let (s, e) = info.data_offsets;
            tensors.push(TensorMeta {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                range: data_start + s..data_start + e,
                file: 0,
            });
        }
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Model {
            path: path.into(),
            map,
            tensors,
            index,
            metadata: metadata.metadata().clone().unwrap_or_default(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorMeta] {
        &self.tensors
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A tensor's metadata by name.
    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's raw little-endian bytes.
    pub fn bytes(&self, t: &TensorMeta) -> &[u8] {
        &self.map[t.range.clone()]
    }

    /// Drops the process's mapping of the pages wholly inside `range` (they stay in the page
    /// cache), so a pass over a file larger than memory keeps the resident set to what is in use.
    pub fn release(&self, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let start = range.start.next_multiple_of(PAGE);
        let end = range.end / PAGE * PAGE;
        if end > start {
            if let Storage::Map(map) = &self.map {
                crate::platform::release_pages(map, start, end - start);
            }
        }
    }

    /// A float tensor converted to f32.
    pub fn read_f32(&self, t: &TensorMeta) -> Result<Vec<f32>> {
        dtype::to_f32(t.dtype, self.bytes(t))
            .ok_or_else(|| Error::tensor(&self.path, &t.name, dtype::unsupported(t.dtype)))
    }

    /// Rows `rows` of a tensor viewed as `[numel / width, width]`, converted to f32.
    pub fn read_rows_f32(
        &self,
        t: &TensorMeta,
        width: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let es = dtype::size_of(t.dtype).unwrap_or(0);
        let bytes = self.bytes(t);
        let slice = &bytes[rows.start * width * es..rows.end * width * es];
        dtype::to_f32(t.dtype, slice)
            .ok_or_else(|| Error::tensor(&self.path, &t.name, dtype::unsupported(t.dtype)))
    }

    /// A float tensor converted to f64.
    pub fn read_f64(&self, t: &TensorMeta) -> Result<Vec<f64>> {
        dtype::to_f64(t.dtype, self.bytes(t))
            .ok_or_else(|| Error::tensor(&self.path, &t.name, dtype::unsupported(t.dtype)))
    }
}

fn describe_error(e: &safetensors::SafeTensorError, map: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    let declared = map
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0);
    match e {
        E::HeaderTooLarge => format!(
            "the header length field says {declared} bytes, over the 100 MB limit of the \
             safetensors format"
        ),
        E::InvalidHeaderLength => format!(
            "the header length field says {declared} bytes but the file has {} (truncated or not safetensors)",
            map.len()
        ),
        E::InvalidHeader(_) => "the header is not valid UTF-8".into(),
        E::InvalidHeaderDeserialization(err) => format!("the header is not valid safetensors JSON: {err}"),
        E::InvalidOffset(name) => match duplicate_name(map) {
            Some(dup) => format!("the header names tensor '{dup}' twice"),
            None => format!(
                "tensor '{name}' has data offsets that overlap another tensor, leave a gap or run past the data"
            ),
        },
        E::TensorInvalidInfo | E::MetadataIncompleteBuffer => match culprit(map) {
            Some(why) => why,
            None => format!(
                "the tensors' data offsets do not end at the end of the file ({} bytes): truncated or padded",
                map.len()
            ),
        },
        other => other.to_string(),
    }
}

/// The first name the header's JSON object holds twice (a JSON map would keep only one).
fn duplicate_name(map: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut a: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = a.next_key::<String>()? {
                a.next_value::<IgnoredAny>()?;
                if !seen.insert(k.clone()) {
                    return Ok(Some(k));
                }
            }
            Ok(None)
        }
    }
    let n = u64::from_le_bytes(map.get(..8)?.try_into().ok()?) as usize;
    let header = map.get(8..8usize.checked_add(n)?)?;
    serde_json::Deserializer::from_slice(header)
        .deserialize_map(Keys)
        .ok()
        .flatten()
}

/// Finds the tensor whose byte range is inconsistent (wrong length or past the end of the data),
/// for a message that names it.
fn culprit(map: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(map.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(map.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = map.len() - 8 - n;
    for (name, v) in &header {
        if name == "__metadata__" {
            continue;
        }
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(v.clone()).ok()?;
        let (s, e) = info.data_offsets;
        let expected = info.shape.iter().product::<usize>() * info.dtype.bitsize() / 8;
        if e < s || e - s != expected {
            return Some(format!(
                "tensor '{name}' ({} {:?}) needs {expected} bytes but its data offsets [{s}, {e}] span {}",
                dtype::name(info.dtype),
                info.shape,
                e.saturating_sub(s)
            ));
        }
        if e > data_len {
            return Some(format!(
                "tensor '{name}' has data offsets [{s}, {e}] past the end of the data ({data_len} bytes): the file is truncated or the header lies"
            ));
        }
    }
    None
}

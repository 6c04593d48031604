//! The compiled kernels on disk: a wgpu `PipelineCache` (Vulkan's pipeline cache) saved after
//! the pipelines are built and handed back to the driver on the next start, so a run does not
//! compile its kernels from SPIR-V again (tens to hundreds of milliseconds per kernel on some
//! drivers).
//!
//! The file is untrusted input: the driver's data sits behind our own header (a magic string
//! and the SHA-256 of the data), and a file whose digest does not match is ignored and
//! replaced, never handed to the driver. wgpu checks its own header inside (adapter, driver,
//! wgpu version) and starts an empty cache where that does not match. The file's name carries
//! the adapter key and a digest of the kernel sources, so another adapter or another build uses
//! another file. Writes go to a temporary file renamed into place; a failure to read or write the
//! cache is a warning, never an error. Only backends that support it (Vulkan) use it.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The environment variable that moves the cache (a directory) or turns it off (`off`).
pub const CACHE_ENV: &str = "COMQ_PIPELINE_CACHE";

const MAGIC: &[u8; 8] = b"COMQPC1\0";
const HEADER: usize = 8 + 32;
/// Larger files are not read (a driver's cache for a few dozen kernels is well under this).
const MAX_FILE_BYTES: u64 = 256 << 20;

/// What became of the cache when the device opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheState {
    /// No cache: turned off, no directory, or a backend without pipeline caches.
    Off,
    /// No file yet: the kernels were compiled and the cache written.
    Created,
    /// The file was read and handed to the driver.
    Loaded,
    /// The file was damaged (bad header or digest) and was ignored; a new one was written.
    Replaced,
}

/// Where the cache lives by default: `$COMQ_PIPELINE_CACHE` (a directory, or `off`), else the
/// user's cache directory (`$XDG_CACHE_HOME`, `~/.cache`, or `%LOCALAPPDATA%`) under
/// `comq-gpu/pipelines`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os(CACHE_ENV) {
        if v == "off" || v.is_empty() {
            return None;
        }
        return Some(PathBuf::from(v));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .or_else(|| std::env::var_os("LOCALAPPDATA").map(PathBuf::from))?;
    Some(base.join("comq-gpu").join("pipelines"))
}

/// A pipeline cache tied to its file.
pub struct DiskCache {
    cache: wgpu::PipelineCache,
    path: PathBuf,
    /// The digest of the data read (none when nothing valid was read).
    read_digest: Option<[u8; 32]>,
    state: CacheState,
}

/// The file name for `info` and this build's kernels, or `None` where the backend keeps no
/// pipeline cache.
fn file_name(info: &wgpu::AdapterInfo, sources: &[(&str, &str)]) -> Option<String> {
    let key = wgpu::util::pipeline_cache_key(info)?;
    let mut h = Sha256::new();
    for (name, src) in sources {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(src.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    let tag: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{key}_{tag}.bin"))
}

/// The driver's data inside a file's bytes, when the header and the digest hold.
fn unwrap_file(bytes: &[u8]) -> Option<(&[u8], [u8; 32])> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return None;
    }
    let data = &bytes[HEADER..];
    let digest: [u8; 32] = Sha256::digest(data).into();
    (bytes[8..HEADER] == digest).then_some((data, digest))
}

impl DiskCache {
    /// Opens the cache for `device` in `dir`, reading its file if there is a valid one. `None`
    /// where the device lacks `PIPELINE_CACHE` or the backend keeps none.
    pub fn open(
        device: &wgpu::Device,
        info: &wgpu::AdapterInfo,
        dir: &Path,
        sources: &[(&str, &str)],
    ) -> Option<DiskCache> {
        if !device.features().contains(wgpu::Features::PIPELINE_CACHE) {
            return None;
        }
        let path = dir.join(file_name(info, sources)?);
        let bytes = match std::fs::metadata(&path) {
            Ok(m) if m.len() > MAX_FILE_BYTES => {
                log::warn!(
                    "pipeline cache {} is {} bytes, over {MAX_FILE_BYTES}; ignored",
                    path.display(),
                    m.len()
                );
                None
            }
            Ok(_) => match std::fs::read(&path) {
                Ok(b) => Some(b),
                Err(e) => {
                    log::warn!("pipeline cache {} unreadable: {e}", path.display());
                    None
                }
            },
            Err(_) => None,
        };
        let valid = bytes.as_deref().and_then(unwrap_file);
        let state = match (&bytes, &valid) {
            (None, _) => CacheState::Created,
            (Some(_), Some(_)) => CacheState::Loaded,
            (Some(_), None) => {
                log::warn!(
                    "pipeline cache {} is damaged (header or digest); ignored and replaced",
                    path.display()
                );
                CacheState::Replaced
            }
        };
        // SAFETY: the data is handed over only when its digest matches the one written beside it
        // by `save`, which wrote what `PipelineCache::get_data` returned; wgpu then checks its
        // own header (adapter, driver, version) and falls back to an empty cache on a mismatch.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("comq-gpu"),
                data: valid.map(|(d, _)| d),
                fallback: true,
            })
        };
        Some(DiskCache {
            cache,
            path,
            read_digest: valid.map(|(_, d)| d),
            state,
        })
    }

    /// The cache to build pipelines with.
    pub fn cache(&self) -> &wgpu::PipelineCache {
        &self.cache
    }

    /// What became of the file.
    pub fn state(&self) -> CacheState {
        self.state
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the driver's data back when it changed (atomically: a temporary file renamed
    /// into place). Failures are logged.
    pub fn save(&self) {
        let Some(data) = self.cache.get_data() else {
            return;
        };
        let digest: [u8; 32] = Sha256::digest(&data).into();
        if self.read_digest == Some(digest) {
            return;
        }
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self
                .path
                .with_extension(format!("bin.{}.tmp", std::process::id()));
            let mut bytes = Vec::with_capacity(HEADER + data.len());
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&digest);
            bytes.extend_from_slice(&data);
            if let Err(e) =
                std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, &self.path))
            {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            Ok(())
        };
        match write() {
            Ok(()) => log::debug!(
                "pipeline cache written: {} ({} bytes)",
                self.path.display(),
                data.len()
            ),
            Err(e) => log::warn!("pipeline cache {} not written: {e}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_trusted_only_with_its_digest() {
        let data = b"driver data".to_vec();
        let digest: [u8; 32] = Sha256::digest(&data).into();
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&digest);
        file.extend_from_slice(&data);
        assert_eq!(unwrap_file(&file).map(|(d, _)| d.to_vec()), Some(data));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(unwrap_file(&flipped).is_none());
        assert!(unwrap_file(&file[..file.len() - 1]).is_none());
        assert!(unwrap_file(&file[..10]).is_none());
        let mut magic = file.clone();
        magic[0] = b'X';
        assert!(unwrap_file(&magic).is_none());
    }
}

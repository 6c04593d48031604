//! Calibration and evaluation images: a folder of PNG/JPEG files (searched recursively; the
//! first-level sub-folder names a file's class) or an image pack (one safetensors file with
//! `images` u8 `[N, H, W, C]`, optional `labels` i64 `[N]` and the class names as JSON in the
//! metadata key `classes`), preprocessed as the model expects.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};
use safetensors::Dtype;

use super::safetensors::Model;
use crate::error::{Error, Result};
use crate::util::rng::SplitMix;

/// How the bundled generic photos ([`ImageSet::bundled`]) are named in messages and reports.
pub const BUNDLED_PHOTOS: &str = "the bundled generic photos";

/// How pixels become the model's input tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Preprocess {
    /// Input channels (1 = grey, 3 = RGB).
    pub channels: usize,
    /// Resize so the shorter side has this many pixels (keeping the aspect ratio)...
    pub resize: usize,
    /// ...then take the centre `crop × crop` square.
    pub crop: usize,
    /// Bicubic (true) or bilinear resampling.
    pub bicubic: bool,
    /// Per-channel mean after scaling pixels to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

/// Where one image comes from.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Pack(usize),
}

/// A set of images with optional class labels.
pub struct ImageSet {
    path: PathBuf,
    items: Vec<(Source, Option<usize>)>,
    classes: Vec<String>,
    pack: Option<Model>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Largest image, in pixels, decoded or after the resize of the preprocessing (8192 × 8192).
pub const MAX_PIXELS: u64 = 8192 * 8192;
/// Largest ratio of an image's long side to its short side (a resize of the short side to the
/// model's input would otherwise blow the long side up without bound).
pub const MAX_ASPECT: u64 = 32;

/// Refuses an image of `w × h` pixels beyond [`MAX_PIXELS`] or [`MAX_ASPECT`].
fn check_size(path: &Path, w: u64, h: u64, stage: &str) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(bad(path, "the image is empty"));
    }
    if w.saturating_mul(h) > MAX_PIXELS {
        return Err(bad(
            path,
            format!("{w} × {h} pixels {stage} is more than the limit of {MAX_PIXELS} pixels"),
        ));
    }
    let (long, short) = (w.max(h), w.min(h));
    if long > MAX_ASPECT * short {
        return Err(bad(
            path,
            format!(
                "{w} × {h} pixels: an aspect ratio beyond {MAX_ASPECT}:1 is refused (it is no \
                 photo, and resizing its short side would make the long side huge)"
            ),
        ));
    }
    Ok(())
}

/// The size of an image of `w × h` after the resize of `p` (short side to `p.resize`, at least
/// the crop on each side).
fn resized(w: usize, h: usize, p: &Preprocess) -> (usize, usize) {
    let short = w.min(h).max(1);
    let (nw, nh) = if short == p.resize {
        (w, h)
    } else {
        (
            ((w as f64 * p.resize as f64) / short as f64)
                .round()
                .max(1.0) as usize,
            ((h as f64 * p.resize as f64) / short as f64)
                .round()
                .max(1.0) as usize,
        )
    };
    (nw.max(p.crop), nh.max(p.crop))
}

/// Image files under `dir`, sorted. Only regular files are listed (a FIFO or a device named
/// like an image would block or never end), and symbolic links to folders are not followed (a
/// link loop would never end); a symbolic link to a regular file is.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut entries: Vec<(PathBuf, std::fs::FileType)> = rd
        .map(|e| {
            e.and_then(|e| Ok((e.path(), e.file_type()?)))
                .map_err(|e| Error::io(dir, e))
        })
        .collect::<Result<_>>()?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (p, t) in entries {
        if t.is_dir() {
            walk(&p, out)?;
        } else if !is_image(&p) {
            continue;
        } else if t.is_file() {
            out.push(p);
        } else if t.is_symlink() {
            match std::fs::metadata(&p) {
                Ok(m) if m.is_file() => out.push(p),
                _ => log::warn!(
                    "{}: skipped (a link to something that is not a regular file)",
                    p.display()
                ),
            }
        } else {
            log::warn!("{}: skipped (not a regular file)", p.display());
        }
    }
    Ok(())
}

impl ImageSet {
    /// Opens a folder or an image pack.
    pub fn open(path: &Path) -> Result<ImageSet> {
        if path.is_dir() {
            let mut files = Vec::new();
            walk(path, &mut files)?;
            if files.is_empty() {
                return Err(bad(
                    path,
                    "no PNG or JPEG images in this folder or its sub-folders",
                ));
            }
            let class_of = |f: &Path| -> Option<String> {
                let rel = f.strip_prefix(path).ok()?;
                let mut c = rel.components();
                let first = c.next()?;
                c.next()?; // a file directly in the root has no class
                Some(first.as_os_str().to_string_lossy().into_owned())
            };
            let mut classes: Vec<String> = files.iter().filter_map(|f| class_of(f)).collect();
            classes.sort();
            classes.dedup();
            let items = files
                .iter()
                .map(|f| {
                    let label = class_of(f).and_then(|c| classes.iter().position(|x| *x == c));
                    (Source::File(f.clone()), label)
                })
                .collect();
            Ok(ImageSet {
                path: path.to_path_buf(),
                items,
                classes,
                pack: None,
            })
        } else if path.is_file() {
            Self::from_pack(Model::open(path)?)
        } else {
            Err(bad(path, "no such image folder or image pack"))
        }
    }

    /// The generic photos bundled with the tool (`assets/photos`, every one redistributable; see
    /// its `LICENSES.md`): what a recognised ViT is calibrated on when no calibration is given.
    pub fn bundled() -> Result<ImageSet> {
        static PACK: &[u8] = include_bytes!("../../assets/photos/generic.safetensors");
        Self::from_pack(Model::from_bytes(Path::new(BUNDLED_PHOTOS), PACK.to_vec())?)
    }

    /// Reads an image pack.
    pub fn from_pack(m: Model) -> Result<ImageSet> {
        let path = m.path().to_path_buf();
        let images = m.get("images").ok_or_else(|| {
            bad(
                &path,
                "not an image pack (no 'images' tensor); pass a folder of PNG/JPEG files or a pack",
            )
        })?;
        let s = &images.shape;
        if images.dtype != Dtype::U8
            || s.len() != 4
            || !(s[3] == 1 || s[3] == 3)
            || s[1] == 0
            || s[2] == 0
        {
            return Err(bad(
                &path,
                format!(
                    "'images' must be u8 [N, H, W, 1 or 3], found {:?} {:?}",
                    images.dtype, s
                ),
            ));
        }
        let n = s[0];
        if n == 0 {
            return Err(bad(&path, "the image pack holds no images"));
        }
        check_size(&path, s[2] as u64, s[1] as u64, "in the pack")?;
        let classes: Vec<String> = match m.metadata().get("classes") {
            Some(c) => serde_json::from_str(c)
                .map_err(|e| bad(&path, format!("metadata 'classes' is not a JSON list: {e}")))?,
            None => Vec::new(),
        };
        let labels: Vec<Option<usize>> = match m.get("labels") {
            Some(l) => {
                if l.dtype != Dtype::I64 || l.shape != [n] {
                    return Err(bad(
                        &path,
                        format!(
                            "'labels' must be i64 [{n}], found {:?} {:?}",
                            l.dtype, l.shape
                        ),
                    ));
                }
                m.bytes(l)
                    .chunks_exact(8)
                    .map(|b| {
                        let v = i64::from_le_bytes(b.try_into().expect("8 bytes"));
                        if v < 0 {
                            Ok(None)
                        } else if classes.is_empty() || (v as usize) < classes.len() {
                            Ok(Some(v as usize))
                        } else {
                            Err(bad(
                                &path,
                                format!("label {v} but only {} classes", classes.len()),
                            ))
                        }
                    })
                    .collect::<Result<_>>()?
            }
            None => vec![None; n],
        };
        Ok(ImageSet {
            path,
            items: (0..n).map(Source::Pack).zip(labels).collect(),
            classes,
            pack: Some(m),
        })
    }

    /// Where the set came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the set is empty (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Class names (folder names, or the pack's list); empty when unlabelled.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Label of image `i`.
    pub fn label(&self, i: usize) -> Option<usize> {
        self.items[i].1
    }

    /// Name of image `i` for messages.
    pub fn name(&self, i: usize) -> String {
        match &self.items[i].0 {
            Source::File(p) => p.display().to_string(),
            Source::Pack(k) => format!("{}[{k}]", self.path.display()),
        }
    }

    /// `count` image indices chosen by `seed` (all of them, in order, when `count ≥ len`).
    pub fn choose(&self, count: usize, seed: u64) -> Vec<usize> {
        let n = self.len();
        if count >= n {
            return (0..n).collect();
        }
        let mut idx: Vec<usize> = (0..n).collect();
        let mut rng = SplitMix::new(seed);
        for i in 0..count {
            let j = i + (rng.next_u64() % (n - i) as u64) as usize;
            idx.swap(i, j);
        }
        let mut v = idx[..count].to_vec();
        v.sort_unstable();
        v
    }

    /// Decodes image `i`.
    pub fn decode(&self, i: usize) -> Result<DynamicImage> {
        match &self.items[i].0 {
            Source::File(p) => {
                let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                decode_bytes(&bytes).map_err(|r| bad(p, r))
            }
            Source::Pack(k) => {
                let m = self
                    .pack
                    .as_ref()
                    .expect("pack images come with their pack");
                let t = m.get("images").expect("checked at open");
                let (h, w, c) = (t.shape[1], t.shape[2], t.shape[3]);
                let size = h * w * c;
                let data = m.bytes(t)[k * size..(k + 1) * size].to_vec();
                Ok(if c == 1 {
                    DynamicImage::ImageLuma8(
                        GrayImage::from_raw(w as u32, h as u32, data).expect("size"),
                    )
                } else {
                    DynamicImage::ImageRgb8(
                        RgbImage::from_raw(w as u32, h as u32, data).expect("size"),
                    )
                })
            }
        }
    }

    /// Image `i` decoded and preprocessed to `[channels, crop, crop]`.
    pub fn pixels(&self, i: usize, p: &Preprocess) -> Result<Vec<f32>> {
        let img = self.decode(i)?;
        let (nw, nh) = resized(img.width() as usize, img.height() as usize, p);
        let path = match &self.items[i].0 {
            Source::File(f) => f.clone(),
            Source::Pack(k) => self.path.join(format!("#{k}")),
        };
        check_size(&path, nw as u64, nh as u64, "after the resize")?;
        Ok(preprocess(&img, p))
    }
}

/// Decodes PNG or JPEG bytes; the error says why not.
pub fn decode_bytes(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    // The size from the header, before any pixel is decoded: a few bytes can claim gigapixels.
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot read the image: {e}"))
    };
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| format!("cannot decode image: {e}"))?;
    check_size(Path::new(""), w as u64, h as u64, "as stored").map_err(|e| match e {
        Error::Image { reason, .. } => reason,
        other => other.to_string(),
    })?;
    let img = reader()?
        .decode()
        .map_err(|e| format!("cannot decode image: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("the image is empty".into());
    }
    Ok(img)
}

/// Resize the shorter side, centre-crop, scale to [0, 1] and normalise.
pub fn preprocess(img: &DynamicImage, p: &Preprocess) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = resized(w, h, p);
    let filter = if p.bicubic {
        FilterType::CatmullRom
    } else {
        FilterType::Triangle
    };
    let img = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        img.resize_exact(nw as u32, nh as u32, filter)
    };
    let left = ((nw - p.crop) as f64 / 2.0).round() as u32;
    let top = ((nh - p.crop) as f64 / 2.0).round() as u32;
    let img = img.crop_imm(left, top, p.crop as u32, p.crop as u32);
    let plane = p.crop * p.crop;
    let mut out = vec![0.0f32; p.channels * plane];
    if p.channels == 1 {
        let g = img.to_luma8();
        for (k, v) in g.as_raw().iter().enumerate() {
            out[k] = (*v as f32 / 255.0 - p.mean[0]) / p.std[0];
        }
    } else {
        let rgb = img.to_rgb8();
        for (k, px) in rgb.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3.min(p.channels) {
                out[c * plane + k] = (px[c] as f32 / 255.0 - p.mean[c]) / p.std[c];
            }
        }
    }
    out
}

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
    /// ...then take the centre `crop × crop_w` rectangle: `crop` is the input's height.
    pub crop: usize,
    /// The input's width (`crop` for a square input). A non-square input is resized to
    /// `resize × round(resize · crop_w / crop)` without keeping the aspect ratio, then
    /// centre-cropped, as timm does for a non-square `input_size`.
    pub crop_w: usize,
    /// Instead: resize the whole image to `crop × crop_w` without keeping the aspect ratio, as
    /// HF's image processors do when `size` is `{height, width}` with no centre crop (ViT, SigLIP).
    pub squash: bool,
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
    if p.crop_w != p.crop {
        let nw = (p.resize as f64 * p.crop_w as f64 / p.crop as f64).round() as usize;
        return (nw.max(p.crop_w), p.resize.max(p.crop));
    }
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

    /// A view of an image decoded and preprocessed to `[channels, crop, crop]`: the image as the
    /// model's preprocessing gives it, or a seeded augmented view ([`augment`]).
    pub fn view_pixels(&self, v: View, p: &Preprocess) -> Result<Vec<f32>> {
        match v.aug {
            None => self.pixels(v.image, p),
            Some(seed) => Ok(augment(&self.decode(v.image)?, p, seed)),
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
    if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills what is missing with grey and says nothing; PIL, which timm
        // and transformers load images with, refuses such a file, and so does this.
        return Err("the JPEG ends before its end-of-image marker: the file is truncated".into());
    }
    let img = reader()?
        .decode()
        .map_err(|e| format!("cannot decode image: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("the image is empty".into());
    }
    Ok(img)
}

/// Whether a JPEG's bytes hold an end-of-image marker after its first scan. The marker segments
/// before the first start-of-scan are walked by their lengths (so a thumbnail inside an APP1
/// segment, with an end-of-image marker of its own, is skipped); inside the entropy-coded data a
/// `0xFF` is followed by `0x00` or a restart marker, so `0xFF 0xD9` there is the end of the image.
/// Bytes after the marker are allowed, as every decoder allows them.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2;
    // The segments before the first scan: 0xFF, a marker, a big-endian length that counts itself.
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            // Fill bytes before a marker.
            0xFF => i += 1,
            // Standalone markers carry no length.
            0x01 | 0xD0..=0xD7 => i += 2,
            0xD9 => return false,
            _ => {
                let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
                if len < 2 {
                    return false;
                }
                i += 2 + len;
                if marker == 0xDA {
                    return bytes
                        .get(i..)
                        .is_some_and(|rest| rest.windows(2).any(|w| w == [0xFF, 0xD9]));
                }
            }
        }
    }
    false
}

/// One calibration input: an image, or a seeded augmented view of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct View {
    /// The image's index in its set.
    pub image: usize,
    /// `None`: the image through the model's own preprocessing; `Some(seed)`: the augmented view
    /// that seed draws.
    pub aug: Option<u64>,
}

impl View {
    /// The image itself.
    pub fn plain(image: usize) -> View {
        View { image, aug: None }
    }

    /// The image and its `extra` augmented views, seeded by `seed` and the image index (so a
    /// view does not depend on which other images are drawn).
    pub fn with_views(image: usize, extra: u32, seed: u64) -> Vec<View> {
        let mut v = vec![View::plain(image)];
        v.extend((1..=extra as u64).map(|k| View {
            image,
            aug: Some(SplitMix::new(seed ^ AUGMENT_SEED ^ (image as u64) << 20 ^ k).next_u64()),
        }));
        v
    }
}

/// Mixed into the run's seed for the augmented views.
const AUGMENT_SEED: u64 = 0x0a06_0e47_u64 << 32;

/// Smallest share of the image's area a random crop keeps (torchvision's `RandomResizedCrop`
/// uses 0.08 for training; calibration wants views that still look like the image).
pub const AUGMENT_MIN_AREA: f64 = 0.35;

/// A seeded augmented view of `img`: a random crop of 35–100% of its area with an aspect ratio in
/// [3/4, 4/3] (as `RandomResizedCrop` draws it; the centre square when ten draws do not fit),
/// flipped left to right with probability ½, resized to the model's input with its filter and
/// normalised with its mean and std.
pub fn augment(img: &DynamicImage, p: &Preprocess, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix::new(seed);
    let mut unit = move || rng.uniform();
    let (w, h) = (img.width() as f64, img.height() as f64);
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    let mut region = None;
    for _ in 0..10 {
        let area = w * h * (AUGMENT_MIN_AREA + (1.0 - AUGMENT_MIN_AREA) * unit());
        let ratio = (lo + (hi - lo) * unit()).exp();
        let (cw, ch) = ((area * ratio).sqrt().round(), (area / ratio).sqrt().round());
        if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
            let x = ((w - cw + 1.0) * unit()).floor().min(w - cw);
            let y = ((h - ch + 1.0) * unit()).floor().min(h - ch);
            region = Some((x as u32, y as u32, cw as u32, ch as u32));
            break;
        }
    }
    let side = w.min(h);
    let (x, y, cw, ch) = region.unwrap_or((
        ((w - side) / 2.0) as u32,
        ((h - side) / 2.0) as u32,
        side as u32,
        side as u32,
    ));
    let flip = unit() < 0.5;
    let mut view =
        img.crop_imm(x, y, cw, ch)
            .resize_exact(p.crop_w as u32, p.crop as u32, filter_of(p));
    if flip {
        view = view.fliph();
    }
    normalise(&view, p)
}

fn filter_of(p: &Preprocess) -> FilterType {
    if p.bicubic {
        FilterType::CatmullRom
    } else {
        FilterType::Triangle
    }
}

/// Resize the shorter side, centre-crop (or squash the whole image to the input), scale to
/// [0, 1] and normalise.
pub fn preprocess(img: &DynamicImage, p: &Preprocess) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if p.squash {
        let img = if (w, h) == (p.crop_w, p.crop) {
            img.clone()
        } else {
            img.resize_exact(p.crop_w as u32, p.crop as u32, filter_of(p))
        };
        return normalise(&img, p);
    }
    let (nw, nh) = resized(w, h, p);
    let img = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        img.resize_exact(nw as u32, nh as u32, filter_of(p))
    };
    let left = ((nw - p.crop_w) as f64 / 2.0).round() as u32;
    let top = ((nh - p.crop) as f64 / 2.0).round() as u32;
    let img = img.crop_imm(left, top, p.crop_w as u32, p.crop as u32);
    normalise(&img, p)
}

/// A `crop × crop_w` image scaled to [0, 1] and normalised, `[channels, crop, crop_w]`.
fn normalise(img: &DynamicImage, p: &Preprocess) -> Vec<f32> {
    let plane = p.crop * p.crop_w;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        }));
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
        bytes
    }

    /// A JPEG cut short anywhere is refused before it is decoded (the decoder would fill the
    /// rest with grey); a whole one, with bytes after its end, or with a thumbnail whose own
    /// end-of-image marker comes before the main image's scan, is read.
    #[test]
    fn a_truncated_jpeg_is_refused_and_a_whole_one_is_read() {
        let whole = jpeg(40, 30);
        assert!(decode_bytes(&whole).is_ok());
        // Cut in the headers, the decoder refuses it itself; cut in the scan, it would not.
        let sos = whole.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        assert!(decode_bytes(&whole[..sos / 2]).is_err());
        for cut in [
            whole.len() - 1,
            whole.len() - 2,
            (sos + whole.len()) / 2,
            sos + 20,
        ] {
            let e = decode_bytes(&whole[..cut]).unwrap_err();
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
        let mut trailing = whole.clone();
        trailing.extend_from_slice(b"\0\xFF\xDAtrailing bytes");
        assert!(decode_bytes(&trailing).is_ok());
        // A thumbnail (a whole JPEG) in an APP1 segment right after the start-of-image marker.
        let thumb = jpeg(8, 8);
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&((thumb.len() + 2) as u16).to_be_bytes());
        app1.extend_from_slice(&thumb);
        let with_thumb: Vec<u8> = [&whole[..2], &app1[..], &whole[2..]].concat();
        assert!(jpeg_is_complete(&with_thumb));
        assert!(decode_bytes(&with_thumb).is_ok());
        let cut = &with_thumb[..with_thumb.len() - 40];
        assert!(!jpeg_is_complete(cut));
        assert!(decode_bytes(cut).unwrap_err().contains("truncated"));
    }

    fn prep(crop: usize) -> Preprocess {
        Preprocess {
            channels: 3,
            resize: crop,
            crop,
            crop_w: crop,
            squash: false,
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
            bicubic: true,
        }
    }

    /// `squash` resizes the whole image to the input, aspect ratio lost (HF's `{height, width}`
    /// processors); without it the short side is resized and the centre cropped.
    #[test]
    fn squash_resizes_the_whole_image_and_crop_keeps_the_centre() {
        // Left half black, right half white, 16 x 8: squashed, the halves stay halves.
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(16, 8, |x, _| {
            image::Rgb(if x < 8 { [0, 0, 0] } else { [255, 255, 255] })
        }));
        let mut p = prep(8);
        p.squash = true;
        let sq = preprocess(&img, &p);
        let lo = (0.0 - 0.5) / 0.25;
        let hi = (1.0 - 0.5) / 0.25;
        assert!(
            (sq[0] - lo).abs() < 1e-6 && (sq[7] - hi).abs() < 1e-6,
            "{:?}",
            &sq[..8]
        );
        p.squash = false;
        // Cropped: the centre 8 x 8 is columns 4..12, black then white at column 4.
        let cr = preprocess(&img, &p);
        assert!((cr[0] - lo).abs() < 1e-6 && (cr[7] - hi).abs() < 1e-6);
        assert_ne!(sq, cr);
        assert_eq!(sq.len(), cr.len());
    }

    /// An augmented view is seeded (the same seed gives the same pixels, another seed others),
    /// has the model's input size, normalises like the plain preprocessing (a constant image
    /// stays that constant), and the views of an image do not depend on the other images drawn.
    #[test]
    fn augmented_views_are_seeded_sized_and_normalised() {
        let p = prep(16);
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])
        }));
        let a = augment(&img, &p, 7);
        assert_eq!(a.len(), 3 * 16 * 16);
        assert_eq!(a, augment(&img, &p, 7));
        assert_ne!(a, augment(&img, &p, 8));
        let flat =
            DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 30, image::Rgb([191, 191, 191])));
        let want = (191.0 / 255.0 - 0.5) / 0.25;
        for seed in 0..20 {
            assert!(augment(&flat, &p, seed)
                .iter()
                .all(|v| (v - want).abs() < 1e-5));
        }
        let v = View::with_views(3, 4, 11);
        assert_eq!(v.len(), 5);
        assert_eq!(v[0], View::plain(3));
        let seeds: std::collections::BTreeSet<u64> =
            v[1..].iter().map(|x| x.aug.unwrap()).collect();
        assert_eq!(seeds.len(), 4);
        assert_eq!(View::with_views(3, 4, 11), v);
        assert_ne!(View::with_views(4, 4, 11)[1].aug, v[1].aug);
        assert_ne!(View::with_views(3, 4, 12)[1].aug, v[1].aug);
    }

    /// A view is a crop of the image, flipped or not: a left-to-right ramp stays a ramp, rising
    /// or falling across every row.
    #[test]
    fn augmented_views_are_crops_of_the_image() {
        let p = prep(8);
        let ramp = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 48, |x, _| {
            image::Rgb([(x * 4) as u8; 3])
        }));
        let mut flips = 0;
        for seed in 0..32 {
            let v = augment(&ramp, &p, seed);
            let row = &v[..8];
            let rising = row.windows(2).all(|w| w[1] >= w[0]);
            let falling = row.windows(2).all(|w| w[1] <= w[0]);
            assert!(rising || falling, "{row:?}");
            flips += (falling && !rising) as usize;
        }
        assert!((4..=28).contains(&flips), "{flips} of 32 flipped");
    }
}

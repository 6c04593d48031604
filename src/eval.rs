//! Accuracy of a model on labelled images, and fidelity of a quantized model's features to the
//! full-precision model's.
//!
//! Top-1 / top-5 need a classifier head and labels (class sub-folders or a labelled pack). For a
//! backbone, and as a finer signal for a classifier, the quantized model is compared with the
//! full-precision one on the same images: mean cosine of the CLS features, their relative mean
//! squared error, and how often each image's nearest neighbour (cosine, among the other images)
//! is the same image under both models. Same-model k-NN accuracy is not a fidelity measure —
//! gallery and queries drift together under quantization — so it is not used as one.

use std::collections::HashMap;

use serde::Serialize;

use crate::calibrate::embed_batches;
use crate::device::AnyOps;
use crate::error::Result;
use crate::io::checkpoint::Checkpoint;
use crate::io::images::ImageSet;
use crate::io::images::View;
use crate::model::forward::{Forward, HostBlock, HostStem, Ops};
use crate::model::{Role, VitSpec};

/// Images processed block by block together (bounds the hidden state held at once).
const GROUP: usize = 512;

/// Features of an image set under one model.
#[derive(Debug, Clone)]
pub struct Features {
    /// Images.
    pub n: usize,
    /// Width of the CLS features.
    pub dim: usize,
    /// Classes of the head (0 for a backbone).
    pub classes: usize,
    /// CLS features after the final LayerNorm, `[n, dim]`.
    pub cls: Vec<f32>,
    /// Logits `[n, classes]`.
    pub logits: Vec<f32>,
}

/// Replacement weights (dequantized layers) by tensor name.
pub type SwappedWeights = HashMap<String, Vec<f32>>;

fn block_with(
    model: &Checkpoint,
    spec: &VitSpec,
    b: usize,
    overrides: &SwappedWeights,
) -> Result<HostBlock> {
    let names = &spec.blocks[b];
    let mut h = HostBlock::load(model, spec, names)?;
    for (role, prefix) in names.linears() {
        if let Some(w) = overrides.get(&format!("{prefix}.weight")) {
            h.set_weight(role, w);
        }
    }
    // LayerNorms rescaled by --equalize.
    for (norm, name) in [
        (&mut h.norm1.0, &names.norm1.0),
        (&mut h.norm1.1, &names.norm1.1),
        (&mut h.norm2.0, &names.norm2.0),
        (&mut h.norm2.1, &names.norm2.1),
    ] {
        if let Some(v) = overrides.get(name) {
            norm.clone_from(v);
        }
    }
    Ok(h)
}

fn features_on<O: Ops>(
    ops: &O,
    spec: &VitSpec,
    model: &Checkpoint,
    overrides: &SwappedWeights,
    set: &ImageSet,
    idx: &[usize],
) -> Result<Features> {
    let f = Forward::new(ops, spec);
    let stem = HostStem::load(model, spec)?.upload(ops)?;
    let mut out = Features {
        n: idx.len(),
        dim: spec.out_dim(),
        classes: spec.num_classes,
        cls: Vec::new(),
        logits: Vec::new(),
    };
    for group in idx.chunks(GROUP) {
        let views: Vec<View> = group.iter().map(|&i| View::plain(i)).collect();
        let mut hidden = embed_batches(&f, &stem, set, &views, spec)?;
        for b in 0..spec.depth {
            let w = block_with(model, spec, b, overrides)?.upload(ops)?;
            for (h, n) in hidden.iter_mut() {
                f.block(&w, h, *n, None, &mut |_, _, _| Ok(()))?;
                ops.throttle()?;
            }
        }
        for (h, n) in &hidden {
            let o = f.finish(&stem, h, *n)?;
            out.cls.extend(o.cls);
            out.logits.extend(o.logits);
        }
    }
    Ok(out)
}

/// Runs the model (with `overrides` swapped in) over images `idx` of `set`.
pub fn features(
    engine: &AnyOps,
    spec: &VitSpec,
    model: &Checkpoint,
    overrides: &SwappedWeights,
    set: &ImageSet,
    idx: &[usize],
) -> Result<Features> {
    let f = match engine {
        AnyOps::Cpu(o) => features_on(o, spec, model, overrides, set, idx),
        AnyOps::Gpu(o) => features_on(o.as_ref(), spec, model, overrides, set, idx),
    }?;
    // A NaN logit would otherwise score as a hit or a miss by accident; a score of such
    // features is no score.
    let bad = f.cls.iter().chain(&f.logits).position(|v| !v.is_finite());
    if let Some(at) = bad {
        let (what, k) = if at < f.cls.len() {
            ("CLS features", at)
        } else {
            ("logits", at - f.cls.len())
        };
        return Err(crate::error::Error::InvalidOption(format!(
            "{}{}: non-finite {what} ({} at index {k}): a weight or a LayerNorm parameter of the \
             model is not finite or overflows",
            model.path().display(),
            if overrides.is_empty() {
                ""
            } else {
                " with the quantized layers"
            },
            if at < f.cls.len() {
                f.cls[k]
            } else {
                f.logits[k]
            },
        )));
    }
    Ok(f)
}

/// Hidden states of a few images at one block's input, kept on the host between measurements.
type States = Vec<(Vec<f32>, usize)>;

/// The pooled features `[n, dim]` and every token after the final norm.
type Pooled = (Vec<f32>, Vec<f32>);

/// How far one layer's quantization alone moves the model's pooled features. The
/// full-precision model carries a few images forward block by block (so a whole model costs one
/// forward, plus, per measured block, the blocks from its own to the last); for each layer of a
/// block, its weights are swapped in and the rest of the model runs, every layer of the block in
/// one pass (each later block is loaded and uploaded once for all of them). What
/// `--target-bits` weighs layer errors with.
pub struct FeatureProbe<'a> {
    engine: &'a AnyOps,
    spec: &'a VitSpec,
    model: &'a Checkpoint,
    /// The block whose input `states` holds.
    block: usize,
    states: States,
    /// The full-precision pooled features of the images, `[n, dim]`, and their tokens after the
    /// final norm.
    reference: Pooled,
}

fn probe_start<O: Ops>(
    ops: &O,
    spec: &VitSpec,
    model: &Checkpoint,
    set: &ImageSet,
    views: &[View],
) -> Result<(States, Pooled)> {
    let f = Forward::new(ops, spec);
    let stem = HostStem::load(model, spec)?.upload(ops)?;
    let hidden = embed_batches(&f, &stem, set, views, spec)?;
    let states = hidden
        .iter()
        .map(|(h, n)| Ok((ops.download(h)?, *n)))
        .collect::<Result<States>>()?;
    let reference = probe_tail(ops, spec, model, &states, 0, &[None])?.remove(0);
    Ok((states, reference))
}

/// Runs `states` (block `from`'s input) through blocks `from..` once per variant, block `from`
/// with that variant's weights swapped in (`None`: as it is), and returns each variant's pooled
/// features and tokens after the final norm. The blocks after `from` are loaded once for all.
fn probe_tail<O: Ops>(
    ops: &O,
    spec: &VitSpec,
    model: &Checkpoint,
    states: &States,
    from: usize,
    variants: &[Option<(Role, &[f32])>],
) -> Result<Vec<Pooled>> {
    let f = Forward::new(ops, spec);
    let stem = HostStem::load(model, spec)?.upload(ops)?;
    let upload_states = || {
        states
            .iter()
            .map(|(h, n)| Ok((ops.upload(h)?, *n)))
            .collect::<Result<Vec<_>>>()
    };
    let mut hidden = variants
        .iter()
        .map(|_| upload_states())
        .collect::<Result<Vec<_>>>()?;
    let host = HostBlock::load(model, spec, &spec.blocks[from])?;
    for (v, hv) in variants.iter().zip(hidden.iter_mut()) {
        let w = match v {
            Some((role, w)) => {
                let mut swapped = host.clone();
                swapped.set_weight(*role, w);
                swapped.upload(ops)?
            }
            None => host.upload(ops)?,
        };
        for (h, n) in hv.iter_mut() {
            f.block(&w, h, *n, None, &mut |_, _, _| Ok(()))?;
        }
    }
    for b in from + 1..spec.depth {
        let w = HostBlock::load(model, spec, &spec.blocks[b])?.upload(ops)?;
        for (h, n) in hidden.iter_mut().flatten() {
            f.block(&w, h, *n, None, &mut |_, _, _| Ok(()))?;
        }
    }
    hidden
        .iter()
        .map(|hv| {
            let mut out = (Vec::new(), Vec::new());
            for (h, n) in hv {
                let o = f.finish(&stem, h, *n)?;
                out.0.extend(o.cls);
                out.1.extend(o.tokens);
            }
            Ok(out)
        })
        .collect()
}

/// `‖a − b‖² / ‖b‖²` (0 for an all-zero `b`).
fn rel_change(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

fn probe_advance<O: Ops>(
    ops: &O,
    spec: &VitSpec,
    model: &Checkpoint,
    states: &mut States,
    b: usize,
) -> Result<()> {
    let f = Forward::new(ops, spec);
    let w = HostBlock::load(model, spec, &spec.blocks[b])?.upload(ops)?;
    for (h, n) in states.iter_mut() {
        let mut t = ops.upload(h)?;
        f.block(&w, &mut t, *n, None, &mut |_, _, _| Ok(()))?;
        *h = ops.download(&t)?;
    }
    Ok(())
}

impl<'a> FeatureProbe<'a> {
    /// Embeds the views `views` of `set` and records their full-precision features.
    pub fn new(
        engine: &'a AnyOps,
        spec: &'a VitSpec,
        model: &'a Checkpoint,
        set: &ImageSet,
        views: &[View],
    ) -> Result<FeatureProbe<'a>> {
        let (states, reference) = match engine {
            AnyOps::Cpu(o) => probe_start(o, spec, model, set, views),
            AnyOps::Gpu(o) => probe_start(o.as_ref(), spec, model, set, views),
        }?;
        Ok(FeatureProbe {
            engine,
            spec,
            model,
            block: 0,
            states,
            reference,
        })
    }

    /// The mean of `‖f − f₀‖² / ‖f₀‖²` over the pooled features and over every token after the
    /// final norm, `f` with layer `role` of block `block` set to `w` and `f₀` at full precision.
    /// The tokens steady the measure on few images (a task head may read more than the pooled
    /// vector: DINOv2's reads the patch mean too). Blocks come in increasing order (an earlier
    /// block than the last one measured is an internal error).
    pub fn effect(&mut self, block: usize, role: Role, w: &[f32]) -> Result<f64> {
        Ok(self.effects(block, &[(role, w)])?[0])
    }

    /// [`FeatureProbe::effect`] for several layers of one block, in one pass over the blocks
    /// after it.
    pub fn effects(&mut self, block: usize, swaps: &[(Role, &[f32])]) -> Result<Vec<f64>> {
        if block < self.block || block >= self.spec.depth {
            return Err(crate::error::Error::Internal(format!(
                "feature probe asked for block {block} at block {} of {}",
                self.block, self.spec.depth
            )));
        }
        let (spec, model) = (self.spec, self.model);
        while self.block < block {
            let b = self.block;
            match self.engine {
                AnyOps::Cpu(o) => probe_advance(o, spec, model, &mut self.states, b),
                AnyOps::Gpu(o) => probe_advance(o.as_ref(), spec, model, &mut self.states, b),
            }?;
            self.block += 1;
        }
        let variants: Vec<Option<(Role, &[f32])>> = swaps.iter().map(|&s| Some(s)).collect();
        let fs = match self.engine {
            AnyOps::Cpu(o) => probe_tail(o, spec, model, &self.states, block, &variants),
            AnyOps::Gpu(o) => probe_tail(o.as_ref(), spec, model, &self.states, block, &variants),
        }?;
        let r = &self.reference;
        Ok(fs
            .iter()
            .map(|f| 0.5 * (rel_change(&f.0, &r.0) + rel_change(&f.1, &r.1)))
            .collect())
    }
}

/// Classification accuracy.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Accuracy {
    /// Labelled images scored.
    pub images: usize,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy.
    pub top5: f64,
}

/// Maps the image set's classes onto the head's: by name when the model has label names and
/// every class name of the set is one of them; by position (with a warning) when none is; a
/// mix of both is refused, naming the classes that are not labels of the model.
pub fn label_map(set: &ImageSet, spec: &VitSpec) -> crate::error::Result<Vec<Option<usize>>> {
    let classes = set.classes();
    let named: Vec<&String> = classes
        .iter()
        .filter(|c| spec.labels.contains(*c))
        .collect();
    let by_name = !spec.labels.is_empty() && !classes.is_empty() && named.len() == classes.len();
    if !spec.labels.is_empty() && !named.is_empty() && !by_name {
        let others: Vec<&String> = classes
            .iter()
            .filter(|c| !spec.labels.contains(*c))
            .take(5)
            .collect();
        return Err(crate::error::Error::InvalidOption(format!(
            "{} of the {} class folders are label names of the model and the others \
             ({others:?}{}) are not: rename them to the model's labels (config.json id2label) \
             or use folders that all follow the head's order",
            named.len(),
            classes.len(),
            if classes.len() - named.len() > 5 {
                ", …"
            } else {
                ""
            }
        )));
    }
    if !spec.labels.is_empty() && !classes.is_empty() && named.is_empty() {
        log::warn!(
            "no class folder is named like a label of the model (e.g. '{}'): folders are \
             matched to the head's classes by sorted position, which is only right if they \
             follow the head's order",
            spec.labels[0]
        );
    }
    let map: Vec<Option<usize>> = (0..classes.len().max(spec.num_classes))
        .map(|i| {
            if by_name {
                classes
                    .get(i)
                    .and_then(|c| spec.labels.iter().position(|l| l == c))
            } else {
                (i < spec.num_classes).then_some(i)
            }
        })
        .collect();
    // A labelled image whose class the head does not have would drop out of top-1 and top-5
    // unseen (and the figures would be over fewer images than the table says). Without a head
    // nothing is scored, and a pack's negative label marks an image without one.
    if spec.num_classes > 0 {
        let beyond = (0..set.len()).find(|&i| {
            set.label(i)
                .is_some_and(|l| map.get(l).copied().flatten().is_none())
        });
        if let Some(i) = beyond {
            let l = set.label(i).expect("found labelled");
            let what = match classes.get(l) {
                Some(c) => format!("class '{c}'"),
                None => format!("label {l}"),
            };
            return Err(crate::error::Error::Image {
                path: set.path().to_path_buf(),
                reason: format!(
                    "{what} (of {}) is not a class of the model's head, which has {} classes \
                     matched by position: leave those images out, or name the classes like the \
                     model's labels (config.json id2label)",
                    set.name(i),
                    spec.num_classes
                ),
            });
        }
    }
    Ok(map)
}

/// Top-1 / top-5 of `f` on the labelled images of `idx` (`None` without a head or labels).
pub fn accuracy(
    f: &Features,
    set: &ImageSet,
    idx: &[usize],
    map: &[Option<usize>],
) -> Option<Accuracy> {
    if f.classes == 0 {
        return None;
    }
    let (mut n, mut t1, mut t5) = (0usize, 0usize, 0usize);
    for (k, &i) in idx.iter().enumerate() {
        let Some(label) = set.label(i).and_then(|l| map.get(l).copied().flatten()) else {
            continue;
        };
        let row = &f.logits[k * f.classes..(k + 1) * f.classes];
        let mine = row[label];
        // A tie is not a hit, and neither is a row with a non-finite logit.
        let rivals = row
            .iter()
            .enumerate()
            .filter(|&(j, &v)| j != label && v >= mine)
            .count();
        let finite = row.iter().all(|v| v.is_finite());
        n += 1;
        t1 += (finite && rivals == 0) as usize;
        t5 += (finite && rivals < 5) as usize;
    }
    (n > 0).then(|| Accuracy {
        images: n,
        top1: t1 as f64 / n as f64,
        top5: t5 as f64 / n as f64,
    })
}

/// Fidelity of features `q` to reference features `r` on the same images.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Fidelity {
    /// Mean cosine similarity of the CLS features.
    pub cls_cosine: f64,
    /// `Σ‖q − r‖² / Σ‖r‖²` over the CLS features.
    pub rel_mse: f64,
    /// Share of images whose nearest other image (cosine) is the same under both models.
    pub nn_agreement: f64,
    /// Share of images with the same top-1 class (models with a head).
    pub top1_agreement: Option<f64>,
}

fn normalized(v: &[f32], d: usize) -> Vec<f64> {
    v.chunks(d)
        .flat_map(|r| {
            let n = r
                .iter()
                .map(|&x| (x as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-30);
            r.iter().map(move |&x| x as f64 / n)
        })
        .collect()
}

fn nearest(u: &[f64], d: usize) -> Vec<usize> {
    let n = u.len() / d;
    (0..n)
        .map(|i| {
            let a = &u[i * d..(i + 1) * d];
            (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let s: f64 = a
                        .iter()
                        .zip(&u[j * d..(j + 1) * d])
                        .map(|(x, y)| x * y)
                        .sum();
                    (j, s)
                })
                .fold((usize::MAX, f64::NEG_INFINITY), |b, c| {
                    if c.1 > b.1 {
                        c
                    } else {
                        b
                    }
                })
                .0
        })
        .collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

/// Compares `q` with the reference `r`.
pub fn fidelity(q: &Features, r: &Features) -> Fidelity {
    let d = r.dim;
    let (un, rn) = (normalized(&q.cls, d), normalized(&r.cls, d));
    let n = r.n.max(1);
    let cos = un
        .chunks(d)
        .zip(rn.chunks(d))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>())
        .sum::<f64>()
        / n as f64;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in q.cls.iter().zip(&r.cls) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let nn = if r.n >= 2 {
        let (a, b) = (nearest(&un, d), nearest(&rn, d));
        a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / r.n as f64
    } else {
        1.0
    };
    let top1 = (r.classes > 0).then(|| {
        let c = r.classes;
        (0..r.n)
            .filter(|&i| {
                argmax(&q.logits[i * c..(i + 1) * c]) == argmax(&r.logits[i * c..(i + 1) * c])
            })
            .count() as f64
            / n as f64
    });
    Fidelity {
        cls_cosine: cos,
        rel_mse: num / den.max(1e-30),
        nn_agreement: nn,
        top1_agreement: top1,
    }
}

/// One row of an evaluation table.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    /// What was evaluated ("FP32", "RTN W4", "COMQ W4", a file name).
    pub model: String,
    /// Accuracy, when the model has a head and the images labels.
    pub accuracy: Option<Accuracy>,
    /// Fidelity to the reference (absent for the reference itself).
    pub fidelity: Option<Fidelity>,
}

/// An evaluation: the images and one row per model.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The image folder or pack.
    pub images: String,
    /// Images used.
    pub count: usize,
    /// The rows.
    pub rows: Vec<EvalRow>,
}

impl EvalReport {
    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "evaluation on {} images of {}\n{:<16} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}\n",
            self.count,
            self.images,
            "model",
            "top-1",
            "top-5",
            "CLS cos",
            "rel MSE",
            "NN agree",
            "top-1 agr"
        );
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
        let f4 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        for r in &self.rows {
            let a = r.accuracy;
            let f = r.fidelity;
            s.push_str(&format!(
                "{:<16} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}\n",
                r.model,
                pct(a.map(|a| a.top1)),
                pct(a.map(|a| a.top5)),
                f4(f.map(|f| f.cls_cosine)),
                f.map_or("-".to_string(), |f| format!("{:.3e}", f.rel_mse)),
                pct(f.map(|f| f.nn_agreement)),
                pct(f.and_then(|f| f.top1_agreement)),
            ));
        }
        s
    }
}

/// Brings the features of a model quantized with `--rotate` (its metadata names the rotation)
/// back to the basis of an unrotated reference, so the two compare; both rotated alike need
/// nothing, rotated differently cannot be compared.
fn same_basis(
    f: &mut Features,
    spec: &VitSpec,
    m: &Checkpoint,
    rf: &mut Features,
    rspec: &VitSpec,
    rm: &Checkpoint,
) -> Result<()> {
    use crate::model::rotate::{seed_of, unrotate_features};
    match (seed_of(m)?, seed_of(rm)?) {
        (Some(s), None) => {
            log::info!(
                "{} was rotated (--rotate, seed {s}): its features are mapped back to the basis of {}",
                m.path().display(),
                rm.path().display()
            );
            unrotate_features(&mut f.cls, rspec, rm, s)
        }
        (None, Some(s)) => {
            log::info!(
                "{} was rotated (--rotate, seed {s}): its features are mapped back to the basis of {}",
                rm.path().display(),
                m.path().display()
            );
            unrotate_features(&mut rf.cls, spec, m, s)
        }
        (Some(a), Some(b)) if a != b => Err(crate::error::Error::InvalidOption(format!(
            "{} and {} were rotated with different seeds ({a}, {b}): their features are in \
             different bases; compare each with the unrotated model",
            m.path().display(),
            rm.path().display()
        ))),
        _ => Ok(()),
    }
}

/// `comq-gpu eval`: accuracy of `model` on `images`, and with `reference` the fidelity of its
/// features to the reference model's (both must share the layout).
pub fn evaluate(
    model: &std::path::Path,
    reference: Option<&std::path::Path>,
    images: &std::path::Path,
    count: Option<usize>,
    (resize, crop): (Option<usize>, Option<usize>),
    device: crate::device::DeviceKind,
    adapter: Option<&str>,
    allow_unused_tensors: bool,
) -> Result<EvalReport> {
    let m = Checkpoint::open(model)?;
    let mut spec = VitSpec::detect_allowing(&m, allow_unused_tensors)?;
    spec.set_input(resize, crop)?;
    let set = ImageSet::open(images)?;
    let idx = set.choose(count.unwrap_or(usize::MAX), 0);
    let dev = crate::device::AnyDevice::select(device, adapter)?;
    let engine = AnyOps::for_device(&dev)?;
    let map = label_map(&set, &spec)?;
    let none = SwappedWeights::new();
    let mut rows = Vec::new();
    let reference = match reference {
        Some(r) => {
            let rm = Checkpoint::open(r)?;
            let mut rspec = VitSpec::detect_allowing(&rm, allow_unused_tensors)?;
            rspec.set_input(resize, crop)?;
            if (
                rspec.dim,
                rspec.out_dim(),
                rspec.depth,
                rspec.preprocess.crop,
                rspec.preprocess.crop_w,
            ) != (
                spec.dim,
                spec.out_dim(),
                spec.depth,
                spec.preprocess.crop,
                spec.preprocess.crop_w,
            ) {
                return Err(crate::error::Error::InvalidOption(format!(
                    "--reference {} is not the same architecture as {} (width {} depth {} vs {} {})",
                    r.display(),
                    model.display(),
                    rspec.dim,
                    rspec.depth,
                    spec.dim,
                    spec.depth
                )));
            }
            let f = features(&engine, &rspec, &rm, &none, &set, &idx)?;
            rows.push(EvalRow {
                model: r.display().to_string(),
                accuracy: accuracy(&f, &set, &idx, &map),
                fidelity: None,
            });
            Some((f, rm, rspec))
        }
        None => None,
    };
    let mut f = features(&engine, &spec, &m, &none, &set, &idx)?;
    let fidelity = match reference {
        Some((mut rf, rm, rspec)) => {
            same_basis(&mut f, &spec, &m, &mut rf, &rspec, &rm)?;
            Some(fidelity(&f, &rf))
        }
        None => None,
    };
    rows.push(EvalRow {
        model: model.display().to_string(),
        accuracy: accuracy(&f, &set, &idx, &map),
        fidelity,
    });
    Ok(EvalReport {
        images: images.display().to_string(),
        count: idx.len(),
        rows,
    })
}

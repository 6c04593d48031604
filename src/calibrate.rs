//! Calibration from images: the Gram matrices of each block's linear layers, one block at a time.
//!
//! The calibration images are embedded once; their hidden state (one block's input for the whole
//! calibration set, in batches on the device) is then moved through the model block by block.
//! For block `b`, the inputs of its linear layers (LayerNorm 1 output, attention output,
//! LayerNorm 2 output, GELU output) are accumulated into Gram matrices on the device while the
//! block runs; the pipeline quantizes the block's layers, then asks for the next block.
//!
//! Two modes. [`CalibMode::Fp`] (the paper's): every layer's inputs come from the
//! full-precision model, so one forward pass serves every block. [`CalibMode::Quantized`]
//! (sequential): the inputs come from the already-quantized prefix — earlier blocks run with
//! their quantized weights, and inside a block a layer's input is recomputed after the layers
//! before it were quantized. [`CalibMode::Corrected`] is the sequential mode plus the
//! full-precision model's inputs of the same rows, walked beside them: each site also gets the
//! cross-Gram `X̃ᵀ(X − X̃)`, from which the layer's target is corrected for how far the quantized
//! prefix moved its inputs (`quant::correct`).

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use crate::device::AnyOps;
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::io::images::{ImageSet, View};
use crate::model::forward::{BlockWeights, Forward, HostBlock, HostStem, Ops, Stem};
use crate::model::{Role, Site, VitSpec};
use crate::numeric::gram::CrossGram;
use crate::profile::Profile;
use crate::quant::Gram;

/// Where calibration inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CalibMode {
    /// From the full-precision model (layers independent, as in the paper).
    #[default]
    Fp,
    /// From the already-quantized prefix (sequential).
    Quantized,
    /// From the already-quantized prefix, each layer fitting the full-precision model's output
    /// (sequential, with the full-precision inputs beside them).
    Corrected,
}

impl CalibMode {
    /// Whether layers are calibrated on the quantized prefix (one block at a time).
    pub fn sequential(self) -> bool {
        self != CalibMode::Fp
    }
}

crate::util::value_enum!(CalibMode {
    Fp = "fp": "Inputs from the full-precision model (the paper's setting)",
    Quantized = "quantized": "Inputs from the already-quantized prefix (sequential)",
    Corrected = "corrected": "Inputs from the already-quantized prefix, each layer fitted to the full-precision model's output on them (sequential)",
});

/// Images per device batch during calibration and evaluation, at most.
pub const BATCH: usize = 32;

/// Bytes of activations one batch may hold in flight; wide models get smaller batches so the
/// calibration of the 6-billion-parameter shape fits 8 GB of GPU memory (ARCHITECTURE.md).
pub const BATCH_ACTIVATION_BYTES: usize = 256 << 20;

/// Images per batch for a ViT of width `dim`, MLP width `mlp` and `tokens` tokens per image:
/// [`BATCH`], or fewer when a batch's activations (qkv, attention output, MLP hidden and
/// LayerNorm output, `tokens·(6·dim + mlp)` floats per image) would pass
/// [`BATCH_ACTIVATION_BYTES`]. Up to ViT-L/16 this is [`BATCH`].
pub fn batch_for(dim: usize, mlp: usize, tokens: usize) -> usize {
    let per_image = tokens * (6 * dim + mlp) * 4;
    (BATCH_ACTIVATION_BYTES / per_image.max(1)).clamp(1, BATCH)
}

/// Images per batch for `spec`: [`batch_for`] of its most demanding block (the blocks of a
/// Swin differ in width and tokens; a ViT's are all alike).
pub fn batch_for_spec(spec: &VitSpec) -> usize {
    spec.blocks
        .iter()
        .map(|b| {
            let g = &b.geom;
            batch_for(g.dim.max(g.merge_in), g.mlp, spec.block_tokens(b.index))
        })
        .min()
        .unwrap_or_else(|| batch_for(spec.dim, spec.mlp, spec.tokens_per_image()))
}

/// Decodes and preprocesses the views `idx` of images of `set` into one `[n, c, s, s]` buffer.
pub fn load_pixels(set: &ImageSet, idx: &[View], spec: &VitSpec) -> Result<Vec<f32>> {
    let per: Vec<Vec<f32>> = idx
        .par_iter()
        .map(|&v| set.view_pixels(v, &spec.preprocess))
        .collect::<Result<_>>()?;
    Ok(per.concat())
}

/// Embeds the views `idx` of images of `set` in device batches of [`BATCH`]: `(tokens, images)`
/// per batch.
pub fn embed_batches<O: Ops>(
    f: &Forward<'_, O>,
    stem: &Stem<O::T>,
    set: &ImageSet,
    idx: &[View],
    spec: &VitSpec,
) -> Result<Vec<(O::T, usize)>> {
    idx.chunks(batch_for_spec(spec))
        .map(|chunk| {
            let px = load_pixels(set, chunk, spec)?;
            Ok((f.embed(stem, &px, chunk.len())?, chunk.len()))
        })
        .collect()
}

/// Something that hands out one block's Gram matrices at a time.
pub trait BlockGrams {
    /// The Gram of the input of layer `role` in block `block` (blocks in increasing order).
    fn gram(&mut self, block: usize, role: Role) -> Result<Gram>;
    /// Records the dequantized weights of a layer just quantized (used in quantized mode).
    fn quantized(&mut self, block: usize, role: Role, w: &[f32]);
    /// Device description.
    fn describe(&self) -> String;
    /// Every site's Gram of block `block`, handed over (full-precision mode; blocks in
    /// increasing order). What [`Ahead`] computes on its own thread.
    fn take_block(&mut self, block: usize) -> Result<HashMap<Site, Gram>>;
    /// The cross-Gram `X̃ᵀ(X − X̃)` of layer `role`'s input in block `block` (the quantized
    /// model's inputs against their shift from the full-precision model's), after
    /// [`BlockGrams::gram`] for it ([`CalibMode::Corrected`]; `None` in the other modes).
    fn cross(&mut self, _block: usize, _role: Role) -> Result<Option<CrossGram>> {
        Ok(None)
    }
}

/// The block-by-block calibrator over one device.
pub struct Calibrator<'a, O: Ops> {
    ops: &'a O,
    spec: &'a VitSpec,
    model: &'a Checkpoint,
    mode: CalibMode,
    /// Hidden state per batch: the input of block `at`.
    hidden: Vec<(O::T, usize)>,
    /// The full-precision model's hidden state of the same batches (corrected mode; else
    /// empty).
    hidden_fp: Vec<(O::T, usize)>,
    /// Cross-Gram matrices of block `grams_block`, by site (corrected mode).
    crosses: HashMap<Site, CrossGram>,
    /// The full-precision weights of one block on the device (corrected mode).
    fp_weights: Option<(usize, BlockWeights<O::T>)>,
    at: usize,
    /// Gram matrices of block `at - 1` (fp mode) or of block `at` (quantized mode), by site.
    grams: HashMap<Site, Gram>,
    grams_block: Option<usize>,
    /// Host weights of blocks with quantized layers (quantized mode).
    blocks: HashMap<usize, HostBlock>,
    profile: Arc<Profile>,
}

impl<'a, O: Ops> Calibrator<'a, O> {
    /// Embeds the calibration images.
    pub fn new(
        ops: &'a O,
        spec: &'a VitSpec,
        model: &'a Checkpoint,
        images: &ImageSet,
        idx: &[View],
        mode: CalibMode,
        profile: Arc<Profile>,
    ) -> Result<Self> {
        let t = Instant::now();
        let stem = HostStem::load(model, spec)?.upload(ops)?;
        let hidden = embed_batches(&Forward::new(ops, spec), &stem, images, idx, spec)?;
        if profile.exact() {
            ops.sync()?;
        }
        let hidden_fp = match mode {
            CalibMode::Corrected => hidden
                .iter()
                .map(|(h, n)| Ok((ops.duplicate(h)?, *n)))
                .collect::<Result<Vec<_>>>()?,
            _ => Vec::new(),
        };
        profile.add("embed", t.elapsed().as_secs_f64());
        log::info!(
            "calibration: {} images or views from {}, {} tokens each, on {}",
            idx.len(),
            images.path().display(),
            spec.tokens_per_image(),
            ops.describe()
        );
        Ok(Calibrator {
            ops,
            spec,
            model,
            mode,
            hidden,
            hidden_fp,
            crosses: HashMap::new(),
            fp_weights: None,
            at: 0,
            grams: HashMap::new(),
            grams_block: None,
            blocks: HashMap::new(),
            profile,
        })
    }

    fn host_block(&self, b: usize) -> Result<HostBlock> {
        match self.blocks.get(&b) {
            Some(h) => Ok(h.clone()),
            None => HostBlock::load(self.model, self.spec, &self.spec.blocks[b]),
        }
    }

    /// Moves the hidden state through block `self.at` (accumulating its Grams when `collect`).
    fn advance(&mut self, collect: bool) -> Result<()> {
        let started = Instant::now();
        let mut in_gram = 0.0;
        let exact = self.profile.exact();
        let b = self.at;
        let w = self.host_block(b)?.upload(self.ops)?;
        let f = Forward::new(self.ops, self.spec);
        let geom = self.spec.blocks[b].geom;
        let mut acc: HashMap<Site, O::G> = HashMap::new();
        if collect {
            for s in geom.sites() {
                acc.insert(s, self.ops.gram_new(geom.site_width(s))?);
            }
        }
        let ops = self.ops;
        for (h, n) in self.hidden.iter_mut() {
            f.block(&w, h, *n, None, &mut |site, x, rows| {
                if let Some(g) = acc.get_mut(&site) {
                    timed_gram(ops, exact, &mut in_gram, || ops.gram_add(g, x, rows))?;
                }
                Ok(())
            })?;
            ops.throttle()?;
        }
        if collect {
            self.grams.clear();
            let t = Instant::now();
            for (s, g) in acc {
                self.grams.insert(s, ops.gram_finish(g)?);
            }
            in_gram += t.elapsed().as_secs_f64();
            self.grams_block = Some(b);
        }
        if !self.hidden_fp.is_empty() {
            // The full-precision model's walk beside it, through the block's own weights.
            let wf = self.fp_weights(b)?;
            for (h, n) in self.hidden_fp.iter_mut() {
                f.block(&wf, h, *n, None, &mut |_, _, _| Ok(()))?;
                ops.throttle()?;
            }
        }
        if exact {
            ops.sync()?;
        }
        self.add_walk(started, in_gram);
        self.at += 1;
        Ok(())
    }

    /// The full-precision weights of block `b` on the device (corrected mode), uploaded once per
    /// block: every site of the block and the walk past it use them.
    fn fp_weights(&mut self, b: usize) -> Result<BlockWeights<O::T>> {
        match self.fp_weights.take() {
            Some((k, w)) if k == b => Ok(w),
            _ => HostBlock::load(self.model, self.spec, &self.spec.blocks[b])?.upload(self.ops),
        }
    }

    /// The Gram of one site of block `self.at` with the block's current weights, leaving the
    /// hidden state where it is; in corrected mode also the cross-Gram `X̃ᵀ(X − X̃)` of the same
    /// site: the quantized inputs against how far the full-precision model's inputs of the same
    /// rows are from them.
    fn site_grams(&mut self, site: Site) -> Result<(Gram, Option<CrossGram>)> {
        // The partial walks count as `forward`, the Gram and cross-Gram sums as `gram`, as in
        // `advance` (in step with the quantization, these are most of a sequential run's
        // calibration).
        let started = Instant::now();
        let mut in_gram = 0.0;
        let exact = self.profile.exact();
        let b = self.at;
        let w = self.host_block(b)?.upload(self.ops)?;
        let corrected = self.mode == CalibMode::Corrected;
        let wf = if corrected {
            Some(self.fp_weights(b)?)
        } else {
            None
        };
        let f = Forward::new(self.ops, self.spec);
        let n = self.spec.blocks[b].geom.site_width(site);
        let ops = self.ops;
        let mut g = ops.gram_new(n)?;
        let mut c = if corrected {
            Some(ops.cross_new(n)?)
        } else {
            None
        };
        let minus = if corrected {
            Some(ops.upload(&vec![-1.0f32; n])?)
        } else {
            None
        };
        let mut fp = self.hidden_fp.iter_mut();
        for (h, k) in self.hidden.iter_mut() {
            // The full-precision inputs of the same rows, which become the shift below.
            let mut shift = None;
            if let (Some(wf), Some((hf, _))) = (&wf, fp.next()) {
                f.block(wf, hf, *k, Some(site), &mut |s, x, _| {
                    if s == site {
                        shift = Some(ops.duplicate(x)?);
                    }
                    Ok(())
                })?;
                if shift.is_none() {
                    return Err(Error::Internal(format!("block {b} never reached {site:?}")));
                }
            }
            f.block(&w, h, *k, Some(site), &mut |s, x, rows| {
                if s == site {
                    timed_gram(ops, exact, &mut in_gram, || {
                        ops.gram_add(&mut g, x, rows)?;
                        if let (Some(sh), Some(c), Some(minus)) =
                            (shift.as_mut(), c.as_mut(), &minus)
                        {
                            // The shift X − X̃ elementwise in f32, then X̃ᵀ(X − X̃): no
                            // cancellation between two large sums, and exactly zero where
                            // nothing moved.
                            ops.add_scaled(sh, x, minus, rows, n)?;
                            ops.cross_add(c, x, sh, rows)?;
                        }
                        Ok(())
                    })?;
                }
                Ok(())
            })?;
            ops.throttle()?;
        }
        if let Some(wf) = wf {
            self.fp_weights = Some((b, wf));
        }
        let t = Instant::now();
        let cross = c.map(|c| ops.cross_finish(c)).transpose()?;
        let gram = ops.gram_finish(g)?;
        in_gram += t.elapsed().as_secs_f64();
        self.add_walk(started, in_gram);
        Ok((gram, cross))
    }

    /// Books a walk begun at `started`: `in_gram` seconds of it as `gram`, the rest as
    /// `forward`.
    fn add_walk(&self, started: Instant, in_gram: f64) {
        self.profile.add("gram", in_gram);
        self.profile
            .add("forward", started.elapsed().as_secs_f64() - in_gram);
    }
}

/// Runs one Gram accumulation and adds its seconds to `in_gram`. With an exact profile the
/// forward work queued before it is waited for first (and so counted as forward), then its own.
fn timed_gram<O: Ops>(
    ops: &O,
    exact: bool,
    in_gram: &mut f64,
    f: impl FnOnce() -> Result<()>,
) -> Result<()> {
    if exact {
        ops.sync()?;
    }
    let t = Instant::now();
    f()?;
    if exact {
        ops.sync()?;
    }
    *in_gram += t.elapsed().as_secs_f64();
    Ok(())
}

impl<O: Ops> BlockGrams for Calibrator<'_, O> {
    fn gram(&mut self, block: usize, role: Role) -> Result<Gram> {
        let site = role.site();
        // The hidden state only moves forward: a block behind it (other than the one whose
        // Grams are held) cannot be served.
        if self.grams_block != Some(block) && block < self.at {
            return Err(Error::InvalidOption(format!(
                "calibration asked for block {block} after block {}",
                self.at
            )));
        }
        match self.mode {
            CalibMode::Fp => {
                if self.grams_block != Some(block) {
                    while self.at < block {
                        self.advance(false)?;
                    }
                    self.advance(true)?;
                }
                Ok(self.grams[&site].clone())
            }
            CalibMode::Quantized | CalibMode::Corrected => {
                while self.at < block {
                    self.advance(false)?;
                    self.grams.clear();
                    self.crosses.clear();
                }
                if self.grams_block != Some(block) {
                    self.grams.clear();
                    self.crosses.clear();
                    self.grams_block = Some(block);
                }
                if let Some(g) = self.grams.get(&site) {
                    return Ok(g.clone());
                }
                let (g, c) = self.site_grams(site)?;
                if let Some(c) = c {
                    self.crosses.insert(site, c);
                }
                self.grams.insert(site, g.clone());
                Ok(g)
            }
        }
    }

    fn quantized(&mut self, block: usize, role: Role, w: &[f32]) {
        if !self.mode.sequential() {
            return;
        }
        if !self.blocks.contains_key(&block) {
            match HostBlock::load(self.model, self.spec, &self.spec.blocks[block]) {
                Ok(h) => {
                    self.blocks.insert(block, h);
                }
                Err(e) => {
                    log::warn!("cannot record quantized weights of block {block}: {e}");
                    return;
                }
            }
        }
        if let Some(h) = self.blocks.get_mut(&block) {
            h.set_weight(role, w);
        }
        // Blocks behind the hidden state are no longer needed.
        let at = self.at;
        self.blocks.retain(|&k, _| k >= at);
    }

    fn describe(&self) -> String {
        self.ops.describe()
    }

    fn cross(&mut self, block: usize, role: Role) -> Result<Option<CrossGram>> {
        if self.mode != CalibMode::Corrected {
            return Ok(None);
        }
        if self.grams_block != Some(block) {
            return Err(Error::Internal(format!(
                "cross-Gram of block {block} asked outside its Gram's block"
            )));
        }
        Ok(self.crosses.get(&role.site()).cloned())
    }

    fn take_block(&mut self, block: usize) -> Result<HashMap<Site, Gram>> {
        if self.mode != CalibMode::Fp || block < self.at {
            return Err(Error::InvalidOption(format!(
                "calibration cannot hand over block {block} (mode {:?}, at block {})",
                self.mode, self.at
            )));
        }
        while self.at < block {
            self.advance(false)?;
        }
        self.advance(true)?;
        self.grams_block = None;
        Ok(std::mem::take(&mut self.grams))
    }
}

/// Work done with a block's Grams on the thread that computed them ([`Ahead::spawn_with`]).
pub type BlockHook<'env> = dyn Fn(usize, &HashMap<Site, Gram>) + Send + 'env;

/// A full-precision calibrator run on its own thread, one block ahead of the quantization: while
/// the layers of block `b` are quantized, the forward pass and the Grams of the next block needed
/// are computed. The channel is a rendezvous, so at most two blocks' Grams exist at once (the
/// one being quantized and the one waiting to be handed over).
pub struct Ahead {
    rx: Receiver<Result<(usize, HashMap<Site, Gram>)>>,
    held: Option<(usize, HashMap<Site, Gram>)>,
    describe: String,
}

impl Ahead {
    /// Starts `inner` on a thread of `scope`, producing the Grams of `blocks` (increasing).
    pub fn spawn<'scope, 'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        inner: Box<dyn BlockGrams + Send + 'env>,
        blocks: Vec<usize>,
    ) -> Ahead {
        Ahead::spawn_with(scope, inner, blocks, None)
    }

    /// [`Ahead::spawn`], with `then` run on that thread with each block's Grams before they are
    /// handed over (the run builds the block's GPTQ factors there, while the block before it
    /// quantizes).
    pub fn spawn_with<'scope, 'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        mut inner: Box<dyn BlockGrams + Send + 'env>,
        blocks: Vec<usize>,
        then: Option<Box<BlockHook<'env>>>,
    ) -> Ahead {
        let describe = inner.describe();
        let (tx, rx) = sync_channel(0);
        scope.spawn(move || {
            for b in blocks {
                let item = inner.take_block(b).map(|m| (b, m));
                if let (Ok((b, grams)), Some(f)) = (&item, &then) {
                    f(*b, grams);
                }
                let failed = item.is_err();
                // The receiver is gone when the run stopped early: nothing more to do.
                if tx.send(item).is_err() || failed {
                    break;
                }
            }
        });
        Ahead {
            rx,
            held: None,
            describe,
        }
    }
}

impl Ahead {
    /// Receives until block `block`'s Grams are held (blocks only move forward).
    fn reach(&mut self, block: usize) -> Result<&mut HashMap<Site, Gram>> {
        loop {
            match &self.held {
                Some((b, _)) if *b == block => break,
                Some((b, _)) if *b > block => {
                    return Err(Error::InvalidOption(format!(
                        "calibration asked for block {block} after block {b}"
                    )))
                }
                _ => {}
            }
            self.held = None;
            match self.rx.recv() {
                Ok(item) => self.held = Some(item?),
                Err(_) => {
                    return Err(Error::InvalidOption(format!(
                        "calibration ended before block {block}"
                    )))
                }
            }
        }
        Ok(&mut self.held.as_mut().expect("reached").1)
    }
}

impl BlockGrams for Ahead {
    fn gram(&mut self, block: usize, role: Role) -> Result<Gram> {
        self.reach(block)?
            .get(&role.site())
            .cloned()
            .ok_or_else(|| Error::InvalidOption(format!("no Gram for {role:?} of block {block}")))
    }

    fn quantized(&mut self, _block: usize, _role: Role, _w: &[f32]) {}

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn take_block(&mut self, block: usize) -> Result<HashMap<Site, Gram>> {
        Ok(std::mem::take(self.reach(block)?))
    }
}

/// A calibrator on the engine's device.
pub fn calibrator<'a>(
    engine: &'a AnyOps,
    spec: &'a VitSpec,
    model: &'a Checkpoint,
    images: &ImageSet,
    idx: &[View],
    mode: CalibMode,
    profile: Arc<Profile>,
) -> Result<Box<dyn BlockGrams + Send + 'a>> {
    Ok(match engine {
        AnyOps::Cpu(o) => Box::new(Calibrator::new(o, spec, model, images, idx, mode, profile)?),
        AnyOps::Gpu(o) => Box::new(Calibrator::new(
            o.as_ref(),
            spec,
            model,
            images,
            idx,
            mode,
            profile,
        )?),
    })
}

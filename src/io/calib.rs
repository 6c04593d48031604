//! Calibration files: per-layer activations or Gram matrices.
//!
//! For a weight `P.weight` the file holds `P.input` (activations `[N, in]`, or `[B, T, in]` with
//! the leading dimensions flattened, any float dtype) or `P.gram` (`[in, in]`). Activations are
//! streamed in chunks of rows into a Gram accumulator, so a file of millions of tokens is never
//! held in memory; every chunk is checked for NaN/Inf before it is summed.

use std::path::Path;

use super::Model;
use crate::device::AnyDevice;
use crate::error::{Error, Result};
use crate::quant::Gram;

/// Rows of activations converted and accumulated at a time.
pub const CHUNK_ROWS: usize = 4096;

/// What calibration a layer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalibKind {
    /// `P.input` activations.
    Input,
    /// `P.gram` matrix.
    Gram,
    /// Captured by the built-in forward pass from calibration images.
    Images,
}

/// An open calibration file.
#[derive(Debug)]
pub struct Calibration {
    file: Model,
}

impl Calibration {
    /// Opens a calibration safetensors file.
    pub fn open(path: &Path) -> Result<Calibration> {
        Ok(Calibration {
            file: Model::open(path)?,
        })
    }

    /// A calibration file already opened (or held in memory).
    pub fn from_model(file: Model) -> Calibration {
        Calibration { file }
    }

    /// The underlying file.
    pub fn model(&self) -> &Model {
        &self.file
    }

    /// Which calibration the layer with weight prefix `prefix` has, if any.
    pub fn kind(&self, prefix: &str) -> Option<CalibKind> {
        if self.file.get(&format!("{prefix}.gram")).is_some() {
            Some(CalibKind::Gram)
        } else if self.file.get(&format!("{prefix}.input")).is_some() {
            Some(CalibKind::Input)
        } else {
            None
        }
    }

    /// Activation rows behind layer `prefix`'s calibration (0 for a given Gram or none).
    pub fn rows(&self, prefix: &str, cols: usize) -> u64 {
        match self.file.get(&format!("{prefix}.input")) {
            Some(t) if self.kind(prefix) == Some(CalibKind::Input) => {
                (t.numel() / cols.max(1)) as u64
            }
            _ => 0,
        }
    }

    /// Checks shapes and dtypes for a layer with `cols` inputs without reading data.
    pub fn check(&self, prefix: &str, cols: usize) -> Result<CalibKind> {
        let path = self.file.path();
        let kind = self.kind(prefix).ok_or_else(|| Error::MissingCalibration {
            layer: format!("{prefix}.weight"),
            prefix: prefix.to_string(),
            cols,
        })?;
        let name = match kind {
            CalibKind::Gram => format!("{prefix}.gram"),
            CalibKind::Input => format!("{prefix}.input"),
            CalibKind::Images => unreachable!("kind() only finds file tensors"),
        };
        let t = self.file.get(&name).expect("kind() found it");
        if !super::dtype::is_float(t.dtype) {
            return Err(Error::tensor(
                path,
                &name,
                super::dtype::unsupported(t.dtype),
            ));
        }
        match kind {
            CalibKind::Gram if t.shape != [cols, cols] => Err(Error::tensor(
                path,
                &name,
                format!("shape {:?} does not match the layer's {cols} inputs (expected [{cols}, {cols}])", t.shape),
            )),
            CalibKind::Input if t.shape.len() < 2 || t.shape.last() != Some(&cols) => {
                Err(Error::tensor(
                    path,
                    &name,
                    format!("shape {:?} does not match the layer's {cols} inputs (expected [N, {cols}])", t.shape),
                ))
            }
            CalibKind::Input if t.numel() == 0 => {
                Err(Error::tensor(path, &name, "holds no activation rows"))
            }
            _ => Ok(kind),
        }
    }

    /// The Gram matrix of layer `prefix` (with `cols` inputs), accumulating activations on `device`.
    pub fn gram(&self, prefix: &str, cols: usize, device: &AnyDevice) -> Result<Gram> {
        let path = self.file.path();
        match self.check(prefix, cols)? {
            CalibKind::Images => unreachable!("check() only returns file kinds"),
            CalibKind::Gram => {
                let name = format!("{prefix}.gram");
                let t = self.file.get(&name).expect("checked");
                let data = self.file.read_f64(t)?;
                if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                    return Err(Error::NonFinite {
                        what: format!("calibration tensor '{name}' in {}", path.display()),
                        value: data[i],
                        index: i,
                    });
                }
                crate::quant::gram::check_gram_matrix(
                    cols,
                    &data,
                    &format!("calibration tensor '{name}' in {}", path.display()),
                )?;
                Ok(Gram::from_matrix(cols, data))
            }
            CalibKind::Input => {
                let rows = self.rows(prefix, cols) as usize;
                self.input_gram(prefix, cols, device, 0..rows)
            }
        }
    }
    /// The Gram matrix of activation rows `rows` of layer `prefix` (checked as `P.input`),
    /// accumulated on `device`.
    fn input_gram(
        &self,
        prefix: &str,
        cols: usize,
        device: &AnyDevice,
        rows: std::ops::Range<usize>,
    ) -> Result<Gram> {
        let path = self.file.path();
        let name = format!("{prefix}.input");
        let t = self.file.get(&name).expect("checked");
        let (first, last) = (rows.start, rows.end);
        let chunks = (first..last).step_by(CHUNK_ROWS).map(|start| {
            let end = (start + CHUNK_ROWS).min(last);
            let chunk = self.file.read_rows_f32(t, cols, start..end)?;
            let es = super::dtype::size_of(t.dtype).unwrap_or(0);
            self.file
                .release(t.range.start + start * cols * es..t.range.start + end * cols * es);
            if let Some(i) = chunk.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFinite {
                    what: format!("calibration tensor '{name}' in {}", path.display()),
                    value: chunk[i] as f64,
                    index: start * cols + i,
                });
            }
            Ok(chunk)
        });
        let g = device.gram(cols, chunks)?;
        g.check(&format!(
            "the Gram of calibration tensor '{name}' in {}",
            path.display()
        ))?;
        Ok(g)
    }

    /// The Gram matrix of layer `prefix` and, when it is given as activations (`P.input`) with
    /// enough rows, a held-out Gram of its last `share` of rows, which the calibration Gram
    /// then leaves out. Rows are taken from the end in one piece: activations are stored image
    /// by image, so the held-out rows come from other images than the rest, as far as the
    /// file allows. Held out only when at least one row is and the rest keeps `cols` rows (a
    /// Gram that can be full rank); otherwise `None` beside the whole Gram.
    pub fn gram_with_holdout(
        &self,
        prefix: &str,
        cols: usize,
        device: &AnyDevice,
        share: f32,
    ) -> Result<(Gram, Option<Gram>)> {
        if self.check(prefix, cols)? != CalibKind::Input || !(share > 0.0 && share < 1.0) {
            return Ok((self.gram(prefix, cols, device)?, None));
        }
        let rows = self.rows(prefix, cols) as usize;
        let held = (rows as f64 * share as f64).round() as usize;
        if held == 0 || rows - held < cols {
            return Ok((self.gram(prefix, cols, device)?, None));
        }
        let cut = rows - held;
        Ok((
            self.input_gram(prefix, cols, device, 0..cut)?,
            Some(self.input_gram(prefix, cols, device, cut..rows)?),
        ))
    }
}

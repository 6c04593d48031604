//! The compressed-tensors encoding of a quantized layer: the scale dtype, the planned tensors
//! and their packed bytes.

use crate::error::Error;
use crate::error::Result;
use crate::io::dtype;
use crate::io::pack;
use crate::io::PlannedTensor;
use crate::quant::QuantConfig;
use crate::quant::QuantizedLayer;
use crate::quant::ScaleDtype;
use safetensors::Dtype;

/// The scale dtype that matches a weight's dtype (scales are stored in the model's dtype).
pub fn scale_dtype_for(d: Dtype) -> (ScaleDtype, Dtype) {
    match d {
        Dtype::F16 => (ScaleDtype::F16, Dtype::F16),
        Dtype::BF16 => (ScaleDtype::Bf16, Dtype::BF16),
        _ => (ScaleDtype::F32, Dtype::F32),
    }
}

/// The compressed-tensors tensors that replace `P.weight`.
pub fn packed_layout(
    prefix: &str,
    rows: usize,
    cols: usize,
    cfg: &QuantConfig,
    scale: Dtype,
) -> Vec<PlannedTensor> {
    let groups = cols / cfg.group_size.unwrap_or(cols);
    let mut v = vec![
        PlannedTensor {
            name: format!("{prefix}.weight_packed"),
            dtype: Dtype::I32,
            shape: vec![rows, pack::words_for(cols, cfg.bits)],
        },
        PlannedTensor {
            name: format!("{prefix}.weight_scale"),
            dtype: scale,
            shape: vec![rows, groups],
        },
        PlannedTensor {
            name: format!("{prefix}.weight_shape"),
            dtype: Dtype::I64,
            shape: vec![2],
        },
    ];
    if !cfg.sym {
        v.push(PlannedTensor {
            name: format!("{prefix}.weight_zero_point"),
            dtype: Dtype::I32,
            shape: vec![pack::words_for(rows, cfg.bits), groups],
        });
    }
    v
}

/// Encodes a quantized layer as its compressed-tensors tensors (name, bytes), in `packed_layout` order.
pub fn packed_tensors(
    prefix: &str,
    q: &QuantizedLayer,
    scale: Dtype,
    sym: bool,
) -> Result<Vec<(String, Vec<u8>)>> {
    let codes = q.unsigned_codes();
    let packed = pack::pack_rows(&codes, q.rows, q.cols, q.bits);
    let groups = q.grid.groups();
    let mut out = vec![
        (
            format!("{prefix}.weight_packed"),
            bytemuck::cast_slice(&packed).to_vec(),
        ),
        (
            format!("{prefix}.weight_scale"),
            dtype::from_f32(scale, &q.grid.delta).expect("scale dtype is a float type"),
        ),
        (
            format!("{prefix}.weight_shape"),
            [q.rows as i64, q.cols as i64]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    ];
    if !sym {
        // Stored zero point = signed zp + 2^(b−1) = −lo; it must fit in b bits.
        let max = (1i64 << q.bits) - 1;
        let mut zp = Vec::with_capacity(q.grid.lo.len());
        for (i, &lo) in q.grid.lo.iter().enumerate() {
            let z = -(lo as i64);
            if !(0..=max).contains(&z) {
                return Err(Error::InvalidOption(format!(
                    "layer '{prefix}.weight' row {} has all weights of one sign, so its zero point ({z}) \
                     does not fit in {} bits of the compressed-tensors format; use --sym, or write only --dequantized",
                    i / groups,
                    q.bits
                )));
            }
            zp.push(z as u32);
        }
        let packed_zp = pack::pack_columns(&zp, q.rows, groups, q.bits);
        out.push((
            format!("{prefix}.weight_zero_point"),
            bytemuck::cast_slice(&packed_zp).to_vec(),
        ));
    }
    Ok(out)
}

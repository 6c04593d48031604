//! Element types: float tensors of any width to f32 and back.
//!
//! Weights arrive as f32, f16 or bf16 (f64 is accepted too); the algorithm works in f32.
//! Bytes come from a memory map with no alignment guarantee, so they are decoded with
//! `from_le_bytes` rather than cast.

use half::{bf16, f16};
use safetensors::Dtype;

/// Whether `dtype` is a float type comq-gpu can read.
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// Bytes per element of a supported dtype (`None` for others).
pub fn size_of(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F64 | Dtype::I64 | Dtype::U64 => Some(8),
        Dtype::F32 | Dtype::I32 | Dtype::U32 => Some(4),
        Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => Some(2),
        Dtype::I8 | Dtype::U8 | Dtype::BOOL => Some(1),
        _ => None,
    }
}

/// The safetensors name of a dtype ("F32", "BF16", …).
pub fn name(dtype: Dtype) -> String {
    serde_json::to_value(dtype)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{dtype:?}"))
}

/// Why a tensor of `dtype` cannot be read as weights: the low-precision float formats (F8, F6,
/// F4) are floats this tool does not decode yet; the rest are not floats at all.
pub fn unsupported(dtype: Dtype) -> String {
    let n = name(dtype);
    if n.starts_with("F8") || n.starts_with("F6") || n.starts_with("F4") {
        format!(
            "dtype {n} is a low-precision float format that comq-gpu does not read yet; \
             convert the model to BF16, F16 or F32"
        )
    } else {
        format!("dtype {n} is not a float type (F32, F16, BF16, F64)")
    }
}

/// Decodes float bytes to f32; `None` if `dtype` is not a float type.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let v = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunk of 8")) as f32)
            .collect(),
        _ => return None,
    };
    Some(v)
}

/// Decodes float bytes to f64 (for Gram matrices given directly).
pub fn to_f64(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f64>> {
    match dtype {
        Dtype::F64 => Some(
            bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("chunk of 8")))
                .collect(),
        ),
        _ => to_f32(dtype, bytes).map(|v| v.into_iter().map(f64::from).collect()),
    }
}

/// Encodes f32 values as `dtype` bytes (round to nearest even); `None` for non-float dtypes.
pub fn from_f32(dtype: Dtype, v: &[f32]) -> Option<Vec<u8>> {
    let out = match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F64 => v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
        _ => return None,
    };
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_dtypes_round_trip_representable_values() {
        let v = [0.0f32, 1.5, -2.25, 1024.0];
        for dt in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            let bytes = from_f32(dt, &v).unwrap();
            assert_eq!(to_f32(dt, &bytes).unwrap(), v, "{dt:?}");
        }
        assert_eq!(name(Dtype::BF16), "BF16");
    }
}

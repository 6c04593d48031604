//! `config.json` with a compressed-tensors `quantization_config`, so loaders know how to read
//! the packed tensors (`../shared/design/formats.md` §2.3).
//!
//! The input's `config.json` is copied and extended when one sits beside the input; otherwise a
//! minimal one holding only the quantization config is written. One config group per distinct
//! scheme (bits, group size, symmetry): with a single scheme it targets `Linear` and lists the
//! unquantized linear layers in `ignore` (robust to transformers renaming modules on load); with
//! several, each group targets its modules by name.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One quantized module's scheme.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModuleScheme {
    /// Bits.
    pub bits: u32,
    /// Group size (`None` = per channel).
    pub group_size: Option<usize>,
    /// Symmetric grid.
    pub sym: bool,
}

fn weights_json(s: &ModuleScheme) -> Value {
    json!({
        "num_bits": s.bits,
        "type": "int",
        "symmetric": s.sym,
        "strategy": if s.group_size.is_some() { "group" } else { "channel" },
        "group_size": s.group_size,
        "dynamic": false,
        "actorder": null,
        "observer": "minmax",
    })
}

/// The `quantization_config` object for `modules` (name without `.weight` → scheme), with the
/// unquantized linear layers in `ignore`.
pub fn quantization_config(modules: &BTreeMap<String, ModuleScheme>, ignore: &[String]) -> Value {
    let mut by_scheme: BTreeMap<&ModuleScheme, Vec<&String>> = BTreeMap::new();
    for (name, s) in modules {
        by_scheme.entry(s).or_default().push(name);
    }
    let single = by_scheme.len() == 1;
    let mut groups = serde_json::Map::new();
    for (i, (scheme, names)) in by_scheme.iter().enumerate() {
        let targets: Value = if single {
            json!(["Linear"])
        } else {
            json!(names)
        };
        groups.insert(
            format!("group_{i}"),
            json!({
                "targets": targets,
                "weights": weights_json(scheme),
                "input_activations": null,
                "output_activations": null,
            }),
        );
    }
    json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": null,
    })
}

/// Writes `out_dir/config.json`: the input's `config.json` (if `input_config` exists) with
/// `quantization_config` set, else a minimal one.
pub fn write_config(out_dir: &Path, input_config: Option<&Path>, qc: Value) -> Result<()> {
    let mut cfg = match input_config.filter(|p| p.is_file()) {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::BadSafetensors {
                path: p.into(),
                reason: format!("config.json is not valid JSON: {e}"),
            })?;
            if !v.is_object() {
                return Err(Error::BadSafetensors {
                    path: p.into(),
                    reason: "config.json is not a JSON object".into(),
                });
            }
            v
        }
        None => json!({}),
    };
    cfg["quantization_config"] = qc;
    let path = out_dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg).expect("json serialises");
    super::writer::write_atomic(&path, text.as_bytes())
}

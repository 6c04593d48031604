//! Recipes: `--config FILE.toml` with the same keys as the command-line flags, plus per-layer
//! overrides by regex. Flags given on the command line win over the file; the file wins over
//! the built-in defaults.
//!
//! ```toml
//! bits = 4
//! sym = true
//! group_size = 128
//! max_shard_size = "2GB"
//!
//! [[layer]]            # keep the MLP output projections at 8 bits
//! match = "mlp\\.fc2"
//! bits = 8
//!
//! [[layer]]
//! match = "blocks\\.0\\."
//! skip = true
//! ```

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;

use crate::device::DeviceKind;
use crate::error::{Error, Result};
use crate::pipeline::LayerOverride;
use crate::quant::{Choices, Granularity, Method, OrderKind};

/// A recipe file's contents, typed. Every field is optional. The command line applies every
/// top-level key as the flag of the same name (so a key that is no flag is refused with its
/// line); a library user reads the quantization keys with [`Recipe::choices`] and the
/// per-layer rules with [`Recipe::overrides`].
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Recipe {
    /// `--bits`.
    pub bits: Option<u32>,
    /// `--group-size` (0 = one grid per row).
    pub group_size: Option<usize>,
    /// `--sym`.
    pub sym: Option<bool>,
    /// `--sweeps`.
    pub sweeps: Option<usize>,
    /// `--order` (`greedy`, `natural` or `shared`).
    pub order: Option<OrderKind>,
    /// `--scale-update`.
    pub scale_update: Option<bool>,
    /// `--granularity` (`channel` or `layer`).
    pub granularity: Option<Granularity>,
    /// `--method` (`comq` or `rtn`).
    pub method: Option<Method>,
    /// `--skip`.
    pub skip: Option<String>,
    /// `--only`.
    pub only: Option<String>,
    /// `--calib`.
    pub calib: Option<PathBuf>,
    /// `--data-free`.
    pub data_free: Option<bool>,
    /// `--device` (`auto`, `cpu` or `gpu`).
    pub device: Option<DeviceKind>,
    /// `--adapter`.
    pub adapter: Option<String>,
    /// `--max-shard-size` (bytes, or a string such as "5GB", "500MB", "2GiB").
    pub max_shard_size: Option<Size>,
    /// Per-layer overrides, applied in order.
    #[serde(default)]
    pub layer: Vec<LayerRule>,
}

/// A size in bytes, written as a number or with a unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// Plain bytes.
    Bytes(u64),
    /// "5GB", "500MB", "2GiB"…
    Text(String),
}

impl Size {
    /// The number of bytes.
    pub fn bytes(&self) -> Result<u64> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => parse_size(t),
        }
    }
}

/// Parses "5GB", "500MB", "2GiB", "1000" into bytes.
pub fn parse_size(t: &str) -> Result<u64> {
    let t = t.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| {
        Error::InvalidOption(format!("size '{t}' is not a number with an optional unit"))
    })?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(Error::InvalidOption(format!(
                "size '{t}' has an unknown unit '{other}'"
            )))
        }
    };
    let b = v * mult;
    if !(b >= 1.0 && b.is_finite()) {
        return Err(Error::InvalidOption(format!(
            "size '{t}' must be at least one byte"
        )));
    }
    Ok(b as u64)
}

/// One `[[layer]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRule {
    /// Regex matched against weight names.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Bits for matching layers.
    pub bits: Option<u32>,
    /// Group size for matching layers (0 = one grid per row).
    pub group_size: Option<usize>,
    /// Leave matching layers unquantized.
    #[serde(default)]
    pub skip: bool,
}

impl Recipe {
    /// Reads and parses a recipe file.
    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Recipe::parse(&text).map_err(|e| match e {
            Error::InvalidOption(m) => Error::InvalidOption(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses recipe text.
    pub fn parse(text: &str) -> Result<Recipe> {
        toml::from_str(text).map_err(|e| Error::InvalidOption(format!("not a valid recipe: {e}")))
    }

    /// The 1-based line of `text` where top-level `key` is set (0 when not found).
    pub fn line_of(text: &str, key: &str) -> usize {
        text.lines()
            .take_while(|l| !l.trim_start().starts_with('['))
            .position(|l| {
                let t = l.trim_start();
                t.strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with('='))
            })
            .map_or(0, |i| i + 1)
    }

    /// The quantization choices this recipe makes (for [`crate::quant::Preset::resolve`]).
    pub fn choices(&self) -> Choices {
        Choices {
            bits: self.bits,
            sym: self.sym.unwrap_or(false),
            group_size: self.group_size,
            sweeps: self.sweeps,
            order: self.order,
            scale_update: self.scale_update.unwrap_or(false),
            granularity: self.granularity,
            method: self.method,
            ..Choices::default()
        }
    }

    /// The per-layer overrides, with their regexes compiled and their values checked (a bad
    /// value names its `[[layer]]` rule, not a flag).
    pub fn overrides(&self) -> Result<Vec<LayerOverride>> {
        self.layer
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let rule = format!("recipe [[layer]] #{} (match '{}')", i + 1, r.pattern);
                let pattern = Regex::new(&r.pattern)
                    .map_err(|e| Error::InvalidOption(format!("{rule}: not a valid regex: {e}")))?;
                if let Some(b) = r.bits.filter(|b| !(2..=8).contains(b)) {
                    return Err(Error::InvalidOption(format!(
                        "{rule}: bits = {b} is not in 2..=8"
                    )));
                }
                Ok(LayerOverride {
                    pattern,
                    bits: r.bits,
                    group_size: r.group_size.map(|g| (g > 0).then_some(g)),
                    skip: r.skip,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_parses_with_layer_overrides() {
        let r = Recipe::parse(
            "bits = 3\nsym = true\nmax_shard_size = \"2GB\"\n[[layer]]\nmatch = \"fc2\"\nbits = 8\ngroup_size = 0\n",
        )
        .unwrap();
        assert_eq!(r.bits, Some(3));
        assert_eq!(
            r.max_shard_size.as_ref().unwrap().bytes().unwrap(),
            2_000_000_000
        );
        let o = r.overrides().unwrap();
        assert_eq!(o[0].bits, Some(8));
        assert_eq!(o[0].group_size, Some(None));
    }

    #[test]
    fn a_recipe_parses_into_typed_choices() {
        let r = Recipe::parse(
            "bits = 3\nsym = true\norder = 'shared'\ngranularity = 'layer'\nmethod = 'rtn'\ndevice = 'cpu'\n",
        )
        .unwrap();
        let c = r.choices();
        assert_eq!((c.bits, c.sym), (Some(3), true));
        assert_eq!(c.order, Some(OrderKind::Shared));
        assert_eq!(c.granularity, Some(Granularity::Layer));
        assert_eq!(c.method, Some(Method::Rtn));
        assert_eq!(r.device, Some(DeviceKind::Cpu));
        // A value that is not one of the enum's names is refused when read.
        assert!(Recipe::parse("order = 'sideways'").is_err());
    }

    #[test]
    fn bad_values_and_sizes_are_errors() {
        // Unknown keys are checked against the subcommand's flags by the command line.
        assert!(Recipe::parse("bits = 'three'").is_err());
        let r = Recipe::parse("[[layer]]\nmatch = 'fc2'\nbits = 99\n").unwrap();
        let e = r.overrides().unwrap_err().to_string();
        assert!(e.contains("[[layer]] #1") && e.contains("99"), "{e}");
        assert_eq!(Recipe::line_of("bits = 3\n\n sweeps=2\n", "sweeps"), 3);
        assert!(parse_size("5 parsecs").is_err());
        assert_eq!(parse_size("1.5MiB").unwrap(), 1_572_864);
    }
}

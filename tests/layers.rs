//! The house stays as built: every `crate::…` reference under `src/` points to the same module or
//! to a lower layer, so no import circle can come back. The layers, lowest first, are written
//! out here; moving a module means moving it in this table, on purpose. No arrow runs up.

use std::collections::BTreeMap;
use std::path::Path;

/// Each library module's layer. A module may use its own items and those of lower layers.
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("util", 0),
    ("platform", 0),
    ("interrupt", 1),
    ("profile", 0),
    ("shaders", 0),
    ("numeric", 1),
    ("device", 2),
    ("quant", 3),
    ("io", 4),
    ("model", 5),
    ("resume", 5),
    ("calibrate", 6),
    ("eval", 7),
    ("pipeline", 8),
    ("plan", 8),
    ("recipe", 9),
    ("plot", 9),
    ("bench", 10),
];

/// Arrows that may run up: (file, the module it uses). None: an arrow up between two top-level
/// modules is half of a circle, since the lower one is used by the upper one's layer.
const ALLOWED_UP: &[(&str, &str)] = &[];

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `.rs` file under `src/`, with its path relative to the repository ('/'-separated).
fn src_files() -> Vec<(String, std::path::PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rs_files(&root.join("src"), &mut files);
    files
        .into_iter()
        .map(|f| {
            let rel = f
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, f)
        })
        .collect()
}

#[test]
fn no_module_uses_one_above_it() {
    let layer: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut against = Vec::new();
    for (rel, f) in src_files() {
        let module = rel
            .trim_start_matches("src/")
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        if matches!(module.as_str(), "main" | "cli" | "lib") {
            continue; // the binary and the crate root may use everything
        }
        let Some(&own) = layer.get(module.as_str()) else {
            panic!("{rel}: module '{module}' has no layer in tests/layers.rs");
        };
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let ident = |s: &str| -> String {
                    s.trim_start()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect()
                };
                // `crate::{a::x, b}` names several modules at once.
                let targets: Vec<String> = match rest.strip_prefix('{') {
                    Some(group) => group
                        .split('}')
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .map(ident)
                        .collect(),
                    None => vec![ident(rest)],
                };
                for target in targets {
                    // Crate-root re-exports (`crate::Gram`) are not modules.
                    let Some(&theirs) = layer.get(target.as_str()) else {
                        continue;
                    };
                    if target != module
                        && theirs >= own
                        && !ALLOWED_UP.contains(&(rel.as_str(), target.as_str()))
                    {
                        against.push(format!(
                            "{rel}:{}: {module} (layer {own}) uses crate::{target} (layer {theirs})",
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        against.is_empty(),
        "arrows against the layering:\n{}",
        against.join("\n")
    );
}

/// Everything that differs between the operating systems lives in `src/platform.rs`: a Windows
/// (DX12) or macOS (Metal) build cannot break because another module grew a unix-only call.
/// Test modules (from `#[cfg(test)]` to the end of a file) may use what their platform has.
#[test]
fn platform_code_stays_in_its_module() {
    const PLATFORM_ONLY: &[&str] = &[
        "std::os::",
        "libc::",
        "windows_sys::",
        "cfg(unix)",
        "cfg(windows)",
        "cfg(not(unix))",
        "cfg(not(windows))",
        "cfg(target_os",
        "cfg(target_family",
        "unchecked_advise",
    ];
    let mut against = Vec::new();
    for (rel, f) in src_files() {
        if rel == "src/platform.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            let code = line.split("//").next().unwrap_or("");
            if let Some(p) = PLATFORM_ONLY.iter().find(|p| code.contains(*p)) {
                against.push(format!("{rel}:{}: {p}", n + 1));
            }
        }
    }
    assert!(
        against.is_empty(),
        "platform-specific code outside src/platform.rs:\n{}",
        against.join("\n")
    );
}

//! Our packed output in real runtimes: transformers' `from_pretrained` and compressed-tensors'
//! decoder (`scripts/interop/transformers_load.py`; DINOv2 through transformers 4.57 in
//! `scripts/interop/legacy_load.py`; SigLIP decompressed while loading), run with the Python in `COMQ_PYTHON`
//! (`scripts/setup-python-env.sh` creates it; `.ci/run` sets it). Without it the test prints a
//! visible skip, or fails when `COMQ_REQUIRE_PYTHON=1`.

use std::process::Command;

#[test]
fn transformers_loads_symmetric_output_and_compressed_tensors_decodes_asymmetric_output() {
    let python = match std::env::var("COMQ_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => {
            if std::env::var("COMQ_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
                panic!("COMQ_REQUIRE_PYTHON=1 but COMQ_PYTHON is not set (run scripts/setup-python-env.sh)");
            }
            eprintln!("SKIP: COMQ_PYTHON is not set; run scripts/setup-python-env.sh and export COMQ_PYTHON");
            return;
        }
    };
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/interop/transformers_load.py"
    );
    let out = Command::new(&python)
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_comq-gpu"))
        .output()
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "the interoperability script failed:\n{text}"
    );
    assert!(
        text.contains("W4 sym: from_pretrained OK") && text.contains("W2 sym: from_pretrained OK")
    );
    assert!(
        text.contains("CLIP W4 sym: from_pretrained OK"),
        "the CLIP vision tower's packed output must load"
    );
    assert!(
        text.contains("whole CLIP W4 sym: from_pretrained OK"),
        "a whole CLIP model's packed output must load"
    );
    assert!(
        text.contains("Swin W4 sym: from_pretrained OK"),
        "the Swin's packed output must load"
    );
    assert!(
        text.contains("SigLIP W4 sym: from_pretrained(dequantize=True) OK"),
        "the SigLIP tower's packed output must load, decompressed while loading"
    );
    for class in ["Dinov2Model", "Dinov2WithRegistersModel"] {
        assert!(
            text.contains(&format!("{class}: transformers 4.57.6 loads it")),
            "{class}'s packed output must load in transformers 4.57.6"
        );
    }
}

//! Every WGSL file parses and validates with naga (wgpu's own), with no device needed, and
//! every kernel's entry point exists in its file.

use comq_gpu::shaders::{Kernel, SOURCES};
use wgpu::naga;

fn validate(file: &str, src: &str) -> naga::Module {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{file} does not parse:\n{}", e.emit_to_string(src)));
    let mut v = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    v.validate(&module)
        .unwrap_or_else(|e| panic!("{file} does not validate:\n{}", e.emit_to_string(src)));
    module
}

#[test]
fn every_shader_file_parses_and_validates() {
    for (file, src) in SOURCES {
        validate(file, src);
    }
}

#[test]
fn every_kernel_entry_point_is_in_its_file() {
    for k in Kernel::ALL {
        let m = validate(k.file(), k.source());
        assert!(
            m.entry_points.iter().any(|e| e.name == k.entry()),
            "{} has no entry point '{}'",
            k.file(),
            k.entry()
        );
    }
}

#[test]
fn every_shader_file_documents_its_bindings() {
    for (file, src) in SOURCES {
        let bindings = src.matches("@binding(").count();
        let documented = src
            .lines()
            .filter(|l| l.starts_with("// @group(0) @binding("))
            .count();
        assert_eq!(
            bindings - documented,
            documented,
            "{file}: every binding is listed in the header comment"
        );
        assert!(
            src.contains("Workgroup") || src.contains("workgroup"),
            "{file}: header states the workgroup size"
        );
    }
}

/// `MAX_STORAGE_BUFFERS`, which an adapter must allow per shader stage, is the most storage
/// buffers any kernel's entry point uses (from naga's own analysis of each entry point).
#[test]
fn the_storage_buffer_bound_is_what_the_kernels_use() {
    let mut most = 0u32;
    for k in Kernel::ALL {
        let src = k.source();
        let module = naga::front::wgsl::parse_str(src).unwrap();
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap();
        let (index, _) = module
            .entry_points
            .iter()
            .enumerate()
            .find(|(_, e)| e.name == k.entry())
            .unwrap();
        let fi = info.get_entry_point(index);
        let used = module
            .global_variables
            .iter()
            .filter(|(h, g)| {
                matches!(g.space, naga::AddressSpace::Storage { .. }) && !fi[*h].is_empty()
            })
            .count() as u32;
        most = most.max(used);
    }
    assert_eq!(most, comq_gpu::shaders::MAX_STORAGE_BUFFERS);
}

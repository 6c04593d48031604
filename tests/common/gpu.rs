//! Opening a GPU for tests: a visible skip without an adapter, a failure with COMQ_REQUIRE_GPU=1.

use comq_gpu::device::WgpuDevice;

/// The test GPU (software adapters allowed), or `None` after printing a visible skip.
/// Panics when `COMQ_REQUIRE_GPU=1` and no adapter opens, so CI cannot go green without one.
pub fn device() -> Option<WgpuDevice> {
    match WgpuDevice::open(None, true) {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("COMQ_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("COMQ_REQUIRE_GPU=1 but no GPU adapter opened: {e}");
            }
            eprintln!("SKIP: no wgpu adapter ({e}); set COMQ_REQUIRE_GPU=1 to make this a failure");
            None
        }
    }
}

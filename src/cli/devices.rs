//! `comq-gpu devices`: the GPU adapters wgpu finds.

use anyhow::Result;

pub(super) fn devices_cmd(json: bool) -> Result<()> {
    let list = comq_gpu::device::wgpu::list_adapters();
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        super::print::adapters(&list);
    }
    Ok(())
}

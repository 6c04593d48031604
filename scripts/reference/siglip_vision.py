#!/usr/bin/env python3
"""A small HF SiglipVisionModel with random weights (no download), saved with the library's own
names and config, and its outputs for random pixels: the reference the forward pass is held to
(tests/vit.rs).

Usage: siglip_vision.py OUT_DIR
Writes OUT_DIR/model.safetensors, OUT_DIR/config.json and OUT_DIR/reference.safetensors with
`pixel_values` [3, 3, 32, 32], `last_hidden_state` (every token after the post-LayerNorm) and
`pooler_output` (the attention-pooling head's features).
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

out = sys.argv[1]
torch.manual_seed(0)
cfg = SiglipVisionConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
)
model = SiglipVisionModel(cfg).eval()
with torch.no_grad():
    # LayerNorms, the probe and the position embedding away from their initial values, so a
    # missed or misplaced one shows.
    for name, p in model.named_parameters():
        if "norm" in name or "probe" in name or "position" in name:
            p.add_(0.2 * torch.randn_like(p))
model.save_pretrained(out, safe_serialization=True)
px = torch.randn(3, 3, 32, 32)
with torch.no_grad():
    o = model(pixel_values=px)
save_file(
    {
        "pixel_values": px.contiguous(),
        "last_hidden_state": o.last_hidden_state.contiguous(),
        "pooler_output": o.pooler_output.contiguous(),
    },
    f"{out}/reference.safetensors",
)
print("wrote", out)

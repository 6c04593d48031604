#!/usr/bin/env python3
"""A small HF Dinov2WithRegistersModel with random weights (no download), saved with the
library's own names and config, and its outputs for random pixels: the reference the forward
pass is held to (tests/vit.rs).

Usage: dinov2_registers.py OUT_DIR
Writes OUT_DIR/model.safetensors, OUT_DIR/config.json and OUT_DIR/reference.safetensors with
`pixel_values` [3, 3, 32, 32] and `last_hidden_state` (every token after the final LayerNorm:
class token, 4 registers, 16 patches).
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

out = sys.argv[1]
torch.manual_seed(0)
cfg = Dinov2WithRegistersConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    mlp_ratio=4,
    image_size=32,
    patch_size=8,
    num_register_tokens=4,
    layer_norm_eps=1e-6,
)
model = Dinov2WithRegistersModel(cfg).eval()
with torch.no_grad():
    # Tokens, LayerNorms and LayerScales away from their initial values, so a missed or
    # misplaced one shows.
    for name, p in model.named_parameters():
        if "norm" in name or "token" in name or "lambda" in name or "position" in name:
            p.add_(0.2 * torch.randn_like(p))
model.save_pretrained(out, safe_serialization=True)
px = torch.randn(3, 3, 32, 32)
with torch.no_grad():
    o = model(pixel_values=px)
save_file(
    {"pixel_values": px.contiguous(), "last_hidden_state": o.last_hidden_state.contiguous()},
    f"{out}/reference.safetensors",
)
print("wrote", out)

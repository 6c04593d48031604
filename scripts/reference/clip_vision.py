#!/usr/bin/env python3
"""A small HF CLIPVisionModelWithProjection with random weights (no download), saved with the
library's own names and config, and its outputs for random pixels: the reference the forward
pass is held to (tests/vit.rs).

Usage: clip_vision.py OUT_DIR [hidden_act]
Writes OUT_DIR/model.safetensors, OUT_DIR/config.json and OUT_DIR/reference.safetensors with
`pixel_values` [3, 3, 32, 32], `pooler_output` (the post-LayerNorm CLS), `tokens` (every token
after the post-LayerNorm) and `image_embeds` (the projection of the pooled output).
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

out = sys.argv[1]
act = sys.argv[2] if len(sys.argv) > 2 else "quick_gelu"
torch.manual_seed(0)
cfg = CLIPVisionConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=24,
    hidden_act=act,
    layer_norm_eps=1e-5,
)
model = CLIPVisionModelWithProjection(cfg).eval()
with torch.no_grad():
    # LayerNorms away from the identity, so a missed or misplaced one shows.
    for name, p in model.named_parameters():
        if "norm" in name:
            p.add_(0.2 * torch.randn_like(p))
model.save_pretrained(out, safe_serialization=True)
px = torch.randn(3, 3, 32, 32)
with torch.no_grad():
    o = model(pixel_values=px)
    v = model.vision_model(pixel_values=px)
    tokens = model.vision_model.post_layernorm(v.last_hidden_state)
save_file(
    {
        "pixel_values": px.contiguous(),
        "pooler_output": v.pooler_output.contiguous(),
        "tokens": tokens.contiguous(),
        "image_embeds": o.image_embeds.contiguous(),
    },
    f"{out}/reference.safetensors",
)
print("wrote", out)

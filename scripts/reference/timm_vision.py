#!/usr/bin/env python3
"""A small timm ViT with random weights (no download), saved as timm saves for the Hugging Face
hub (`save_for_hf`: model.safetensors and config.json), and its outputs for random pixels: the
reference our forward pass is held to (tests/vit.rs).

Usage: timm_vision.py VARIANT OUT_DIR
VARIANT is one of:
  reg4        DINOv2-style registers: 4 `reg_token`s, `no_embed_class`, LayerScale
  reg_embed   2 registers with `no_embed_class=False` (the position embedding covers them)
  clip        a CLIP image tower: `norm_pre`, QuickGELU, no patch bias, a projection head
  siglip      a SigLIP image tower: no class token, tanh-GELU, the attention-pooling head
  avg_fc      no class token, `global_pool='avg'`, `fc_norm` (the final norm moves after pooling)
  avg         class token kept, `global_pool='avg'`, no `fc_norm`
  qk_norm     `qk_norm=True`: a LayerNorm over each head's queries and keys
  rect        a non-square input, 32 x 48 px (a 4 x 6 patch grid)
Writes OUT_DIR/model.safetensors, OUT_DIR/config.json and OUT_DIR/reference.safetensors with
`pixel_values` [3, 3, 32, 32], `tokens` (forward_features), `features` (pooled, after fc_norm)
and `logits` when the model has a head. Every model is 64 wide, 2 blocks of 4 heads, 32-px input
in 8-px patches.
"""
import sys

import torch
from safetensors.torch import save_file
import timm
from timm.models import save_for_hf

VARIANTS = {
    "reg4": dict(reg_tokens=4, no_embed_class=True, init_values=1e-5, num_classes=5),
    "reg_embed": dict(reg_tokens=2, no_embed_class=False, num_classes=5),
    "clip": dict(pre_norm=True, act_layer="quick_gelu", num_classes=24),
    "siglip": dict(class_token=False, global_pool="map", act_layer="gelu_tanh", num_classes=0),
    "avg_fc": dict(class_token=False, global_pool="avg", fc_norm=True, num_classes=5),
    "avg": dict(global_pool="avg", fc_norm=False, num_classes=5),
    "qk_norm": dict(qk_norm=True, num_classes=5),
    "rect": dict(img_size=(32, 48), num_classes=5),
}
SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def main():
    variant, out = sys.argv[1], sys.argv[2]
    if variant not in VARIANTS:
        sys.exit(f"unknown variant {variant}; one of {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    kwargs = dict(SMALL, **VARIANTS[variant])
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()
    with torch.no_grad():
        # Parameters that start at a constant (LayerNorms, tokens, LayerScales, the latent) are
        # moved away from it, so a missed or misplaced one shows.
        for name, p in model.named_parameters():
            if any(m in name for m in ("norm", "token", "gamma", "latent", "pos_embed")):
                p.add_(0.2 * torch.randn_like(p))
    save_for_hf(model, out, safe_serialization=True)
    size = kwargs["img_size"]
    h, w = size if isinstance(size, tuple) else (size, size)
    px = torch.randn(3, 3, h, w)
    with torch.no_grad():
        tokens = model.forward_features(px)
        ref = {
            "pixel_values": px,
            "tokens": tokens,
            "features": model.forward_head(tokens, pre_logits=True),
        }
        if model.num_classes:
            ref["logits"] = model.forward_head(tokens)
    save_file({k: v.contiguous() for k, v in ref.items()}, f"{out}/reference.safetensors")
    print("wrote", out)


if __name__ == "__main__":
    main()

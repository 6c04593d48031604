#!/usr/bin/env python3
"""A small Swin Transformer with random weights (no download), saved with the library's own names
and config, and its outputs for random pixels: the reference our forward pass is held to
(tests/vit.rs).

Usage: swin.py LIBRARY OUT_DIR
LIBRARY is one of:
  timm   timm `SwinTransformer` saved with `save_for_hf` (model.safetensors, config.json)
  hf     transformers `SwinForImageClassification` saved with `save_pretrained`
  hf_backbone  transformers `SwinModel` (no classifier)
Writes OUT_DIR/model.safetensors, OUT_DIR/config.json and OUT_DIR/reference.safetensors with
`pixel_values` [3, 3, 64, 64], `tokens` (every token after the final LayerNorm, [3, 4, 64]),
`features` (their mean) and `logits` when the model has a head. Every model has 4-px patches,
stages of width 16, 32, 64 with depths 2, 2, 2 and 1, 2, 4 heads, windows of 4: a 16x16 grid of
16 windows in the first stage (shifted in every second block), 8x8 in the second, and a 4x4 grid
in the last, where the window covers the whole grid and nothing shifts.
"""
import sys

import torch
from safetensors.torch import save_file

DEPTHS = (2, 2, 2)
HEADS = (1, 2, 4)
EMBED = 16
WINDOW = 4
SIZE = 64
CLASSES = 5


def build(library):
    if library == "timm":
        import timm

        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=SIZE,
                                  patch_size=4, window_size=WINDOW, embed_dim=EMBED, depths=DEPTHS,
                                  num_heads=HEADS, num_classes=CLASSES)
        return model
    import transformers as tf

    cfg = tf.SwinConfig(image_size=SIZE, patch_size=4, embed_dim=EMBED, depths=list(DEPTHS),
                        num_heads=list(HEADS), window_size=WINDOW, num_labels=CLASSES)
    if library == "hf":
        return tf.SwinForImageClassification(cfg)
    if library == "hf_backbone":
        return tf.SwinModel(cfg)
    sys.exit(f"unknown library {library}")


def outputs(library, model, px):
    if library == "timm":
        tokens = model.forward_features(px)  # [n, h, w, c] after the final norm
        return {
            "tokens": tokens.flatten(1, 2),
            "features": model.forward_head(tokens, pre_logits=True),
            "logits": model.forward_head(tokens),
        }
    if library == "hf":
        o = model(pixel_values=px, output_hidden_states=True)
        inner = model.swin(pixel_values=px)
        return {
            "tokens": inner.last_hidden_state,
            "features": inner.pooler_output,
            "logits": o.logits,
        }
    o = model(pixel_values=px)
    return {"tokens": o.last_hidden_state, "features": o.pooler_output}


def main():
    library, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = build(library).eval()
    with torch.no_grad():
        # Parameters that start at a constant (LayerNorms) or near zero (the relative position
        # bias tables) are moved, so a missed or misplaced one shows.
        for name, p in model.named_parameters():
            if "norm" in name or "relative_position_bias_table" in name:
                p.add_(0.5 * torch.randn_like(p))
    if library == "timm":
        from timm.models import save_for_hf

        save_for_hf(model, out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
    px = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = {k: v.contiguous() for k, v in outputs(library, model, px).items()}
    ref["pixel_values"] = px.contiguous()
    save_file(ref, f"{out}/reference.safetensors")
    print("wrote", out)


if __name__ == "__main__":
    main()

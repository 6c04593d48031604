#!/usr/bin/env python3
"""Vision towers of real shapes with random weights (no download), saved with the library's own
names and config, for timing and memory runs of each family (scripts/family-shapes.sh).

Usage: family-shapes.py NAME OUT_DIR
NAME is one of:
  clip-l14        CLIP ViT-L/14 at 224 px (CLIPVisionModelWithProjection, as in LLaVA 1.5's tower
                  family): width 1024, 24 blocks, 16 heads, MLP 4096, QuickGELU, 768-d projection
  clip-l14-336    the same at 336 px (577 tokens)
  siglip-so400m   SigLIP So400m/14 at 384 px (SiglipVisionModel, PaliGemma's tower): width 1152,
                  27 blocks, 16 heads, MLP 4304, tanh-GELU, the attention-pooling head, 729 tokens
  dinov2-reg-b    DINOv2-B/14 with 4 registers at 224 px (Dinov2WithRegistersModel): width 768,
                  12 blocks, 12 heads, MLP 3072, LayerScale
  swin-b          Swin-B at 224 px (SwinForImageClassification, 1000 classes): stages of width 128,
                  256, 512, 1024 (depths 2, 2, 18, 2; heads 4, 8, 16, 32), windows of 7
  swin-t          Swin-T at 224 px: widths 96 … 768 (depths 2, 2, 6, 2; heads 3, 6, 12, 24)
Writes OUT_DIR/model.safetensors (float32), OUT_DIR/config.json and OUT_DIR/preprocessor_config.json.
"""
import json
import os
import sys

import torch
import transformers as tf

CLIP_PREP = dict(do_resize=True, size={"shortest_edge": 224}, do_center_crop=True,
                 crop_size={"height": 224, "width": 224}, resample=3,
                 image_mean=[0.48145466, 0.4578275, 0.40821073],
                 image_std=[0.26862954, 0.26130258, 0.27577711])


def build(name):
    if name in ("clip-l14", "clip-l14-336"):
        px = 336 if name.endswith("336") else 224
        cfg = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=px, patch_size=14,
                                  projection_dim=768, hidden_act="quick_gelu")
        prep = dict(CLIP_PREP, size={"shortest_edge": px}, crop_size={"height": px, "width": px})
        return tf.CLIPVisionModelWithProjection(cfg), prep
    if name == "siglip-so400m":
        cfg = tf.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                    num_attention_heads=16, image_size=384, patch_size=14,
                                    hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        prep = dict(do_resize=True, size={"height": 384, "width": 384}, resample=3,
                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return tf.SiglipVisionModel(cfg), prep
    if name == "dinov2-reg-b":
        cfg = tf.Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12,
                                           num_attention_heads=12, mlp_ratio=4, patch_size=14,
                                           image_size=518, num_register_tokens=4,
                                           layer_norm_eps=1e-6)
        prep = dict(do_resize=True, size={"shortest_edge": 256}, do_center_crop=True,
                    crop_size={"height": 224, "width": 224}, resample=3,
                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        return tf.Dinov2WithRegistersModel(cfg), prep
    if name in ("swin-b", "swin-t"):
        base = name == "swin-b"
        cfg = tf.SwinConfig(image_size=224, patch_size=4, window_size=7,
                            embed_dim=128 if base else 96,
                            depths=[2, 2, 18, 2] if base else [2, 2, 6, 2],
                            num_heads=[4, 8, 16, 32] if base else [3, 6, 12, 24], num_labels=1000)
        prep = dict(do_resize=True, size={"shortest_edge": 256}, do_center_crop=True,
                    crop_size={"height": 224, "width": 224}, resample=3,
                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        return tf.SwinForImageClassification(cfg), prep
    sys.exit(f"unknown name {name}")


def main():
    name, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model, prep = build(name)
    model.eval().save_pretrained(out)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(prep, f, indent=1)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {type(model).__name__}, {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()

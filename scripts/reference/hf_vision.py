#!/usr/bin/env python3
"""A small HF vision tower with random weights (no download), saved with the library's own names
and config, and its outputs for random pixels: the reference our forward pass is held to
(tests/vit.rs).

Usage: hf_vision.py ARCH OUT_DIR [hidden_act]
ARCH is one of:
  clip              CLIPVisionModelWithProjection: `pooler_output` (the post-LayerNorm class
                    token), `tokens` (every token after the post-LayerNorm), `image_embeds`
  siglip            SiglipVisionModel: `last_hidden_state` (after the post-LayerNorm),
                    `pooler_output` (the attention-pooling head's features)
  dinov2_registers  Dinov2WithRegistersModel (4 registers): `last_hidden_state`
  clip_model        a whole CLIPModel (text tower beside the vision tower): `image_embeds`
                    (get_image_features: the projected, pooled vision features)
  siglip_model      a whole SiglipModel: `pooler_output` (get_image_features)
  vit_rect          ViTForImageClassification with a non-square 32 x 48 input (`image_size`
                    [32, 48]; 5 classes): `logits`, `last_hidden_state`
Writes OUT_DIR/model.safetensors, OUT_DIR/config.json and OUT_DIR/reference.safetensors, which
also holds `pixel_values` [3, 3, 32, 32]. Every model is 64 wide, 2 blocks of 4 heads, 32-px
input in 8-px patches.
"""
import sys

import torch
from safetensors.torch import save_file
import transformers as tf

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def build(arch, act):
    if arch == "clip":
        cfg = tf.CLIPVisionConfig(intermediate_size=128, projection_dim=24, hidden_act=act,
                                  layer_norm_eps=1e-5, **SMALL)
        return tf.CLIPVisionModelWithProjection(cfg), ("norm",)
    if arch == "siglip":
        cfg = tf.SiglipVisionConfig(intermediate_size=128, layer_norm_eps=1e-6, **SMALL)
        return tf.SiglipVisionModel(cfg), ("norm", "probe", "position")
    if arch == "dinov2_registers":
        cfg = tf.Dinov2WithRegistersConfig(mlp_ratio=4, num_register_tokens=4, layer_norm_eps=1e-6,
                                           **SMALL)
        return tf.Dinov2WithRegistersModel(cfg), ("norm", "token", "lambda", "position")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=99, max_position_embeddings=16)
    vision = dict(SMALL, intermediate_size=128)
    if arch == "vit_rect":
        cfg = tf.ViTConfig(intermediate_size=128, num_labels=5, **dict(SMALL, image_size=[32, 48]))
        return tf.ViTForImageClassification(cfg), ("norm", "token", "position")
    if arch == "clip_model":
        cfg = tf.CLIPConfig(text_config=text, vision_config=dict(vision, hidden_act=act),
                            projection_dim=24)
        return tf.CLIPModel(cfg), ("norm",)
    if arch == "siglip_model":
        cfg = tf.SiglipConfig(text_config=text, vision_config=dict(vision, layer_norm_eps=1e-6))
        return tf.SiglipModel(cfg), ("norm", "probe", "position")
    sys.exit(f"unknown architecture {arch}")


def outputs(arch, model, px):
    if arch == "clip":
        o = model(pixel_values=px)
        v = model.vision_model(pixel_values=px)
        return {
            "pooler_output": v.pooler_output,
            "tokens": model.vision_model.post_layernorm(v.last_hidden_state),
            "image_embeds": o.image_embeds,
        }
    if arch in ("clip_model", "siglip_model"):
        f = model.get_image_features(pixel_values=px)
        # transformers 5 returns an output object whose pooled output is the features.
        f = f if torch.is_tensor(f) else f.pooler_output
        return {"image_embeds" if arch == "clip_model" else "pooler_output": f}
    if arch == "vit_rect":
        o = model(pixel_values=px, output_hidden_states=True)
        return {"logits": o.logits,
                "last_hidden_state": model.vit.layernorm(o.hidden_states[-1])}
    o = model(pixel_values=px)
    out = {"last_hidden_state": o.last_hidden_state}
    if arch == "siglip":
        out["pooler_output"] = o.pooler_output
    return out


def main():
    arch, out = sys.argv[1], sys.argv[2]
    act = sys.argv[3] if len(sys.argv) > 3 else "quick_gelu"
    torch.manual_seed(0)
    model, moved = build(arch, act)
    model = model.eval()
    with torch.no_grad():
        # Parameters that start at a constant (LayerNorms, tokens, LayerScales, embeddings) are
        # moved away from it, so a missed or misplaced one shows.
        for name, p in model.named_parameters():
            if any(m in name for m in moved):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    px = torch.randn(3, 3, 32, 48) if arch == "vit_rect" else torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = {k: v.contiguous() for k, v in outputs(arch, model, px).items()}
    ref["pixel_values"] = px.contiguous()
    save_file(ref, f"{out}/reference.safetensors")
    print("wrote", out)


if __name__ == "__main__":
    main()

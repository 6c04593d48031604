#!/usr/bin/env python3
"""A linear classification head for DINOv2-S on Fashion-MNIST, the way DINOv2 is used for
classification (a linear probe on the frozen features): `classifier` over [class token, mean of
the patch tokens] after the final LayerNorm, as HF's Dinov2ForImageClassification has it.

Usage: head.py DINOV2_DIR TRAIN_PACK OUT_DIR

DINOV2_DIR is the HF Dinov2Model folder from scripts/prepare-dinov2.sh; TRAIN_PACK an image
pack (`images` u8 [n, h, w, c], `labels` i64 [n], class names in the metadata), e.g.
assets/fmnist-images/calib.safetensors (512 training images). The images go through the
folder's preprocessor_config.json (shorter side to 256, bicubic; centre crop 224; ImageNet
normalisation). The head is fitted full-batch (L-BFGS, cross-entropy, L2 1e-3) on those features.
OUT_DIR gets model.safetensors (the backbone's tensors unchanged plus `classifier.weight`
[classes, 2·width] and `classifier.bias`), config.json (Dinov2ForImageClassification, the
labels) and the preprocessor config. Needs torch, transformers, safetensors and Pillow (the
pinned test environment: scripts/setup-python-env.sh).
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import transformers as tf


def preprocess(images, prep):
    mean = np.array(prep["image_mean"], dtype=np.float32)[:, None, None]
    std = np.array(prep["image_std"], dtype=np.float32)[:, None, None]
    short, crop = prep["size"]["shortest_edge"], prep["crop_size"]["height"]
    out = []
    for a in images:
        im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
        w, h = im.size
        s = short / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.BICUBIC)
        w, h = im.size
        left, top = (w - crop) // 2, (h - crop) // 2
        im = im.crop((left, top, left + crop, top + crop))
        x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out.append((x - mean) / std)
    return torch.from_numpy(np.stack(out))


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, pack, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    torch.manual_seed(0)
    with safe_open(str(pack), "np") as f:
        images, labels = f.get_tensor("images"), f.get_tensor("labels")
        classes = json.loads(f.metadata()["classes"])
    prep = json.loads((src / "preprocessor_config.json").read_text())
    model = tf.Dinov2Model.from_pretrained(src).eval()
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            h = model(pixel_values=preprocess(images[i:i + 32], prep)).last_hidden_state
            feats.append(torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=1))
    x, y = torch.cat(feats), torch.from_numpy(labels).long()
    head = torch.nn.Linear(x.shape[1], len(classes))
    opt = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    acc = (head(x).argmax(1) == y).float().mean().item()
    print(f"head fitted on {len(y)} images: training top-1 {acc:.4f}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["classifier.weight"] = head.weight.detach().contiguous()
    tensors["classifier.bias"] = head.bias.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["Dinov2ForImageClassification"]
    config["id2label"] = {str(i): c for i, c in enumerate(classes)}
    config["label2id"] = {c: i for i, c in enumerate(classes)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(src / "preprocessor_config.json", out / "preprocessor_config.json")
    print(out)


if __name__ == "__main__":
    main()

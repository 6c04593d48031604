#!/usr/bin/env python3
"""Train a small Vision Transformer on Fashion-MNIST and export it with its image packs.

The model is plain PyTorch, but its parameter names and forward semantics follow timm's
`VisionTransformer` (class token, pre-norm blocks, fused qkv, LayerNorm eps 1e-6, exact GELU,
classifier on the CLS token), so the exported safetensors file loads like a timm checkpoint.

Outputs:
  <out-model>/model.safetensors      float32 weights, timm tensor names
  <out-model>/config.json            timm hub style config
  <out-model>/train-log.json         epochs, wall time, accuracies, torch version
  <out-images>/calib.safetensors     512 seeded random TRAIN images (image pack)
  <out-images>/test.safetensors      3000 t10k images, the first 300 of each class, file order
  tests/data/fmnist-vit-reference.safetensors
                                     first 16 test-pack images, their normalized pixels and
                                     the eval-mode logits, for parity tests

Usage:
  python scripts/train-fmnist-vit.py [--out-model assets/fmnist-vit]
                                     [--out-images assets/fmnist-images] [--epochs N]

The data comes from the Debian package `dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist
is used when installed, otherwise the package is downloaded (no root needed) and unpacked into
~/.cache/comq-gpu/fashion-mnist/.
"""

import argparse
import gzip
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent

LABEL_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MEAN, STD = 0.2860, 0.3530
SOURCE = "Fashion-MNIST (MIT, Zalando SE), https://github.com/zalandoresearch/fashion-mnist"

# Architecture (timm `VisionTransformer` arguments).
IMG_SIZE, PATCH_SIZE, IN_CHANS = 28, 4, 1
EMBED_DIM, DEPTH, NUM_HEADS, MLP_RATIO = 64, 4, 4, 4.0
NUM_CLASSES = 10

SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "comq-gpu" / "fashion-mnist"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def find_or_fetch_data() -> Path:
    """Directory holding the four IDX files; downloads the Debian package into the cache if needed."""
    cached = CACHE_DIR / "root" / "usr" / "share" / "datasets" / "fashion-mnist"
    for d in (SYSTEM_DATA_DIR, cached):
        if (d / "t10k-labels-idx1-ubyte.gz").exists():
            return d
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    print(f"fetching dataset-fashion-mnist into {CACHE_DIR}", flush=True)
    subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=CACHE_DIR, check=True)
    debs = sorted(CACHE_DIR.glob("dataset-fashion-mnist_*.deb"))
    if not debs:
        raise SystemExit("apt-get download produced no dataset-fashion-mnist .deb")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(CACHE_DIR / "root")], check=True)
    return cached


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (unsigned byte data) into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: unexpected IDX type in magic {magic:#x}")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_split(data_dir: Path, split: str):
    """(images uint8 [N,28,28], labels uint8 [N]) for split 'train' or 't10k'."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")
    assert images.shape[0] == labels.shape[0]
    return images, labels


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28]: /255, then (x - mean) / std."""
    x = images_u8.to(torch.float32).div_(255.0).unsqueeze(1)
    return (x - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random 28x28 crop from the image padded by 2 (background value)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    bg = (0.0 - MEAN) / STD  # a zero pixel after normalization
    padded = F.pad(x, (2, 2, 2, 2), value=bg)
    dy = torch.randint(0, 5, (n,), generator=gen)
    dx = torch.randint(0, 5, (n,), generator=gen)
    # Gather each image's crop with per-sample offsets.
    ar = torch.arange(IMG_SIZE)
    rows = (dy[:, None] + ar[None, :])[:, None, :, None].expand(n, 1, IMG_SIZE, IMG_SIZE + 4)
    padded = padded.gather(2, rows)
    cols = (dx[:, None] + ar[None, :])[:, None, None, :].expand(n, 1, IMG_SIZE, IMG_SIZE)
    return padded.gather(3, cols)


# ----------------------------------------------------------------------------------------------
# Model: timm VisionTransformer names and semantics
# ----------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(IN_CHANS, EMBED_DIM, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, 49, C]


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        # timm layout: qkv output features are [3, heads, head_dim].
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # Explicit softmax((q * scale) @ k^T) @ v (on CPU this is faster than SDPA at this size).
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        num_patches = (IMG_SIZE // PATCH_SIZE) ** 2
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, EMBED_DIM))  # CLS first
        self.blocks = nn.Sequential(*[Block(EMBED_DIM, NUM_HEADS, MLP_RATIO) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(EMBED_DIM, eps=1e-6)
        self.head = nn.Linear(EMBED_DIM, NUM_CLASSES)
        self._init_weights()

    def _init_weights(self):
        # timm's default ('jax'-free) init: truncated normal 0.02 for linears and pos_embed.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])  # global_pool 'token'


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, images_u8: torch.Tensor, labels: torch.Tensor, batch=1000):
    """(top-1, top-5) accuracy in eval mode."""
    model.eval()
    top1 = top5 = 0
    for i in range(0, images_u8.shape[0], batch):
        logits = model(normalize(images_u8[i:i + batch]))
        y = labels[i:i + batch]
        best5 = logits.topk(5, dim=1).indices
        top1 += (best5[:, 0] == y).sum().item()
        top5 += (best5 == y[:, None]).any(dim=1).sum().item()
    n = images_u8.shape[0]
    return top1 / n, top5 / n


def lr_at(step, total, warmup, base_lr):
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def train(model, train_x, train_y, test_x, test_y, epochs, batch, lr, wd, beta2, use_augment, warmup_epochs=1):
    # No weight decay on biases, norms, cls_token and pos_embed (as timm does).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in ("cls_token", "pos_embed")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n not in ("cls_token", "pos_embed"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, beta2))
    gen = torch.Generator().manual_seed(0)
    n = train_x.shape[0]
    steps_per_epoch = n // batch  # drop the last partial batch
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs * steps_per_epoch, total // 5)
    history = []
    step = 0
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * batch:(b + 1) * batch]
            x = normalize(train_x[idx])
            if use_augment:
                x = augment(x, gen)
            y = train_y[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, lr)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * y.shape[0]
            correct += (logits.argmax(1) == y).sum().item()
        seconds = time.perf_counter() - t0
        seen = steps_per_epoch * batch
        test_top1, _ = evaluate(model, test_x, test_y)
        rec = {"epoch": epoch + 1, "seconds": round(seconds, 1), "train_loss": round(loss_sum / seen, 4),
               "train_acc": round(correct / seen, 4), "test_acc": round(test_top1, 4)}
        history.append(rec)
        print(f"epoch {rec['epoch']:2d}/{epochs}  {seconds:6.1f}s  loss {rec['train_loss']:.4f}  "
              f"train acc {rec['train_acc']:.4f}  test acc {rec['test_acc']:.4f}", flush=True)
    return history


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def save_image_pack(path: Path, images_u8: np.ndarray, labels: np.ndarray, source: str):
    """Image pack: `images` uint8 [N,H,W,C], `labels` int64 [N], comq.image_pack metadata."""
    tensors = {
        "images": torch.from_numpy(np.ascontiguousarray(images_u8[..., None])),  # [N,28,28,1]
        "labels": torch.from_numpy(labels.astype(np.int64)),
    }
    meta = {"comq.image_pack": "1", "classes": json.dumps(LABEL_NAMES), "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def config_json():
    return {
        "architecture": "vit_fmnist_p4_d64",
        "num_classes": NUM_CLASSES,
        "num_features": EMBED_DIM,
        "global_pool": "token",
        "model_args": {
            "img_size": IMG_SIZE, "patch_size": PATCH_SIZE, "in_chans": IN_CHANS,
            "embed_dim": EMBED_DIM, "depth": DEPTH, "num_heads": NUM_HEADS,
            "mlp_ratio": MLP_RATIO, "qkv_bias": True, "class_token": True,
        },
        "pretrained_cfg": {
            "input_size": [IN_CHANS, IMG_SIZE, IMG_SIZE], "mean": [MEAN], "std": [STD],
            "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": NUM_CLASSES,
        },
        "label_names": LABEL_NAMES,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-model", type=Path, default=REPO / "assets" / "fmnist-vit")
    ap.add_argument("--out-images", type=Path, default=REPO / "assets" / "fmnist-images")
    ap.add_argument("--out-reference", type=Path, default=REPO / "tests" / "data" / "fmnist-vit-reference.safetensors")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--beta2", type=float, default=0.999)
    # Off by default: with a budget of a few epochs, flip/crop slows convergence more than it
    # helps generalization (about 8 points lower test accuracy after 400 steps).
    ap.add_argument("--augment", action="store_true", help="random flip and padded crop")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    np.random.seed(0)

    data_dir = find_or_fetch_data()
    train_np, train_lab_np = load_split(data_dir, "train")
    test_np, test_lab_np = load_split(data_dir, "t10k")
    print(f"data: {data_dir}  train {train_np.shape}  test {test_np.shape}", flush=True)

    # Image packs. calib: 512 seeded random train images (file order); test: the first 300 of
    # each class in the t10k file, kept in file order.
    rng = np.random.default_rng(0)
    calib_idx = np.sort(rng.choice(train_np.shape[0], size=512, replace=False))
    seen = np.zeros(NUM_CLASSES, dtype=np.int64)
    test_idx = []
    for i, c in enumerate(test_lab_np):
        if seen[c] < 300:
            seen[c] += 1
            test_idx.append(i)
    test_idx = np.array(test_idx)
    assert test_idx.shape[0] == 3000
    save_image_pack(args.out_images / "calib.safetensors", train_np[calib_idx], train_lab_np[calib_idx],
                    SOURCE + "; train split, 512 images chosen with numpy default_rng(0), file order")
    save_image_pack(args.out_images / "test.safetensors", test_np[test_idx], test_lab_np[test_idx],
                    SOURCE + "; t10k split, the first 300 images of each class, file order")

    train_x, train_y = torch.from_numpy(train_np), torch.from_numpy(train_lab_np.astype(np.int64))
    test_x, test_y = torch.from_numpy(test_np), torch.from_numpy(test_lab_np.astype(np.int64))

    model = VisionTransformer()
    t0 = time.perf_counter()
    history = train(model, train_x, train_y, test_x, test_y, args.epochs, args.batch, args.lr, args.wd,
                    args.beta2, args.augment)
    seconds = time.perf_counter() - t0
    model.eval()

    top1, top5 = evaluate(model, test_x, test_y)
    pack_top1, pack_top5 = evaluate(model, test_x[test_idx], test_y[test_idx])
    print(f"test 10k: top-1 {top1:.4f}  top-5 {top5:.4f}   test pack (3000): top-1 {pack_top1:.4f}", flush=True)

    # Model, config, log.
    args.out_model.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out_model / "model.safetensors"),
              metadata={"format": "pt", "source": "scripts/train-fmnist-vit.py, Fashion-MNIST"})
    with open(args.out_model / "config.json", "w") as f:
        json.dump(config_json(), f, indent=2)
        f.write("\n")
    log = {
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "weight_decay": args.wd, "beta2": args.beta2,
        "augment": args.augment, "label_smoothing": 0.1,
        "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
        "test_top1": round(top1, 4), "test_top5": round(top5, 4),
        "test_pack_top1": round(pack_top1, 4), "test_pack_top5": round(pack_top5, 4),
        "torch_version": torch.__version__, "history": history,
    }
    with open(args.out_model / "train-log.json", "w") as f:
        json.dump(log, f, indent=2)
        f.write("\n")

    # Parity reference: first 16 test-pack images, their model inputs and eval-mode logits.
    ref_u8 = test_x[test_idx[:16]]
    pixel_values = normalize(ref_u8).contiguous()
    with torch.no_grad():
        logits = model(pixel_values).contiguous()
    args.out_reference.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": ref_u8[..., None].contiguous(), "pixel_values": pixel_values, "logits": logits},
              str(args.out_reference),
              metadata={"source": "scripts/train-fmnist-vit.py; first 16 images of the Fashion-MNIST test pack"})
    print(f"wrote {args.out_model}, {args.out_images}, {args.out_reference}", flush=True)


if __name__ == "__main__":
    main()

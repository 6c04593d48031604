"""Loads comq-gpu's packed output in real runtimes and checks it against our dequantized export.

1. Symmetric 4-bit (group 32) and 2-bit (per channel) pack-quantized checkpoints of a small
   random HF ViT load with AutoModelForImageClassification.from_pretrained, and their logits equal
   those of a dense model built from our dequantized export.
2. Asymmetric 3-bit group-wise packing decoded with compressed-tensors' own unpacker gives
   exactly our dequantized weights (transformers does not load asymmetric files yet).
3. A symmetric 4-bit packed CLIP vision tower (CLIPVisionModelWithProjection) loads with
   from_pretrained and its image embeddings equal those of our dequantized export.
   A whole CLIPModel (its text tower beside the vision tower, left in full precision) loads too,
   with the dequantized export's image and text embeddings.
4. A symmetric 4-bit packed Swin (SwinForImageClassification, its patch-merging reductions
   quantized too) loads with from_pretrained and its logits equal those of our dequantized export.
5. A symmetric 4-bit packed SigLIP vision tower (SiglipVisionModel): this transformers cannot
   build it compressed (SigLIP's `_init_weights` touches the `weight` of each compressed
   `Linear`, which the script checks so a fixed release is noticed), so it loads with
   `CompressedTensorsConfig(dequantize=True)` (compressed-tensors decompresses it while loading)
   and its pooled output equals that of our dequantized export.
6. Symmetric 4-bit packed DINOv2 (Dinov2Model, and Dinov2WithRegistersModel) made with this
   transformers: it cannot load them (its DINOv2 conversion mapping collides with compressed-tensors'
   suffixes, which the script checks so a fixed release is noticed), so transformers 4.57.6 from the
   environment's `legacy` folder loads them (legacy_load.py) and matches the dequantized export.

Usage: python transformers_load.py PATH/TO/comq-gpu
"""

import os
import subprocess
import sys
import tempfile

import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageClassification,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SwinConfig,
    SwinForImageClassification,
    CompressedTensorsConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
)

LOGITS_ATOL = 1e-5


def comq(binary, *args):
    subprocess.run([binary, "run", *args, "--device", "cpu", "-q"], check=True)


def main(binary):
    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    model = ViTForImageClassification(cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "src")
        model.save_pretrained(src)
        for bits, extra in [(4, ["--group-size", "32"]), (2, [])]:
            out, deq = os.path.join(d, f"w{bits}"), os.path.join(d, f"w{bits}-deq")
            comq(binary, src, "--data-free", "--sym", "--bits", str(bits), *extra, "--out", out, "--dequantized", deq)
            q = AutoModelForImageClassification.from_pretrained(out).eval()
            dense = AutoModelForImageClassification.from_pretrained(deq).eval()
            with torch.no_grad():
                lq, ld, lf = q(pixel_values=x).logits, dense(pixel_values=x).logits, model(pixel_values=x).logits
            diff = (lq - ld).abs().max().item()
            print(f"W{bits} sym: from_pretrained OK, max |logits - dense(dequantized)| = {diff:.3g}, "
                  f"vs FP32 = {(lq - lf).abs().max().item():.3g}")
            assert diff <= LOGITS_ATOL, f"W{bits}: logits differ by {diff}"
            assert (lq - lf).abs().max().item() > 0, "the quantized model must differ from FP32"

        # Asymmetric: our packing against compressed-tensors' own decoder.
        out, deq = os.path.join(d, "w3a"), os.path.join(d, "w3a-deq")
        comq(binary, src, "--data-free", "--bits", "3", "--group-size", "32", "--out", out, "--dequantized", deq)
        packed = load_file(os.path.join(out, "model.safetensors"))
        dense = load_file(os.path.join(deq, "model.safetensors"))
        prefixes = sorted(k[: -len(".weight_packed")] for k in packed if k.endswith(".weight_packed"))
        assert len(prefixes) == 12, prefixes
        for p in prefixes:
            rows, cols = packed[p + ".weight_shape"].tolist()
            scale = packed[p + ".weight_scale"].float()
            groups = scale.shape[1]
            qv = unpack_from_int32(packed[p + ".weight_packed"], 3, torch.Size([rows, cols]), packed_dim=1)
            zp = unpack_from_int32(packed[p + ".weight_zero_point"], 3, torch.Size([rows, groups]), packed_dim=0)
            g = cols // groups
            w = (qv.float() - zp.float().repeat_interleave(g, dim=1)) * scale.repeat_interleave(g, dim=1)
            ref = dense[p + ".weight"].float()
            err = (w - ref).abs().max().item()
            assert err <= 1e-6 * ref.abs().max().item(), f"{p}: compressed-tensors decodes {err} away"
        print(f"W3 asym g32: compressed-tensors' unpacker reproduces the dequantized weights of {len(prefixes)} layers")

        # A CLIP vision tower: packed W4 loads and matches the dequantized export.
        clip = CLIPVisionModelWithProjection(
            CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, image_size=32, patch_size=8, projection_dim=24)
        ).eval()
        src = os.path.join(d, "clip")
        clip.save_pretrained(src)
        out, deq = os.path.join(d, "clip-w4"), os.path.join(d, "clip-w4-deq")
        comq(binary, src, "--data-free", "--sym", "--bits", "4", "--out", out, "--dequantized", deq)
        q = CLIPVisionModelWithProjection.from_pretrained(out).eval()
        dense = CLIPVisionModelWithProjection.from_pretrained(deq).eval()
        with torch.no_grad():
            eq, ed = q(pixel_values=x).image_embeds, dense(pixel_values=x).image_embeds
            ef = clip(pixel_values=x).image_embeds
        diff = (eq - ed).abs().max().item()
        print(f"CLIP W4 sym: from_pretrained OK, max |embeds - dense(dequantized)| = {diff:.3g}, "
              f"vs FP32 = {(eq - ef).abs().max().item():.3g}")
        assert diff <= LOGITS_ATOL, f"CLIP W4: image embeddings differ by {diff}"
        assert (eq - ef).abs().max().item() > 0, "the quantized model must differ from FP32"

        # A whole CLIPModel: the vision tower packed, the text tower kept; both embeddings match.
        whole = CLIPModel(CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=99, max_position_embeddings=16),
            vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8),
            projection_dim=24)).eval()
        src = os.path.join(d, "clip-whole")
        whole.save_pretrained(src)
        out, deq = os.path.join(d, "clip-whole-w4"), os.path.join(d, "clip-whole-w4-deq")
        comq(binary, src, "--data-free", "--sym", "--bits", "4", "--out", out, "--dequantized", deq)
        ids = torch.randint(0, 99, (3, 8))
        q = CLIPModel.from_pretrained(out).eval()
        dense = CLIPModel.from_pretrained(deq).eval()
        with torch.no_grad():
            oq, od = q(pixel_values=x, input_ids=ids), dense(pixel_values=x, input_ids=ids)
        diff = max((oq.image_embeds - od.image_embeds).abs().max().item(),
                   (oq.text_embeds - od.text_embeds).abs().max().item())
        print(f"whole CLIP W4 sym: from_pretrained OK, max |embeds - dense(dequantized)| = {diff:.3g}")
        assert diff <= LOGITS_ATOL, f"whole CLIP W4: embeddings differ by {diff}"

        # A Swin: packed W4 (every linear layer, the patch mergings' reductions included) loads
        # and matches the dequantized export.
        swin = SwinForImageClassification(
            SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                       window_size=4, num_labels=5)
        ).eval()
        src = os.path.join(d, "swin")
        swin.save_pretrained(src)
        out, deq = os.path.join(d, "swin-w4"), os.path.join(d, "swin-w4-deq")
        comq(binary, src, "--data-free", "--sym", "--bits", "4", "--out", out, "--dequantized", deq)
        packed = load_file(os.path.join(out, "model.safetensors"))
        assert any(k.endswith("downsample.reduction.weight_packed") for k in packed), \
            "the patch merging's reduction must be packed"
        q = SwinForImageClassification.from_pretrained(out).eval()
        dense = SwinForImageClassification.from_pretrained(deq).eval()
        with torch.no_grad():
            lq, ld, lf = q(pixel_values=x).logits, dense(pixel_values=x).logits, swin(pixel_values=x).logits
        diff = (lq - ld).abs().max().item()
        print(f"Swin W4 sym: from_pretrained OK, max |logits - dense(dequantized)| = {diff:.3g}, "
              f"vs FP32 = {(lq - lf).abs().max().item():.3g}")
        assert diff <= LOGITS_ATOL, f"Swin W4: logits differ by {diff}"
        assert (lq - lf).abs().max().item() > 0, "the quantized model must differ from FP32"

        # SigLIP: decompressed while loading (its weight init cannot take compressed modules).
        siglip = SiglipVisionModel(
            SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8)
        ).eval()
        src = os.path.join(d, "siglip")
        siglip.save_pretrained(src)
        out, deq = os.path.join(d, "siglip-w4"), os.path.join(d, "siglip-w4-deq")
        comq(binary, src, "--data-free", "--sym", "--bits", "4", "--out", out, "--dequantized", deq)
        try:
            SiglipVisionModel.from_pretrained(out)
            print(f"SigLIP: transformers {transformers.__version__} now loads packed SigLIP compressed")
        except AttributeError as e:
            assert "weight" in str(e), f"SigLIP: an unexpected refusal: {e}"
            print(f"SigLIP: transformers {transformers.__version__} cannot build it compressed ({e})")
        q = SiglipVisionModel.from_pretrained(
            out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        dense = SiglipVisionModel.from_pretrained(deq).eval()
        with torch.no_grad():
            pq, pd, pf = (m(pixel_values=x).pooler_output for m in (q, dense, siglip))
        diff = (pq - pd).abs().max().item()
        print(f"SigLIP W4 sym: from_pretrained(dequantize=True) OK, max |pooled - dense(dequantized)| "
              f"= {diff:.3g}, vs FP32 = {(pq - pf).abs().max().item():.3g}")
        assert diff <= LOGITS_ATOL, f"SigLIP W4: pooled output differs by {diff}"
        assert (pq - pf).abs().max().item() > 0, "the quantized model must differ from FP32"

        # DINOv2, with and without registers: loaded by transformers 4.57 (the `legacy` folder).
        legacy = os.path.join(sys.prefix, "legacy")
        assert os.path.isdir(legacy), f"{legacy} is missing: run scripts/setup-python-env.sh"
        common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=28, patch_size=14)
        for cls, model in [
            (Dinov2Model, Dinov2Model(Dinov2Config(**common))),
            (Dinov2WithRegistersModel,
             Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**common, num_register_tokens=4))),
        ]:
            name = cls.__name__
            src = os.path.join(d, name)
            model.eval().save_pretrained(src)
            out, deq = os.path.join(d, f"{name}-w4"), os.path.join(d, f"{name}-w4-deq")
            comq(binary, src, "--data-free", "--sym", "--bits", "4", "--out", out, "--dequantized", deq)
            try:
                cls.from_pretrained(out)
                print(f"{name}: transformers {transformers.__version__} now loads packed DINOv2 itself")
            except ValueError as e:
                assert "mlp.weights_in" in str(e), f"{name}: an unexpected refusal: {e}"
                print(f"{name}: transformers {transformers.__version__} refuses it (its SwiGLU mapping)")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([legacy, os.environ.get("PYTHONPATH", "")]))
            here = os.path.dirname(os.path.abspath(__file__))
            subprocess.run([sys.executable, os.path.join(here, "legacy_load.py"), name, out, deq, "28", src],
                           check=True, env=env)


if __name__ == "__main__":
    main(sys.argv[1])

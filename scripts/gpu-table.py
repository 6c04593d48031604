#!/usr/bin/env python3
"""Turns the JSON that scripts/gpu-measure.sh wrote into one Markdown report (stdout).

Usage: scripts/gpu-table.py OUTDIR

Each table reads one step's JSON; a step that failed, timed out or was skipped is listed with its
status instead. Peaks are not known to the tool (wgpu reports no clock or bandwidth), so the
kernel rates are printed beside an H100's datasheet figures where the host says it is one.
"""
import json
import os
import sys

# FP32 (CUDA cores, no tensor cores through wgpu) and memory bandwidth, datasheet.
PEAKS = {
    "H100 80GB HBM3": (67e12, 3.35e12, "H100 SXM"),
    "H100 PCIe": (51e12, 2.0e12, "H100 PCIe"),
    "H100 NVL": (60e12, 3.9e12, "H100 NVL"),
    "H200": (67e12, 4.8e12, "H200"),
}


def load(d, name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def peaks(host):
    for key, v in PEAKS.items():
        if key in host:
            return v
    return None


def stage(row, name):
    for s in row.get("stages", []):
        if s["stage"] == name:
            return s["seconds"]
    return 0.0


def layers_ratio(r):
    """The layers' bytes both ways against one upload of W and G and one download of the codes."""
    lb, floor = r.get("layers_bytes"), r.get("layers_floor_bytes")
    if not lb or not floor:
        return "-"
    return "%.2fx" % ((lb[0] + lb[1]) / floor)


def main():
    d = sys.argv[1]
    host = open(os.path.join(d, "host.txt")).read() if os.path.exists(os.path.join(d, "host.txt")) else ""
    pk = peaks(host)
    print("# GPU measurements\n")
    print("```\n" + host.strip() + "\n```\n")
    devs = load(d, "devices.json")
    if isinstance(devs, list):
        for a in devs:
            print(f"- adapter: {a.get('name')} ({a.get('backend')}, {a.get('device_type')}), driver "
                  f"{a.get('driver')} {a.get('driver_info', '')}")
        print()

    steps = []
    tsv = os.path.join(d, "steps.tsv")
    if os.path.exists(tsv):
        steps = [line.rstrip("\n").split("\t") for line in open(tsv) if line.strip()]
    print("| step | status | seconds | peak GPU memory (whole card) |\n|---|---|---|---|")
    for s in steps:
        s = (s + ["", "", "", ""])[:4]
        s[3] = f"{int(s[3]) / 1024:.2f} GiB" if s[3].strip().isdigit() else "-"
        print("| " + " | ".join(s) + " |")
    print()
    gpu_mib = {s[0]: int(s[3]) for s in steps if len(s) > 3 and s[3].strip().isdigit()}

    def order_cell(r):
        if "order_seconds" not in r:
            return "-"
        where = "ranked on the device" if r.get("order_on_device") else "host sort + upload"
        return f"{r['order_seconds'] * 1e3:.2f} ms ({where})"

    k = load(d, "kernels.json")
    if k:
        print("## Kernels alone (`bench --kernels --no-cpu --gram-rows 16384`)\n")
        if pk:
            print(f"Rates against the {pk[2]} datasheet: FP32 {pk[0] / 1e12:.0f} TFLOP/s, "
                  f"{pk[1] / 1e12:.2f} TB/s.\n")
        print("| layer | Gram | GFLOP/s | % FP32 | greedy sweep | GB/s | % bandwidth | shared sweep | GFLOP/s | % FP32 | greedy order |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in k:
            m, n = r["shape"]
            gr = r["gram_flops"] / r["gram_seconds"]
            gb = r["sweep_greedy_bytes"] / r["sweep_greedy_seconds"]
            sr = r["sweep_shared_flops"] / r["sweep_shared_seconds"]
            pct = (lambda v, p: f"{100 * v / p:.1f}%") if pk else (lambda v, p: "-")
            print(f"| {m} × {n} | {r['gram_seconds'] * 1e3:.2f} ms | {gr / 1e9:.0f} | {pct(gr, pk[0] if pk else 1)} "
                  f"| {r['sweep_greedy_seconds'] * 1e3:.2f} ms | {gb / 1e9:.0f} | {pct(gb, pk[1] if pk else 1)} "
                  f"| {r['sweep_shared_seconds'] * 1e3:.2f} ms | {sr / 1e9:.0f} | {pct(sr, pk[0] if pk else 1)} "
                  f"| {order_cell(r)} |")
        print()

    lay = load(d, "layers.json")
    if lay:
        print("## Whole layers, GPU vs CPU of the same host (`bench --repeats 3`, W4, one sweep)\n")
        print("| layer | CPU | GPU | speed-up | codes differing | rel. error | RTN rel. error |")
        print("|---|---|---|---|---|---|---|")
        for r in lay:
            f = lambda v, u="s": "-" if v is None else f"{v:.3f} {u}"
            print(f"| {r['shape'][0]} × {r['shape'][1]} | {f(r.get('cpu_seconds'))} | {f(r.get('gpu_seconds'))} "
                  f"| {'-' if r.get('speedup') is None else '%.1fx' % r['speedup']} "
                  f"| {'-' if r.get('code_disagreement') is None else '%.3f%%' % (100 * r['code_disagreement'])} "
                  f"| {r['rel_error']:.4e} | {r['rel_error_rtn']:.4e} |")
        print()

    fw = load(d, "forward.json")
    if fw:
        print("## Forward pass (`bench --forward vit-b16 --images 64`)\n")
        print("| model | images | CPU img/s | GPU img/s | speed-up | CLS rel. diff |\n|---|---|---|---|---|---|")
        g = lambda v, fmt: "-" if v is None else fmt % v
        print(f"| {fw['model']} | {fw['images']} | {g(fw.get('cpu_images_per_s'), '%.1f')} "
              f"| {g(fw.get('gpu_images_per_s'), '%.1f')} | {g(fw.get('speedup'), '%.1fx')} "
              f"| {g(fw.get('cls_rel_diff'), '%.2e')} |")
        print()

    rows = []
    for name, label in [("e2e-paper-greedy", "paper, greedy"), ("e2e-paper-shared", "paper, shared")]:
        v = load(d, name + ".json")
        for r in v or []:
            rows.append((label, r["images"], r))
    for r in load(d, "e2e-default.json") or []:
        rows.append(("default, greedy", r["images"], r))
    for r in load(d, "e2e-default-4b.json") or []:
        rows.append((f"default, greedy, first {r['blocks']} blocks", r["images"], r))
    for r in load(d, "e2e-default-4b-host-factor.json") or []:
        rows.append((f"default, greedy, first {r['blocks']} blocks, factors from the host",
                     r["images"], r))
    for n in (256, 512, 2048, 4096):
        for r in load(d, f"calib-{n}.json") or []:
            rows.append(("paper, greedy", r["images"], r))
    if rows:
        print("## End to end, ViT-L/16 (synthetic weights, 224-px images), W4, one sweep, on the GPU\n")
        print("| recipe | images | forward | Gram | quantize | search | wall | wall without I/O | peak host memory | mean layer error | layers' bytes ÷ (W + G up, codes down) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for label, n, r in sorted(rows, key=lambda t: (t[0], t[1] or 1024)):
            rss = r.get("peak_rss_bytes")
            err = r.get("mean_rel_error")
            print(f"| {label} | {n or 1024} | {stage(r, 'forward'):.2f} s | {stage(r, 'gram'):.2f} s "
                  f"| {stage(r, 'quantize'):.2f} s | {stage(r, 'probe') + stage(r, 'search'):.2f} s "
                  f"| {r['wall_seconds']:.2f} s | {r['wall_seconds_without_io']:.2f} s "
                  f"| {'-' if rss is None else '%.2f GB' % (rss / 1e9)} | {'-' if err is None else '%.3e' % err} "
                  f"| {layers_ratio(r)} |")
        print()
        print("Stage seconds are busy time per thread (the calibration runs one block ahead on its own "
              "thread), so they can add up to more than the wall clock.\n")

    size = []
    for m in ("vit-s14", "vit-b16", "vit-l16", "vit-h14", "vit-6b"):
        for r in load(d, f"size-{m}.json") or []:
            size.append((m, r))
    if size:
        print("## Model sizes (`bench --model SHAPE --images 1024 --no-cpu --memory-limit 8GB`, "
              "paper recipe W4, one greedy sweep)\n")
        print("| shape | blocks | linear weights | forward | Gram | quantize | wall | wall without I/O "
              "| weights/s | planned device / host | peak GPU (card) | peak host |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m, r in size:
            c = r.get("calibration_memory") or {}
            plan = (f"{c['device_bytes'] / 1e9:.2f} / {c['host_bytes'] / 1e9:.2f} GB"
                    if "device_bytes" in c and "host_bytes" in c else "-")
            gpu = gpu_mib.get(f"size-{m}")
            rss = r.get("peak_rss_bytes")
            print(f"| {m} | {r['blocks']} | {r['linear_params'] / 1e6:.1f} M | {stage(r, 'forward'):.2f} s "
                  f"| {stage(r, 'gram'):.2f} s | {stage(r, 'quantize'):.2f} s | {r['wall_seconds']:.2f} s "
                  f"| {r['wall_seconds_without_io']:.2f} s | {r['linear_params'] / r['wall_seconds'] / 1e6:.2f} M "
                  f"| {plan} | {'-' if gpu is None else '%.2f GiB' % (gpu / 1024)} "
                  f"| {'-' if rss is None else '%.2f GB' % (rss / 1e9)} |")
        print()


if __name__ == "__main__":
    main()

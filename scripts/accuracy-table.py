#!/usr/bin/env python3
"""The Markdown table of scripts/accuracy-matrix.sh's results.

Usage: accuracy-table.py OUT_DIR/results.jsonl [--top1]

Wall clocks are the runs' own, without the evaluation. One row per width, one column per setting; each cell the recipe's CLS cosine to FP32 (with
--top1, top-1 / CLS cosine), RTN's in the first column (RTN does not depend on the setting:
the default run's). The last line of the table gives each setting's mean wall clock relative to
the default's over the widths both ran. A result line repeated (a matrix run again) counts once,
the last one.
"""
import json
import sys

WIDTHS = {"w4": "W4", "w3": "W3", "w2": "W2", "w4g128": "W4 g128", "w3g128": "W3 g128", "t3": "`--target-bits 3`",
          "t2.5": "`--target-bits 2.5`"}
SETTINGS = {"paper": "paper", "default": "default", "augment": "`--augment auto`",
            "rotate": "`--rotate`", "corrected": "`--calib-mode corrected`",
            "all": "all three"}


def main():
    path = sys.argv[1]
    top1 = "--top1" in sys.argv[2:]
    runs = {}
    for line in open(path):
        r = json.loads(line)
        runs[(r["setting"], r["width"])] = r
    settings = [s for s in SETTINGS if any(k[0] == s for k in runs)]
    widths = [w for w in WIDTHS if any(k[1] == w for k in runs)]

    def fmt(c):
        cls = "—" if c.get("cls") is None else f"{c['cls']:.4f}"
        if top1 and c.get("top1") is not None:
            return f"{100 * c['top1']:.1f}% / {cls}"
        return cls

    head = ["bits", "RTN"] + [SETTINGS[s] for s in settings]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for w in widths:
        base = runs.get(("default", w)) or next((runs[k] for k in runs if k[1] == w), None)
        cells = [WIDTHS[w], fmt(base["rtn"]) if base else "—"]
        scores = {s: runs[(s, w)]["ours"]["cls"] for s in settings if (s, w) in runs}
        best = max((v for v in scores.values() if v is not None), default=None)
        for s in settings:
            r = runs.get((s, w))
            if r is None:
                cells.append("—")
                continue
            c = fmt(r["ours"])
            cells.append(f"**{c}**" if r["ours"]["cls"] == best else c)
        print("| " + " | ".join(cells) + " |")
    walls = []
    for s in settings:
        pairs = [(runs[(s, w)]["wall"], runs[("default", w)]["wall"]) for w in widths
                 if (s, w) in runs and ("default", w) in runs]
        walls.append("—" if not pairs else f"{sum(a for a, _ in pairs) / sum(b for _, b in pairs):.2f}×")
    print("| wall clock ÷ default | | " + " | ".join(walls) + " |")


if __name__ == "__main__":
    main()

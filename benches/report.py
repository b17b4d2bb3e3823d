#!/usr/bin/env python3
"""Tables and the thread-scaling plot of `docs/benchmarks.md`, from criterion's output.

    python3 benches/report.py [--criterion DIR ...] [--svg docs/sdtree-scaling.svg]
                              [--size 100k]

Reads every `*/new/benchmark.json` + `estimates.json` under each criterion directory
(default `target/criterion`; ids `OP/DATASET/SIZE/STRUCTURE/tTHREADS`, written by
`benches/sdtree.rs`), prints Markdown tables (throughput, ratios to the red-black tree
and to the SD tree, the issue's targets) and writes the scaling plot as SVG. Throughput
is criterion's estimate for one op (slope where criterion fitted one, else mean),
inverted: operations per second. Given several directories (copies of
`target/criterion` from repeated runs), each benchmark's value is the best of its runs,
and the run-to-run spread is printed. Standard library only.
"""

import argparse
import glob
import json
import math
import os
from collections import defaultdict

OPS = ["lookup_hit", "lookup_miss", "insert_or_get", "remove"]
STRUCTS = ["sdtree", "rbtree_ksm", "btreemap_rwlock", "skipmap", "scc_treeindex", "papaya_xxh3"]
SHORT = {
    "sdtree": "SD tree",
    "rbtree_ksm": "RB tree (KSM)",
    "btreemap_rwlock": "BTreeMap",
    "skipmap": "SkipMap",
    "scc_treeindex": "scc TreeIndex",
    "papaya_xxh3": "papaya+xxh3",
}
COLORS = {
    "sdtree": "#d62728",
    "rbtree_ksm": "#1f77b4",
    "btreemap_rwlock": "#2ca02c",
    "skipmap": "#9467bd",
    "scc_treeindex": "#8c564b",
    "papaya_xxh3": "#7f7f7f",
}


def size_value(label):
    if label.endswith("M"):
        return int(label[:-1]) * 1_000_000
    if label.endswith("k"):
        return int(label[:-1]) * 1_000
    return int(label)


def load(root):
    """{(op, ds, size, struct, threads): ops per second}"""
    data = {}
    for bj in glob.glob(os.path.join(root, "**", "new", "benchmark.json"), recursive=True):
        meta = json.load(open(bj))
        parts = meta["group_id"].split("/")
        if len(parts) != 3 or parts[0] not in OPS:
            continue
        est = json.load(open(os.path.join(os.path.dirname(bj), "estimates.json")))
        ns = (est.get("slope") or est["mean"])["point_estimate"]
        threads = int(meta["value_str"].lstrip("t"))
        data[(parts[0], parts[1], parts[2], meta["function_id"], threads)] = 1e9 / ns
    return data


def fmt_tp(x):
    if x is None:
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    return f"{x / 1e3:.0f} k"


def fmt_ratio(x):
    if x is None:
        return "–"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def rows(data, op):
    keys = sorted(
        {(ds, size, t) for (o, ds, size, _, t) in data if o == op},
        key=lambda k: (k[0], size_value(k[1]), k[2]),
    )
    return keys


def tables(data):
    out = []
    structs = [s for s in STRUCTS if any(k[3] == s for k in data)]
    for op in OPS:
        keys = rows(data, op)
        if not keys:
            continue
        out.append(f"\n#### `{op}`\n")
        head = "| data set | keys | threads | " + " | ".join(SHORT[s] for s in structs) + " |"
        sep = "| --- | ---: | ---: | " + " | ".join("---:" for _ in structs) + " |"
        for title, base in [("ops/s", None), ("÷ RB tree (KSM)", "rbtree_ksm"), ("÷ SD tree", "sdtree")]:
            out.append(f"\n{title}:\n")
            out.append(head)
            out.append(sep)
            for ds, size, t in keys:
                cells = []
                b = data.get((op, ds, size, base, t)) if base else None
                for s in structs:
                    v = data.get((op, ds, size, s, t))
                    if base is None:
                        cells.append(fmt_tp(v))
                    else:
                        cells.append(fmt_ratio(v / b) if v and b else "–")
                out.append(f"| {ds} | {size} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def targets(runs):
    """The issue's targets, as within-run ratios: each run's ratio, then the median and
    range over the runs that measured both sides (robust to runs slowed by other load)."""
    out = [
        "| target | keys | runs | median (min–max) | verdict on the median |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    sizes = sorted({k[2] for r in runs for k in r}, key=size_value)

    def line(name, need, size, a, b):
        rs = sorted(r[a] / r[b] for r in runs if r.get(a) and r.get(b))
        if not rs:
            return
        n = len(rs)
        med = rs[n // 2] if n % 2 else (rs[n // 2 - 1] + rs[n // 2]) / 2
        verdict = "met" if med >= need else "missed"
        out.append(f"| {name} | {size} | {n} | {med:.2f}× ({rs[0]:.2f}–{rs[-1]:.2f}) | {verdict} |")

    for size in sizes:
        for ds, need in [("ds1_random", 1.2), ("ds2_zeroprefix", 2.0), ("ds3_tail64", 10.0)]:
            line(
                f"lookup hit, 1 thread, {ds}: SD tree ≥ {need:g}× RB tree",
                need,
                size,
                ("lookup_hit", ds, size, "sdtree", 1),
                ("lookup_hit", ds, size, "rbtree_ksm", 1),
            )
        for ds in ["ds1_random", "ds2_zeroprefix", "ds3_tail64", "ds4_sparse"]:
            line(
                f"insert_or_get, {ds}: SD tree 2 threads ≥ 1.8× 1 thread",
                1.8,
                size,
                ("insert_or_get", ds, size, "sdtree", 2),
                ("insert_or_get", ds, size, "sdtree", 1),
            )
        for ds in ["ds1_random", "ds2_zeroprefix", "ds3_tail64", "ds4_sparse"]:
            line(
                f"lookup miss, 1 thread, {ds}: SD tree ≥ papaya+xxh3",
                1.0,
                size,
                ("lookup_miss", ds, size, "sdtree", 1),
                ("lookup_miss", ds, size, "papaya_xxh3", 1),
            )
    return "\n".join(out)


def svg(data, size, path, note=""):
    """Speed-up over the structure's own 1-thread throughput, per (data set, op)."""
    datasets = sorted({k[1] for k in data if k[2] == size})
    threads = sorted({k[4] for k in data if k[2] == size})
    if not datasets or len(threads) < 2:
        return False
    tmax = max(threads)
    pw, ph, ml, mt, gap = 210, 170, 70, 80, 40
    width = ml + len(OPS) * (pw + gap) + 170
    height = mt + len(datasets) * (ph + gap) + 30
    top = 1.0
    for (op, ds, sz, s, t), v in data.items():
        one = data.get((op, ds, sz, s, 1))
        if sz == size and one:
            top = max(top, v / one)
    top = max(math.ceil(top * 2) / 2, float(tmax))
    e = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{ml}" y="22" font-size="15" font-weight="bold">Thread scaling, {size} keys: '
        "throughput ÷ the same structure's 1-thread throughput</text>",
        f'<text x="{ml}" y="40" fill="#555">dashed: linear scaling. Measured on the 2-core machine '
        "of docs/benchmarks.md; above 2 threads the cores are oversubscribed.</text>",
    ]
    if note:
        e.append(f'<text x="{ml}" y="54" fill="#555">{note}</text>')

    def xpos(x0, t):
        return x0 + (math.log2(t) / math.log2(tmax)) * pw if tmax > 1 else x0

    def ypos(y0, v):
        return y0 + ph - (v / top) * ph

    for r, ds in enumerate(datasets):
        for c, op in enumerate(OPS):
            x0, y0 = ml + c * (pw + gap), mt + r * (ph + gap)
            e.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
            e.append(f'<text x="{x0 + pw / 2}" y="{y0 - 6}" text-anchor="middle">{op} · {ds}</text>')
            # grid and axes
            step = 0.5 if top <= 4 else (1 if top <= 8 else 2)
            v = 0.0
            while v <= top + 1e-9:
                y = ypos(y0, v)
                e.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
                if c == 0:
                    e.append(f'<text x="{x0 - 5}" y="{y + 4:.1f}" text-anchor="end">{v:g}×</text>')
                v += step
            for t in threads:
                x = xpos(x0, t)
                e.append(f'<text x="{x:.1f}" y="{y0 + ph + 14}" text-anchor="middle">{t}</text>')
            e.append(
                f'<line x1="{xpos(x0, 1):.1f}" y1="{ypos(y0, 1):.1f}" x2="{xpos(x0, tmax):.1f}" '
                f'y2="{ypos(y0, tmax):.1f}" stroke="#bbb" stroke-dasharray="4 3"/>'
            )
            for s in STRUCTS:
                one = data.get((op, ds, size, s, 1))
                pts = [(t, data.get((op, ds, size, s, t))) for t in threads]
                pts = [(t, v / one) for t, v in pts if v and one]
                if len(pts) < 2:
                    continue
                p = " ".join(f"{xpos(x0, t):.1f},{ypos(y0, v):.1f}" for t, v in pts)
                width_px = 2.5 if s == "sdtree" else 1.5
                e.append(f'<polyline points="{p}" fill="none" stroke="{COLORS[s]}" stroke-width="{width_px}"/>')
                for t, v in pts:
                    e.append(f'<circle cx="{xpos(x0, t):.1f}" cy="{ypos(y0, v):.1f}" r="2.5" fill="{COLORS[s]}"/>')
        e.append(
            f'<text x="{ml - 50}" y="{mt + r * (ph + gap) + ph / 2}" text-anchor="middle" '
            f'transform="rotate(-90 {ml - 50} {mt + r * (ph + gap) + ph / 2})">speed-up</text>'
        )
    lx = ml + len(OPS) * (pw + gap)
    for i, s in enumerate(STRUCTS):
        y = mt + 10 + i * 18
        e.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{y}" y2="{y}" stroke="{COLORS[s]}" stroke-width="2.5"/>')
        e.append(f'<text x="{lx + 28}" y="{y + 4}">{SHORT[s]}</text>')
    e.append(f'<text x="{lx}" y="{mt + 10 + len(STRUCTS) * 18 + 10}" fill="#555">x: threads</text>')
    e.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(e) + "\n")
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--criterion", nargs="+", default=["target/criterion"])
    ap.add_argument("--svg", default="docs/sdtree-scaling.svg")
    ap.add_argument("--size", default=None, help="keys for the plot (default: largest with ≥2 thread counts)")
    ap.add_argument("--note", default="", help="a line of text under the plot's title")
    a = ap.parse_args()
    runs = [load(d) for d in a.criterion]
    data = {}
    for run in runs:
        for k, v in run.items():
            data[k] = max(v, data.get(k, 0.0))
    if not data:
        raise SystemExit(f"no sdtree benchmark results under {a.criterion}")
    if len(runs) > 1:
        spread = sorted(
            max(r[k] for r in runs if k in r) / min(r[k] for r in runs if k in r)
            for k in data
            if sum(k in r for r in runs) > 1
        )
        if spread:
            print(
                f"Best of {len(runs)} runs. Spread (fastest ÷ slowest run) over {len(spread)} "
                f"benchmarks measured more than once: median {spread[len(spread) // 2]:.2f}, "
                f"90th percentile {spread[int(len(spread) * 0.9)]:.2f}.\n"
            )
    print(tables(data))
    print("\n#### Targets\n")
    print(targets(runs))
    sizes = sorted({k[2] for k in data}, key=size_value)
    plot_size = a.size or next(
        (s for s in reversed(sizes) if len({k[4] for k in data if k[2] == s}) >= 2), None
    )
    if plot_size and a.svg and svg(data, plot_size, a.svg, a.note):
        print(f"\n(wrote {a.svg} for {plot_size} keys)")


if __name__ == "__main__":
    main()

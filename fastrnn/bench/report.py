"""What a benchmark prints and writes: the table, the summary, the JSON, the plot."""

from __future__ import annotations

import json
import time

import numpy as np


def print_table(rows, peers=("torch",), out=print):
    """The rows, a line each; a ``~`` after the median marks a noisy row
    (:data:`.runner.NOISY_IQR`), explained under the table."""
    head = (f"{'backend':<13} {'cell':<14} {'mode':<9} {'T':>5} {'B':>4} {'I':>5} {'H':>5} "
            f"{'median ms':>10}  {'GFLOP/s':>8} {'%peak':>6}")
    out(head + "".join(f" {'vs ' + p:>14}" for p in peers))
    for r in rows:
        speed = "".join(f" {r['speedup_vs'][p]:>13.2f}x" if p in r.get("speedup_vs", {})
                        else f" {'-':>14}" for p in peers)
        frac = r.get("peak_fraction")
        out(f"{r['backend']:<13} {r.get('kind', r['cell']):<14} {r['mode']:<9} {r['T']:>5} {r['B']:>4} "
            f"{r['I']:>5} {r['H']:>5} {r['median_ms']:>10.3f}{'~' if r.get('noisy') else ' '} "
            f"{r['gflops']:>8.1f} {'-' if frac is None else f'{100 * frac:.0f}%':>6}{speed}")
    if any(r.get("noisy") for r in rows):
        from .runner import NOISY_IQR
        out(f"~ noisy: the middle half of the row's samples spans more than {NOISY_IQR:.0%} of "
            "its median (the machine ran at two speeds during the point); its ratios are "
            "less certain (q1_ms, q3_ms in the JSON)")


def point(r) -> tuple:
    """The grid point of a row: (kind, mode, T, B, I, H)."""
    return (r.get("kind", r["cell"]), r["mode"], r["T"], r["B"], r["I"], r["H"])


def geomean(values) -> float:
    return float(np.exp(np.mean(np.log(values))))


def summarize(rows, backend="numba", peers=("torch",)) -> str:
    """Geometric-mean and minimum speedups of ``backend`` over each peer, per mode."""
    lines = []
    for mode in ("inference", "training"):
        for peer in peers:
            s = [r["speedup_vs"][peer] for r in rows if r["backend"] == backend and
                 r["mode"] == mode and peer in r.get("speedup_vs", {})]
            if s:
                worst = min(range(len(s)), key=s.__getitem__)
                where = [r for r in rows if r["backend"] == backend and r["mode"] == mode and
                         peer in r.get("speedup_vs", {})][worst]
                noisy = any(r.get("noisy") for r in rows if r["backend"] in (backend, peer)
                            and point(r) == point(where))
                lines.append(f"{backend} {mode} vs {peer}: geometric mean {geomean(s):.2f}x, "
                             f"min {min(s):.2f}x ({where.get('kind', where['cell'])} "
                             f"{where['T']}x{where['B']}x"
                             f"{where['I']}x{where['H']}{', noisy' if noisy else ''}), "
                             f"{len(s)} points")
    return "\n".join(lines)


def write_json(path, result, args_line, threads, protocol):
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": args_line,
            "protocol": protocol, "threads": threads,
            "gemm_peak_gflops": result.peak, "gemm_peak_source": result.peak_source,
            "machine": next((e["machine"] for e in result.engines.values()), {}),
            "engines": {name: {k: e.get(k) for k in ("absent", "blas", "modes", "precision",
                                                      "env")} | {"versions": {
                                                          k: e["machine"].get(k) for k in
                                                          ("numpy", "numba", "torch",
                                                           "onnxruntime", "openvino", "jax")}}
                        for name, e in result.engines.items()},
            "verified": {" ".join(k): {"passed": v[0], "max_rel_err": v[1]}
                         for k, v in result.verified.items()},
            "not_timed": result.not_timed, "rows": result.rows}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fastrnn[plot]'") from None
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(8 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        labels = sorted({(r.get("kind", r["cell"]), r["T"], r["B"], r["I"], r["H"]) for r in sel},
                        key=lambda k: (k[0], -k[2] * k[4]))
        names = sorted({r["backend"] for r in sel})
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            vals = []
            for lab in labels:
                match = [r for r in sel if r["backend"] == name and
                         (r.get("kind", r["cell"]), r["T"], r["B"], r["I"], r["H"]) == lab]
                vals.append(match[0]["gflops"] if match else 0)
            ax.bar(np.arange(len(labels)) + k * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{c}\n{T}x{Bs}x{I}x{H}" for c, T, Bs, I, H in labels],
                           fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("GFLOP/s (GEMM flops / median time)")
        ax.set_yscale("log")
        ax.set_title(f"{mode} ({rows[0]['dtype']}), T x B x I x H")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

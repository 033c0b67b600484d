"""``arfuse bench --plot``: latency against token count, log-log, one line per path, one panel per (world size,
hidden size[, dtype])."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from arfuse.bench.report import by_shape, is_peer, ordered_paths


def _panels(measurements: Sequence[dict]) -> Tuple[List[int], List[Tuple[int, str]], Dict]:
    shapes = by_shape(measurements)
    worlds = sorted({w for w, _, _ in shapes})
    dtypes = {d for _, _, d in shapes}
    columns = sorted({(h, d) for _, h, d in shapes})
    if len(dtypes) == 1:
        columns = sorted({(h, next(iter(dtypes))) for _, h, _ in shapes})
    return worlds, columns, shapes


def plot(doc: dict, path) -> Path:
    """Write the PNG for a bench document to ``path``; returns the path. Paths that failed or cannot run at a
    size have no point there. Needs matplotlib (``pip install 'arfuse[plot]'``)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plot: needs matplotlib, which is not installed: pip install 'arfuse[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    measurements = doc["measurements"]
    worlds, columns, shapes = _panels(measurements)
    if not worlds:
        raise ValueError("plot: the document has no measurements")
    fig, axes = plt.subplots(len(worlds), len(columns), figsize=(max(5.5 * len(columns), 8), 4.2 * len(worlds)),
                             squeeze=False, sharex=True)
    all_paths = ordered_paths(measurements)
    colors = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(all_paths)}
    for r, world in enumerate(worlds):
        for c, (hidden, dtype) in enumerate(columns):
            ax = axes[r][c]
            ms = shapes.get((world, hidden, dtype), [])
            for p in ordered_paths(ms):
                pts = sorted((m["tokens"], m["us"]) for m in ms if m["path"] == p and m["status"] == "ok")
                if not pts:
                    continue
                peer = is_peer(next(m for m in ms if m["path"] == p))
                ax.plot([t for t, _ in pts], [u for _, u in pts], label=p, color="black" if p == "auto" else colors[p],
                        linewidth=2.6 if p == "auto" else 1.4, linestyle="--" if peer else "-",
                        marker="o", markersize=3)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_title(f"TP{world}, hidden {hidden}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            if r == len(worlds) - 1:
                ax.set_xlabel("tokens")
            if c == 0:
                ax.set_ylabel("µs per call")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(len(labels), 5),
               fontsize="small", frameon=False)
    machine = doc.get("machine", {})
    gpus = machine.get("gpus") or []
    fig.suptitle(f"arfuse bench - {f'{len(gpus)}x {gpus[0]}' if gpus else 'cpu'} - {machine.get('date', '')}\n"
                 f"{doc.get('config', {}).get('timing_method', '')}", fontsize="small")
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(labels) - 1) // 5), 1, 0.94))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

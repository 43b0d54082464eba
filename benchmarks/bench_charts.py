"""PNG charts of a ``multifd bench`` result (matplotlib, imported only here)."""

from __future__ import annotations

import os
from typing import Any

from multifd_core.errors import MultiFDError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MultiFDError("--charts needs matplotlib: pip install 'multifd-core[bench]' "
                           "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "error" not in r]


def chart_time(res: dict[str, Any], plt: Any, path: str) -> str:
    """Seconds per GiB of RAM (transfer), per method and channel count."""
    rows = _ok(res["runs"])
    labels = list(dict.fromkeys(r["label"] for r in rows))
    chans = sorted({r["channels"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 5))
    width = 0.8 / max(1, len(chans))
    for k, ch in enumerate(chans):
        xs, ys = [], []
        for i, lab in enumerate(labels):
            r = next((r for r in rows if r["label"] == lab and r["channels"] == ch), None)
            if r is not None:
                xs.append(i + (k - (len(chans) - 1) / 2) * width)
                ys.append(r["transfer_s"] / (r["ram_bytes"] / 2**30))
        ax.bar(xs, ys, width, label=f"{ch} channel{'s' if ch > 1 else ''}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{lab}\n({_mib(rows, lab)} MiB)" for lab in labels], rotation=30,
                       ha="right", fontsize=8)
    ax.set_ylabel("seconds per GiB of RAM (first packet to last SYNC)")
    ax.set_title(f"our sender -> our receiver, loopback, mixed image; load "
                 f"{res['host']['loadavg_start'][0]:.1f}")
    if rows:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mib(rows: list[dict[str, Any]], label: str) -> int:
    return next(r["image_mib"] for r in rows if r["label"] == label)


def chart_limits(res: dict[str, Any], plt: Any, path: str) -> str:
    """Best RAM GB/s per method against the physical limits measured in the same run."""
    rows = _ok(res["runs"])
    best: dict[str, float] = {}
    for r in rows:
        best[r["label"]] = max(best.get(r["label"], 0.0), r["ram_gb_s"])
    fig, ax = plt.subplots(figsize=(max(8, len(best) * 0.8), 5))
    ax.bar(range(len(best)), list(best.values()), color="tab:blue", label="best of 1/2/4 ch")
    ax.set_xticks(range(len(best)))
    ax.set_xticklabels(list(best), rotation=30, ha="right", fontsize=8)
    lim = res.get("limits") or {}
    lines = []
    sl = lim.get("socket_loopback", {})
    for c, v in sl.items():
        lines.append((f"bare sockets x{c} (RAM-equivalent)", v["ram_bytes_per_s"] / 1e9))
    for key, name in (("first_touch_file_bytes_per_s", "first touch, sparse file"),
                      ("first_touch_anon_bytes_per_s", "first touch, anonymous"),
                      ("memcopy_bytes_per_s", "memory copy")):
        if key in lim:
            lines.append((name, lim[key] / 1e9))
    styles = ["--", "-.", ":", (0, (5, 1)), (0, (1, 1))]
    colors = ["tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for (name, y), ls, col in zip(lines, styles, colors, strict=False):
        ax.axhline(y, linestyle=ls, color=col, label=f"{name}: {y:.2f}")
    ax.set_ylabel("GB/s of RAM migrated")
    ax.set_title("throughput against the physical limits (same run)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_links(res: dict[str, Any], plt: Any, path: str) -> str | None:
    """Time per method on each rate-limited link, auto's pick marked."""
    links = (res.get("links") or {}).get("links") or []
    if not links:
        return None
    fig, axes = plt.subplots(1, len(links), figsize=(6 * len(links), 4.5), squeeze=False)
    for ax, entry in zip(axes[0], links, strict=True):
        rows = _ok(entry["runs"])
        labels = [r["method"] + ("" if r["level"] is None else f":{r['level']}") for r in rows]
        choice = entry["auto"]["choice"]
        colors = ["tab:green" if lab == choice else "tab:gray" for lab in labels]
        ax.bar(range(len(rows)), [r["transfer_s"] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("seconds (first packet to last SYNC)")
        ax.set_title(f"tbf {entry['rate']} ({entry['probe']['bytes_per_s'] / 1e6:.0f} MB/s "
                     f"bare); green: auto's pick", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_charts(res: dict[str, Any], out_dir: str) -> list[str]:
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = [chart_time(res, plt, os.path.join(out_dir, "time-per-method.png")),
             chart_limits(res, plt, os.path.join(out_dir, "throughput-vs-limits.png")),
             chart_links(res, plt, os.path.join(out_dir, "links.png"))]
    return [p for p in paths if p]

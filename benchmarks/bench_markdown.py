"""Render a ``multifd bench --json`` result as Markdown tables (for docs/results.md).

    .venv/bin/python -m benchmarks.bench_markdown docs/bench/results.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def _runs_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| method[:level]/engine | ch | image MiB | transfer s | wall s | RAM GB/s | "
           "wire MiB | ratio | CPU s send | CPU s recv | maxrss MiB send/recv | "
           "RssAnon MiB send/recv |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['label']} | {r['channels']} | {r['image_mib']} | failed: "
                       f"{r['error'][:80]} |||||||||")
            continue
        s, v = r["sender"], r["receiver"]
        out.append(
            f"| {r['label']} | {r['channels']} | {r['image_mib']} | {r['transfer_s']:.3f} | "
            f"{r['wall_s']:.2f} | {r['ram_gb_s']:.2f} | {r['wire_bytes'] / 2**20:.1f} | "
            f"{r['ratio']:.2f} | {s['cpu_s']:.2f} | {v['cpu_s']:.2f} | "
            f"{s['maxrss_kib'] / 1024:.0f} / {v['maxrss_kib'] / 1024:.0f} | "
            f"{s['rss_anon_peak_kib'] / 1024:.0f} / {v['rss_anon_peak_kib'] / 1024:.0f} |")
    return out


def render(res: dict[str, Any]) -> str:
    h = res["host"]
    lines = [f"Run {res['started']}, {res['seconds']:.0f} s, {h['cpus']} CPUs, kernel "
             f"{h['kernel']}, Python {h['python']}; load average {h['loadavg_start'][0]:.2f} "
             f"at the start and {h['loadavg_end'][0]:.2f} at the end.", "",
             "```", " ".join(res["command"]), "```", ""]
    lim = res["limits"]
    sl = lim["socket_loopback"]
    lines += ["### Physical limits (same run)", "", "| limit | GB/s |", "|---|--:|"]
    for c in sorted(sl, key=int):
        lines.append(f"| bare sockets over loopback, {c} connection(s), non-zero bytes "
                     f"(RAM-equivalent) | {_gb(sl[c]['bytes_per_s'])} "
                     f"({_gb(sl[c]['ram_bytes_per_s'])}) |")
    lines += [f"| memory copy (numpy, touched buffers) | {_gb(lim['memcopy_bytes_per_s'])} |",
              f"| first-touch copy into fresh anonymous memory | "
              f"{_gb(lim['first_touch_anon_bytes_per_s'])} |",
              f"| first-touch copy into a sparse file's mmap | "
              f"{_gb(lim['first_touch_file_bytes_per_s'])} |",
              f"| zero-page scan, one core | {_gb(lim['zero_scan_bytes_per_s'])} |", "",
              f"pluggy dispatch: {lim['dispatch_us']['pluggy_us']:.2f} us per packet "
              f"(direct call {lim['dispatch_us']['direct_us']:.2f} us).", ""]
    st = res["startup"]
    lines += ["### Our sender -> our receiver (separate processes, loopback)", "",
              f"CPU seconds include about {st['cpu_s']:.2f} s of interpreter start-up and "
              f"plugin loading per side (a `multifd methods` process: "
              f"{st['maxrss_kib'] / 1024:.0f} MiB maxrss).", ""]
    if res.get("slow_note"):
        lines += [res["slow_note"] + ".", ""]
    lines += _runs_table(res["runs"]) + [""]
    rss = res.get("rss") or {}
    if rss.get("runs"):
        a, b = rss["sizes_mib"]
        lines += [f"### Peak memory against image size (none, 2 channels, {a} and {b} MiB)", ""]
        lines += _runs_table(rss["runs"]) + [""]
        if "sender_maxrss_kib_ratio" in rss:
            lines += [f"Ratio {b}/{a} MiB: sender ru_maxrss {rss['sender_maxrss_kib_ratio']}, "
                      f"RssAnon {rss['sender_rss_anon_peak_kib_ratio']}; receiver ru_maxrss "
                      f"{rss['receiver_maxrss_kib_ratio']}, RssAnon "
                      f"{rss['receiver_rss_anon_peak_kib_ratio']}. Anonymous memory within "
                      f"10%: {'yes' if rss['anon_within_10pct'] else 'no'}.", ""]
    links = res.get("links") or {}
    if links.get("skipped"):
        lines += [f"### Rate-limited links: skipped ({links['skipped']})", ""]
    for e in links.get("links", []):
        a = e["auto"]
        lines += [f"### Link {e['rate']} (tbf between two namespaces, {links['channels']} "
                  f"channels, {links['image_mib']} MiB image)", "",
                  f"Bare sockets: {e['probe']['bytes_per_s'] / 1e6:.0f} MB/s.", ""]
        lines += _runs_table(e["runs"]) + [""]
        lines += [f"`auto` picks **{a['choice']}**; fastest measured: "
                  f"**{a.get('fastest_measured')}** ({a.get('fastest_measured_s')} s); "
                  f"auto's pick measured {a.get('choice_measured_s')} s (regret "
                  f"{a.get('regret')}). Predictions: " + ", ".join(
                      f"{c['label']} {c['predicted_s']:.2f} s ({c['bound']}-bound)"
                      for c in a["candidates"]) + ".", ""]
    q = res.get("qemu") or {}
    if q.get("rows"):
        lines += [f"### QEMU ({q['guest']})", "", q["times"] + ".", "",
                  "| method | ch | QEMU->QEMU ms | QEMU->our capture ms |", "|---|--:|--:|--:|"]
        for r in q["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | | {r['error']} | |")
                continue
            qq, qc = r["qemu_to_qemu"], r["qemu_to_capture"]
            lines.append(f"| {r['method']} | {r['channels']} | "
                         f"{qq.get('total_ms', qq.get('error'))} | "
                         f"{qc.get('total_ms', qc.get('error'))} |")
        lines.append("")
    elif q.get("skipped"):
        lines += [f"### QEMU rows: skipped ({q['skipped']})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))

"""``--compression auto``: predict each method's migration time from a sample, pick the fastest.

``predict_best`` takes ``packets`` packets spread evenly over the blocks, splits off the zero
pages (which never reach a method), encodes and decodes the normal pages with every candidate
through its own hooks on one core, and predicts the whole migration's time as the slowest of

* the link:      wire bytes (headers + normal bytes / ratio) / link rate,
* the sender:    (zero scan of all RAM + compression of the normal bytes) / parallel channels,
* the receiver:  decompression of the normal bytes / parallel channels,

where the parallel channels are ``min(channels, cores)`` (``cores`` may be a fraction on a
shared machine): the stages overlap (channels stream),
so the slowest one sets the pace. The link rate comes from the session's PROBE exchange on
its main connection (``session.send.probe_link``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from multifd_core.engine.harness import MethodHarness
from multifd_core.engine.ram import RamBlock
from multifd_core.errors import MultiFDError
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.registry import MethodRegistry
from multifd_core.session.cpus import usable_cpus
from multifd_core.wire import page_count, ram_packet_len
from multifd_core.wire.pages import zero_mask

#: The default sample: 64 packets of 128 pages (32 MiB with 4 KiB pages).
SAMPLE_PACKETS = 64
#: Predictions this close (a fraction) to the best one count as a tie.
TIE = 0.03


@dataclass(frozen=True)
class Candidate:
    """A method to consider, with the level and sender engine it would run with."""

    method: str
    level: int | None = None
    engine: str | None = None

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.level is not None:
            parts.append(str(self.level))
        if self.engine is not None:
            parts.append(self.engine)
        return ":".join(parts)


@dataclass
class Prediction:
    """A candidate's sampled speeds and predicted migration time (bytes per second per core)."""

    label: str
    method: str
    level: int | None
    engine: str | None
    ratio: float
    compress_bytes_per_s: float
    decompress_bytes_per_s: float
    wire_bytes: int
    link_s: float
    sender_s: float
    receiver_s: float
    predicted_s: float
    bound: str

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 4)
        return out


@dataclass
class Sample:
    """Normal pages of the sampled packets, and what the sample says about all the RAM."""

    packets: list[np.ndarray]  # (n_normal, page_size) uint8 per sampled packet
    sampled_pages: int
    normal_fraction: float
    ram_bytes: int
    page_size: int
    zero_scan_bytes_per_s: float


def take_sample(blocks: Sequence[RamBlock], packets: int = SAMPLE_PACKETS) -> Sample:
    """``packets`` packets' worth of pages at evenly spread places over all ``blocks``."""
    if not blocks:
        raise MultiFDError("auto: nothing to sample: no ramblocks")
    page_size = blocks[0].page_size
    per_packet = page_count(page_size)
    total_pages = sum(b.n_pages for b in blocks)
    starts = np.unique(np.linspace(0, max(total_pages - per_packet, 0), max(packets, 1))
                       .astype(np.int64)).tolist()
    bounds = np.cumsum([0] + [b.n_pages for b in blocks]).tolist()
    chunks = []
    for start in starts:
        i = int(np.searchsorted(bounds, start, side="right")) - 1
        first = start - bounds[i]
        chunks.append(blocks[i].pages[first : min(first + per_packet, blocks[i].n_pages)])
    pages = np.concatenate(chunks)  # a copy: faults the sampled pages in before timing
    words = pages.view(np.uint64)
    scan_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        zmask = zero_mask(words)
        scan_s = min(scan_s, time.perf_counter() - t0)
    edges = np.cumsum([0] + [len(c) for c in chunks]).tolist()
    out = [pages[a:b][~zmask[a:b]] for a, b in zip(edges, edges[1:], strict=False)]
    out = [p for p in out if len(p)]
    sampled, normal = len(pages), int((~zmask).sum())
    return Sample(out, sampled, normal / sampled if sampled else 0.0,
                  sum(b.used_length for b in blocks), page_size,
                  sampled * page_size / scan_s if scan_s > 0 else float("inf"))


def measure(sample: Sample, registry: MethodRegistry, candidate: Candidate,
            passes: int = 2) -> tuple[float, float, float]:
    """(ratio, compress and decompress bytes per second of normal pages) on one core, the
    best of ``passes`` (each sets a channel up afresh, as a session does once)."""
    method = registry.create(candidate.method, MethodOptions(
        page_size=sample.page_size, level=candidate.level, engine=candidate.engine))
    raw = sum(p.nbytes for p in sample.packets)
    if not raw:
        return 1.0, float("inf"), float("inf")
    enc = dec = float("inf")
    for _ in range(passes):  # the best pass: other jobs on the machine only ever slow it
        with MethodHarness(method) as harness:
            t0 = time.perf_counter()
            payloads = [harness.encode(p) for p in sample.packets]
            t1 = time.perf_counter()
            for payload, pages in zip(payloads, sample.packets, strict=True):
                harness.decode(payload, len(pages))
            t2 = time.perf_counter()
        enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
    wire = sum(len(p) for p in payloads)
    ratio = raw / wire if wire else float("inf")
    return ratio, raw / max(enc, 1e-9), raw / max(dec, 1e-9)


def predict(sample: Sample, candidate: Candidate, ratio: float, comp: float, decomp: float, *,
            channels: int, link_bytes_per_s: float, cores: float,
            socket_bytes_per_s: float | None = None) -> Prediction:
    """The predicted migration time of all the RAM the sample stands for.

    ``socket_bytes_per_s``: what moving one wire byte through a socket costs each side's CPU
    (e.g. a bare loopback socket's rate); None leaves it out."""
    normal_bytes = sample.ram_bytes * sample.normal_fraction
    n_packets = -(-sample.ram_bytes // (page_count(sample.page_size) * sample.page_size))
    wire = int(n_packets * ram_packet_len(sample.page_size) + normal_bytes / ratio)
    parallel = max(min(float(channels), cores), 1e-3)
    link_s = wire / link_bytes_per_s if link_bytes_per_s > 0 else 0.0
    sender_s = (sample.ram_bytes / sample.zero_scan_bytes_per_s + normal_bytes / comp) / parallel
    receiver_s = normal_bytes / decomp / parallel
    if socket_bytes_per_s:
        sender_s += wire / socket_bytes_per_s / parallel
        receiver_s += wire / socket_bytes_per_s / parallel
    stages = {"link": link_s, "sender": sender_s, "receiver": receiver_s}
    bound = max(stages, key=lambda k: stages[k])
    return Prediction(candidate.label, candidate.method, candidate.level, candidate.engine,
                      ratio, comp, decomp, wire, link_s, sender_s, receiver_s, stages[bound],
                      bound)


def _dominated_by_none(rows: Sequence[Prediction]) -> set[str]:
    """Candidates that do not shrink the data (ratio within 1% of ``none``'s): they put the
    same bytes on the wire for more work, so ``none`` beats them whatever the link; only
    sampling noise could make them look faster."""
    none = next((r for r in rows if r.method == "none"), None)
    if none is None:
        return set()
    return {r.label for r in rows if r is not none and r.ratio <= none.ratio * 1.01}


def default_candidates(registry: MethodRegistry) -> list[Candidate]:
    """Every method that can run here, at its default level and engine."""
    return [Candidate(e.name) for e in registry.entries() if e.cls.available()[0]]


def predict_best(blocks: Sequence[RamBlock], registry: MethodRegistry, channels: int,
                  link_bytes_per_s: float, *, candidates: Sequence[Candidate] | None = None,
                  packets: int = SAMPLE_PACKETS, cores: float | None = None,
                  socket_bytes_per_s: float | None = None,
                  tie: float = TIE) -> tuple[str, dict[str, Any]]:
    """The method predicted to migrate ``blocks`` fastest over a link of
    ``link_bytes_per_s`` with ``channels`` channels, and the report behind the choice
    (``report["choice"]`` is the winning candidate's label, with its level and engine).

    Predictions within ``tie`` (a fraction) of the best are a tie, won by the earliest
    candidate (registry order: ``none`` first), so sampling noise does not flip the choice;
    candidates that do not compress are never preferred to ``none``. ``cores``: the cores
    each endpoint can use (default: those this process may use, ``cpus.usable_cpus``: its
    affinity mask capped by a cgroup quota; a fraction when shared)."""
    started = time.perf_counter()
    cores = cores or usable_cpus()
    sample = take_sample(blocks, packets)
    rows: list[Prediction] = []
    skipped: dict[str, str] = {}
    for cand in candidates if candidates is not None else default_candidates(registry):
        try:
            ratio, comp, decomp = measure(sample, registry, cand)
        except MultiFDError as exc:
            skipped[cand.label] = str(exc)
            continue
        rows.append(predict(sample, cand, ratio, comp, decomp, channels=channels,
                            link_bytes_per_s=link_bytes_per_s, cores=cores,
                            socket_bytes_per_s=socket_bytes_per_s))
    if not rows:
        raise MultiFDError(f"auto: no method could be measured: {skipped}")
    dominated = _dominated_by_none(rows)
    eligible = [r for r in rows if r.label not in dominated]
    fastest = min(r.predicted_s for r in eligible)
    best = next(r for r in eligible if r.predicted_s <= fastest * (1 + tie))
    report = {
        "choice": best.label, "method": best.method, "level": best.level,
        "engine": best.engine, "channels": channels, "cores": cores,
        "link_bytes_per_s": link_bytes_per_s, "socket_bytes_per_s": socket_bytes_per_s,
        "sample": {"packets": len(sample.packets), "pages": sample.sampled_pages,
                   "normal_fraction": round(sample.normal_fraction, 4),
                   "zero_scan_bytes_per_s": round(sample.zero_scan_bytes_per_s)},
        "candidates": [r.as_dict() for r in sorted(rows, key=lambda r: r.predicted_s)],
        "dominated": sorted(dominated),
        "skipped": skipped, "seconds": round(time.perf_counter() - started, 3),
    }
    return best.method, report

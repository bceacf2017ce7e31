"""What an O_DIRECT expert read and an expert's decode steps cost each other on the same cores.

    python benchmarks/read_under_decode.py --bundle DIR --expert A --read B,C,D [--rounds 3] [--huge-pages]

The serving bench reports its disk reads' rate while reading (bytes over the summed seconds of
each read). A read that prefetch issues runs beside the decode steps; one that a miss issues runs
while the engine waits. This times the server's own reader (`tiers.disk.DiskReader`, its default
threads and chunks, O_DIRECT, into a `HostArena`) on the blobs of `--read`, and `--expert`'s
one-row decode steps (`--path`, torch's intra-op threads on every core), each alone and both at
once, in rounds. Prints one JSON object: read GB/s and decode ms per step, alone and together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from wallbreak.coe import cores
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine import aot
from wallbreak.coe.engine.kv import KVCache
from wallbreak.coe.engine.step import forward, run_step
from wallbreak.coe.tiers.device import load_standalone
from wallbreak.coe.tiers.disk import DiskReader
from wallbreak.coe.tiers.host import HostArena


class Decoder:
    """One expert's one-row decode steps on a thread, each timed, until stopped."""

    def __init__(self, bundle: Bundle, expert: str, compiled: bool) -> None:
        torch.set_grad_enabled(False)
        self.model = load_standalone(bundle, expert)
        key = bundle.expert(expert).layout_key
        self.step = aot.AotStep(aot.package_path(key)) if compiled else None
        self.cache = self._fresh()
        self.ids = torch.ones(1, 1, dtype=torch.long)
        self.times: list[float] = []

    def _fresh(self) -> KVCache:
        cache = KVCache.for_model(self.model)
        cache.open_rows(1)
        forward(self.model, torch.ones(1, 128, dtype=torch.long), cache)
        return cache

    def serve(self, go: threading.Event, done: threading.Event) -> None:
        """One long-lived thread, as the engine's: decodes into `self.times` while `go` is set."""
        torch.set_grad_enabled(False)
        cores.take_all_cores()  # as the engine thread does, in a process kept to one core
        while not done.is_set():
            if not go.wait(0.05):
                continue
            t0 = time.perf_counter()
            if self.step is not None:
                self.step(self.model, self.ids, self.cache)
            else:
                run_step(self.model, self.ids, self.cache, None)
            self.times.append(time.perf_counter() - t0)
            if self.cache.get_seq_length() > 400:  # keep the context from growing without bound
                self.cache = self._fresh()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True, help="the expert that decodes")
    p.add_argument("--read", required=True, help="experts whose blobs are read, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--path", choices=("eager", "compiled"), default="compiled",
                   help="the decode step (compiled: its package must be built)")  # fmt: skip
    p.add_argument(
        "--huge-pages", action="store_true", help="read into an arena on huge pages, as serve does"
    )
    a = p.parse_args()
    cores.keep_to_one_core()  # as `serve` does: only the decoding thread runs an OpenMP team
    bundle = Bundle.open(a.bundle)
    names = a.read.split(",")
    size = max(bundle.expert(n).total_bytes for n in names)
    arena = HostArena(size + (1 << 21), huge_pages=a.huge_pages)
    ext = arena.alloc(size)
    assert ext is not None
    reader = DiskReader(direct="on")
    dec = Decoder(bundle, a.expert, a.path == "compiled")
    reads: dict[str, list[float]] = {"alone": [], "together": []}
    steps: dict[str, list[float]] = {"alone": [], "together": []}

    def read_all(into: list[float]) -> float:
        t0 = time.perf_counter()
        for n in names:
            res = reader.read(bundle.blob_path(n), arena.memoryview(ext)[: bundle.expert(n).total_bytes])
            into.append(res.nbytes / res.seconds / 1e9)
        return time.perf_counter() - t0

    go, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=dec.serve, args=(go, done))
    thread.start()
    for _ in range(a.rounds):
        span = read_all(reads["alone"])
        for mode in ("alone", "together"):
            dec.times = steps[mode]
            go.set()
            if mode == "together":
                read_all(reads["together"])
            else:
                time.sleep(span)  # as long as the reads took alone
            go.clear()
            time.sleep(0.1)  # the step under way ends
    done.set()
    thread.join()
    reader.close()
    print(
        json.dumps(
            {
                "decode": a.path,
                "huge_pages": arena.huge_pages,
                "reader_threads": reader.threads,
                "read_gbps": {k: round(statistics.median(v), 3) for k, v in reads.items()},
                "decode_ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in steps.items()},
                "decode_steps": {k: len(v) for k, v in steps.items()},
                "reads": {k: [round(x, 3) for x in v] for k, v in reads.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`wallbreak bench switch`: how fast an expert becomes ready, against simple baselines and the
machine's own ceilings, measured in one run.

A switch ends when the model has finished its first forward pass on a short input. Lazy loaders
(safetensors mmap, transformers 5) return early and pay on first use, so every `*_s` figure is the
time to that first forward minus the same forward on a model already loaded. Contenders are
interleaved and repeated; medians are reported.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from wallbreak.coe.bundle.manifest import Bundle, ExpertEntry, iter_blob_tensors
from wallbreak.coe.tiers import Lease, TierConfig, TierManager
from wallbreak.coe.tiers.device import build_skeleton
from wallbreak.coe.tiers.disk import drop_file_cache, resident_fraction
from wallbreak.coe.tiers.host import HostArena
from wallbreak.errors import ConfigError
from wallbreak.progress import progress, say

Cache = Literal["warm", "cold"]
INPUT = torch.tensor([[1, 2, 3, 4]])  # a short prompt: 4 token ids valid in every vocabulary


@dataclass(kw_only=True)
class BenchSwitchArgs:
    bundle: Path
    experts: list[str] | None = None
    cache: str = "both"
    repeats: int = 5
    device: str = "cpu"
    reader_threads: int = 4

    def __post_init__(self) -> None:
        if self.cache not in ("warm", "cold", "both"):
            raise ConfigError(f"--cache must be warm, cold or both, got {self.cache!r}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {self.repeats}")


def _forward(model: nn.Module, device: torch.device) -> None:
    with torch.inference_mode():
        model(INPUT.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Ceilings


def memcpy_gbps(nbytes: int) -> float:
    """Best large host copy rate: torch's (multi-threaded) copy and numpy's, best of several."""
    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.zeros(nbytes, dtype=torch.uint8)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(5))
    na, nb = a.numpy(), b.numpy()
    best = min(best, *(_timed(lambda: np.copyto(nb, na)) for _ in range(3)))
    return nbytes / best / 1e9


def h2d_pinned_gbps(nbytes: int, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    arena = HostArena(nbytes, pin=True)
    dst = torch.empty(arena.budget, dtype=torch.uint8, device=device)
    try:
        times = []
        for _ in range(5):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(arena.buffer, non_blocking=True)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return arena.budget / min(times) / 1e9
    finally:
        arena.close()


def sequential_read_gbps(path: Path, cold: bool) -> tuple[float, bool]:
    """One thread reading the file start to end in 16 MiB blocks, buffered and O_DIRECT; the
    better of the two is the ceiling. Returns (GB/s, whether the reads really were cold)."""
    really_cold = cold
    best = 0.0
    for flags in (os.O_RDONLY, os.O_RDONLY | getattr(os, "O_DIRECT", 0)):
        if cold:
            really_cold = drop_file_cache(path) and really_cold
        try:
            best = max(best, _read_once(path, flags)[0])
        except OSError:
            continue
    return best, really_cold


def o_direct_read_gbps(path: Path) -> float:
    """The disk's O_DIRECT read rate on `path`: one thread, 16 MiB blocks, the page cache
    bypassed (what every miss of a server with --direct-io on reads at best)."""
    rate, _ = _read_once(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    return rate


def _read_once(path: Path, flags: int) -> tuple[float, int]:
    """(GB/s, bytes) reading `path` start to end once with `flags`."""
    size = path.stat().st_size
    buf = HostArena(max(size, 1 << 20), pin=False)
    mv = memoryview(buf._mm)
    fd = os.open(path, flags)
    try:
        t0 = time.perf_counter()
        pos = 0
        while pos < size:
            got = os.preadv(fd, [mv[pos : pos + (16 << 20)]], pos)
            if got <= 0:
                break
            pos += got
        return pos / (time.perf_counter() - t0) / 1e9, pos
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Baselines


def export_hf_folder(bundle: Bundle, entry: ExpertEntry, out: Path) -> Path:
    """Write the expert as a plain HF folder (config.json + model.safetensors) for the baselines."""
    from safetensors.torch import save_file  # deferred: loads safetensors
    from transformers import AutoConfig  # deferred: loads transformers

    cfg = dict(entry.config)
    cfg.pop("model_type", None)
    AutoConfig.for_model(entry.model_type, **cfg).save_pretrained(str(out))
    raw = np.fromfile(bundle.blob_path(entry.name), dtype=np.uint8)
    buf = torch.from_numpy(raw)
    sd = {name: t.clone() for name, t in iter_blob_tensors(buf, entry)}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _net_ready(load: Callable[[], nn.Module], device: torch.device, warm: list[float]) -> float:
    """Seconds from nothing to a finished first forward, net of compute: the same forward, run
    again right after on the now-loaded model, is subtracted (paired, so noise mostly cancels)."""
    t0 = time.perf_counter()
    model = load()
    _forward(model, device)
    first = time.perf_counter() - t0
    second = _timed(lambda: _forward(model, device))
    warm.append(second)
    return first - second


def _load_state_dict_into(folder: Path, model: nn.Module, device: torch.device) -> nn.Module:
    from safetensors.torch import load_file  # deferred: loads safetensors

    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)), strict=False)
    return model


def _from_pretrained(folder: Path, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM  # deferred: loads transformers

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", device_map=str(device)).eval()


class _Held:
    """Keeps a lease open while its model runs the paired forwards, then lets it go."""

    def __init__(self, mgr: TierManager, name: str) -> None:
        self.mgr, self.name = mgr, name
        self.lease: Lease | None = None

    def __call__(self) -> nn.Module:
        self.lease = self.mgr.acquire(self.name)
        return self.lease.model

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def _ours(
    mgr: TierManager, name: str, device: torch.device, warm: list[float], tier: str
) -> tuple[float, Any]:
    """Net seconds to ready with the expert evicted from `tier` first, and the load's record."""
    if tier == "device" and not mgr.where(name)["host"]:
        mgr.acquire(name).release()
    mgr.evict(name, "all" if tier == "host" else "device")
    held = _Held(mgr, name)
    try:
        net = _net_ready(held, device, warm)
    finally:
        held.release()
    return net, mgr.stats.recent[-1]


# ----------------------------------------------------------------------------------------------


def run_bench_switch(args: BenchSwitchArgs) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bundle = Bundle.open(args.bundle)
    names = args.experts or bundle.names[:2]
    device = torch.device(args.device)
    entries = [bundle.expert(n) for n in names]
    biggest = max(e.total_bytes for e in entries)
    conditions: list[Cache] = ["warm", "cold"] if args.cache == "both" else [args.cache]  # type: ignore[list-item]
    if "cold" in conditions and not drop_file_cache(bundle.blob_path(names[0])):
        say("note: the page cache cannot be dropped here; cold figures are skipped")
        conditions = [c for c in conditions if c != "cold"]
        if not conditions:
            conditions = ["warm"]

    cold_ok = "cold" in conditions
    disk_gbps, disk_cold = sequential_read_gbps(bundle.blob_path(names[0]), cold=cold_ok)
    ceilings = {
        "disk_read_gbps": round(disk_gbps, 3),
        "disk_read_cold": disk_cold,
        "memcpy_gbps": round(memcpy_gbps(biggest), 3),
        "h2d_pinned_gbps": None if (g := h2d_pinned_gbps(biggest, device)) is None else round(g, 3),
    }

    config = TierConfig(
        host_budget=sum(e.total_bytes for e in entries) + (1 << 20),
        device_budget=sum(e.total_bytes for e in entries) + (1 << 20),
        device=args.device,
        max_slots=len(entries),
        reader_threads=args.reader_threads,
    )
    results = []
    # On CPU the default device tier aliases the host arena; a copying manager runs beside it so
    # the report also shows what one flat copy per switch costs.
    copy_mgr = TierManager(bundle, replace(config, alias_slots=False), names) if config.alias else None
    with (
        tempfile.TemporaryDirectory(prefix=".bench-", dir=bundle.root) as tmp,
        TierManager(bundle, config, names) as mgr,
    ):
        steps = len(entries) * len(conditions) * args.repeats * (4 + (copy_mgr is not None))
        bar = progress(steps, "bench switch", "run", leave=False)
        for entry in entries:
            folder = export_hf_folder(bundle, entry, Path(tmp) / entry.name)
            prebuilt = build_skeleton(entry, device)
            _forward(_load_state_dict_into(folder, prebuilt, device), device)  # first-call overheads out
            for cache in conditions:
                samples: dict[str, list[float]] = {
                    k: [] for k in ("d2h", "h2d", "d2r", "h2r", "lsd", "fp", "h2d_copy", "h2r_copy", "warm")
                }

                def prepare(path: Path, cache: Cache = cache) -> None:
                    if cache == "cold":
                        drop_file_cache(path)
                    elif resident_fraction(path) < 0.99:
                        path.read_bytes()

                def ours_disk(entry: ExpertEntry = entry, samples: dict[str, list[float]] = samples) -> None:
                    mgr.evict(entry.name)
                    prepare(bundle.blob_path(entry.name))
                    net, rec = _ours(mgr, entry.name, device, samples["warm"], "host")
                    samples["d2h"].append(rec.disk_to_host_s or 0.0)
                    samples["d2r"].append(net)

                def ours_host(entry: ExpertEntry = entry, samples: dict[str, list[float]] = samples) -> None:
                    net, rec = _ours(mgr, entry.name, device, samples["warm"], "device")
                    samples["h2r"].append(net)
                    samples["h2d"].append(rec.host_to_device_s)

                def ours_copy(entry: ExpertEntry = entry, samples: dict[str, list[float]] = samples) -> None:
                    assert copy_mgr is not None
                    net, rec = _ours(copy_mgr, entry.name, device, samples["warm"], "device")
                    samples["h2r_copy"].append(net)
                    samples["h2d_copy"].append(rec.host_to_device_s)

                def lsd(folder: Path = folder, m: nn.Module = prebuilt, samples: dict = samples) -> None:
                    prepare(folder / "model.safetensors")
                    samples["lsd"].append(
                        _net_ready(lambda: _load_state_dict_into(folder, m, device), device, samples["warm"])
                    )

                def fp(folder: Path = folder, samples: dict = samples) -> None:
                    prepare(folder / "model.safetensors")
                    samples["fp"].append(
                        _net_ready(lambda: _from_pretrained(folder, device), device, samples["warm"])
                    )

                contenders: list[Callable[[], None]] = [ours_disk, ours_host, lsd, fp]
                if copy_mgr is not None:
                    contenders.append(ours_copy)
                k = len(contenders)
                for r in range(args.repeats):
                    for c in contenders[r % k :] + contenders[: r % k]:  # rotate the order each repeat
                        c()
                        bar.update(1)
                med = {k: statistics.median(v) for k, v in samples.items() if v}
                results.append(
                    {
                        "expert": entry.name,
                        "bytes": entry.total_bytes,
                        "cache": cache,
                        "forward_s": round(med["warm"], 5),
                        "ours": {
                            "disk_to_host_s": round(med["d2h"], 5),
                            "host_to_device_s": round(med["h2d"], 5),
                            "disk_to_ready_s": round(med["d2r"], 5),
                            "host_to_ready_s": round(med["h2r"], 5),
                        },
                        "load_state_dict_s": round(med["lsd"], 5),
                        "from_pretrained_s": round(med["fp"], 5),
                        "device_tier": "alias" if config.alias else "copy",
                    }
                )
                if copy_mgr is not None:
                    results[-1]["ours_copy"] = {
                        "host_to_device_s": round(med["h2d_copy"], 5),
                        "host_to_ready_s": round(med["h2r_copy"], 5),
                    }
            del prebuilt
        bar.close()
    if copy_mgr is not None:
        copy_mgr.close()
    out = {
        "ceilings": ceilings,
        "results": results,
        "device": str(device),
        "repeats": args.repeats,
        "reader_threads": args.reader_threads,
    }
    out["checks"] = _checks(out)
    return out


def _host_to_ready(mgr: TierManager, name: str, device: torch.device) -> float:
    """Seconds from 'in the host arena, not on the device' to a finished first forward."""
    if not mgr.where(name)["host"]:
        mgr.acquire(name).release()
    mgr.evict(name, "device")
    return _timed(lambda: _acquire_forward(mgr, name, device))


def _acquire_forward(mgr: TierManager, name: str, device: torch.device) -> None:
    with mgr.acquire(name) as lease:
        _forward(lease.model, device)


def _checks(out: dict[str, Any]) -> dict[str, Any]:
    """The switch targets as ratios (ours against the baselines and ceilings), so a reader sees at once
    which hold on the machine measured."""
    ceil = out["ceilings"]
    ref_copy = ceil["h2d_pinned_gbps"] or ceil["memcpy_gbps"]
    checks: dict[str, Any] = {}
    for r in out["results"]:
        key = f"{r['expert']}/{r['cache']}"
        o = r["ours"]
        copied = r.get("ours_copy", o)  # alias slots move no bytes: judge the copying path's rate
        c: dict[str, Any] = {
            "h2d_vs_copy_ceiling": round(
                r["bytes"] / max(copied["host_to_device_s"], 1e-9) / 1e9 / ref_copy, 3
            )
        }
        if r["cache"] == "warm":
            # Net-of-compute differences can dip below the switch work itself by noise; never
            # credit ours with less than the re-pointing or copy it measurably did.
            h2r = max(o["host_to_ready_s"], o["host_to_device_s"], 1e-6)
            c["from_pretrained_over_host_to_ready"] = round(r["from_pretrained_s"] / h2r, 2)
            c["load_state_dict_over_host_to_ready"] = round(r["load_state_dict_s"] / h2r, 2)
        else:
            d2h_gbps = r["bytes"] / max(o["disk_to_host_s"], 1e-9) / 1e9
            c["d2h_vs_disk_ceiling"] = round(d2h_gbps / max(ceil["disk_read_gbps"], 1e-9), 3)
            d2r = max(o["disk_to_ready_s"], o["disk_to_host_s"], 1e-6)
            c["from_pretrained_over_disk_to_ready"] = round(r["from_pretrained_s"] / d2r, 2)
        checks[key] = c
    return checks


def format_bench_switch(out: dict[str, Any]) -> str:
    c = out["ceilings"]
    lines = [
        f"ceilings: disk read {c['disk_read_gbps']:.2f} GB/s ({'cold' if c['disk_read_cold'] else 'warm'}), "
        f"memcpy {c['memcpy_gbps']:.2f} GB/s"
        + (f", pinned H2D {c['h2d_pinned_gbps']:.2f} GB/s" if c["h2d_pinned_gbps"] else ""),
        f"{'expert':<24}{'cache':<6}{'MB':>8}{'d->h':>9}{'h->d':>9}{'d->ready':>10}{'h->ready':>10}"
        f"{'load_sd':>9}{'from_pre':>10}{'fwd':>8}",
    ]
    for r in out["results"]:
        o = r["ours"]
        lines.append(
            f"{r['expert']:<24}{r['cache']:<6}{r['bytes'] / 1e6:>8.1f}{o['disk_to_host_s']:>9.4f}"
            f"{o['host_to_device_s']:>9.4f}{o['disk_to_ready_s']:>10.4f}{o['host_to_ready_s']:>10.4f}"
            f"{r['load_state_dict_s']:>9.4f}{r['from_pretrained_s']:>10.4f}{r['forward_s']:>8.4f}"
        )
    for r in out["results"]:
        if "ours_copy" in r:
            oc = r["ours_copy"]
            lines.append(
                f"{r['expert']:<24}{r['cache']:<6} copying slots: h->d {oc['host_to_device_s']:.4f} "
                f"({r['bytes'] / max(oc['host_to_device_s'], 1e-9) / 1e9:.2f} GB/s), "
                f"h->ready {oc['host_to_ready_s']:.4f}"
            )
    lines.append("(seconds, medians; every *_s is net of the first forward's compute)")
    lines.append("checks: " + json.dumps(out["checks"]))
    return "\n".join(lines)

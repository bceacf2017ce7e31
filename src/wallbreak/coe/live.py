"""The served bundle while it changes: experts added, replaced and removed without a restart.

One owner applies every change, whoever wrote it (the admin API, or `wallbreak bundle import` in
another process): `sync` reads the manifest, which a writer only ever replaces whole by rename,
and compares it with what is served. The writer bumps the manifest's generation at every commit;
a watcher thread checks the file cheaply (one stat) and syncs when it changed.

- Added: the serving side makes the expert servable under a new version key, and only then does
  the catalog point its name at it.
- Replaced: the same, under a fresh key (`name@N`); requests already bound to the old key finish
  on the old weights, new requests bind to the new key. Pins and keep-alive carry over.
- Removed: the name leaves the catalog (new requests get 404); in-flight ones finish.
A version that has left the catalog is retired once it has no work (`reap`).

Where the weights live is the serving side's business, behind one seam (`Side`): `LocalSide`
here (this process's engine and tiers, blobs read through a file the server holds open, so the
writer's delete of a replaced blob cannot break an in-flight old version), and the Ray ingress's
side over its replicas (`coe/replicas/fleet.py`). A version is the same across processes: its
name and its blob's file name, which the writer makes fresh at every write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from wallbreak.coe.bundle.manifest import MANIFEST, Bundle, ExpertEntry
from wallbreak.coe.bundle.writer import BundleWriter
from wallbreak.coe.catalog import Catalog
from wallbreak.coe.engine import Engine
from wallbreak.coe.router import Router
from wallbreak.coe.router.incremental import forget_expert
from wallbreak.coe.tiers import TierManager
from wallbreak.coe.tokenization import ExpertTokenizer
from wallbreak.errors import CapacityError, ConfigError, WallbreakError, first_line

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the watcher stats the manifest
GRACE_S = 2.0  # a version is retired no sooner than this after it left the catalog (late binders)


class UnknownExpert(WallbreakError):
    """No expert of that name is served (HTTP 404)."""


@dataclass
class Version:
    key: str
    name: str
    entry: ExpertEntry  # as the manifest has it (entry.name is the public name)
    retiring_since: float | None = None


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    router: bool = False
    failed: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.replaced or self.removed or self.router or self.failed)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Side(Protocol):
    """Where the weights of each version live, and the operator's residency asks about them."""

    def adopt(self, bundle: Bundle, v: Version) -> None:
        """A version served since start."""

    def start(self, bundle: Bundle, v: Version) -> None:
        """Make a new version servable under `v.key`; raises WallbreakError or OSError."""

    def carry_over(self, old: Version, new: Version) -> None: ...

    def retire(self, v: Version) -> bool:
        """Free a version that left the catalog; False while it still has work."""

    def before_sync(self) -> dict[str, str]:
        """Before a sync's changes reach the catalog; what failed there, by expert."""

    def describe(self, v: Version) -> dict[str, Any]: ...

    def pin(self, v: Version, tier: str) -> None: ...

    def unpin(self, v: Version) -> bool: ...

    def load(self, v: Version, tier: str) -> None: ...

    def unload(self, v: Version) -> bool: ...

    def keep_alive(self, v: Version, seconds: float | None) -> None: ...

    def tick(self) -> None:
        """The watcher's periodic work (idle expiry)."""

    def close(self) -> None: ...


def _manifest_stamp(root: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(root / MANIFEST)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class LiveBundle:
    def __init__(
        self,
        bundle: Bundle,
        catalog: Catalog,
        side: Side,
        poll_s: float = POLL_S,
        routes: bool = True,
    ) -> None:
        """`routes`: keep the catalog's router up to date (a Ray replica does not route)."""
        self.root = bundle.root
        self.catalog, self.side = catalog, side
        self.poll_s, self.routes = poll_s, routes
        self.generation = bundle.generation
        self.router_meta = bundle.router
        self._stamp = _manifest_stamp(self.root)
        self._serial = itertools.count(2)
        self._lock = threading.RLock()  # one change at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.versions: dict[str, Version] = {}
        self.listeners: list[Any] = []  # told `on_change(Changes)` (metrics)
        for name in catalog.names:
            v = Version(name, name, bundle.experts[name])
            side.adopt(bundle, v)
            self.versions[name] = v

    @staticmethod
    def local(bundle: Bundle, engine: Engine, tiers: TierManager, catalog: Catalog, **kw: Any) -> LiveBundle:
        """The bundle served by this process's engine and tiers."""
        return LiveBundle(bundle, catalog, LocalSide(engine, tiers), **kw)

    # -- reading --------------------------------------------------------------------------------

    def serving(self, name: str) -> Version | None:
        key = self.catalog.key(name)
        return None if key is None else self.versions.get(key)

    def retiring(self) -> list[str]:
        return [v.key for v in self.versions.values() if v.retiring_since is not None]

    def need(self, name: str) -> Version:
        """The version serving `name`; UnknownExpert when none does."""
        v = self.serving(name)
        if v is None:
            raise UnknownExpert(f"no expert {name!r} is served; experts: {', '.join(self.catalog.names)}")
        return v

    def find(self, name: str, blob: str, sync: bool = True) -> Version | None:
        """The version of `name` whose weights are `blob` (serving or retiring), after one sync
        (`sync`) if this process has not seen it yet; None when it is gone or unknown."""
        for attempt in range(2 if sync else 1):
            if attempt:
                self.sync()
            for v in list(self.versions.values()):  # a copy, taken without waiting on a sync
                if v.name == name and v.entry.blob == blob:
                    return v
        return None

    def describe(self, name: str) -> dict[str, Any]:
        """An expert's state: where its weights are, pins, keep-alive, whether it has work, its
        bytes and form, and which version serves (for /v1/models and the admin API)."""
        v = self.need(name)
        return self.side.describe(v) | {"bytes": v.entry.total_bytes, "form": v.entry.dtype, "version": v.key}

    # -- an operator's residency asks -------------------------------------------------------------

    def pin(self, name: str, tier: str) -> None:
        self.side.pin(self.need(name), tier)

    def unpin(self, name: str) -> bool:
        return self.side.unpin(self.need(name))

    def load(self, name: str, tier: str) -> None:
        if tier not in ("host", "device"):
            raise ConfigError(f"tier must be 'host' or 'device', got {tier!r}")
        self.side.load(self.need(name), tier)

    def unload(self, name: str) -> bool:
        return self.side.unload(self.need(name))

    def keep_alive(self, name: str, seconds: float | None) -> None:
        """None: as the eviction policy decides; negative: always."""
        self.side.keep_alive(self.need(name), seconds)

    def remove(self, name: str) -> Changes:
        """Take `name` out of the bundle (and the router's head), then out of service."""
        self.need(name)
        with BundleWriter(self.root) as w:
            w.remove(name)
            forget_expert(w, name)
        return self.sync()

    # -- the watcher ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="wb-live", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.side.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if _manifest_stamp(self.root) != self._stamp:
                    self.sync()
                self.reap()
                self.side.tick()
            except Exception:  # the watcher must outlive a bad manifest or a failed load
                log.exception("live bundle: applying a change failed")

    # -- changes --------------------------------------------------------------------------------

    def sync(self) -> Changes:
        """Apply the manifest as it is now to what is served; returns what changed."""
        with self._lock:
            stamp = _manifest_stamp(self.root)
            bundle = Bundle.open(self.root, lenient=True)
            changes = Changes(failed=self.side.before_sync())
            current = {v.name: v for v in self.versions.values() if v.retiring_since is None}
            for name, entry in bundle.experts.items():
                old = current.get(name)
                if name in bundle.damaged:
                    if old is None or old.entry.blob != entry.blob:
                        changes.failed[name] = bundle.damaged[name]
                    continue
                if old is not None and old.entry.blob == entry.blob:
                    old.entry = entry  # description or examples may have changed
                    continue
                try:
                    self._serve(bundle, entry, old)
                except (WallbreakError, OSError) as e:
                    changes.failed[name] = first_line(e)
                    log.error("cannot serve expert %s from the changed bundle: %s", name, e)
                    continue
                (changes.added if old is None else changes.replaced).append(name)
            for name, old in current.items():
                if name not in bundle.experts:
                    self.catalog.drop(name)
                    old.retiring_since = time.monotonic()
                    changes.removed.append(name)
            if self.routes and bundle.router != self.router_meta:
                changes.router = self._reload_router(bundle)
            self.generation, self._stamp = bundle.generation, stamp
            if changes:
                log.info("bundle generation %d: %s", self.generation, changes.to_json())
                for listener in self.listeners:
                    listener.on_change(changes)
            return changes

    def _serve(self, bundle: Bundle, entry: ExpertEntry, old: Version | None) -> None:
        """Serve `entry` under a fresh key, then point its name at it (old: the version it replaces)."""
        name = entry.name
        key = name if name not in self.versions else f"{name}@{next(self._serial)}"
        tok = ExpertTokenizer.load(bundle, entry)
        v = Version(key, name, entry)
        self.catalog.tokenizers[key] = tok
        try:
            self.side.start(bundle, v)
        except BaseException:
            self.catalog.tokenizers.pop(key, None)
            raise
        self.versions[key] = v
        if old is not None:
            self.side.carry_over(old, v)
            old.retiring_since = time.monotonic()
        self.catalog.set(name, key)

    def _reload_router(self, bundle: Bundle) -> bool:
        try:
            router = Router.load(bundle, reuse=self.catalog.router)
        except WallbreakError as e:
            log.error("the bundle's new router cannot be loaded (the old one keeps routing): %s", e)
            return False
        self.catalog.router = router
        self.router_meta = bundle.router
        return True

    def reap(self) -> list[str]:
        """Retire the versions that left the catalog and have no work left; returns their keys."""
        out = []
        with self._lock:
            now = time.monotonic()
            for v in list(self.versions.values()):
                if v.retiring_since is None or now - v.retiring_since < GRACE_S:
                    continue
                if not self.side.retire(v):
                    continue
                self.catalog.tokenizers.pop(v.key, None)
                del self.versions[v.key]
                out.append(v.key)
        return out


class LocalSide:
    """This process's engine and tiers hold the weights."""

    def __init__(self, engine: Engine, tiers: TierManager) -> None:
        self.engine, self.tiers = engine, tiers
        self.fds: dict[str, int] = {}  # version key -> its blob, held open while it serves
        # new version key -> (tier, old key): a carried-over pin with no room until the old
        # version (still finishing requests in its slot) retires
        self.deferred: dict[str, tuple[str, str]] = {}

    def adopt(self, bundle: Bundle, v: Version) -> None:
        fd = self._open(bundle.blob_path(v.name))
        if fd is not None:
            self.fds[v.key] = fd
            self.tiers.set_blob_path(v.key, _fd_path(fd))

    def start(self, bundle: Bundle, v: Version) -> None:
        fd = self._open(bundle.blob_path(v.name))
        path = _fd_path(fd) if fd is not None else bundle.blob_path(v.name)
        try:
            self.tiers.add_expert(dataclasses.replace(v.entry, name=v.key), path)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            self.fds[v.key] = fd
        self.engine.add_expert(v.key)

    def carry_over(self, old: Version, new: Version) -> None:
        """A replacement keeps the operator's pin and keep-alive (the old version drops its pin)."""
        rules = self.tiers.rules
        ka = rules.keep_alive.get(old.key)
        if ka is not None:
            self.tiers.set_keep_alive(new.key, ka)
        tier = rules.pins.get(old.key)
        if tier is not None:
            self.tiers.unpin(old.key)
            try:
                self.tiers.pin(new.key, tier)  # type: ignore[arg-type]  # a pin's tier
            except CapacityError:
                self.deferred[new.key] = (tier, old.key)
            except WallbreakError as e:
                log.warning("the new version of %s could not keep its %s pin: %s", new.name, tier, e)

    def retire(self, v: Version) -> bool:
        if self.engine.has_work(v.key) or not self.tiers.remove_expert(v.key):
            return False
        self.engine.forget(v.key)
        fd = self.fds.pop(v.key, None)
        if fd is not None:
            os.close(fd)
        for key, (tier, old) in list(self.deferred.items()):
            if old == v.key:  # its room is free now
                del self.deferred[key]
                try:
                    self.tiers.pin(key, tier)  # type: ignore[arg-type]  # a pin's tier
                except WallbreakError as e:
                    log.warning("expert version %s could not keep its %s pin: %s", key, tier, e)
        return True

    def before_sync(self) -> dict[str, str]:
        return {}

    def describe(self, v: Version) -> dict[str, Any]:
        state = self.tiers.state(v.key)
        if state["pinned"] is None and v.key in self.deferred:
            state["pinned"] = self.deferred[v.key][0]  # held as soon as the old version retires
        return state | {"busy": self.engine.has_work(v.key), "unavailable": self.engine.broken.get(v.key)}

    def pin(self, v: Version, tier: str) -> None:
        self.tiers.pin(v.key, tier)  # type: ignore[arg-type]  # checked by the tiers

    def unpin(self, v: Version) -> bool:
        waiting = self.deferred.pop(v.key, None) is not None
        return self.tiers.unpin(v.key) or waiting

    def load(self, v: Version, tier: str) -> None:
        self.tiers.load(v.key, tier)  # type: ignore[arg-type]  # checked by LiveBundle.load

    def unload(self, v: Version) -> bool:
        return self.tiers.unload(v.key)

    def keep_alive(self, v: Version, seconds: float | None) -> None:
        self.tiers.set_keep_alive(v.key, seconds)

    def tick(self) -> None:
        self.tiers.expire_idle()

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    @staticmethod
    def _open(path: Path) -> int | None:
        if not HOLD_OPEN:
            return None
        try:
            return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None  # a missing blob: the loads report it


def _fd_path(fd: int) -> Path:
    """A path that opens the file `fd` holds, even once it has been unlinked (Linux)."""
    return Path(f"/proc/self/fd/{fd}")


HOLD_OPEN = os.path.isdir("/proc/self/fd")  # elsewhere a replaced blob is read by its name

"""Live changes with Ray replicas: the admin API on the ingress, applied to every replica.

The ingress runs the same `LiveBundle` as `wallbreak serve` (coe/live.py: versions, catalog,
router, the manifest watcher), over `FleetSide`, whose weights live in the replicas:
- **Changes**: before the ingress's catalog takes a manifest's changes, every live replica syncs
  (`ReplicaServer.sync`), so a new version is servable there before a request can bind to it.
  A request names its version to the replica by (name, blob file): the same in every process.
  A replica that has not seen that version yet syncs once; a version it no longer has is a 503.
- **Placement**: an added expert is placed on one replica (placement.py, rule 4), a removed one
  leaves the table once its last relayed request ended.
- **Residency asks**: pin and load go to the replicas placed with the expert; unpin, unload and
  keep-alive to every live replica. A pin that one replica refuses is undone on the others (409).
  The ingress remembers pins and keep-alives, and gives them again to a replica that Ray restarted.
- **State**: each replica's status carries its experts' states; an expert's state on the ingress
  is the best tier any replica holds it in, with each replica's tier beside it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.catalog import Catalog
from wallbreak.coe.live import LiveBundle, UnknownExpert, Version
from wallbreak.coe.replicas.remote import REFRESH_S, RemoteEngine
from wallbreak.errors import CapacityError, ConfigError, WallbreakError, first_line, without_paths

log = logging.getLogger(__name__)

CALL_S = 120.0  # how long one admin call may take on a replica (a load to device included)
TIERS = ("disk", "host", "device")
ERRORS: dict[str, type[WallbreakError]] = {
    "unknown": UnknownExpert,
    "conflict": CapacityError,
    "config": ConfigError,
}


def replica_admin(live: LiveBundle, op: str, name: str, *args: Any) -> dict[str, Any]:
    """One residency ask on a replica, answered as data (exceptions do not cross Ray as types):
    {"result": ..., "state": ...} or {"error": kind, "message": ...}."""
    fns: dict[str, Any] = {"pin": live.pin, "unpin": live.unpin, "load": live.load, "unload": live.unload,
           "keep_alive": live.keep_alive}  # fmt: skip
    if op not in fns:
        return {"error": "config", "message": f"unknown admin operation {op!r}"}
    try:
        result = fns[op](name, *args)
        return {"result": result, "state": live.describe(name)}
    except UnknownExpert as e:
        return {"error": "unknown", "message": str(e)}
    except CapacityError as e:
        return {"error": "conflict", "message": str(e)}
    except WallbreakError as e:
        return {"error": "config", "message": without_paths(str(e))}


def expert_states(live: LiveBundle) -> dict[str, dict[str, Any]]:
    """Every served expert's state on this replica (its status call carries them)."""
    out = {}
    for n in live.catalog.names:
        try:
            out[n] = live.describe(n)
        except UnknownExpert:
            continue  # removed while we read
    return out


class FleetSide:
    """`LiveBundle`'s serving side on the Ray ingress: the replicas hold the weights."""

    def __init__(self, remote: RemoteEngine, catalog: Catalog) -> None:
        self.remote, self.catalog = remote, catalog
        self.asks: dict[str, dict[str, Any]] = {}  # name -> {"pin": tier, "keep_alive": s}
        remote.tiers.keep_alive = self._request_keep_alive

    def attach(self, live: LiveBundle) -> None:
        """Requests name their version to the replicas by (name, blob)."""

        def resolve(key: str) -> tuple[str, str | None]:
            v = live.versions.get(key)
            return (key, None) if v is None else (v.name, v.entry.blob)

        self.remote.resolve = resolve

    # -- changes --------------------------------------------------------------------------------

    def adopt(self, bundle: Bundle, v: Version) -> None:
        pass  # placed at start (Placement.spread)

    def start(self, bundle: Bundle, v: Version) -> None:
        self.remote.placement.add(v.name)
        self.remote.broken.pop(v.name, None)

    def carry_over(self, old: Version, new: Version) -> None:
        pass  # each replica carries its own pins over to the new version

    def retire(self, v: Version) -> bool:
        if self.remote.in_flight(v.key):
            return False
        if self.catalog.key(v.name) is None:  # removed, not replaced
            self.remote.placement.remove(v.name)
            self.asks.pop(v.name, None)
        return True

    def before_sync(self) -> dict[str, str]:
        """Every live replica applies the manifest first; returns what failed there, by expert."""
        failed: dict[str, str] = {}
        for i, out in self._each(self.remote.placement.live(), lambda h: h.sync.remote()):
            if isinstance(out, Exception):
                log.warning("replica %d did not sync (%s); it reads the bundle when it is back", i, out)
                continue
            for name, why in out.get("failed", {}).items():
                failed[name] = f"replica {i}: {why}"
        return failed

    # -- state ----------------------------------------------------------------------------------

    def describe(self, v: Version) -> dict[str, Any]:
        statuses = self.remote.statuses.items()
        per = {i: st["experts"][v.name] for i, st in statuses if v.name in st.get("experts", {})}
        tier = max((s["tier"] for s in per.values()), key=TIERS.index, default="disk")
        pins = [s["pinned"] for s in per.values() if s.get("pinned")]
        loaded = [s["loaded_at"] for s in per.values() if s.get("loaded_at")]
        alive = [s["keep_alive_s"] for s in per.values() if s.get("keep_alive_s") is not None]
        return {
            "tier": tier,
            "loading": any(s.get("loading") for s in per.values()),
            "pinned": max(pins, key=TIERS.index) if pins else None,
            "keep_alive_s": alive[0] if alive else self.asks.get(v.name, {}).get("keep_alive"),
            "loaded_at": max(loaded) if loaded else None,
            "busy": self.remote.in_flight(v.key) > 0 or any(s.get("busy") for s in per.values()),
            "unavailable": self.remote.broken.get(v.name),
            "replicas": {str(i): s["tier"] for i, s in sorted(per.items())},
        }

    def tick(self) -> None:
        """Statuses no older than REFRESH_S, and a restarted replica given the pins and keep-alives
        it lost."""
        if time.monotonic() - self.remote._refreshed < REFRESH_S:
            return
        for i in self.remote.refresh_blocking():
            log.info("replica %d restarted: giving it the operator's pins and keep-alives again", i)
            for name, ask in list(self.asks.items()):
                if ask.get("keep_alive") is not None:
                    self._ask([i], "keep_alive", name, ask["keep_alive"], quiet=True)
                if ask.get("pin") and i in self.remote.placement.holders.get(name, []):
                    self._ask([i], "pin", name, ask["pin"], quiet=True)

    def close(self) -> None:
        pass

    # -- residency asks -------------------------------------------------------------------------

    def pin(self, v: Version, tier: str) -> None:
        holders = self._holders(v.name)
        done: list[int] = []
        try:
            for i in holders:  # one at a time, so a refusal can be undone on the ones before
                self._ask([i], "pin", v.name, tier)
                done.append(i)
        except WallbreakError:
            self._ask(done, "unpin", v.name, quiet=True)
            raise
        self.asks.setdefault(v.name, {})["pin"] = tier

    def unpin(self, v: Version) -> bool:
        self.asks.get(v.name, {}).pop("pin", None)
        return any(out["result"] for out in self._ask(self._live(), "unpin", v.name))

    def load(self, v: Version, tier: str) -> None:
        self._ask(self._holders(v.name), "load", v.name, tier)

    def unload(self, v: Version) -> bool:
        return all(out["result"] for out in self._ask(self._live(), "unload", v.name))

    def keep_alive(self, v: Version, seconds: float | None) -> None:
        self._ask(self._live(), "keep_alive", v.name, seconds)
        self.asks.setdefault(v.name, {})["keep_alive"] = seconds

    def _request_keep_alive(self, key: str, seconds: float | None) -> None:
        """A request's keep_alive (on the event loop): passed on without waiting for the answers."""
        name, _ = self.remote.resolve(key)
        self.asks.setdefault(name, {})["keep_alive"] = seconds
        for i in self._live():
            self.remote.handles[i].admin.remote("keep_alive", name, seconds)

    def _live(self) -> list[int]:
        live = self.remote.placement.live()
        if not live:
            raise ConfigError("no replica is up; retry when /health shows one")
        return live

    def _holders(self, name: str) -> list[int]:
        """The live replicas placed with `name`; where none is, the one the next request would get."""
        placement = self.remote.placement
        held = [i for i in placement.holders.get(name, []) if i not in placement.down]
        if held:
            return held
        r = placement.choose(name)
        if r is None:
            raise ConfigError("no replica is up; retry when /health shows one")
        return [r]

    def _ask(
        self, replicas: list[int], op: str, name: str, *args: Any, quiet: bool = False
    ) -> list[dict[str, Any]]:
        """`op` on each replica; their answers, or the first refusal raised as the error it was."""
        outs = []
        for i, out in self._each(replicas, lambda h: h.admin.remote(op, name, *args)):
            if isinstance(out, Exception):
                out = {"error": "config", "message": f"replica {i} did not answer ({first_line(out)})"}
            if "state" in out and i in self.remote.statuses:
                self.remote.statuses[i].setdefault("experts", {})[name] = out["state"]
            if "error" in out:
                if quiet:
                    log.warning("replica %d: %s %s: %s", i, op, name, out["message"])
                    continue
                raise ERRORS.get(out["error"], ConfigError)(f"replica {i}: {out['message']}")
            outs.append(out)
        return outs

    def _each(self, replicas: list[int], call: Any) -> list[tuple[int, Any]]:
        """`call(handle)` on each replica at once, then each one's answer or exception."""
        pending = [(i, call(self.remote.handles[i])) for i in replicas]
        out: list[tuple[int, Any]] = []
        for i, resp in pending:
            try:
                out.append((i, resp.result(timeout_s=CALL_S)))
            except Exception as e:  # dead, restarting or slow: the caller says what it means
                out.append((i, e))
        return out

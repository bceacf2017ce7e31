"""`wallbreak experts ...`: the admin API of a running server, from the command line.

The key comes from WALLBREAK_ADMIN_KEY (never an argument: it would show in `ps`). `add` and
`replace` follow the import's progress until it ends."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from wallbreak.cli.args import Parser
from wallbreak.coe import defaults
from wallbreak.errors import ConfigError

ACTIONS = ("list", "add", "replace", "rm", "pin", "unpin", "load", "unload", "keep-alive")


def add_experts_parser(verbs: Any) -> None:
    e = verbs.add_parser("experts", help="add, replace, remove, pin and load experts on a running server")
    ev = e.add_subparsers(dest="action", required=True, parser_class=Parser)
    url = f"http://{defaults.HOST}:{defaults.PORT}"
    for action in ACTIONS:
        p = ev.add_parser(action)
        p.add_argument("--server", default=url, help=f"the server (default {url}); key: WALLBREAK_ADMIN_KEY")
        if action != "list":
            p.add_argument("name")
        if action in ("add", "replace"):
            p.add_argument("source", help="a HF folder or .gguf, as a path on the server")
            p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16, int8, int4")
            p.add_argument("--description", default=None)
            p.add_argument("--example", action="append", default=[], help="an example prompt (repeatable)")
        if action in ("pin", "load"):
            p.add_argument("--tier", choices=("host", "device"), default="device")
        if action == "keep-alive":
            p.add_argument("duration", help="seconds, '5m', '1h', -1 (always) or 'default'")
        if action == "list":
            p.add_argument("--json", action="store_true")


def _call(server: str, method: str, path: str, body: Any = None, stream: bool = False) -> Any:
    key = os.environ.get("WALLBREAK_ADMIN_KEY")
    if not key:
        raise ConfigError("set WALLBREAK_ADMIN_KEY to the server's admin key")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if stream:
        headers["Accept"] = "text/event-stream"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=None if stream else 600)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        raise ConfigError(f"{method} {path}: {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise ConfigError(f"cannot reach {server}: {e.reason}") from None
    if stream:
        return resp
    with resp:
        return json.loads(resp.read())


def _follow(resp: Any) -> int:
    """Print a job's progress lines as they come; 0 when it ends done, 1 when it failed."""
    last: dict[str, Any] = {}
    with resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if "line" in ev:
                print(ev["line"], file=sys.stderr)
            last = ev
    if last.get("state") == "done":
        print(json.dumps(last.get("result", {})))
        return 0
    print(f"wallbreak: the job failed: {last.get('error')}", file=sys.stderr)
    return 1


def run_experts(args: argparse.Namespace) -> int:
    s, a = args.server, args.action
    name = urllib.parse.quote(getattr(args, "name", ""), safe="")
    if a == "list":
        out = _call(s, "GET", "/admin/experts")
        if args.json:
            print(json.dumps(out))
        for e in [] if args.json else out["data"]:
            pin = f" pinned:{e['pinned']}" if e["pinned"] else ""
            busy = " busy" if e["busy"] else ""
            print(f"{e['id']:<28}{e['tier']:<8}{e['form']:<10}{e['bytes']:>14}{pin}{busy}")
        return 0
    if a in ("add", "replace"):
        body: dict[str, Any] = {"source": args.source, "dtype": args.dtype, "examples": args.example}
        if args.description is not None:
            body["description"] = args.description
        if a == "add":
            return _follow(_call(s, "POST", "/admin/experts", {"name": args.name, **body}, stream=True))
        return _follow(_call(s, "PUT", f"/admin/experts/{name}", body, stream=True))
    if a == "rm":
        print(json.dumps(_call(s, "DELETE", f"/admin/experts/{name}")))
        return 0
    body = {}
    if a in ("pin", "load"):
        body = {"tier": args.tier}
    if a == "keep-alive":
        body = {"keep_alive": None if args.duration == "default" else args.duration}
    print(json.dumps(_call(s, "POST", f"/admin/experts/{name}/{a}", body)))
    return 0

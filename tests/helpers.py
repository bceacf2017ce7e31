"""Helpers the tests share: tiny models built here, never downloaded."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from wallbreak.coe.engine import Engine, Event
    from wallbreak.coe.tiers import TierManager


def make_tiny_llama_folder(out: Path, seed: int = 0, tie: bool = False, context: int = 128) -> Path:
    """A random-init Llama saved as a Hugging Face folder (config, safetensors, byte tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from wallbreak.coe.bundle.importers import BYTE_VOCAB, byte_tokenizer_dir

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    byte_tokenizer_dir(out)
    return out


def make_tiny_gemma3_folder(out: Path, seed: int = 0, window: int = 8) -> Path:
    """A random-init Gemma-3 text model with sliding-window layers (window `window`) and one
    full-attention layer, saved as a Hugging Face folder with the byte tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from wallbreak.coe.bundle.importers import BYTE_VOCAB, byte_tokenizer_dir

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=window,
        max_position_embeddings=4096,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        bos_token_id=256,
        eos_token_id=258,
        pad_token_id=256,
    )
    Gemma3ForCausalLM(cfg).save_pretrained(str(out))
    byte_tokenizer_dir(out)
    return out


ROUTER_TOPICS = {
    "alpha": "apple banana cherry grape lemon mango melon peach pear plum",
    "beta": "car truck bus train plane boat bike tram taxi ferry",
    "gamma": "red blue green yellow purple orange pink brown black white",
}
SHARED_WORDS = ["the", "a", "of", "and", "to", "in", "is", "it"]


def make_tiny_bert_folder(out: Path, seed: int = 0, max_positions: int = 64) -> Path:
    """A random-init BERT encoder with a word-level vocabulary covering ROUTER_TOPICS."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for v in ROUTER_TOPICS.values() for w in v.split()} | set(SHARED_WORDS))
    out.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    BertModel(cfg).save_pretrained(str(out))
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(str(out))
    return out


def router_prompts(n_per_expert: int, seed: int) -> list[tuple[str, str]]:
    """Labelled prompts: a few of the expert's topic words mixed with shared filler words."""
    import random

    rnd = random.Random(seed)
    out = []
    for name, vocab in ROUTER_TOPICS.items():
        topic = vocab.split()
        for _ in range(n_per_expert):
            words = rnd.sample(topic, 3) + rnd.sample(SHARED_WORDS, 3)
            rnd.shuffle(words)
            out.append((" ".join(words), name))
    return out


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    import json

    path.write_text("".join(json.dumps({"prompt": p, "expert": e}) + "\n" for p, e in rows))
    return path


class ServerThread:
    """`wallbreak serve`'s app on a free port in a background thread, for tests."""

    def __init__(self, opts: object, compile: str = "off") -> None:
        """`compile`: the server's compile policy; off unless a test is about it, so no test of
        something else starts a background build (as `make_engine`)."""
        import threading

        import uvicorn

        from wallbreak.coe.server.net import free_port
        from wallbreak.coe.server.serve import make_app

        self.port = free_port()
        opts.port = self.port  # type: ignore[attr-defined]
        opts.engine = dataclasses.replace(opts.engine, compile=compile)  # type: ignore[attr-defined]
        self.app = make_app(opts)  # type: ignore[arg-type]
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return self.app.state.engine

    def __enter__(self) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def http(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, dict, str]:
    """(status, headers, text) without raising on 4xx/5xx."""
    import json
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def hf_reference(
    spec: Any, tokens: Any, global_batch: int, steps: int, optim: Any = None, seed: int = 0
) -> tuple[list[float], dict[str, Any], Any]:
    """What the Holmes runtime must reproduce, computed by transformers: AutoModelForCausalLM (the
    spec's weights folder, or the runtime's seeded weights), its own loss on each whole global batch,
    torch.optim.AdamW with decay on matrices, torch's clip_grad_norm_ and a warm-up + cosine
    LambdaLR. Returns (losses, final parameters by name, the model)."""
    import math

    from transformers import AutoModelForCausalLM

    from wallbreak.holmes.runtime.data import Batches
    from wallbreak.holmes.runtime.model import hf_config, init_weights
    from wallbreak.holmes.runtime.optim import OptimSpec

    o = optim or OptimSpec()
    if spec.source.get("weights"):
        model = AutoModelForCausalLM.from_pretrained(spec.source["weights"], dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(hf_config(spec))
        init_weights(model, spec, seed)
    model.config._attn_implementation = "sdpa"
    named = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": o.weight_decay},
         {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
    )  # fmt: skip
    horizon = o.decay_steps or steps

    def factor(k: int) -> float:
        if k < o.warmup_steps:
            return (k + 1) / o.warmup_steps
        prog = min(1.0, (k - o.warmup_steps) / max(1, horizon - o.warmup_steps))
        return (o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * prog))) / o.lr

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    data = Batches(tokens, spec.seq_len, global_batch, seed=seed)
    losses = []
    for step in range(steps):
        x, y = data.batch(step)
        rows = torch.cat([x, y[:, -1:]], dim=1)
        loss = model(rows, labels=rows).loss
        loss.backward()
        if o.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}, model


# ----------------------------------------------------------------------------------------------
# Engine runs


class Collector:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        self.text.append(ev.text)
        self.tokens.extend(ev.tokens)
        if ev.error:
            self.error = ev.error
        if ev.finish_reason:
            self.finish = ev.finish_reason
            self.done.set()


def make_engine(bundle_dir: Path, **config: object) -> tuple[Engine, TierManager]:
    from wallbreak.coe.bundle.manifest import Bundle
    from wallbreak.coe.engine import Engine, EngineConfig
    from wallbreak.coe.tiers import TierConfig, TierManager
    from wallbreak.coe.tokenization import load_tokenizers

    bundle = Bundle.open(bundle_dir)
    size = max(e.total_bytes for e in bundle.experts.values())
    tiers = TierManager(
        bundle, TierConfig(host_budget=4 * size + (1 << 20), device_budget=2 * size + (1 << 20))
    )
    # compile off unless a test asks: a test of something else should not start a build process
    cfg = EngineConfig(**{"max_batch": 8, "max_wait_s": 0.5, "compile": "off", **config})  # type: ignore[arg-type]
    return Engine(bundle, tiers, load_tokenizers(bundle, tiers.entries), cfg), tiers


@contextlib.contextmanager
def running_engine(bundle_dir: Path, **config: object) -> Iterator[Engine]:
    """`make_engine`'s engine, started, and stopped (with its tiers) afterwards."""
    eng, tiers = make_engine(bundle_dir, **config)
    eng.start()
    try:
        yield eng
    finally:
        eng.stop(timeout=5)
        tiers.close()


def fit_test_router(bundle_dir: Path, encoder: Path) -> None:
    """A logistic-regression router over ROUTER_TOPICS' prompts (experts alpha, beta, gamma)."""
    from wallbreak.coe.router import FitOptions, fit_router

    train = write_jsonl(bundle_dir.parent / "train.jsonl", router_prompts(8, seed=0))
    fit_router(bundle_dir, FitOptions(examples=train, encoder=encoder, methods=("logreg",)), progress=False)


def run(eng: Engine, expert: str, prompt: list[int], n: int, stop: tuple[str, ...] = ()) -> Collector:
    from wallbreak.coe.engine import Request, SamplingParams

    c = Collector()
    detok = eng.tokenizers[expert].stream(stop)
    eng.submit(Request(expert, prompt, SamplingParams(max_tokens=n, temperature=0), c, detok))
    return c

"""Everything textual about an expert, in one place: its tokenizer, chat template, context length,
end-of-sequence ids, and the incremental detokenizer that turns generated ids into text and finds
stop strings. The engine never sees text; the HTTP layer never opens a tokenizer itself."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wallbreak.coe.bundle.manifest import Bundle, ExpertEntry
from wallbreak.errors import BundleError, ConfigError, first_line

# Turn-end markers of common chat formats; a chat model stops at these although its config's
# eos_token_id may name only the document end.
TURN_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")
DEFAULT_CONTEXT = 2048  # when a config names no max_position_embeddings
# What an expert's generation_config.json may set for a request that leaves the field out (vLLM's
# rule): the import keeps these, beside the tokenizer.
GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
GENERATION_FILE = "generation_config.json"


def sampling_defaults(tok_dir: Path) -> dict[str, float]:
    """The sampling values an expert's generation_config.json sets (none if it has no such file,
    or one that is not a JSON object of numbers)."""
    path = tok_dir / GENERATION_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        k: float(v)
        for k in GENERATION_KEYS
        if isinstance(v := raw.get(k), int | float) and not isinstance(v, bool)
    }


class TemplateError(ConfigError):
    """The expert's chat template rejects these messages (e.g. a role order it forbids)."""


def eos_ids(tokenizer: Any, config: Mapping[str, Any]) -> frozenset[int]:
    ids: set[int] = set()
    for v in (tokenizer.eos_token_id, config.get("eos_token_id")):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(int(x) for x in v)
    vocab = tokenizer.get_vocab()
    for tok in TURN_END_TOKENS:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return frozenset(ids)


@dataclass(frozen=True)
class ExpertTokenizer:
    name: str
    tokenizer: Any
    context: int  # the model's own context length: prompt plus generated tokens
    eos_ids: frozenset[int]
    # generation_config's sampling values (GENERATION_KEYS), for fields a request leaves out
    defaults: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def load(
        cls, bundle: Bundle, entry: ExpertEntry, shared: dict[Any, Any] | None = None
    ) -> ExpertTokenizer:
        """`shared`: tokenizers already loaded, by their files' checksums; experts whose tokenizer
        files are the same bytes (fine-tunes of one base) share one object, loaded once. Sharing
        trusts the checksums, so the files are checked against them first (a damaged file is then
        this expert's error, not another's tokenizer served in its place)."""
        from transformers import AutoTokenizer  # deferred: loads transformers

        tok_dir = bundle.tokenizer_path(entry.name)
        if tok_dir is None:
            raise ConfigError(f"expert {entry.name!r} has no tokenizer in the bundle; it cannot be served")
        same = tuple(sorted(entry.tokenizer_files.items())) if entry.tokenizer_files else None
        if shared is not None and same:
            bundle.verify_tokenizer(entry.name)
        tok = shared.get(same) if shared is not None and same else None
        if tok is None:
            tok = AutoTokenizer.from_pretrained(str(tok_dir))
            if shared is not None and same:
                shared[same] = tok
        context = int(entry.config.get("max_position_embeddings") or DEFAULT_CONTEXT)
        return cls(entry.name, tok, context, eos_ids(tok, entry.config), sampling_defaults(tok_dir))

    @property
    def takes_tools(self) -> bool:
        """Its chat template renders a `tools` list itself (Qwen, Llama 3.1, Hermes templates do)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return isinstance(template, str) and "tools" in template

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        kw: dict[str, Any] = {"tools": list(tools)} if tools else {}
        try:
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, **kw
            )
        except Exception as e:  # jinja raises its own errors for messages a template forbids
            raise TemplateError(f"expert {self.name!r} cannot format these messages: {e}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def decode_all(self, ids: Sequence[int]) -> str:
        """Ids back to text, special tokens included (an echoed prompt, /detokenize)."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def token_text(self, token: int) -> str:
        """One token as text on its own (what OpenAI's logprobs call `token`)."""
        return str(self.tokenizer.decode([token], skip_special_tokens=False))

    def stream(self, stop: Sequence[str] = ()) -> TextStream:
        return TextStream(self, tuple(stop))


def load_tokenizers(
    bundle: Bundle, entries: Sequence[ExpertEntry], lenient: bool = False
) -> dict[str, ExpertTokenizer]:
    """Each expert's tokenizer facts. `lenient` (a server): an expert whose tokenizer cannot be
    loaded is left out and recorded in `bundle.damaged`, so the others still serve."""
    out = {}
    shared: dict[Any, Any] = {}
    for e in entries:
        if lenient and e.name in bundle.damaged:
            continue
        try:
            out[e.name] = ExpertTokenizer.load(bundle, e, shared)
        except Exception as ex:  # transformers and tokenizers raise their own kinds for bad files
            why = f"its tokenizer cannot be loaded ({first_line(ex)})"
            if not lenient:
                raise BundleError(f"expert {e.name!r}: {why}") from None
            bundle.damaged[e.name] = why
    return out


class TextStream:
    """Generated ids -> text deltas, decoding only a short window per token, and stop strings.

    Decoding the whole output at every token is quadratic; decoding only the newest id breaks
    characters that span tokens and the spacing that tokenizers apply at a word start. So, as the
    usual incremental detokenizers do, each step decodes the ids from `prefix` on twice, with and
    without the newest ones, and emits the difference once it no longer ends in a half-decoded
    character. Text that could still be the start of a stop string is held back; only that held
    tail is searched, so stop detection is linear in the output too.
    """

    def __init__(self, tok: ExpertTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tok = tok
        self.stop = stop
        self.hold = max((len(s) - 1 for s in stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already accounted for
        self.read = 0
        self.pending = ""  # decoded text not yet emitted (kept for stop matching)
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated id; return the text that can be emitted now ('' while held back)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        self.prefix, self.read = self.read, len(self.ids)
        self.pending += after[len(before) :]
        return self._release()

    def _release(self) -> str:
        found = [(at, s) for s in self.stop if (at := self.pending.find(s)) >= 0]
        if found:
            at = min(found)[0]
            self.stopped = True
            out, self.pending = self.pending[:at], ""
            return out
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return ""
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def fork(self) -> TextStream:
        """A fresh stream with the same stop strings (another choice of the same request)."""
        return TextStream(self.tok, self.stop)

    def finish(self) -> str:
        """The generation ended (end-of-sequence or length): flush what was held back."""
        if self.stopped:
            return ""
        rest = self.tok.decode(self.ids[self.prefix :])
        before = self.tok.decode(self.ids[self.prefix : self.read])
        self.pending += rest[len(before) :] if len(rest) > len(before) else ""
        self.prefix = self.read = len(self.ids)
        self.hold = 0  # nothing more can arrive: release all but a stop string
        return self._release()

"""Everything textual about an expert, in one place: its tokenizer, chat template, context length,
end-of-sequence ids, and the incremental detokenizer that turns generated ids into text and finds
stop strings. The engine never sees text; the HTTP layer never opens a tokenizer itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wallbreak.coe.bundle.manifest import Bundle, ExpertEntry
from wallbreak.errors import BundleError, ConfigError, first_line

# Turn-end markers of common chat formats; a chat model stops at these although its config's
# eos_token_id may name only the document end.
TURN_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")
DEFAULT_CONTEXT = 2048  # when a config names no max_position_embeddings


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

    @classmethod
    def load(cls, bundle: Bundle, entry: ExpertEntry) -> ExpertTokenizer:
        from transformers import AutoTokenizer  # deferred: loads transformers

        tok_dir = bundle.tokenizer_path(entry.name)
        if tok_dir is None:
            raise ConfigError(f"expert {entry.name!r} has no tokenizer in the bundle; it cannot be served")
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        context = int(entry.config.get("max_position_embeddings") or DEFAULT_CONTEXT)
        return cls(entry.name, tok, context, eos_ids(tok, entry.config))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True
            )
        except Exception as e:  # jinja raises its own errors for messages a template forbids
            raise TemplateError(f"expert {self.name!r} cannot format these messages: {e}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def encode_text(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

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
    for e in entries:
        if lenient and e.name in bundle.damaged:
            continue
        try:
            out[e.name] = ExpertTokenizer.load(bundle, e)
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

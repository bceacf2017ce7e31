"""Device tier: model slots allocated once, each a flat buffer that its module's parameters view.

A slot is built for one byte layout (architecture config + tensor table). Every parameter of its
module skeleton is a view into the slot's flat buffer at the offset the bundle's blob uses, so the
blob's bytes and the slot's bytes line up one to one: switching an expert in is one large copy
from the host arena, and no module is ever constructed after start-up.

When the device *is* host memory (CPU), copying buys nothing: an "alias" slot has no buffer of its
own and its parameters view the expert's extent in the host arena directly, so a switch re-points
a few hundred views instead of moving bytes. The host extent stays pinned while a slot aliases it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from wallbreak.coe.bundle import compact
from wallbreak.coe.bundle.manifest import Bundle, ExpertEntry, iter_blob_tensors
from wallbreak.coe.bundle.skeleton import skeleton_on
from wallbreak.coe.tiers.cpu_linear import split_linears
from wallbreak.errors import BundleError, CapacityError
from wallbreak.units import format_bytes

log = logging.getLogger(__name__)


def build_skeleton(entry: ExpertEntry, device: torch.device) -> nn.Module:
    """The expert's module on `device`, in its stored form (compact experts get compact modules)."""
    if entry.quant:
        dtype = compact.COMPUTE_DTYPE
    else:
        dtype = torch.float32 if entry.dtype not in ("float16", "bfloat16") else getattr(torch, entry.dtype)
    model = skeleton_on(entry.model_type, entry.config, device, dtype, entry.name)
    if entry.quant:
        compact.make_compact(model, entry, device)
    elif dtype == torch.float32 and device.type == "cpu":
        split_linears(model)  # decode's fp32 products on every core (coe/tiers/cpu_linear.py)
    return model


def load_standalone(bundle: Bundle, name: str) -> nn.Module:
    """The expert's module on the CPU, in its stored form, its weights read whole from the bundle
    (outside the tiers: for benchmarks and checks)."""
    entry = bundle.expert(name)
    model = build_skeleton(entry, torch.device("cpu"))
    bind_to_flat(model, bundle.read_blob(name), entry)
    return model


def bind_to_flat(model: nn.Module, flat: torch.Tensor, entry: ExpertEntry) -> None:
    """Point every parameter (and stored buffer) of `model` at its bytes inside `flat`."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    bound: set[str] = set()
    for name, view in iter_blob_tensors(flat, entry):
        target = params.get(name)
        if target is None and name in buffers:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            if tuple(mod._buffers[attr].shape) != tuple(view.shape):  # type: ignore[union-attr]
                raise BundleError(f"expert {entry.name!r}: buffer {name!r} has shape {list(view.shape)}")
            mod._buffers[attr] = view
            bound.add(name)
            continue
        if target is None:
            continue  # e.g. a tied weight stored under its other name, or a buffer this version drops
        if tuple(target.shape) != tuple(view.shape):
            raise BundleError(
                f"expert {entry.name!r}: tensor {name!r} has shape {list(view.shape)}, "
                f"the {entry.model_type} skeleton wants {list(target.shape)}"
            )
        target.data = view
        bound.add(name)
    missing = sorted(set(params) - bound)
    if missing:
        raise BundleError(
            f"expert {entry.name!r}: the bundle has no weights for {len(missing)} parameter(s) of its "
            f"architecture, e.g. {missing[:3]}"
        )


@dataclass(eq=False)
class Slot:
    index: int
    layout: str
    flat: torch.Tensor | None  # None: an alias slot, viewing the host arena
    model: nn.Module
    expert: str | None = None
    loading: bool = False
    refs: int = 0
    pending: int = 0  # acquirers waiting for this slot's load; they hold it like a reference
    meta: dict[str, float] = field(default_factory=dict)

    @property
    def busy(self) -> bool:
        return self.loading or self.refs > 0 or self.pending > 0


def plan_slots(
    experts: Sequence[ExpertEntry], budget: int, max_slots: int | None = None
) -> list[tuple[str, ExpertEntry]]:
    """How many slots of each layout fit the budget: one per layout first, then by demand."""
    layouts: dict[str, list[ExpertEntry]] = {}
    for e in experts:
        layouts.setdefault(e.layout_key, []).append(e)
    if not layouts:
        raise BundleError("there are no experts to plan device slots for")
    first = sorted(layouts.items(), key=lambda kv: -kv[1][0].total_bytes)
    need = sum(es[0].total_bytes for _, es in first)
    if need > budget:
        sizes = ", ".join(f"{es[0].name}: {format_bytes(es[0].total_bytes)}" for _, es in first)
        raise CapacityError(
            f"device budget {format_bytes(budget)} cannot hold one slot per architecture "
            f"(needs {format_bytes(need)}: {sizes}); raise --device-budget"
        )
    chosen = [(k, es[0]) for k, es in first]
    counts = {k: 1 for k in layouts}
    used = need
    limit = max_slots if max_slots is not None else sum(len(es) for es in layouts.values())
    while len(chosen) < limit:
        # Give the next slot to the layout with the most experts per slot that still fits.
        fits = [k for k, es in layouts.items() if counts[k] < len(es) and used + es[0].total_bytes <= budget]
        if not fits:
            break
        k = max(fits, key=lambda k: (len(layouts[k]) / counts[k], -layouts[k][0].total_bytes))
        counts[k] += 1
        used += layouts[k][0].total_bytes
        chosen.append((k, layouts[k][0]))
    return chosen


class DevicePool:
    """The fixed set of slots on one device."""

    def __init__(
        self,
        experts: Sequence[ExpertEntry],
        budget: int,
        device: torch.device,
        max_slots: int | None = None,
        alias: bool = False,
    ) -> None:
        self.device = device
        self.budget = budget
        self.alias = alias
        self.slots: list[Slot] = []
        self.bytes = 0
        for layout, entry in plan_slots(experts, budget, max_slots):
            self.add(self.new_slot(entry, layout))
        log.info(
            "device pool: %d %sslot(s), %s on %s",
            len(self.slots),
            "alias " if alias else "",
            format_bytes(self.bytes),
            device,
        )

    def new_slot(self, entry: ExpertEntry, layout: str | None = None) -> Slot:
        """A slot for `entry`'s layout (not yet in the pool: `add` puts it there)."""
        # Alias slots keep the skeleton's own (never touched, so never resident) storage until
        # the first switch re-points the parameters.
        model = build_skeleton(entry, self.device)
        flat = None
        if not self.alias:
            flat = torch.zeros(entry.total_bytes, dtype=torch.uint8, device=self.device)  # zeros: pre-touched
            bind_to_flat(model, flat, entry)
        return Slot(index=-1, layout=layout or entry.layout_key, flat=flat, model=model)

    def add(self, slot: Slot) -> None:
        slot.index = max((s.index for s in self.slots), default=-1) + 1
        self.slots.append(slot)
        self.bytes += 0 if slot.flat is None else slot.flat.numel()

    def remove(self, slot: Slot) -> None:
        """Take an idle, empty slot out of the pool (its memory goes with the last reference)."""
        assert not slot.busy and slot.expert is None
        self.slots.remove(slot)
        self.bytes -= 0 if slot.flat is None else slot.flat.numel()

    def slots_for(self, layout: str) -> list[Slot]:
        return [s for s in self.slots if s.layout == layout]

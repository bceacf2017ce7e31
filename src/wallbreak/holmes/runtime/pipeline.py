"""Pipeline schedules (GPipe, 1F1B) on a point-to-point layer of our own, and data-parallel sync.

Why not torch.distributed.pipelining: it works over gloo here, but it owns the stage split, the
loss scaling and the gradient sync, and its schedules hide the per-step communication times we
report. Our own layer is ~150 lines: sends are non-blocking (isend), so two neighbours sending to
each other never deadlock; every message carries a tag (micro-batch, direction), so out-of-order
arrival cannot mix them up.

Data-parallel sync is bucketed and overlapped with the last micro-batch's backward: a hook on each
parameter adds its finished gradient to a bucket, and full buckets are all-reduced asynchronously on
the stage's data-parallel group while backward continues (what DDP does; DDP itself decides at
forward time whether to sync, which does not fit 1F1B, where the last forward precedes earlier
backwards).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from wallbreak.holmes.runtime.tensor_parallel import local


class P2P:
    def __init__(self, prev: int | None, nxt: int | None, group: Any) -> None:
        self.prev, self.next, self.group = prev, nxt, group
        self.pending: list[Any] = []
        self.wait_s = 0.0  # time blocked on receives: exposed pipeline communication

    def send(self, t: torch.Tensor, forward: bool, mb: int) -> None:
        dst = self.next if forward else self.prev
        assert dst is not None
        self.pending.append(
            dist.isend(t.contiguous(), dst, group=self.group, tag=2 * mb + (0 if forward else 1))
        )

    def recv(self, shape: tuple[int, ...], forward: bool, mb: int) -> torch.Tensor:
        src = self.prev if forward else self.next
        assert src is not None
        buf = torch.empty(shape)
        t0 = time.perf_counter()
        work = dist.irecv(buf, src, group=self.group, tag=2 * mb + (0 if forward else 1))
        if work is not None:
            work.wait()
        self.wait_s += time.perf_counter() - t0
        return buf

    def flush(self) -> None:
        t0 = time.perf_counter()
        for w in self.pending:
            if w is not None:
                w.wait()
        self.pending.clear()
        self.wait_s += time.perf_counter() - t0


class GradSync:
    """Bucketed all-reduce (average) of gradients on a data-parallel group, during backward."""

    def __init__(self, module: nn.Module, group: Any, size: int, bucket_bytes: int = 25 << 20) -> None:
        self.group, self.size, self.bucket_bytes = group, size, bucket_bytes
        self.active = False
        self.bucket: list[nn.Parameter] = []
        self.inflight: list[tuple[Any, torch.Tensor, list[nn.Parameter]]] = []
        self.wait_s = 0.0
        if size > 1:
            for p in module.parameters():
                p.register_post_accumulate_grad_hook(self._ready)

    def _ready(self, p: torch.Tensor) -> None:
        if not self.active:
            return
        self.bucket.append(p)  # type: ignore[arg-type]
        if sum(local(x).numel() * x.element_size() for x in self.bucket) >= self.bucket_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.bucket:
            return
        grads = [local(p.grad) for p in self.bucket if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.inflight.append((work, flat, self.bucket))
        self.bucket = []

    @contextlib.contextmanager
    def final_backward(self) -> Any:
        """Gradients finishing inside this block are complete: sync them as they come."""
        self.active = self.size > 1
        try:
            yield
        finally:
            self.active = False

    def finish(self) -> None:
        if self.size <= 1:
            return
        self._flush()
        t0 = time.perf_counter()
        for work, flat, params in self.inflight:
            work.wait()
            flat /= self.size
            off = 0
            for p in params:
                assert p.grad is not None
                g = local(p.grad)
                n = g.numel()
                g.copy_(flat[off : off + n].view_as(g))
                off += n
        self.inflight.clear()
        self.wait_s += time.perf_counter() - t0


def run_schedule(
    schedule: str,
    module: nn.Module,
    p2p: P2P,
    sync: GradSync,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    stage: int,
    stages: int,
    act_shape: tuple[int, ...],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """One iteration's forwards and backwards for this stage; returns the summed loss (last stage)."""
    m = len(inputs)
    first, last = stage == 0, stage == stages - 1
    saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
    total = 0.0

    def forward(mb: int) -> None:
        nonlocal total
        x = inputs[mb] if first else p2p.recv(act_shape, True, mb).requires_grad_()
        out = module(x)
        if last:
            loss = loss_fn(out, targets[mb]) / m
            total += float(loss.detach())
            saved[mb] = (None if first else x, loss)
        else:
            p2p.send(out.detach(), True, mb)
            saved[mb] = (None if first else x, out)

    def backward(mb: int) -> None:
        x, out = saved.pop(mb)
        ctx = sync.final_backward() if mb == m - 1 else contextlib.nullcontext()
        with ctx:
            if last:
                out.backward()
            else:
                out.backward(p2p.recv(act_shape, False, mb))
        if x is not None:
            assert x.grad is not None
            p2p.send(x.grad, False, mb)

    if schedule == "gpipe":
        for mb in range(m):
            forward(mb)
        for mb in range(m):
            backward(mb)
    elif schedule == "1f1b":
        warmup = min(stages - stage - 1, m)
        for mb in range(warmup):
            forward(mb)
        for i in range(m - warmup):
            forward(warmup + i)
            backward(i)
        for mb in range(m - warmup, m):
            backward(mb)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    p2p.flush()
    sync.finish()
    return total

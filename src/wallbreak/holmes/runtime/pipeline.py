"""Pipeline schedules (GPipe, 1F1B) on a point-to-point layer of our own, and data-parallel sync.

Why not torch.distributed.pipelining: it works over gloo here, but it owns the stage split, the
loss scaling and the gradient sync, and its schedules hide the per-step communication times we
report. Our own layer matches messages by order alone, as NCCL does (see P2P).

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

TAG = 0  # every message: NCCL ignores point-to-point tags, so order alone must keep messages apart


class P2P:
    """Point-to-point with the pipeline neighbours, matched by order alone (as NCCL matches them).

    Between two neighbours, activations flow one way in micro-batch order and gradients the other
    way in micro-batch order, and the schedules below post every send and receive in that order on
    both sides. Where a stage sends to a neighbour and receives from it in the same step (1F1B's
    steady state), both go in one `batch_isend_irecv`, so neither side can block in its send while
    the other blocks in its own (the NCCL deadlock). All messages carry one tag, so a schedule whose
    order diverged would hand a stage the wrong tensor and break the parity tests, on gloo too.
    Receive buffers live on the stage's device; `dtype` is the wire's (bf16 under mixed precision,
    as Megatron sends activations), and sends are cast to it.
    """

    def __init__(
        self, prev: int | None, nxt: int | None, group: Any, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.prev, self.next, self.group = prev, nxt, group
        self.device, self.dtype = device, dtype
        self.pending: list[Any] = []
        self.wait_s = 0.0  # time blocked on receives: exposed pipeline communication

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, device=self.device, dtype=self.dtype)

    def exchange(
        self, sends: list[tuple[torch.Tensor, int | None]], recvs: list[tuple[tuple[int, ...], int | None]]
    ) -> list[torch.Tensor | None]:
        """Post these sends and receives together (peers of None are skipped); wait for the receives.
        Returns one buffer per receive (None where the peer is None)."""
        ops, out = [], []
        for t, dst in sends:
            if dst is not None:
                ops.append(dist.P2POp(dist.isend, t.to(self.dtype).contiguous(), dst, self.group, TAG))
        for shape, src in recvs:
            buf = self._buffer(shape) if src is not None else None
            if buf is not None:
                ops.append(dist.P2POp(dist.irecv, buf, src, self.group, TAG))
            out.append(buf)
        if not ops:
            return out
        t0 = time.perf_counter()
        works = dist.batch_isend_irecv(ops)
        if recvs:
            for w in works:
                w.wait()
        else:
            self.pending.extend(works)  # sends alone complete in the background until flush()
        self.wait_s += time.perf_counter() - t0
        return out

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
        self.params = list(module.parameters())
        if size > 1:
            for p in self.params:
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

    def all_now(self) -> None:
        """Average every gradient at once (after a schedule that ran the backwards itself)."""
        if self.size > 1:
            self.bucket = [p for p in self.params if p.grad is not None]
            self.finish()

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


class _Stage:
    """One stage's forward and backward passes for a list of micro-batches, and its neighbours."""

    def __init__(self, module: nn.Module, p2p: P2P, sync: GradSync, inputs: list[torch.Tensor],
                 targets: list[torch.Tensor], first: bool, last: bool, act_shape: tuple[int, ...],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 autocast: torch.dtype | None = None) -> None:  # fmt: skip
        self.module, self.p2p, self.sync = module, p2p, sync
        self.autocast = autocast
        self.inputs, self.targets, self.first, self.last = inputs, targets, first, last
        self.act_shape, self.loss_fn = act_shape, loss_fn
        self.saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.total = 0.0

    def input_of(self, mb: int, received: torch.Tensor | None) -> torch.Tensor:
        """The micro-batch's input: token ids, or the received activation as an fp32 leaf (the wire
        may carry bf16; the stage computes from fp32, as the one-stage model does)."""
        if self.first:
            return self.inputs[mb]
        assert received is not None
        return received.float().requires_grad_()

    def forward(self, mb: int, x: torch.Tensor) -> torch.Tensor | None:
        """Runs the micro-batch; returns the activation to send on (None on the last stage)."""
        mixed = (
            torch.autocast(x.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        )
        with mixed:
            out = self.module(x)
            loss = self.loss_fn(out, self.targets[mb]) / len(self.inputs) if self.last else None
        keep = None if self.first else x
        if loss is not None:
            self.total += float(loss.detach())
            self.saved[mb] = (keep, loss)
            return None
        self.saved[mb] = (keep, out)
        return out.detach()

    def backward(self, mb: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backward of a micro-batch given its output gradient; returns the input gradient to send."""
        x, out = self.saved.pop(mb)
        ctx = self.sync.final_backward() if mb == len(self.inputs) - 1 else contextlib.nullcontext()
        with ctx:
            if self.last:
                out.backward()
            else:
                assert grad is not None
                out.backward(grad.to(out.dtype))
        return x.grad if x is not None else None

    # The four exchanges of Megatron's schedules; a None peer (first or last stage) is skipped.
    def recv_forward(self) -> torch.Tensor | None:
        return self.p2p.exchange([], [(self.act_shape, self.p2p.prev)])[0]

    def send_forward(self, out: torch.Tensor | None) -> None:
        if out is not None:
            self.p2p.exchange([(out, self.p2p.next)], [])

    def recv_backward(self) -> torch.Tensor | None:
        return None if self.last else self.p2p.exchange([], [(self.act_shape, self.p2p.next)])[0]

    def send_backward(self, grad: torch.Tensor | None) -> None:
        if grad is not None:
            self.p2p.exchange([(grad, self.p2p.prev)], [])

    def send_forward_recv_backward(self, out: torch.Tensor | None) -> torch.Tensor | None:
        if self.last:
            return None
        assert out is not None
        return self.p2p.exchange([(out, self.p2p.next)], [(self.act_shape, self.p2p.next)])[0]

    def send_backward_recv_forward(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        sends = [(grad, self.p2p.prev)] if grad is not None else []
        return self.p2p.exchange(sends, [(self.act_shape, self.p2p.prev)])[0]


def run_schedule(
    schedule: str,
    *,
    module: nn.Module,
    p2p: P2P,
    sync: GradSync,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    stage: int,
    stages: int,
    act_shape: tuple[int, ...],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: torch.dtype | None = None,
) -> float:
    """One iteration's forwards and backwards for this stage; returns the summed loss (last stage).
    With `autocast` (bf16), forwards run under torch.autocast; weights and gradients stay fp32."""
    st = _Stage(module, p2p, sync, inputs, targets, stage == 0, stage == stages - 1, act_shape, loss_fn,
                autocast)  # fmt: skip
    m = len(inputs)
    if schedule == "gpipe":
        for mb in range(m):
            st.send_forward(st.forward(mb, st.input_of(mb, st.recv_forward())))
        for mb in range(m):
            st.send_backward(st.backward(mb, st.recv_backward()))
    elif schedule == "1f1b":
        _one_f_one_b(st, m, min(stages - stage - 1, m))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    p2p.flush()
    sync.finish()
    return st.total


def _one_f_one_b(st: _Stage, m: int, warmup: int) -> None:
    """Megatron's non-interleaved 1F1B: warm-up forwards, then one forward and one backward per step
    (their opposite-direction messages paired in one batch), then the remaining backwards."""
    for mb in range(warmup):
        st.send_forward(st.forward(mb, st.input_of(mb, st.recv_forward())))
    steady = m - warmup
    received = st.recv_forward() if steady > 0 else None
    for i in range(steady):
        mb = warmup + i
        out = st.forward(mb, st.input_of(mb, received))
        grad = st.send_forward_recv_backward(out)
        x_grad = st.backward(i, grad)
        if i == steady - 1:
            st.send_backward(x_grad)
        else:
            received = st.send_backward_recv_forward(x_grad)
    for mb in range(steady, m):
        st.send_backward(st.backward(mb, st.recv_backward()))

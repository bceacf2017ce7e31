"""One owner for the CPU's cores: the engine thread alone runs torch's intra-op threads.

torch on the CPU runs its kernels on OpenMP teams (libgomp), one team per thread that calls into
torch with more than one intra-op thread, and each team keeps its threads for as long as the
thread that made it lives. While libgomp manages more threads than there are cores, its idle team
threads stop spinning between parallel regions and sleep, and a decode step runs hundreds of short
regions: on the 2-core CPU machine, SmolLM2's compiled one-row step took 16.7-17.5 ms on a thread
while no other thread had a team, and 39-41 ms once the main thread (or any living thread) had run
one matrix product on two threads; a fresh `wallbreak serve` of the default bundle, its main thread
having fitted the router, decoded at 38.9 ms a step. Spinning for ever instead (OMP_WAIT_POLICY
active) was no better (41.8 ms): the other team's threads then take a core. A team is freed when
its thread ends, and a thread set to one intra-op thread makes none.

So: the serving process keeps every thread to one intra-op thread (`keep_to_one_core`, first thing
in `serve`), and the engine thread, where the decode and prefill steps run, takes every core
(`take_all_cores`). torch's `set_num_threads` sets the calling thread's OpenMP count and also the
count that a thread gets on its first call into torch, so after the engine thread has taken its
cores, a short-lived helper thread sets that back to one for every thread started later (HTTP
workers that route prompts, prefetch, package checks), without touching the caller's own count.
The thread that compiles the in-process torch.compile step takes every core too: Dynamo guards a
graph on the calling thread's count, so one traced on a one-thread helper recompiles on the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_cores: int | None = None
_kept_to_one = False  # keep_to_one_core was called: threads started later get one core
_lock = threading.Lock()


def intra_op_threads() -> int:
    """torch's intra-op thread count as this process started (read once, before anything sets one)."""
    global _cores
    with _lock:
        if _cores is None:
            _cores = torch.get_num_threads()
        return _cores


def keep_to_one_core() -> None:
    """This thread, and every thread it starts from now on, runs torch's kernels on one thread."""
    global _kept_to_one
    intra_op_threads()
    _kept_to_one = True
    torch.set_num_threads(1)


def take_all_cores() -> int:
    """The calling thread (the engine's) runs torch's kernels on every core; in a process that
    keeps to one core, threads started later still get one (the default is set back by a helper
    thread, which leaves this one's alone). Returns the thread's count."""
    torch.set_num_threads(intra_op_threads())
    n = torch.get_num_threads()  # torch fixes a thread's count at its first call: make this it
    if _kept_to_one:
        _back_to_one()
    return n


def _back_to_one() -> None:
    """Threads started from now on get one intra-op thread; the caller's own count is left alone."""
    helper = threading.Thread(target=torch.set_num_threads, args=(1,), name="wb-one-core")
    helper.start()
    helper.join()


def on_all_cores(fn: Callable[[], T]) -> T:
    """`fn()` on a thread of its own with every core (a long start-up job, such as fitting the
    router, in a process that keeps to one core): its OpenMP team ends with that thread."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        take_all_cores()
        try:
            out.append(fn())
        except BaseException as e:  # raised again in the caller
            err.append(e)

    t = threading.Thread(target=run, name="wb-all-cores")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]

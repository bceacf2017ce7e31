"""Run a plan: `torchrun ... -m wallbreak.holmes.runtime.train --plan PLAN.json [--steps N] ...`.

Every rank checks the plan before touching torch.distributed, so a bad plan is one clear line on
every rank and exit status 2, not a hang; collectives carry a timeout, so a dead peer is an error.
Under torchrun's elastic restart (--max-restarts) a restarted job resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from wallbreak.errors import ConfigError, WallbreakError
from wallbreak.holmes.plan.plan_file import RunPlan, load_plan
from wallbreak.holmes.runtime import checkpoint, nccl_check
from wallbreak.holmes.runtime.data import Batches, training_tokens
from wallbreak.holmes.runtime.groups import build_groups, tied_group
from wallbreak.holmes.runtime.interleaved import Interleaved, chunk_layers
from wallbreak.holmes.runtime.model import Stage, build_stage, lm_loss
from wallbreak.holmes.runtime.nccl_check import DebugLog
from wallbreak.holmes.runtime.optim import OptimSpec, adamw, clip_, global_grad_norm, set_lr
from wallbreak.holmes.runtime.pipeline import P2P, GradSync, run_schedule
from wallbreak.holmes.runtime.tensor_parallel import apply_tp

SCHEDULES = ("1f1b", "gpipe", "interleaved")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m wallbreak.holmes.runtime.train", description=__doc__.splitlines()[0]
    )
    p.add_argument("--plan", required=True, type=Path)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data", type=Path, help="text file or directory (default: the Python standard library)")
    p.add_argument("--tokenizer", type=Path, help="Hugging Face tokenizer folder (default: bytes)")
    p.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule (default: the plan's; "
                   "interleaved uses the plan's virtual stages)")  # fmt: skip
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="compute precision (default: the plan's; "
                   "bf16 is autocast over fp32 weights and optimizer states)")  # fmt: skip
    for f in dataclasses.fields(OptimSpec):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=type(f.default), default=f.default, help=f"(default {f.default})")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation and sample order")
    p.add_argument("--checkpoint-dir", type=Path)
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at the end)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir"
    )
    p.add_argument(
        "--log-file", type=Path, help="JSON-lines log (default: CHECKPOINT_DIR/train.jsonl, if given)"
    )
    p.add_argument("--profile", type=Path, help="write a torch profiler trace of steps 2-3 here")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a silent peer is an error")
    p.add_argument("--backend", default="auto", help="gloo, nccl or auto (nccl when CUDA is available)")
    return p.parse_args(argv)


PEER_GRACE_S = 3.0  # a rank that finds the plan bad waits this long before exiting: torchrun stops
# every rank once one exits, and its peers, which find the same fault, should get to say so too


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fail(rank: int, msg: str, grace: bool = False) -> int:
    print(f"wallbreak: error (rank {rank}): {msg}", file=sys.stderr, flush=True)
    if grace:
        time.sleep(PEER_GRACE_S)
    return 2


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return fail(0, "run this under torchrun (or use `wallbreak train --plan PLAN --nproc N`)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        plan = load_plan(a.plan, world)
        if a.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {a.steps}")
        if (a.resume or a.checkpoint_every) and a.checkpoint_dir is None:
            raise ConfigError("--resume and --checkpoint-every need --checkpoint-dir")
        optim = OptimSpec(**{f.name: getattr(a, f.name) for f in dataclasses.fields(OptimSpec)})
        tokens = training_tokens(a.data, a.tokenizer, plan.model.vocab, plan.model.source.get("tokenizer"))
        data = Batches(tokens, plan.model.seq_len, plan.global_batch, a.seed)
    except WallbreakError as e:
        return fail(rank, str(e), grace=True)
    backend = a.backend if a.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    try:
        return Trainer(a, plan, data, optim, rank, backend).run()
    except WallbreakError as e:
        return fail(rank, str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(
        self, a: argparse.Namespace, plan: RunPlan, data: Batches, optim: OptimSpec, rank: int, backend: str
    ) -> None:
        self.a, self.plan, self.data, self.optim, self.rank = a, plan, data, optim, rank
        self.device = torch.device(
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu"
        )
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        # Each elastic attempt gets its own key space in the rendezvous store: after a restart the
        # store still holds the dead workers' addresses under the same group names.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=rank == 0 and not hosted,
            timeout=timedelta(seconds=a.timeout),
        )
        # NCCL reads its logging settings once per process: on before any communicator exists.
        nccl_dir = Path(tempfile.gettempdir()) / "wallbreak-nccl"
        nccl_log = DebugLog.enable(nccl_dir) if backend == "nccl" else None
        # No device_id: bound, torch may split new NCCL groups from this one (pytorch#112889), and a
        # split child inherits the parent's network; every group must get its own NCCL_NET.
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"wallbreak/attempt-{attempt}", store),
            rank=rank,
            world_size=plan.world_size,
            timeout=timedelta(seconds=a.timeout),
        )
        t0 = time.perf_counter()
        self.groups = build_groups(plan, rank, a.timeout, backend, nccl_log)
        self.setup_s = time.perf_counter() - t0
        self.tied_pg = tied_group(plan, rank, a.timeout, backend)
        self.stage = plan.stage_of(rank)
        self.last = self.stage == plan.pp - 1
        self.tp_index = plan.layout.tp_index(rank)
        self.dtype = a.dtype or plan.training.dtype
        self.autocast = torch.bfloat16 if self.dtype == "bf16" else None  # and the pipeline's wire dtype
        # The plan file holds the schedule the planner chose; "auto" (a plan written by hand) is 1F1B.
        self.schedule = a.schedule or plan.training.schedule.replace("auto", "1f1b")
        self.build_model()
        self.sync = GradSync(self.module, self.groups.pg["dp"], plan.dp)
        self.log_path = a.log_file or (a.checkpoint_dir / "train.jsonl" if a.checkpoint_dir else None)

    def build_model(self) -> None:
        """This rank's stage (or, interleaved, its chunks), tensor-parallel, with the optimizer and
        the pipeline's exchange."""
        a, plan, rank = self.a, self.plan, self.rank
        torch.manual_seed(a.seed)
        recompute = plan.training.recompute == "full"
        if self.schedule == "interleaved":
            v, total = plan.training.virtual_stages, plan.pp * plan.training.virtual_stages
            mine = [(c, r) for c, r in enumerate(chunk_layers(plan, v)) if c % plan.pp == self.stage]
        else:
            mine = [(self.stage, plan.layer_range(self.stage))]
            total = plan.pp
        self.chunks: list[Stage] = [
            build_stage(plan.model, layers, c == 0, c == total - 1, seed=a.seed, recompute=recompute,
                        device=self.device)
            for c, layers in mine
        ]  # fmt: skip
        self.module = nn.ModuleList(self.chunks)
        tied = [t for t in (m.tied_copy() for m in self.chunks) if t is not None]
        self.tied = tied[0] if tied else None
        for m in self.chunks:
            apply_tp(m, self.groups.pg["tp"], plan.tp, self.device.type)
        self.opt = adamw(self.module.parameters(), self.optim)
        pp_ranks = self.groups.ranks["pp"]
        i = pp_ranks.index(rank)
        self.p2p = P2P(
            pp_ranks[i - 1] if i > 0 else None, pp_ranks[i + 1] if i + 1 < len(pp_ranks) else None,
            self.groups.pg["pp"], self.device, self.autocast or torch.float32,
        )  # fmt: skip
        self.interleaved = (
            Interleaved(list(zip([c for c, _ in mine], self.chunks, strict=True)), plan, self.groups.pg["pp"],
                        self.device, lm_loss, self.autocast)
            if self.schedule == "interleaved" else None
        )  # fmt: skip

    def announce(self) -> None:
        if self.groups.nccl and self.rank == 0:  # the versions that decide which NCCL knobs exist
            nccl_version = ".".join(map(str, torch.cuda.nccl.version()))
            print(f"wallbreak: torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl_version}",
                  file=sys.stderr, flush=True)  # fmt: skip
        for kind, report in self.groups.nccl.items():
            wanted = self.plan.group_of(kind, self.rank).env.get("NCCL_NET")
            print(f"wallbreak: rank {self.rank} {kind} group {list(self.groups.ranks[kind])}: NCCL "
                  f"{report.describe()}" + (f" (plan: {self.groups.nccl_via[kind]})" if wanted else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
            why = nccl_check.mismatch(wanted, report)
            if why:
                raise ConfigError(f"{kind} group: {why}")
        for kind in ("dp", "pp", "tp"):
            want = self.groups.wanted.get(kind)
            seen = self.groups.interfaces.get(kind, [])
            print(
                f"wallbreak: rank {self.rank} {kind} group {list(self.groups.ranks[kind])}: "
                f"interface {','.join(seen) or '(no sockets: local group)'}"
                + (f" (plan: {want})" if want else ""),
                file=sys.stderr,
                flush=True,
            )
            if want and seen and seen != [want]:
                raise ConfigError(
                    f"{kind} group was meant to use {want} but its sockets are on {', '.join(seen)}"
                )

    def resume(self) -> int:
        """The step to start after: a checkpoint's (--resume, or after an elastic restart), else 0.
        The checkpoint may come from another plan: DCP hands each stage its own tensors."""
        a = self.a
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if not (a.checkpoint_dir and (a.resume or restarted)):
            return 0
        step = checkpoint.latest(a.checkpoint_dir)
        if step is None:
            if a.resume:
                raise ConfigError(f"--resume: no complete checkpoint in {a.checkpoint_dir}")
            return 0
        meta = checkpoint.load(
            a.checkpoint_dir, step, modules=list(self.chunks), opt=self.opt,
            plan_config=self.plan.model.config, tied=self.plan.model.tied,
        )  # fmt: skip
        if self.rank == 0:
            lay = meta["layout"]
            other = "" if lay.get("fingerprint") == self.plan.fingerprint() else (
                f" (written by tp={lay.get('tp')} pp={lay.get('pp')} dp={lay.get('dp')} layers "
                f"{lay.get('stage_layers')}; resharded to tp={self.plan.tp} pp={self.plan.pp} "
                f"dp={self.plan.dp} layers {list(self.plan.stage_layers)})"
            )  # fmt: skip
            print(f"wallbreak: resuming after step {step} from {a.checkpoint_dir}{other}", file=sys.stderr)
        return int(step)

    def finish_grads(self) -> float:
        """After the schedule: sum the tied embedding's two copies' gradients, then clip by the
        global norm. Returns the norm before clipping."""
        if self.tied is not None and self.tied_pg is not None and self.tied.grad is not None:
            dist.all_reduce(self.tied.grad, group=self.tied_pg)
        skip = [self.tied] if self.tied is not None and self.last else []
        norm = global_grad_norm(self.module, tp_index=self.tp_index, skip=skip, dp=self.plan.dp)
        clip_(self.module, norm, self.optim.clip_grad)
        return norm

    def step(self, step: int, act: tuple[int, int, int], tokens_per_step: int) -> dict[str, Any]:
        """One optimizer step over the global batch; its log record (loss known on every rank)."""
        a, plan = self.a, self.plan
        shard = self.data.shard(step, plan.dp_index(self.rank), plan.dp, plan.micro_batch)
        t0 = time.perf_counter()
        self.p2p.wait_s = self.sync.wait_s = 0.0
        lr = self.optim.lr_at(step, a.steps)
        set_lr(self.opt, lr)
        if self.interleaved is not None:
            x = torch.cat([x for x, _ in shard]).to(self.device)
            loss = self.interleaved.run(x, torch.cat([y for _, y in shard]).to(self.device))
            self.sync.all_now()
        else:
            loss = run_schedule(
                self.schedule, module=self.chunks[0], p2p=self.p2p, sync=self.sync,
                inputs=[x.to(self.device) for x, _ in shard], targets=[y.to(self.device) for _, y in shard],
                stage=self.stage, stages=plan.pp, act_shape=act, loss_fn=lm_loss,
                autocast=self.autocast,
            )  # fmt: skip
        norm = self.finish_grads()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        # The last stage's replicas hold the loss; one world all-gather tells every rank, with
        # every rank's peak memory.
        mine = torch.tensor(
            [loss / plan.dp if self.last and self.tp_index == 0 else 0.0, peak_rss_mib()],
            dtype=torch.float64,
            device=self.device,
        )
        every = [torch.empty_like(mine) for _ in range(plan.world_size)]
        dist.all_gather(every, mine)
        both = torch.stack(every)
        dt = time.perf_counter() - t0
        return {
            "step": step + 1,
            "loss": float(both[:, 0].sum()),
            "lr": lr,
            "grad_norm": norm,
            "step_s": dt,
            "tokens_per_s": tokens_per_step / dt,
            "pp_wait_s": self.p2p.wait_s,
            "dp_sync_wait_s": self.sync.wait_s,
            "peak_rss_mib": float(both[:, 1].max()),  # the largest of any rank's peak so far
            "schedule": self.schedule,
        }

    def run(self) -> int:
        a, plan = self.a, self.plan
        self.announce()
        start = self.resume()
        log = None
        if self.log_path and self.rank == 0:
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(self.log_path, "a")  # noqa: SIM115
            except OSError as e:
                raise ConfigError(f"cannot write the log {self.log_path}: {e.strerror}") from None
        act = (plan.micro_batch, plan.model.seq_len, plan.model.hidden)
        tokens_per_step = plan.global_batch * plan.model.seq_len
        prof: Any = nullcontext()
        if a.profile and self.rank == 0:
            from torch.profiler import ProfilerActivity, profile, schedule  # deferred: loads torch.profiler

            prof = profile(
                activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=0, active=2, repeat=1)
            )
        try:
            with prof:
                for step in range(start, a.steps):
                    rec = self.step(step, act, tokens_per_step)
                    dt = rec["step_s"]
                    if self.rank == 0:
                        print(
                            f"step {step + 1}/{a.steps}  loss {rec['loss']:.4f}  {dt:.3f} s  "
                            f"{rec['tokens_per_s']:.0f} tok/s  lr {rec['lr']:.3g}  grad norm "
                            f"{rec['grad_norm']:.3g}  pp wait {self.p2p.wait_s:.3f} s  "
                            f"dp sync wait {self.sync.wait_s:.3f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                        if log:
                            log.write(json.dumps(rec) + "\n")
                            log.flush()
                    if hasattr(prof, "step"):
                        prof.step()
                    done = step + 1
                    if a.checkpoint_dir and (
                        done == a.steps or (a.checkpoint_every and done % a.checkpoint_every == 0)
                    ):
                        checkpoint.save(
                            a.checkpoint_dir, done, modules=list(self.chunks), opt=self.opt, plan=plan,
                            rank=self.rank, extra={"optim": asdict(self.optim), "steps": a.steps,
                                                   "seed": a.seed, "dtype": self.dtype},
                        )  # fmt: skip
        finally:
            if log:
                log.close()
        if a.profile and self.rank == 0 and hasattr(prof, "export_chrome_trace"):
            a.profile.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(a.profile / "trace.json"))
        return 0


if __name__ == "__main__":
    sys.exit(main())

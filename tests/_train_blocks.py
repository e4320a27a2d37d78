"""Helpers for the trainer-block tests (test_train_optim.py, test_train_checkpoint.py,
test_train_monitoring.py): the optimizer/schedule config, a tiny CPU model, and `Run`, every piece
of state a training step touches (model, AdamW, schedule, EMA, loader, RNGs, non-finite guard)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from loomcore.config import OptimizerConfig, SchedulerConfig
from loomcore.train.checkpoint import CheckpointManager
from loomcore.train.ema import EMA
from loomcore.train.faults import NonFiniteGuard
from loomcore.train.optim import build_optimizer, build_scheduler
from loomcore.train.rng import capture_rng, restore_rng

LR = 2e-5
OPT = OptimizerConfig(name="adamw", lr=LR, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
WARMUP = 4
SCHED = SchedulerConfig(name="constant_with_warmup", warmup_steps=WARMUP)
CLIP = 1.0


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


class ToyLoader:
    """Stands in for PackedLoader: a numpy generator decides the next batch."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.step = 0

    def next(self) -> torch.Tensor:
        self.step += 1
        return torch.from_numpy(self.rng.standard_normal((3, 4)).astype(np.float32))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.step = state["step"]


class Run:
    """Everything a training step touches, built from `seed`."""

    def __init__(self, seed: int, max_consecutive: int = 2):
        self.model = tiny_model(seed)
        self.opt = build_optimizer(self.model.parameters(), OPT)
        self.sched = build_scheduler(self.opt, SCHED)
        self.ema = EMA(self.model, 0.9)
        self.loader = ToyLoader(seed)
        self.noise = torch.Generator().manual_seed(seed)
        self.guard = NonFiniteGuard(self.opt, max_consecutive=max_consecutive, check_every=1)
        self.step = 0

    def pieces(self):
        return {"model": self.model, "ema": self.ema, "optimizer": self.opt,
                "scheduler": self.sched, "loader": self.loader, "guard": self.guard}

    def train(self, n: int, poison: bool = False, tasks=("t2v",)):
        losses = []
        for _ in range(n):
            x = self.loader.next()
            eps = torch.randn(x.shape[0], 2, generator=self.noise)
            jitter = torch.rand(()) + random.random() + float(np.random.rand())  # global RNGs too
            loss = ((self.model(x) - eps) ** 2).mean() * jitter
            if poison:
                loss = loss * float("nan")
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
            self.step += 1
            finite = self.guard.step(loss, gn, self.step, list(tasks))
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
            self.ema.update(self.model, self.step, finite)
            losses.append(loss.item())
        return losses

    def save(self, mgr: CheckpointManager):
        return mgr.save(self.step, self.pieces(), extras={"rng": capture_rng({"noise": self.noise})})

    def resume(self, mgr: CheckpointManager):
        state = mgr.resume(self.pieces())
        restore_rng(state["extras"]["rng"], {"noise": self.noise})
        self.step = state["step"]

"""A torchrun worker for tests/test_train_checkpoint.py: a small FSDP2 model with AdamW and an EMA,
checkpointed by `loomcore.train.distributed.Checkpointer` (sharded, torch.distributed.checkpoint).

    python -m torch.distributed.run --nproc-per-node N tests/_dcp_worker.py save|resume RUN_DIR OUT

save: two optimizer steps, checkpoint step 2. resume: a differently initialised model loads the
newest checkpoint (any world size), then one more step. Either way rank 0 writes the gathered
model / EMA / AdamW state to OUT (safetensors) and the losses to OUT.json. explode: one step, then a
checkpoint whose rank-0-only part fails; each rank writes the error it got to OUT.rank<r>.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loomcore.train.distributed import (
    Checkpointer, EMAState, ModelState, OptimizerState, apply_fsdp, destroy_distributed, init_distributed,
)
from loomcore.train.ema import EMA


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(50, 50) for _ in range(3))  # 50 rows: uneven shards on 3 ranks
        self.head = nn.Linear(50, 7)

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x)

    forward_packed = forward


class Exploding:
    """A small piece: only rank 0 writes it (`CheckpointManager.finish`), and it fails."""

    def state_dict(self):
        raise RuntimeError("disk full (simulated)")

    def load_state_dict(self, state):
        pass


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def step(model, opt, ema, counter, k: int) -> float:
    g = torch.Generator().manual_seed(1000 + k)  # the same global batch on any world size
    x = torch.randn(12, 50, generator=g)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    ema.update(model, k)
    counter.n += 1
    return float(loss.detach())


def main(mode: str, run_dir: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    env = init_distributed(use_gpu=False)
    torch.manual_seed(0 if mode == "save" else 123)
    model = Toy()
    apply_fsdp(model, init_device_mesh("cpu", (env.world_size,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, 0.9)
    counter = Counter()
    pieces = {"model": ModelState(model), "ema": EMAState(ema), "optimizer": OptimizerState(model, opt), "counter": counter}
    if mode == "explode":
        step(model, opt, ema, counter, 1)
        ckpt = Checkpointer(Path(run_dir), keep_last=2, interval=1, env=env, pieces={**pieces, "zz": Exploding()})
        try:
            ckpt.save(1, {})
            error = "none"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        Path(f"{out}.rank{env.rank}").write_text(error)
        del model, opt, ema, pieces, ckpt
        destroy_distributed()
        return
    ckpt = Checkpointer(Path(run_dir), keep_last=2, interval=1, env=env, pieces=pieces)
    losses, resumed = [], None
    if mode == "save":
        losses = [step(model, opt, ema, counter, k) for k in (1, 2)]
        ckpt.save(2, {"note": "two steps"})
    else:
        resumed = ckpt.resume()
        assert resumed is not None and resumed["step"] == 2 and resumed["extras"] == {"note": "two steps"}, resumed
        assert counter.n == 2
    # clones: on one rank (and for AdamW's 0-d steps on any) the "full" tensors are the live ones
    state = {f"model.{k}": v.clone() for k, v in ModelState(model).state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in EMAState(ema).state_dict().items()})
    optim = OptimizerState(model, opt).state_dict()  # a collective; the full state lands on rank 0
    for name, entry in optim.get("state", {}).items():
        state.update({f"optim.{name}.{k}": torch.as_tensor(v).clone() for k, v in entry.items()})
    if mode == "resume":
        losses = [step(model, opt, ema, counter, 3)]  # and it trains on
    if resumed is not None:  # every rank's own (the tests check that all ranks resumed from the same one)
        Path(f"{out}.rank{env.rank}.resumed").write_text(resumed["path"])
    if env.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, out)
        Path(out + ".json").write_text(json.dumps({"losses": losses, "world_size": env.world_size,
                                                   "resumed_from": resumed and resumed["path"]}))
    del model, opt, ema, pieces, ckpt
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])

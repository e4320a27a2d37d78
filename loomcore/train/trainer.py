"""The trainer of stages 1–3 (DESIGN §5, paper §3.3 + Table 1): one loop, driven by a StageConfig.

    train_stage(cfg, "stage2")      # inside torchrun (or one plain process): trains, writes outs

The set-up, the loop, checkpoints, the non-finite policy and the outs are the run harness's
(`loomcore.train.harness`); where things go: `loomcore.train.stage_io`.

The global batch of one step is P = nodes × max(1, gpus_per_node) × train.grad_accum packs of
the stage's max_tokens, drawn from ONE seeded stream that every rank replays; rank r computes
packs r·A … r·A + A − 1 (A = P / world size, accumulated). So the batch depends on the params
only: a 1-process run with A = 2 takes the same steps as 2 processes with A = 1.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch

from loomcore.config import TASK_KINDS, Config
from loomcore.data.loader import PackedLoader
from loomcore.errors import InputError
from loomcore.models.packed import autocast
from loomcore.storage import S3Settings
from loomcore.train import telemetry
from loomcore.train.contexts import context_source, load_pack
from loomcore.train.distributed import (
    DistEnv, EMAState, ModelState, OptimizerState, all_reduce_sum, rank_process, set_gradient_sync,
)
from loomcore.train.ema import EMA
from loomcore.train.faults import LossSpikeDetector
from loomcore.train.harness import Harness
from loomcore.train.metrics import Sums, mean_loss
from loomcore.train.optim import build_optimizer, build_scheduler
from loomcore.train.stage_io import packs_per_step
from loomcore.train.step import (
    build_pack, dit_train_flops, draw_modes, make_generators, pack_loss, seed_generators,
)

# what a step adds up over its packs and ranks (`Sums`): the loss, each task kind's loss sum and
# sample count, the tokens, samples and matmul FLOPs
STEP_SUMS = {"loss": 1, "task_loss": len(TASK_KINDS), "task_count": len(TASK_KINDS), "dit_tokens": 1,
             "context_tokens": 1, "samples": 1, "flops": 1}


class Trainer(Harness):
    """Stages 1–3 in the run harness: the flow-matching step over packs of the cached samples."""

    counter_names = ("samples", "tokens", "spikes")

    def __init__(self, cfg: Config, stage: str, env: DistEnv):
        super().__init__(cfg, stage, env, cfg.stage(stage))
        self.s = s = self.run_cfg
        self.packs_per_step = packs_per_step(cfg, stage)
        if self.packs_per_step % env.world_size:
            raise InputError(f"{stage}: the global batch is {self.packs_per_step} packs (nodes × gpus_per_node × "
                             f"train.grad_accum) and does not split over {env.world_size} ranks")
        self.accum = self.packs_per_step // env.world_size
        self.task_index = {k: i for i, k in enumerate(TASK_KINDS)}

    # -- set-up -------------------------------------------------------------------------------

    def preflight_need_gib(self) -> float:  # the memory plan's per-rank figure at this world size (`loom plan`)
        from loomcore.train.memory import required_free_gib

        return required_free_gib(self.cfg, self.stage, self.env.world_size)

    def source_embedding(self) -> bool:
        return self.s.source_embedding

    def build(self) -> dict:
        cfg, s = self.cfg, self.s
        self.model = self.load_model(trainable=True)
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], s.optimizer)
        self.scheduler = build_scheduler(self.optimizer, s.scheduler, s.steps)
        self.ema = EMA.maybe(self.model, s.ema)
        self.model_weights = "ema" if self.ema is not None else "final"
        self.spikes = LossSpikeDetector(cfg.train.spike_k, cfg.train.spike_warmup, cfg.train.spike_window)
        # every rank replays the one global stream of packs (rank 0 of 1): see the module doc
        self.loader = PackedLoader(cfg.paths.cache, s.sampling.as_dict(), s.max_tokens, s.resolution, cfg.seed,
                                  read_ahead=cfg.data.read_ahead_shards, settings=S3Settings.from_config(cfg.s3))
        self.generators = make_generators()
        self.contexts = context_source(cfg, self.loader.reader, self.loader.null_context, self.device)
        from loomcore.train.validation import maybe_validator

        # (every rank samples)
        self.validator = maybe_validator(cfg, self.stage, s, s.source_embedding, self.device, self.contexts)
        pieces = {"model": ModelState(self.model)}
        if self.ema is not None:
            pieces["ema"] = EMAState(self.ema)
        pieces.update(optimizer=OptimizerState(self.model, self.optimizer), scheduler=self.scheduler,
                      loader=self.loader, spikes=self.spikes)
        return pieces

    def describe(self) -> str:
        return (f"{self.env.world_size} rank(s) × {self.accum} pack(s) = {self.packs_per_step} packs of "
                f"≤ {self.s.max_tokens} tokens per step")

    # -- one step -----------------------------------------------------------------------------

    def _forward_backward(self, step: int, pack_items: list, pack_index: int, last: bool) -> Sums:
        """Loss of one pack (this rank's share of the step), backward scaled by 1/A. Returns its
        `STEP_SUMS` (on the device)."""
        cfg, s = self.cfg, self.s
        rows = [self.loader.rows[it.key] for it in pack_items]
        seed_generators(self.generators, cfg.seed, step, pack_index)
        modes = draw_modes(len(rows), self.generators, s.text_dropout, s.all_dropout)
        samples = load_pack(self.loader.reader, self.contexts, rows, modes)  # online mode: the MLLM runs here
        inputs = build_pack(samples, self.contexts.null_context, self.generators, flow=cfg.flow,
                            shift_scale=s.shift_scale, text_dropout=s.text_dropout, all_dropout=s.all_dropout,
                            patch_size=cfg.dit.patch_size, use_source=s.source_embedding, modes=modes).to(self.device)
        with autocast(self.device):
            pred = self.model.forward_packed(inputs.noisy, inputs.timestep, inputs.context, inputs.layout,
                                             inputs.source, inputs.references).sample
        loss, per_sample = pack_loss(pred, inputs)
        if step in cfg.train.debug_nan_steps:  # fault injection (tests): a NaN loss, hence NaN gradients
            loss = loss * float("nan")
        set_gradient_sync(self.model, last)
        (loss / self.accum).backward()

        # (built on the host, copied as the pack is: torch.tensor(list, device=cuda) copies and synchronises)
        kinds = torch.tensor([self.task_index[t] for t in inputs.tasks]).to(self.device, non_blocking=True)
        row = Sums(STEP_SUMS, self.device)
        row["loss"][0] = loss.detach()
        row["task_loss"].index_add_(0, kinds, per_sample.detach().double())
        row["task_count"].index_add_(0, kinds, torch.ones_like(per_sample, dtype=torch.float64))
        d = cfg.dit
        flops = dit_train_flops(inputs.layout, d.inner_dim, d.ffn_dim, d.num_layers,
                                inputs.noisy.shape[1], cfg.mllm.hidden_size, cfg.mllm.projector_mult)
        for name, value in (("dit_tokens", inputs.dit_tokens), ("context_tokens", inputs.context_tokens),
                            ("samples", len(samples)), ("flops", flops)):
            row[name][0] = value
        return row

    def train_step(self, step: int) -> Dict[str, torch.Tensor]:
        """Optimizer step `step` (1-based). Device tensors only: no host sync on a GPU."""
        packs = [self.loader.next_items() for _ in range(self.packs_per_step)]  # the global batch
        tasks = [self.loader.rows[it.key]["task"] for p in packs for it in p]
        first = self.env.rank * self.accum
        self.loader.prefetch([it for p in packs[first:first + self.accum] for it in p])  # an s3:// cache
        stats = Sums(STEP_SUMS, self.device)
        for a in range(self.accum):
            stats += self._forward_backward(step, packs[first + a], first + a, a == self.accum - 1)
        all_reduce_sum(stats.tensor)
        loss = (stats["loss"][0] / self.packs_per_step).float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
        finite = self.guard.step(loss, grad_norm, step, tasks)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step, finite)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        return {"loss": loss, "grad_norm": grad_norm.detach(), "finite": finite, "stats": stats, "lr": lr}

    def host_rows(self, outs) -> List[dict]:
        rows = []
        for step, out in outs:
            st = out["stats"].read()
            self.counters["samples"] += int(st["samples"])
            self.counters["tokens"] += int(st["dit_tokens"] + st["context_tokens"])
            loss = float(out["loss"])
            rows.append({
                "step": step, "loss": loss, "grad_norm": float(out["grad_norm"]), "lr": out["lr"],
                "finite": bool(out["finite"]), "dit_tokens": int(st["dit_tokens"]),
                "context_tokens": int(st["context_tokens"]), "samples": int(st["samples"]), "flops": st["flops"],
                "task_loss": {k: st["task_loss"][i] for i, k in enumerate(TASK_KINDS) if st["task_count"][i]},
                "task_count": {k: int(st["task_count"][i]) for i, k in enumerate(TASK_KINDS) if st["task_count"][i]},
            })
            event = self.spikes.update(step, loss)
            if event is not None:
                self.counters["spikes"] += 1
                self.log(f"loss spike at step {step}: {loss:.4g} > {event.threshold:.4g} "
                         f"(mean {event.mean:.4g}, std {event.std:.4g}; tasks {sorted(rows[-1]['task_count'])})")
        return rows

    def interval(self, step: int, rows: List[dict]):
        """Interval means (dvclive); the GPU's NVML telemetry and MFU on a GPU."""
        seconds = max(sum(r["seconds"] for r in rows), 1e-9)
        finite = [r for r in rows if r["finite"]]
        tokens = sum(r["dit_tokens"] + r["context_tokens"] for r in rows)
        m: Dict[str, Optional[float]] = {
            "loss/all": sum(r["loss"] for r in finite) / len(finite) if finite else float("nan"),
            "lr": rows[-1]["lr"],
            "grad_norm": sum(r["grad_norm"] for r in finite) / len(finite) if finite else float("nan"),
            "throughput/tokens_per_s": tokens / seconds,
            "throughput/dit_tokens_per_s": sum(r["dit_tokens"] for r in rows) / seconds,
            "throughput/samples_per_s": sum(r["samples"] for r in rows) / seconds,
            "throughput/samples_per_step": sum(r["samples"] for r in rows) / len(rows),
            "faults/loss_spikes": self.counters["spikes"],
        }
        for k in TASK_KINDS:
            n = sum(r["task_count"].get(k, 0) for r in finite)
            if n:
                m[f"loss/{k}"] = sum(r["task_loss"].get(k, 0.0) for r in finite) / n
        if self.device.type == "cuda":
            peak = telemetry.peak_flops_for(torch.cuda.get_device_name(self.device))
            m["perf/mfu"] = telemetry.mfu(sum(r["flops"] for r in rows), seconds, peak, self.env.world_size)
            # this interval's peak (reset after reading), not the whole run's
            m["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / telemetry.GIB
            torch.cuda.reset_peak_memory_stats(self.device)
            m.update({f"system/{k}": v for k, v in telemetry.gpu_metrics().items()})
        line = (f"step {step}/{self.s.steps} loss {m['loss/all']:.4f} lr {m['lr']:.3g} grad_norm {m['grad_norm']:.3f} "
                f"tokens/s {m['throughput/tokens_per_s']:.0f} skipped {self.guard.metrics()['skipped_steps']}")
        return m, line

    def after_step(self, step: int) -> None:
        """The validation grid every `sample_every` steps and at the end (EMA weights when kept)."""
        if self.validator is None or not (step % self.s.sample_every == 0 or step == self.s.steps):
            return
        with self.ema.swapped(self.model) if self.ema is not None else nullcontext():
            latents = self.validator.sample(self.model)
        if self.runlog is not None:
            weights = "EMA" if self.ema is not None else "live"
            path = self.runlog.log_image(step, f"samples/{step:06d}.png", self.validator.grid(latents, step, weights))
            self.log(f"validation grid {path} ({weights} weights; {self.validator.caption()})")

    # -- outputs ------------------------------------------------------------------------------

    def weights(self) -> dict:
        """final/ (the raw weights) and model/ (EMA where kept; frozen parameters from final)."""
        final = ModelState(self.model).state_dict()
        ema = self.ema.full_state_dict(keep=self.env.is_main) if self.ema is not None else None  # rank 0 writes
        return {"final": final, "model": {**final, **ema} if ema is not None else final}

    def summary(self, rows: List[dict], start: int, results) -> dict:
        measured = [r for r in rows if r["step"] > start]
        timed = measured and self.train_seconds > 0
        c = self.counters
        return {
            "packs_per_step": self.packs_per_step,
            "loss_first_10pct": mean_loss(rows, first=0.1),
            "loss_last_10pct": mean_loss(rows, last=0.1),
            # null, not NaN, when the last step was skipped (a metric in git, and the export refuses NaN)
            "loss_final": rows[-1]["loss"] if rows and math.isfinite(rows[-1]["loss"]) else None,
            "loss_spikes": c["spikes"],
            "samples_seen": c["samples"],
            "tokens_seen": c["tokens"],
            "samples_per_step": c["samples"] / max(1, len(rows)),
            # this process's training steps only (no validation, checkpoints)
            "tokens_per_s": sum(r["dit_tokens"] + r["context_tokens"] for r in measured) / self.train_seconds if timed else None,
            "samples_per_s": sum(r["samples"] for r in measured) / self.train_seconds if timed else None,
        }

    def done_note(self, summary: dict) -> str:
        first, last = (f"{v:.4f}" if v is not None else "– (every step skipped)"  # a short run's NaN steps
                       for v in (summary["loss_first_10pct"], summary["loss_last_10pct"]))
        return f"; loss {first} (first 10% of steps) → {last} (last 10%)"


def train_stage(cfg: Config, stage: str) -> dict:
    """Train one stage in this process (one rank of torchrun, or a 1-rank group of its own)."""
    with rank_process(cfg.train, use_gpu=cfg.stage(stage).gpus_per_node > 0) as env:
        trainer = Trainer(cfg, stage, env)
        trainer.setup()
        summary = trainer.run()
        del trainer  # the model, optimizer and EMA hold the device mesh: drop them before the group
        return summary

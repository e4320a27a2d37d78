"""The trainer of stages 1–3 (DESIGN §5, paper §3.3 + Table 1): one loop, driven by a StageConfig.

    train_stage(cfg, "stage2")      # inside torchrun (or one plain process): trains, writes outs

Where things go (run directory, stage outs): see `loomcore.train.stage_io`.

The global batch of one step is P = nodes × max(1, gpus_per_node) × train.grad_accum packs of
the stage's max_tokens, drawn from ONE seeded stream that every rank replays; rank r computes
packs r·A … r·A + A − 1 (A = P / world size, accumulated). So the batch depends on the params
only: a 1-process run with A = 2 takes the same steps as 2 processes with A = 1.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from loomcore.config import TASK_KINDS, Config
from loomcore.data.loader import PackedLoader, load_sample
from loomcore.models.packed import autocast
from loomcore.train import telemetry
from loomcore.train.distributed import (
    Checkpointer, DistEnv, EMAState, ModelState, OptimizerState, all_reduce_sum, broadcast_object,
    parallelize, rank_process, set_gradient_sync,
)
from loomcore.train.ema import EMA
from loomcore.train.faults import LossSpikeDetector, NonFiniteGuard
from loomcore.train.metrics import RunLog, Sums, mean_loss, read_steps, report_progress
from loomcore.train.optim import build_optimizer, build_scheduler
from loomcore.train.rng import capture_rng, restore_rng
from loomcore.train.stage_io import init_weights, stage_run_dir, write_stage_outs
from loomcore.train.weights import stage_out_dir
from loomcore.train.contexts import context_source
from loomcore.train.step import (
    build_pack, dit_train_flops, draw_modes, make_generators, pack_loss, seed_generators,
)

# what a step adds up over its packs and ranks (`Sums`): the loss, each task kind's loss sum and
# sample count, the tokens, samples and matmul FLOPs
STEP_SUMS = {"loss": 1, "task_loss": len(TASK_KINDS), "task_count": len(TASK_KINDS), "dit_tokens": 1,
             "context_tokens": 1, "samples": 1, "flops": 1}

# --------------------------------------------------------------------------------------------
# The trainer


class _Counters:
    """Host-side run counters that go into the checkpoint (JSON)."""

    def __init__(self):
        self.samples = self.tokens = self.spikes = 0

    def state_dict(self) -> dict:
        return {"samples": self.samples, "tokens": self.tokens, "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.samples, self.tokens, self.spikes = int(state["samples"]), int(state["tokens"]), int(state["spikes"])


class Trainer:
    def __init__(self, cfg: Config, stage: str, env: DistEnv):
        self.cfg, self.stage, self.s, self.env = cfg, stage, cfg.stage(stage), env
        s = self.s
        self.packs_per_step = s.nodes * max(1, s.gpus_per_node) * cfg.train.grad_accum
        if self.packs_per_step % env.world_size:
            raise ValueError(f"{stage}: the global batch is {self.packs_per_step} packs (nodes × gpus_per_node × "
                             f"train.grad_accum) and does not split over {env.world_size} ranks")
        self.accum = self.packs_per_step // env.world_size
        self.device = env.device
        self.task_index = {k: i for i, k in enumerate(TASK_KINDS)}
        self.log = (lambda *a, **k: print(*a, **{**k, "flush": True})) if env.is_main else (lambda *a, **k: None)

    # -- set-up -------------------------------------------------------------------------------

    def setup(self) -> None:
        from loomcore.models.dit import check_folder_architecture, loomdit_kwargs
        from loomcore.models.release import load_wan_transformer

        cfg, s, env = self.cfg, self.s, self.env
        if env.local_rank == 0:  # before anything touches the GPUs; "no GPU: running on CPU" on a CPU
            gpus = 0 if self.device.type == "cpu" else max(1, s.gpus_per_node)
            need = cfg.train.preflight_min_free_gib
            if gpus:  # the memory plan's per-rank figure at this world size (`loom plan`)
                from loomcore.train.memory import required_free_gib

                need = required_free_gib(cfg, self.stage, env.world_size)
            print(telemetry.preflight(gpus, need, cfg.train.preflight_gpu_name), flush=True)
        self.init_path, self.init_desc = init_weights(cfg, self.stage)
        run_dir = stage_run_dir(cfg, self.stage, self.init_path) if env.is_main else None
        self.run_dir = Path(broadcast_object(str(run_dir) if run_dir else None))

        check_folder_architecture(self.init_path, cfg)
        torch.manual_seed(cfg.seed)  # the new modules' initialisation, identical on every rank
        model, report = load_wan_transformer(self.init_path, **loomdit_kwargs(cfg, s.source_embedding))
        self.new_params = list(report.new)
        model.set_attention_backend(cfg.train.attention_backend)
        model.train().requires_grad_(True)
        # Wan's T5 text projection is kept (a saved model loads back into diffusers' Wan layout)
        # but never runs on the Deepstack path: frozen, it is simply carried along.
        self.frozen = list(report.unused_by_deepstack)
        for name in self.frozen:
            model.get_parameter(name).requires_grad_(False)
        self.model = parallelize(model, env, activation_checkpointing=cfg.dit.gradient_checkpointing,
                                 compile=cfg.train.compile)
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], s.optimizer)
        self.scheduler = build_scheduler(self.optimizer, s.scheduler, s.steps)
        self.ema = EMA.maybe(self.model, s.ema)
        self.guard = NonFiniteGuard(self.optimizer, cfg.train.nan_max_consecutive, cfg.train.nan_check_every)
        self.spikes = LossSpikeDetector(cfg.train.spike_k, cfg.train.spike_warmup, cfg.train.spike_window)
        self.counters = _Counters()
        # every rank replays the one global stream of packs (rank 0 of 1): see the module doc
        self.loader = PackedLoader(cfg.paths.cache, s.sampling.as_dict(), s.max_tokens, s.resolution, cfg.seed,
                                  read_ahead=cfg.data.read_ahead_shards)
        self.generators = make_generators()
        self.contexts = context_source(cfg, self.loader.reader, self.loader.null_context, self.device)
        pieces = {"model": ModelState(self.model)}
        if self.ema is not None:
            pieces["ema"] = EMAState(self.ema)
        pieces.update(optimizer=OptimizerState(self.model, self.optimizer), scheduler=self.scheduler,
                      loader=self.loader, guard=self.guard, spikes=self.spikes, counters=self.counters)
        self.checkpointer = Checkpointer(self.run_dir, s.keep_last, s.checkpoint_every, env, pieces)

    # -- one step -----------------------------------------------------------------------------

    def _forward_backward(self, step: int, pack_items: list, pack_index: int, last: bool) -> Sums:
        """Loss of one pack (this rank's share of the step), backward scaled by 1/A. Returns its
        `STEP_SUMS` (on the device)."""
        cfg, s = self.cfg, self.s
        rows = [self.loader.rows[it.key] for it in pack_items]
        samples = [load_sample(self.loader.reader, r) for r in rows]
        seed_generators(self.generators, cfg.seed, step, pack_index)
        modes = draw_modes(len(samples), self.generators, s.text_dropout, s.all_dropout)
        self.contexts.fill(samples, rows, modes)  # online mode: the frozen MLLM runs here
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

        kinds = torch.tensor([self.task_index[t] for t in inputs.tasks], device=self.device)
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

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, s, env = self.cfg, self.s, self.env
        t_start = time.perf_counter()
        resumed = self.checkpointer.resume()
        start = 0
        pending: List[dict] = []  # per-step rows since the last dvclive log
        if resumed is not None:
            start = resumed["step"]
            restore_rng(resumed["extras"]["rng"], self.generators)
            pending = resumed["extras"]["pending"]
            self.log(f"resumed from {resumed['path']} (step {start})")
        self.runlog = RunLog(self.run_dir, start) if env.is_main else None
        from loomcore.train.validation import maybe_validator

        self.validator = maybe_validator(cfg, s, s.source_embedding, self.device, self.contexts)  # every rank samples
        self.log(f"{self.stage}: steps {start + 1}..{s.steps}, {env.world_size} rank(s) × {self.accum} pack(s) "
                 f"= {self.packs_per_step} packs of ≤ {s.max_tokens} tokens per step on {self.device}; "
                 f"init: {self.init_desc}; run dir {self.run_dir}")

        device_rows: List[Tuple[int, Dict[str, torch.Tensor]]] = []
        self.train_seconds = 0.0  # time in training steps (validation and checkpoints excluded)
        t_interval = time.perf_counter()
        for step in range(start + 1, s.steps + 1):
            out = self.train_step(step)
            device_rows.append((step, out))
            is_log = step % s.log_every == 0 or step == s.steps
            is_ckpt = self.checkpointer.should_save(step) or step == s.steps
            if self.device.type == "cpu" or is_log or is_ckpt:  # on a GPU the only host syncs
                new = self._host_rows(device_rows)
                device_rows = []
                if self.runlog is not None:
                    self.runlog.write_steps(new)
                pending += new
            if is_log or is_ckpt:  # the rows are on the host here: the clock is honest on a GPU too
                now = time.perf_counter()
                self.train_seconds += now - t_interval
                fresh = [r for r in pending if "seconds" not in r]
                for r in fresh:
                    r["seconds"] = (now - t_interval) / len(fresh)
            if is_log:
                self._log_interval(step, pending)
                pending = []
            if step % s.sample_every == 0 or step == s.steps:
                self._validate(step)
            if is_ckpt:
                extras = {"rng": capture_rng(self.generators), "pending": pending}
                path = self.checkpointer.save(step, extras)
                if path is not None:
                    self.log(f"checkpoint {path}")
            if is_log or is_ckpt:
                t_interval = time.perf_counter()
        self.wall = time.perf_counter() - t_start
        return self._finish(start)

    def _host_rows(self, device_rows) -> List[dict]:
        rows = []
        for step, out in device_rows:
            st = out["stats"].read()
            self.counters.samples += int(st["samples"])
            self.counters.tokens += int(st["dit_tokens"] + st["context_tokens"])
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
                self.counters.spikes += 1
                self.log(f"loss spike at step {step}: {loss:.4g} > {event.threshold:.4g} "
                         f"(mean {event.mean:.4g}, std {event.std:.4g}; tasks {sorted(rows[-1]['task_count'])})")
        return rows

    def _log_interval(self, step: int, rows: List[dict]) -> None:
        """Interval means to dvclive (rank 0); the GPU's NVML telemetry and MFU on a GPU."""
        if not rows:
            return
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
            "faults/skipped_steps": self.guard.metrics()["skipped_steps"],
            "faults/loss_spikes": self.counters.spikes,
        }
        for k in TASK_KINDS:
            n = sum(r["task_count"].get(k, 0) for r in finite)
            if n:
                m[f"loss/{k}"] = sum(r["task_loss"].get(k, 0.0) for r in finite) / n
        if self.device.type == "cuda":
            peak = telemetry.peak_flops_for(torch.cuda.get_device_name(self.device))
            m["perf/mfu"] = telemetry.mfu(sum(r["flops"] for r in rows), seconds, peak, self.env.world_size)
            m["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / telemetry.GIB
            m.update({f"system/{k}": v for k, v in telemetry.gpu_metrics().items()})
        if self.runlog is not None:
            self.runlog.log_metrics(step, m)
            self.log(f"step {step}/{self.s.steps} loss {m['loss/all']:.4f} lr {m['lr']:.3g} "
                     f"grad_norm {m['grad_norm']:.3f} tokens/s {m['throughput/tokens_per_s']:.0f} "
                     f"skipped {m['faults/skipped_steps']}")
            report_progress(step, self.s.steps)

    def _validate(self, step: int) -> None:
        if self.validator is None:
            return
        ctx = self.ema.swapped(self.model) if self.ema is not None else nullcontext()
        with ctx:
            latents = self.validator.sample(self.model)
        if self.runlog is not None:
            path = self.runlog.log_image(step, f"samples/{step:06d}.png", self.validator.grid(latents))
            self.log(f"validation grid {path} ({'EMA' if self.ema else 'live'} weights; {self.validator.caption()})")

    # -- outputs ------------------------------------------------------------------------------

    def _finish(self, start: int) -> dict:
        """Write the stage's outs (rank 0; the state gathers are collectives)."""
        final = ModelState(self.model).state_dict()
        ema = self.ema.full_state_dict() if self.ema is not None else None
        summary = None
        if self.env.is_main:
            self.runlog.close()
            summary = self._summary(start)
            out = stage_out_dir(self.cfg, self.stage)
            write_stage_outs(out, dict(self.model.config), final, ema, self.runlog, summary)
            self.log(f"{self.stage} done: outs in {out}; loss {summary['loss_first_10pct']:.4f} (first 10% of steps) "
                     f"→ {summary['loss_last_10pct']:.4f} (last 10%)")
        return broadcast_object(summary)

    def _summary(self, start: int) -> dict:
        rows = read_steps(self.runlog.steps_path)
        measured = [r for r in rows if r["step"] > start]
        tokens = sum(r["dit_tokens"] + r["context_tokens"] for r in measured)
        tokens_per_s = tokens / self.train_seconds if measured and self.train_seconds > 0 else None
        return {
            "stage": self.stage,
            "steps": self.s.steps,
            "init_weights": self.init_desc,
            "new_parameters": self.new_params,
            "frozen_parameters": self.frozen,
            "model_weights": "ema" if self.ema is not None else "final",
            "resumed_from_step": start,
            "run_dir": str(self.run_dir),
            "world_size": self.env.world_size,
            "packs_per_step": self.packs_per_step,
            "loss_first_10pct": mean_loss(rows, first=0.1),
            "loss_last_10pct": mean_loss(rows, last=0.1),
            "loss_final": rows[-1]["loss"] if rows else None,
            "skipped_steps": self.guard.metrics()["skipped_steps"],
            "loss_spikes": self.counters.spikes,
            "samples_seen": self.counters.samples,
            "tokens_seen": self.counters.tokens,
            "samples_per_step": self.counters.samples / max(1, len(rows)),
            "tokens_per_s": tokens_per_s,  # this process's training steps only (no validation, checkpoints)
            "samples_per_s": (sum(r["samples"] for r in measured) / self.train_seconds) if measured and self.train_seconds > 0 else None,
            "wall_seconds_this_run": round(self.wall, 3),
        }


def train_stage(cfg: Config, stage: str) -> dict:
    """Train one stage in this process (one rank of torchrun, or a 1-rank group of its own)."""
    with rank_process(cfg.train, use_gpu=cfg.stage(stage).gpus_per_node > 0) as env:
        trainer = Trainer(cfg, stage, env)
        trainer.setup()
        summary = trainer.run()
        del trainer  # the model, optimizer and EMA hold the device mesh: drop them before the group
        return summary

"""The one run harness of every trainer (DESIGN §5): the training stages and RL plug a step into it.

    class MyTrainer(Harness):
        model_weights = "final"                       # what out/model/ holds
        def build(self) -> dict: ...                  # models, optimizer …: the checkpoint's pieces
        def train_step(self, step) -> dict: ...       # one step; device tensors allowed (no host sync)
        def host_rows(self, outs) -> list: ...        # [(step, out)] → steps.jsonl rows (host)
        def interval(self, step, rows) -> (dict, str) # dvclive metrics and the log line of an interval
        def summary(self, rows, start, results) -> dict
        def weights(self) -> dict: ...                # the out folders to write: {"model": state, …}

What the harness owns, once for every trainer (torchtitan's Trainer, with the model-specific
parts plugged in):
  - the rank's preflight (GPUs and free memory, before anything touches a GPU);
  - the weights the run starts from (`resolve_weights`), checked against params, loaded (new
    LoomVideo modules initialised from `seed`), Wan's unused text path frozen, FSDP2-wrapped;
  - the run directory <paths.runs>/<stage>/<run key>: params, inputs and code fingerprinted
    (`loomcore.train.stage_io`), so only the same run resumes;
  - the checkpointer, with the trainer's pieces, the named run `Counters` and the
    `NonFiniteGuard` — one non-finite policy: a step whose loss or gradient norm is NaN/Inf is
    skipped (parameters and optimizer state bit-identical), more than `train.nan_max_consecutive`
    in a row stop the run naming the step and its task kinds;
  - the loop: resume (steps, RNG, pending interval rows), steps.jsonl, dvclive intervals every
    `log_every` steps (the trainer's metrics plus `faults/skipped_steps`), structured progress, the trainer's after-step hook (validation grids),
    checkpoints every `checkpoint_every` steps and at the end;
  - the outs <train.out_dir>/<stage>/: the weights folders, summary.json, metrics.json, plots/
    and the untracked timing/ (`stage_io.write_run_record`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from loomcore.config import Config
from loomcore.models.dit import check_folder_architecture, loomdit_kwargs
from loomcore.models.release import load_wan_transformer
from loomcore.train import telemetry
from loomcore.train.distributed import Checkpointer, DistEnv, from_main, parallelize
from loomcore.train.faults import NonFiniteGuard
from loomcore.train.metrics import RunLog, read_steps, report_progress
from loomcore.train.rng import capture_rng, restore_rng
from loomcore.train.stage_io import init_weights, stage_run_dir, write_run_record, write_stage_weights
from loomcore.train.weights import stage_out_dir


class Counters:
    """Named host-side run counters (integers), checkpointed as JSON."""

    def __init__(self, *names: str):
        self._values = dict.fromkeys(names, 0)

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def __setitem__(self, name: str, value: int) -> None:
        if name not in self._values:
            raise KeyError(f"no counter {name!r} (counters: {', '.join(self._values)})")
        self._values[name] = int(value)

    def state_dict(self) -> dict:
        return dict(self._values)

    def load_state_dict(self, state: dict) -> None:
        self._values = {k: int(state[k]) for k in self._values}


class Harness:
    """One training run on this rank: set-up, loop and outs (see the module doc). A trainer
    subclasses it and fills in the hooks below."""

    code_entry = "loomcore.train.trainer"  # the module whose import closure keys the run directory
    counter_names: Tuple[str, ...] = ()
    model_weights = "final"  # what out/model/ holds, for summary.json

    def __init__(self, cfg: Config, stage: str, env: DistEnv, run_cfg):
        """`run_cfg`: the stage's section (steps, log_every, checkpoint_every, keep_last, gpus_per_node)."""
        self.cfg, self.stage, self.env, self.run_cfg = cfg, stage, env, run_cfg
        self.device = env.device
        self.log = (lambda *a, **k: print(*a, **{**k, "flush": True})) if env.is_main else (lambda *a, **k: None)
        self.counters = Counters(*self.counter_names)
        self.generators: Optional[list] = None  # a trainer's RNG generators, checkpointed when set

    # -- hooks --------------------------------------------------------------------------------

    def preflight_need_gib(self) -> float:
        """Free GPU memory a rank needs (GiB) before it starts."""
        return self.cfg.train.preflight_min_free_gib

    def source_embedding(self) -> bool:
        """Whether the trained model has the Scale-and-Add source embedding."""
        raise NotImplementedError

    def build(self) -> Dict[str, Any]:
        """Models, optimizer (`self.optimizer`, a fused AdamW), data: the checkpoint's pieces."""
        raise NotImplementedError

    def describe(self) -> str:
        """What one step is, for the start line."""
        return ""

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def host_rows(self, outs: List[Tuple[int, dict]]) -> List[dict]:
        """steps.jsonl rows of the steps `outs` (step, what train_step returned); host-side."""
        return [out for _, out in outs]

    def interval(self, step: int, rows: List[dict]) -> Tuple[Dict[str, Optional[float]], str]:
        """The dvclive metrics of the interval ending at `step` (its steps.jsonl rows) and its log line."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After the step and its logging, before its checkpoint (every rank): validation."""

    def after_loop(self) -> Any:
        """After the last step (every rank, collectives allowed): evaluations; passed to `summary`."""

    def summary(self, rows: List[dict], start: int, results: Any) -> dict:
        """The trainer's entries of summary.json."""
        return {}

    def weights(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{out folder name: full state dict} (every rank: the gathers are collectives)."""
        raise NotImplementedError

    def done_note(self, summary: dict) -> str:
        """What the last log line adds to "<stage> done: outs in <folder>"."""
        return ""

    # -- set-up -------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        if env.local_rank == 0:  # before the model and data reach the GPUs (the process group's CUDA
            # contexts are up: they count as used); "no GPU: running on CPU" on a CPU
            gpus = 0 if self.device.type == "cpu" else max(1, self.run_cfg.gpus_per_node)
            need = self.preflight_need_gib() if gpus else cfg.train.preflight_min_free_gib
            print(telemetry.preflight(gpus, need, cfg.train.preflight_gpu_name), flush=True)
        self.init_path, self.init_desc = init_weights(cfg, self.stage)
        self.init_config = check_folder_architecture(self.init_path, cfg)  # its config.json
        self.run_dir = Path(from_main(env, lambda: str(stage_run_dir(cfg, self.stage, self.init_path, self.code_entry))))
        pieces = self.build()
        self.guard = NonFiniteGuard(self.optimizer, cfg.train.nan_max_consecutive, cfg.train.nan_check_every)
        pieces.update(guard=self.guard, counters=self.counters)
        self.checkpointer = Checkpointer(self.run_dir, self.run_cfg.keep_last, self.run_cfg.checkpoint_every, env,
                                         pieces)

    def load_model(self, trainable: bool):
        """The run's starting weights as a LoomDiT, FSDP2-wrapped: LoomVideo's modules that the
        folder lacks (a base Wan model) initialised from `seed` — identically on every rank — and
        recorded in `new_params`; Wan's T5 text projection kept (a saved model loads back into
        diffusers' Wan layout) but frozen, as nothing on the Deepstack path runs it."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model, report = load_wan_transformer(self.init_path, **loomdit_kwargs(cfg, self.source_embedding()))
        self.new_params, self.frozen = list(report.new), list(report.unused_by_deepstack)
        model.set_attention_backend(cfg.train.attention_backend)
        model.train(trainable).requires_grad_(trainable)
        for name in self.frozen:
            model.get_parameter(name).requires_grad_(False)
        return parallelize(model, self.env, activation_checkpointing=trainable and cfg.dit.gradient_checkpointing,
                           compile=cfg.train.compile)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        r, env = self.run_cfg, self.env
        t_start = time.perf_counter()
        resumed = self.checkpointer.resume()
        start = 0
        pending: List[dict] = []  # steps.jsonl rows since the last dvclive interval
        if resumed is not None:
            start = resumed["step"]
            if self.generators is not None:
                restore_rng(resumed["extras"]["rng"], self.generators)
            pending = resumed["extras"]["pending"]
            self.log(f"resumed from {resumed['path']} (step {start})")
        self.runlog = RunLog(self.run_dir, start) if env.is_main else None
        self.log(f"{self.stage}: steps {start + 1}..{r.steps}, {self.describe()} on {self.device}; "
                 f"init: {self.init_desc}; run dir {self.run_dir}")

        outs: List[Tuple[int, dict]] = []  # steps not yet read on the host
        self.train_seconds = 0.0  # time in training steps (logging, validation and checkpoints excluded)
        t_interval = time.perf_counter()
        for step in range(start + 1, r.steps + 1):
            outs.append((step, self.train_step(step)))
            is_log = step % r.log_every == 0 or step == r.steps
            is_ckpt = self.checkpointer.should_save(step) or step == r.steps
            if self.device.type == "cpu" or is_log or is_ckpt:  # on a GPU the only host syncs
                new = self.host_rows(outs)
                outs = []
                if self.runlog is not None:
                    self.runlog.write_steps(new)
                pending += new
            if is_log or is_ckpt:  # the rows are on the host here: the clock is honest on a GPU too
                now = time.perf_counter()
                self.train_seconds += now - t_interval
                fresh = [row for row in pending if "seconds" not in row]
                for row in fresh:
                    row["seconds"] = (now - t_interval) / len(fresh)
            if is_log and pending:
                metrics, line = self.interval(step, pending)
                metrics["faults/skipped_steps"] = self.guard.metrics()["skipped_steps"]  # every trainer's plots
                if self.runlog is not None:
                    self.runlog.log_metrics(step, metrics)
                    self.log(line)
                    report_progress(step, r.steps)
                pending = []
            self.after_step(step)
            if is_ckpt:  # a GPU reads the guard every nan_check_every steps: a limit passed since then
                self.guard.check()  # stops the run here, not after its checkpoint or final outputs
                extras = {"pending": pending}
                if self.generators is not None:
                    extras["rng"] = capture_rng(self.generators)
                self.log(f"checkpoint {self.checkpointer.save(step, extras)}")
            if is_log or is_ckpt:
                t_interval = time.perf_counter()
        results = self.after_loop()
        return self._finish(start, results, time.perf_counter() - t_start)

    # -- outputs ------------------------------------------------------------------------------

    def _finish(self, start: int, results: Any, wall: float) -> dict:
        """Write the stage's outs (rank 0; the state gathers are collectives)."""
        weights = self.weights()

        def write() -> dict:  # rank 0; an error there stops every rank (`from_main`)
            self.runlog.close()
            rows = read_steps(self.runlog.steps_path)
            summary = {
                "stage": self.stage, "steps": self.run_cfg.steps, "init_weights": self.init_desc,
                "new_parameters": self.new_params, "frozen_parameters": self.frozen,
                "model_weights": self.model_weights, "resumed_from_step": start, "run_dir": str(self.run_dir),
                "world_size": self.env.world_size, **self.summary(rows, start, results),
                "skipped_steps": self.guard.metrics()["skipped_steps"], "wall_seconds_this_run": round(wall, 3),
            }
            out = stage_out_dir(self.cfg, self.stage)
            out.mkdir(parents=True, exist_ok=True)
            config = dict(self.model.config)
            write_stage_weights(out, config, weights)
            write_run_record(out, self.runlog, summary)
            self.log(f"{self.stage} done: outs in {out}{self.done_note(summary)}")
            return summary

        return from_main(self.env, write)

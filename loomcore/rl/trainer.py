"""The RL post-training stage (paper §3.3 "Post-training"; DESIGN §5): online DiffusionNFT.

    train_rl(cfg)       # inside torchrun (or one plain process): trains, writes outs

Three copies of the stage-`rl.init_from` DiT (its EMA weights): the policy θ (trained), the old
policy θ_old (samples the rollouts, moves toward θ by the warm-up decay) and the reference (the
stage-3 model, frozen: the KL proxy, the optional KL term, the "before" evaluation). One RL step:

  1. G prompts from the train split (a seeded draw per step), K samples each from θ_old with the
     deterministic Euler sampler (`rl.sample_steps` steps, the scheduler's flow shift, no CFG:
     DiffusionNFT is CFG-free, as NVlabs' release trains it; Flow-Factory's Wan2.2 example instead
     rolls out and trains on CFG-combined velocities), decoded to pixels and scored by the reward;
  2. per-prompt advantages → optimality probabilities r (`loomcore.rl.nft`);
  3. `rl.gradient_steps` optimizer steps over the G·K clean samples, each sample trained at
     `rl.train_timesteps` flow times: z_t from fresh noise, v_θ and v_old at z_t, the NFT loss;
  4. θ_old ← d·θ_old + (1 − d)·θ, d from the optimizer steps taken so far.

Distributed exactly like the stage trainer (`loomcore.train.distributed`): one process group
(gloo/nccl), every model FSDP2-wrapped; rank r samples and trains the r-th contiguous G·K/W items
of each step — whole prompt groups where K allows (G·K must split over the W ranks); rewards are
all-gathered so that every rank computes the same advantages. All randomness is derived from (seed, step, item): a resumed run redraws the same
prompts, noise and timesteps, and the checkpoint holds θ, θ_old, the optimizer and the counters.

Prompts are read lazily (`loomcore.rl.rollout.with_conditions`): set-up reads the cache index
only; each rank reads the source and references of its own prompts — once per step for the
step's ≤ G prompts (their K samples share them; kept through the rollout and the optimizer
steps, then dropped) and once per evaluation for its held-out prompts (not kept between the two
evaluations). MLLM contexts follow `mllm.feature_mode`: cached, read with the entry; online (the
paper profile's), encoded by the frozen MLLM on the rank's device (64 held-out prompts at up to
252 MB each would be GBs per rank; re-encoding costs a few MLLM forwards). The MLLM is frozen
and deterministic, so both modes give the same contexts to float tolerance.

Set-up, loop, checkpoints, the non-finite policy (a NaN/Inf optimizer step is skipped) and the
outs are the run harness's (`loomcore.train.harness`). Outs (<train.out_dir>/rl/): model/
(LoomDiT.save_pretrained of the final policy θ — θ itself, where NVlabs saves and evaluates an EMA
of θ (decay up to 0.9) and Flow-Factory θ_old), summary.json (the held-out reward of the
reference and of θ: same prompts, same seeds), metrics.json, plots/metrics (dvclive). Run
directory: <paths.runs>/rl/<run key>/.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from loomcore.config import Config, SchedulerConfig
from loomcore.data.loader import ShardReader
from loomcore.diffusion.flow import add_noise, timestep_input
from loomcore.diffusion.sampling import SamplingShift, sampling_timesteps
from loomcore.errors import InputError
from loomcore.models.packed import decode_videos, pack_conditions, sample_pack, velocity
from loomcore.rl import nft
from loomcore.rl.rewards import build_reward, reward_class
from loomcore.rl.rollout import Prompt, load_prompts, prompt_noise, with_conditions
from loomcore.storage import S3Settings
from loomcore.train.contexts import context_source
from loomcore.train.distributed import DistEnv, ModelState, OptimizerState, rank_process, set_gradient_sync
from loomcore.train.harness import Harness
from loomcore.train.metrics import Sums
from loomcore.train.optim import build_optimizer, build_scheduler
from loomcore.train.rng import derive_seed

STAGE = "rl"
# what an RL step adds up over its micro-batches and ranks (`Sums`); the losses are divided by
# `samples` when read, the KL proxy by the samples it was measured on
RL_SUMS = {"policy_loss": 1, "unweighted_policy_loss": 1, "positive_loss": 1, "negative_loss": 1,
           "old_deviation": 1, "samples": 1, "kl": 1, "kl_samples": 1}


def rank_slice(n: int, env: DistEnv) -> List[int]:
    """This rank's items of n: the r-th contiguous n/W of them, so that a rank holds whole prompt
    groups (K samples of a prompt are neighbours) and reads and encodes about G/W prompts' conditions,
    not up to all G; n must split evenly (FSDP2's forwards are collectives)."""
    if n % env.world_size:
        raise ValueError(f"{n} items do not split over {env.world_size} ranks")
    per = n // env.world_size
    return list(range(env.rank * per, (env.rank + 1) * per))


def pad_to_ranks(items: list, world_size: int) -> list:
    """`items` repeated from the start up to a multiple of `world_size` (equal work per rank; the
    caller drops the repeats' results), however few items there are."""
    return [items[i % len(items)] for i in range(len(items) + (-len(items)) % world_size)]


def all_gather_rows(local: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """[n/W, ...] on each rank → [n, ...] in item order (rank r held the r-th n/W, `rank_slice`)."""
    parts = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def paired_gain(before: Dict[str, float], after: Dict[str, float]) -> dict:
    """Per-prompt differences after − before (same prompts, same seeds): their std, the standard
    error of their mean (std with n − 1 / √n), whether the mean gain exceeds twice that standard
    error (`reward_gain_significant`: RL raised the held-out reward beyond seed-to-prompt noise),
    and how many prompts rose."""
    d = torch.tensor([after[k] - before[k] for k in before], dtype=torch.float64)
    n = d.numel()
    stderr = d.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return {"reward_gain_per_prompt_std": d.std(unbiased=False).item() if n > 1 else 0.0,
            "reward_gain_stderr": stderr, "reward_gain_significant": bool(n > 1 and d.mean().item() > 2 * stderr),
            "prompts_improved": int((d > 0).sum()), "prompts": int(n)}


class RLTrainer(Harness):
    """DiffusionNFT in the run harness (see the module doc)."""

    code_entry = "loomcore.rl.trainer"
    counter_names = ("optimizer_steps", "samples")
    model_weights = "policy"

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, STAGE, env, cfg.rl)
        self.rl = cfg.rl
        self.patch = tuple(cfg.dit.patch_size)
        n = self.rl.prompts_per_step * self.rl.samples_per_prompt
        if n % env.world_size:
            raise ValueError(f"rl: prompts_per_step × samples_per_prompt = {n} samples per step do not split over "
                             f"{env.world_size} ranks")
        if self.rl.gradient_steps > n // env.world_size:  # (the config checks nodes × gpus_per_node; this, the job's)
            raise ValueError(f"rl.gradient_steps = {self.rl.gradient_steps}: more optimizer steps than a rank's "
                             f"{n // env.world_size} samples per RL step over {env.world_size} ranks")

    # -- set-up -------------------------------------------------------------------------------

    def source_embedding(self) -> bool:  # as the weights it starts from (a stage-2/3 model has it)
        return bool(self.init_config.get("use_source_embedding", False))

    def build(self) -> dict:
        from loomcore.models.codec import load_codec

        cfg, rl = self.cfg, self.rl
        reward_class(rl.reward)  # a mistyped reward is refused before anything loads
        # the prompts first (the index only): a pool too small for a step is refused before any model loads
        s3 = S3Settings.from_config(cfg.s3)
        self.reader = ShardReader(cfg.paths.cache, settings=s3)
        mode = cfg.mllm.feature_mode
        self.train_prompts = load_prompts(self.reader.root, "train", rl.resolution, rl.tasks, feature_mode=mode)
        if len(self.train_prompts) < rl.prompts_per_step:  # (a step would quietly take fewer groups)
            raise InputError(f"rl.prompts_per_step = {rl.prompts_per_step}: the cache ({self.reader.root}) has "
                             f"{len(self.train_prompts)} train prompt(s) of rl.tasks {list(rl.tasks)} at "
                             f"rl.resolution {rl.resolution}")
        self.eval_prompts = load_prompts(self.reader.root, "eval", rl.resolution, rl.tasks, rl.eval_prompts, mode)
        self.shift = SamplingShift.from_config(cfg.guidance, cfg.flow)  # fixed, or eq. 3 per sample
        if rl.t_distribution == "discrete":  # each prompt's rollout grid must reach t_range (else a step fails, hours in)
            sizes = sorted({p.dit_tokens(self.patch) for p in self.train_prompts})
            lo, hi = rl.t_range
            missed = [n for n in sizes if not any(lo - 1e-6 <= 1 - float(t) <= hi + 1e-6 for t in
                                                  sampling_timesteps(rl.sample_steps, self.shift.shift(n))[:-1])]
            if missed:
                raise InputError(f"rl.t_range = {list(rl.t_range)} with rl.sample_steps = {rl.sample_steps}: the rollout "
                                 f"grid of prompts of {missed[0]:,} tokens ({len(missed)} of {len(sizes)} sizes) has no "
                                 "time in it (its shift: guidance.flow_shift / dynamic_shift / shift_scale); widen "
                                 "t_range or take more sample_steps")
        self.policy, self.old, self.ref = self.load_model(True), self.load_model(False), self.load_model(False)
        self.model = self.policy
        self.use_source = self.policy.config.use_source_embedding
        self.optimizer = build_optimizer([p for p in self.policy.parameters() if p.requires_grad], rl.optimizer)
        self.scheduler = build_scheduler(self.optimizer, SchedulerConfig("constant_with_warmup", 0))
        self.reward = build_reward(cfg, device=self.device)
        self.codec = load_codec(cfg.models.codec, cfg.models.vae, s3_settings=s3).to(self.device)
        # the prompts' tensors are read when used; online, the frozen MLLM on this rank's device
        # encodes the contexts of this rank's prompts
        self.contexts = context_source(cfg, self.reader, None, self.device)
        return {"model": ModelState(self.policy), "old": ModelState(self.old),
                "optimizer": OptimizerState(self.policy, self.optimizer), "scheduler": self.scheduler}

    def describe(self) -> str:
        rl = self.rl
        return (f"{rl.prompts_per_step} prompts × {rl.samples_per_prompt} samples per step over "
                f"{self.env.world_size} rank(s), reward {rl.reward}, {len(self.train_prompts)} train / "
                f"{len(self.eval_prompts)} held-out prompts")

    # -- sampling and scoring -----------------------------------------------------------------

    def _generate(self, model, prompts: Sequence[Prompt], seeds: Sequence[int], steps: int):
        """Clean tokens per sample and rewards [n] for this rank's (prompt, seed) items."""
        rl = self.rl
        tokens, rewards = [], []
        for i in range(0, len(prompts), rl.micro_batch):
            chunk = list(prompts[i:i + rl.micro_batch])
            pack = pack_conditions(chunk, self.patch, self.use_source, torch.float32)
            noise = prompt_noise(seeds[i:i + rl.micro_batch], chunk, self.patch)
            times = self.shift.timesteps(steps, pack.layout.sequence_lengths)  # [steps + 1, S]
            x = sample_pack(model, pack, noise, times, self.cfg.flow.timestep_scale, self.device)
            videos = decode_videos(self.codec, x, pack.layout, self.patch)
            rewards.append(self.reward(videos, [p.text for p in chunk], [p.metadata for p in chunk]).float())
            tokens += [t.cpu() for t in x.split(list(pack.layout.target_lengths))]
        return tokens, torch.cat(rewards)

    def rollout(self, step: int):
        """Step `step`'s G prompts × K samples: this rank's items, their clean tokens, every item's
        prompt group and reward (all ranks)."""
        rl, cfg = self.rl, self.cfg
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "rl-prompts", step))
        chosen = torch.randperm(len(self.train_prompts), generator=g)[: rl.prompts_per_step].tolist()
        items = [(self.train_prompts[i], group) for group, i in enumerate(chosen) for _ in range(rl.samples_per_prompt)]
        mine = rank_slice(len(items), self.env)
        # this rank's items carry their prompts' tensors through the step (≤ G reads / encodings)
        for i, p in zip(mine, with_conditions([items[i][0] for i in mine], self.reader, self.contexts)):
            items[i] = (p, items[i][1])
        seeds = [derive_seed(cfg.seed, "rl-rollout", step, i) for i in mine]
        tokens, local = self._generate(self.old, [items[i][0] for i in mine], seeds, rl.sample_steps)
        rewards = all_gather_rows(local.to(self.device), self.env).cpu()
        groups = torch.tensor([grp for _, grp in items])
        return items, mine, tokens, rewards, groups

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """The held-out reward: every eval prompt × `eval_samples_per_prompt` seeds (the same for
        any model), `rl.eval_steps` Euler steps. Per-prompt means, then their mean and std."""
        rl, env = self.rl, self.env
        items = [(p, j) for p in self.eval_prompts for j in range(rl.eval_samples_per_prompt)]
        padded = pad_to_ranks(items, env.world_size)  # equal work per rank; the repeats are dropped
        mine = rank_slice(len(padded), env)
        seeds = [derive_seed(self.cfg.seed, "rl-eval", padded[i][0].id, padded[i][1]) for i in mine]
        prompts = with_conditions([padded[i][0] for i in mine], self.reader, self.contexts)  # for this evaluation only
        _, local = self._generate(model, prompts, seeds, rl.eval_steps)
        rewards = all_gather_rows(local.to(self.device), env).cpu()[: len(items)]
        per_prompt = rewards.view(len(self.eval_prompts), rl.eval_samples_per_prompt).double().mean(1)
        return {"mean": per_prompt.mean().item(), "std": per_prompt.std(unbiased=False).item(),
                "sample_std": rewards.double().std(unbiased=False).item(),
                "per_prompt": {p.id: round(v, 6) for p, v in zip(self.eval_prompts, per_prompt.tolist())}}

    # -- one RL step --------------------------------------------------------------------------

    def _train_timesteps(self, step: int, item: int, prompt: Prompt) -> torch.Tensor:
        rl = self.rl
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "rl-t", step, item))
        if rl.t_distribution == "discrete":  # from the grid this prompt's rollout was sampled on
            times = sampling_timesteps(rl.sample_steps, self.shift.shift(prompt.dit_tokens(self.patch)))
            return nft.discrete_train_timesteps(times, rl.train_timesteps, rl.t_range, g)
        return nft.continuous_train_timesteps(rl.train_timesteps, rl.t_range, g, rl.t_distribution, rl.t_shift,
                                              self.cfg.flow.logit_normal_mean, self.cfg.flow.logit_normal_std)

    def _backward_batch(self, step: int, items, mine, tokens, r_all, batch: List[int], denom: int,
                        with_ref: bool, last: bool) -> Sums:
        """NFT loss and backward (scaled by 1/denom) of one micro-batch of this rank's samples at
        each of their training times. Returns its `RL_SUMS` over (sample, time) (on the device)."""
        rl, cfg = self.rl, self.cfg
        prompts = [items[mine[j]][0] for j in batch]
        pack = pack_conditions(prompts, self.patch, self.use_source, torch.float32).to(self.device)
        x0 = torch.cat([tokens[j] for j in batch]).to(self.device)
        r = r_all[[mine[j] for j in batch]].to(self.device)
        times = torch.stack([self._train_timesteps(step, mine[j], prompts[k]) for k, j in enumerate(batch)], dim=1)  # [T, S]
        sums = Sums(RL_SUMS, self.device)
        for k in range(rl.train_timesteps):
            t = times[k].to(self.device)
            noise = torch.cat([torch.randn(tokens[j].shape, generator=torch.Generator().manual_seed(
                derive_seed(cfg.seed, "rl-noise", step, mine[j], k))) for j in batch]).to(self.device)
            z_t = add_noise(x0, noise, t[pack.sample_index], cfg.flow.sigma_min)  # the forward process
            timestep = timestep_input(t, cfg.flow.timestep_scale)
            with torch.no_grad():
                v_old = velocity(self.old, pack, z_t, timestep).float()
                v_ref = velocity(self.ref, pack, z_t, timestep).float() if with_ref else None
            v_theta = velocity(self.policy, pack, z_t, timestep).float()
            out = nft.nft_loss(v_theta, v_old, z_t, x0, t, r, pack.sample_index, beta=rl.beta,
                               adv_clip_max=rl.adv_clip_max, sigma_min=cfg.flow.sigma_min, v_ref=v_ref,
                               kl_weight=rl.kl_weight, reduce="sum")
            loss = out.loss * float("nan") if step in cfg.train.debug_nan_steps else out.loss  # fault injection (tests)
            set_gradient_sync(self.policy, last and k == rl.train_timesteps - 1)
            (loss / denom).backward()
            with torch.no_grad():  # device tensors only: no host sync per micro-batch on a GPU
                deviation = nft.per_sample_mean((v_theta - v_old).double().pow(2), pack.sample_index, len(batch))
                count = torch.full((), float(len(batch)), dtype=torch.float64, device=self.device)  # (a fill, no copy)
                kl = (out.kl.double().sum(), count) if out.kl is not None else (count * 0, count * 0)
                for name, value in (("policy_loss", out.policy_loss.double()),
                                    ("unweighted_policy_loss", out.per_sample.double().sum()),
                                    ("positive_loss", out.positive.double().sum()),
                                    ("negative_loss", out.negative.double().sum()), ("old_deviation", deviation.sum()),
                                    ("samples", count), ("kl", kl[0]), ("kl_samples", kl[1])):
                    sums[name] += value.detach()
        return sums

    def train_step(self, step: int) -> dict:
        rl = self.rl
        t0 = time.perf_counter()
        items, mine, tokens, rewards, groups = self.rollout(step)
        t_rollout = time.perf_counter() - t0
        adv = nft.group_advantages(rewards, groups, rl.global_std)
        r_all = nft.optimality_probability(adv, rl.adv_clip_max).float()
        sums = Sums(RL_SUMS, self.device)
        grad_norms = []
        log_step = step % rl.log_every == 0 or step == rl.steps
        local = list(range(len(mine)))  # this rank's samples, split over the step's optimizer steps
        for c, chunk in enumerate(local[k::rl.gradient_steps] for k in range(rl.gradient_steps)):
            denom = len(chunk) * rl.train_timesteps  # the references' mean over samples and times
            batches = [chunk[i:i + rl.micro_batch] for i in range(0, len(chunk), rl.micro_batch)]
            loss = torch.zeros((), dtype=torch.float64, device=self.device)  # this optimizer step's, for the guard
            for b, batch in enumerate(batches):
                # the reference runs for the KL term, or once per logged step for the KL proxy
                with_ref = rl.kl_weight > 0 or (log_step and c == 0 and b == 0)
                part = self._backward_batch(step, items, mine, tokens, r_all, batch, denom, with_ref,
                                            last=b == len(batches) - 1)
                loss = loss + part["policy_loss"][0]
                sums += part
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), rl.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            # the harness's non-finite policy: a NaN/Inf step is skipped, too many in a row stop the run —
            # on every rank alike (the loss summed over ranks: one rank's Inf is every rank's, as in the stage trainer)
            dist.all_reduce(loss)
            self.counters["optimizer_steps"] += 1
            n = self.counters["optimizer_steps"]
            self.guard.step(loss, grad_norm, n, [items[mine[j]][0].task for j in chunk],
                            label=f"RL step {step}, optimizer step {n}" if rl.gradient_steps > 1 else f"step {step}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            grad_norms.append(float(grad_norm))
        decay = nft.old_policy_decay(self.counters["optimizer_steps"], rl.old_policy.flat_steps,
                                     rl.old_policy.ramp_rate, rl.old_policy.max_decay)
        nft.update_old_policy(self.old.parameters(), self.policy.parameters(), decay)
        dist.all_reduce(sums.tensor)
        self.counters["samples"] += len(items)
        s = sums.read()
        n = s["samples"]
        zero_std = nft.tied_groups(rewards, groups)
        return {
            "step": step, "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
            **{k: s[k] / n for k in ("policy_loss", "unweighted_policy_loss", "positive_loss", "negative_loss",
                                     "old_deviation")},
            "kl_proxy": s["kl"] / s["kl_samples"] if s["kl_samples"] else None,
            "adv_abs_mean": adv.abs().mean().item(), "zero_std_ratio": zero_std / rl.prompts_per_step,
            "grad_norm": sum(grad_norms) / len(grad_norms), "lr": self.scheduler.get_last_lr()[0],
            "old_policy_decay": decay, "seconds": time.perf_counter() - t0, "rollout_seconds": t_rollout,
        }

    # -- the harness's hooks ------------------------------------------------------------------

    def interval(self, step: int, rows: List[dict]):
        row = rows[-1]  # one RL step is a batch of G·K rollouts: its own figures, not an interval mean
        rl = self.rl
        metrics = {
            "reward/mean": row["reward_mean"], "reward/std": row["reward_std"],
            "loss/policy": row["policy_loss"], "loss/unweighted": row["unweighted_policy_loss"],
            "loss/positive": row["positive_loss"], "loss/negative": row["negative_loss"],
            "kl_proxy/stage_ref": row["kl_proxy"], "old_policy/deviation": row["old_deviation"],
            "old_policy/decay": row["old_policy_decay"], "advantage/abs_mean": row["adv_abs_mean"],
            "advantage/zero_std_ratio": row["zero_std_ratio"], "grad_norm": row["grad_norm"], "lr": row["lr"],
            "throughput/samples_per_s": rl.prompts_per_step * rl.samples_per_prompt / row["seconds"],
        }
        kl = f" kl {row['kl_proxy']:.3g}" if row["kl_proxy"] is not None else ""
        line = (f"step {step}/{rl.steps} reward {row['reward_mean']:.4f}±{row['reward_std']:.4f} "
                f"loss {row['policy_loss']:.4f}{kl} decay {row['old_policy_decay']:.3f} {row['seconds']:.1f}s")
        return metrics, line

    def after_loop(self) -> dict:
        """The held-out reward of the reference (the starting model) and of the trained policy."""
        rl = self.rl
        self.log(f"held-out reward: sampling {len(self.eval_prompts)} prompts × {rl.eval_samples_per_prompt} seeds "
                 f"with {rl.init_from}, then with the trained policy")  # (a minute or two on the tiny profile)
        before, after = self.evaluate(self.ref), self.evaluate(self.policy)
        self.log(f"held-out reward ({len(self.eval_prompts)} prompts × {rl.eval_samples_per_prompt} seeds): "
                 f"{rl.init_from} {before['mean']:.4f} ± {before['std']:.4f} → "
                 f"rl {after['mean']:.4f} ± {after['std']:.4f}")
        return {"before": before, "after": after}

    def weights(self) -> dict:
        return {"model": ModelState(self.policy).state_dict()}

    def summary(self, rows: List[dict], start: int, results: dict) -> dict:
        rl, before, after = self.rl, results["before"], results["after"]
        first = rows[: max(1, len(rows) // 10)]
        last = rows[-max(1, len(rows) // 10):]
        return {
            "reward": rl.reward, "optimizer_steps": self.counters["optimizer_steps"],
            "samples_seen": self.counters["samples"],
            "heldout": {"prompts": len(self.eval_prompts), "samples_per_prompt": rl.eval_samples_per_prompt,
                        "sampler_steps": rl.eval_steps, "tasks": list(rl.tasks),
                        "before": {"model": rl.init_from, **before}, "after": {"model": "rl", **after}},
            "reward_before_mean": before["mean"], "reward_before_std": before["std"],
            "reward_after_mean": after["mean"], "reward_after_std": after["std"],
            "reward_gain": after["mean"] - before["mean"],
            **paired_gain(before["per_prompt"], after["per_prompt"]),
            "train_reward_first_10pct": sum(r["reward_mean"] for r in first) / len(first) if rows else None,
            "train_reward_last_10pct": sum(r["reward_mean"] for r in last) / len(last) if rows else None,
        }


def train_rl(cfg: Config) -> dict:
    """Run the RL stage in this process (one rank of torchrun, or a 1-rank group of its own)."""
    with rank_process(cfg.train, use_gpu=cfg.rl.gpus_per_node > 0) as env:
        trainer = RLTrainer(cfg, env)
        trainer.setup()
        summary = trainer.run()
        del trainer  # the model, optimizer and EMA hold the device mesh: drop them before the group
        return summary

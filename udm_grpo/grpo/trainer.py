"""UDMGRPOTrainer: rollout -> reward -> advantages -> micro-batches -> update, on accelerate.

One optimiser step (`train_step`):
1. rollout: P prompts from the stream (the same on every process), each repeated G times
   (prompt-major); process r samples its contiguous slice of the P*G images with the live policy.
2. reward: scores are gathered from all processes and group-normalised into advantages.
3. micro-batches: Reduced-Step picks `train_steps` consecutive steps from a random start; states and
   actions per `forward_process` / `clean_response`; reference (and, for reused rollouts, old)
   log-probs are computed once.
4. update: log-prob of the action, ratio/clip, k3 KL; the loss is the mean over all (sample, step)
   pairs, accumulated over the micro-batches. Non-finite rewards, losses or gradients skip the update
   on every process together (the decision is all-reduced, so no process waits alone in a collective).

Precision: the trained weights are float32 masters (what the optimiser updates and checkpoints keep);
with `model.dtype: bfloat16` (or `training.mixed_precision: bf16`) every forward runs under bf16
autocast and the frozen reference is stored in bf16.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch

from ..config import Config, save_resolved
from ..data.prompts import PromptStream
from ..errors import TrainingError, UserError
from ..models.io import save_folder
from ..models.lora import adapter_base_name, read_adapter_params, save_adapter
from ..models.pipeline import URSAPipeline
from .advantages import expand_prompts, group_advantages, group_rows
from .checkpoint import begin_checkpoint, commit_checkpoint, load_checkpoint, resolve_checkpoint, write_rng
from .collect import Batch, Drawn, collect
from .control import StopOnSigint, all_processes
from .engine import build_engine, plain_accelerator_env, world_layout
from .evaluation import save_samples, summarise_eval
from .health import mean_where_known
from .logger import RunLogger, plot_curves
from .objective import action_log_probs, grpo_loss, token_entropy
from .policy import ImageLogits, MicroBatch, adapters_disabled, build_policy, micro_batch_logits
from .preflight import check_start
from .prompt_stats import PromptStats
from .replay import ReplayBuffer
from .rollout import Rollout, rollout
from .run_folder import RunFolder
from .states import pick_train_steps, training_states


class UDMGRPOTrainer:
    """UDM-GRPO on accelerate. `train()` runs the loop (resume, evaluation, checkpoints, logs);
    `train_step()` is one optimiser step; `save()` / `resume(spec)` write and read checkpoints.

    `pipeline` (default: loaded from `model.path`, or the shipped tiny world) and `reward` (default:
    built from `reward.name`) can be passed in; the transformer is trained in place.
    """

    def __init__(self, config: Config, pipeline: URSAPipeline | None = None, reward=None, accelerator=None,
                 progress: bool = True):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.cfg, c = config, config
        world = accelerator.num_processes if accelerator else int(os.environ.get("WORLD_SIZE", 1))
        start = check_start(c, world, pipeline, reward is not None)  # what `train --check` checks, before any setup
        self.spec, self.plan = start.spec, start.plan
        with plain_accelerator_env():
            self.acc = accelerator or Accelerator(
                cpu=not torch.cuda.is_available(),
                mixed_precision=c.training.mixed_precision if self.spec.kind == "ddp" else "no",
                kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.progress = progress and self.acc.is_main_process
        self.compute_dtype = torch.bfloat16 if c.bf16 else torch.float32
        if pipeline is None:
            pipeline = URSAPipeline.from_pretrained(start.folder, device=self.acc.device, dtype=torch.float32)
        self.pipe = pipeline
        if reward is None:
            from ..rewards import build_reward

            reward = build_reward(c.reward.name, c.reward.params, c.reward.weights, c.reward.normalize)
        self.reward = reward
        self.lora = c.model.lora is not None
        self.base = adapter_base_name(c.model.path, start.folder)  # what a LoRA checkpoint names as its base
        self.model, self.reference = build_policy(self.pipe.transformer, c.model, c.reward.kl_beta, self.compute_dtype)
        self.engine = build_engine(self.spec, self.acc, ImageLogits(self.model), c.training,
                                   self.plan.grad_accum_steps, self.plan.micro_batch_size, self.compute_dtype)
        self.policy, self.optimizer = self.engine.module, self.engine.optimizer
        self.generator = torch.Generator(device=self.acc.device).manual_seed(c.training.seed + 1000 * self.rank)
        self.data = PromptStream(start.train, c.training.seed, c.data.shuffle)
        self.eval_records = start.held_out
        self.prompt_stats = PromptStats(c.data.history)
        self.replay = ReplayBuffer(c.training.reuse_rollouts, c.training.max_staleness)
        self.step, self.nonfinite, self.skipped = 0, 0, 0
        self.updates, self.rollout_images, self.train_seconds = 0, 0, 0.0  # optimiser updates, images drawn, time
        self.run_dir = Path(c.experiment.output_dir)
        self.logger = None
        self._last_eval_images = None

    def autocast(self):
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.compute_dtype != torch.float32)

    @contextlib.contextmanager
    def _sampling(self):
        """Rollouts and evaluation: no grad, eval mode (no dropout), compute-dtype autocast; yields the policy's
        logits function for the sampler."""
        model = self.engine.inner.model
        model.eval()
        try:
            with torch.no_grad(), self.autocast():
                yield self.engine.sampler()
        finally:
            model.train()

    # ---- one optimiser step -----------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimiser step (`updates_per_rollout` updates on one rollout, plus the reused ones). Returns its
        metrics, namespaced `reward/`, `train/`, `health/`, `progress/` and `time/`; a skipped step has
        `train/skipped` (the reason)."""
        c = self.cfg
        clock = [("start", time.perf_counter())]
        self._reward_seconds = 0.0
        batch = self._collect()
        metrics = batch.metrics
        clock.append(("rollout", time.perf_counter()))
        self.rollout_images += batch.images
        if batch.scores is None:
            return self._skip(metrics, "non-finite reward")
        steps = pick_train_steps(c.sampling.train_start, c.sampling.train_steps, self.generator)
        fresh = self._micro_batches(batch.rollout, self._advantages(batch), steps)
        clock.append(("states", time.perf_counter()))
        update = self._update(fresh, self.replay.reused(self.updates))
        if update is None:
            return self._skip(metrics, "non-finite loss or gradient")
        clock.append(("update", time.perf_counter()))
        self.replay.add(fresh, self.updates)
        self.updates += c.training.updates_per_rollout
        self.nonfinite = 0
        metrics.update(update)
        metrics["train/steps"] = f"{steps[0]}-{steps[-1]}"
        metrics.update({f"time/{name}": round(t - clock[i][1], 4) for i, (name, t) in enumerate(clock[1:])})
        metrics["time/rollout"] = round(metrics["time/rollout"] - self._reward_seconds, 4)  # the draws' sampling
        metrics["time/reward"] = round(self._reward_seconds, 4)
        metrics["time/total"] = round(clock[-1][1] - clock[0][1], 4)
        return metrics

    def _draw(self, records: list[dict]) -> Drawn:
        """G images of each of `records` (this process's contiguous share of them), rewarded on every process."""
        c, world = self.cfg, self.world
        expanded = expand_prompts(records, c.sampling.num_images_per_prompt)
        per = len(expanded) // world
        local = expanded[self.rank * per: (self.rank + 1) * per]
        with self._sampling() as logits:
            ro = rollout(self.pipe, logits, [x["prompt"] for x in local], local, c.sampling.rollout.options(),
                         self.generator)
        began = time.perf_counter()
        out = self.reward(ro.images, ro.prompts, ro.metadata)
        self._reward_seconds += time.perf_counter() - began
        gather = lambda x: self.acc.gather(  # noqa: E731
            torch.as_tensor(x, dtype=torch.float32, device=self.acc.device)).cpu()
        return Drawn(records, ro, gather(out.scores), {name: gather(v) for name, v in out.values.items()})

    def _collect(self) -> Batch:
        c = self.cfg
        weight = (lambda r: self.prompt_stats.weight(r, c.data.curriculum_floor)) if c.data.curriculum else None
        return collect(self._draw, lambda n: self.data.next(n, weight), c.sampling, self.rank, self.world,
                       self.pipe.transformer.config.lm_head_size, self._mean_over_processes)

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        return mean_where_known(values, lambda x: self.acc.reduce(x.to(self.acc.device), "sum").cpu())

    def _advantages(self, batch: Batch) -> torch.Tensor:
        """This process's slice of the advantages, Float[images_per_process]; then every group drawn this step
        joins the per-prompt statistics."""
        r, G, per = self.cfg.reward, self.cfg.sampling.num_images_per_prompt, self.plan.images_per_process
        prompts = [x["prompt"] for x in batch.records]
        history = self.prompt_stats.history(prompts) if r.per_prompt_stats else None
        adv = group_advantages(batch.scores, G, r.scale_rewards, r.advantage_eps, r.advantage_clipping,
                               history).float()
        for d in batch.rounds:
            self.prompt_stats.update([x["prompt"] for x in d.records], group_rows(d.scores, G),
                                     d.passes(G, getattr(self.reward, "pass_value", "strict")))
        return adv[self.rank * per: (self.rank + 1) * per].to(self.acc.device)

    def _micro_batches(self, ro: Rollout, adv: torch.Tensor, steps: list[int]) -> list[MicroBatch]:
        """Training states at the trained steps, split into micro-batches, with reference log-probs and, when
        samples are trained again later, the drawing policy's log-probs."""
        s, t = self.cfg.sampling, self.cfg.training
        trained = training_states(ro, steps, self.pipe.scheduler.path, s.forward_process, s.clean_response,
                                  self.generator)
        mb, n = self.plan.micro_batch_size, len(ro)
        micro = [MicroBatch(ts.t, ro.grid, ro.text_ids[sl], None if ro.uncond_ids is None else ro.uncond_ids[sl],
                            ts.states[sl], ts.actions[sl], adv[sl])
                 for ts in trained for sl in (slice(i, i + mb) for i in range(0, n, mb))]
        with torch.no_grad(), self.autocast():
            for m in micro:
                m.ref_logp = self._reference_logp(m)
                if t.updates_per_rollout > 1 or t.reuse_rollouts > 1:
                    m.old_logp = action_log_probs(self._policy_logits(m), m.actions)
        return micro

    def _policy_logits(self, m: MicroBatch, module=None) -> torch.Tensor:
        """Training logits Float[b, N, K] of the policy (or `module`), guided as the rollout was."""
        return micro_batch_logits(module or self.policy, m, self.cfg.sampling.rollout)

    def _reference_logp(self, m: MicroBatch) -> torch.Tensor | None:
        if self.lora:
            with adapters_disabled(self.engine.inner.model):
                return action_log_probs(self._policy_logits(m), m.actions)
        if self.reference is None:
            return None
        return action_log_probs(self._policy_logits(m, ImageLogits(self.reference)), m.actions)

    def _update(self, fresh: list[MicroBatch], reused: list[MicroBatch]) -> dict | None:
        """Accumulate the loss over this rollout's micro-batches and the reused ones, and step the optimiser
        (`updates_per_rollout` times). The loss is sum over samples / D, D = the samples trained (grpo, dapo) or
        the images per process x train_steps (dr_grpo). Returns `train/` metrics averaged over micro-batches and
        processes, or None when skipped."""
        c, r = self.cfg, self.cfg.reward
        micro = fresh + reused
        samples = sum(len(m.advantages) for m in micro)
        norm = self.plan.images_per_process * c.sampling.train_steps if r.loss_type == "dr_grpo" else samples
        sums: dict[str, float] = {"reused_fraction": (samples - sum(len(m.advantages) for m in fresh)) / samples}
        grad_norm: float | None = float("nan")
        lr = c.training.lr * min(1.0, (self.step + 1) / max(1, c.training.lr_warmup_steps))  # resumes exactly
        for update in range(c.training.updates_per_rollout):
            self.engine.zero_grad()
            for i, m in enumerate(micro):
                last = i == len(micro) - 1
                with self.engine.micro_context(last):
                    with self.autocast():
                        logits = self._policy_logits(m)
                        logp = action_log_probs(logits, m.actions)
                    old = m.old_logp if update or i >= len(fresh) else None
                    loss, values = grpo_loss(logp, m.advantages, old, m.ref_logp, r.ratio_clipping, r.kl_beta,
                                             r.kl_mode, r.ratio_clipping_high, r.importance_sampling_level, norm)
                    if not all_processes(self.acc, bool(torch.isfinite(loss))):
                        self.engine.abort(loss)
                        return None
                    self.engine.backward(loss * self.plan.grad_accum_steps, last)  # the engine divides by it
                values["entropy"] = token_entropy(logits.detach()).mean().item()
                weight = len(m.advantages) / (samples * c.training.updates_per_rollout)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
            grad_norm = self.engine.step(lr)
            if grad_norm is None:
                return None
        sums = self._mean_over_processes(sums)  # equal shares
        return {**{f"train/{k}": v for k, v in sums.items()}, "train/grad_norm": grad_norm, "train/lr": lr}

    def _skip(self, metrics: dict, why: str) -> dict:
        self.nonfinite += 1
        self.skipped += 1
        metrics.update({"train/skipped": why, "train/skipped_total": self.skipped})
        if self.nonfinite > self.cfg.training.max_nonfinite:
            raise TrainingError(f"{self.nonfinite} consecutive updates were skipped ({why}); stopping. Check the "
                                "reward and lower training.lr (the weights were never updated with bad values).")
        return metrics

    # ---- evaluation and samples -------------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out prompts (never optimised), fixed seed; see `evaluation.summarise_eval` for the keys.
        Processes sample contiguous shares of the records; trailing processes may get none (under sharded
        parameters, whose forwards are collective, they sample repeats of the first record, then drop them)."""
        e, records = self.cfg.experiment, self.eval_records
        per = math.ceil(len(records) / self.world)
        local = records[self.rank * per: (self.rank + 1) * per]
        real = len(local)
        if self.engine.sharded:
            local = local + [records[0]] * (per - real)
        gen = torch.Generator(device=self.acc.device).manual_seed(12345 + self.rank)
        options = self.cfg.sampling.rollout.options().replace(num_inference_steps=e.eval_num_inference_steps,
                                                              guidance_scale=e.eval_guidance_scale)
        with self._sampling() as logits:
            ro = rollout(self.pipe, logits, [x["prompt"] for x in local], local, options, gen)
        out = self.reward(ro.images[:real], ro.prompts[:real], ro.metadata[:real])
        scores = self._gather_all(out.scores, len(records))
        values = {name: self._gather_all(v, len(records)) for name, v in out.values.items()}
        self._last_eval_images = ro.images[:real] if self.rank == 0 else None
        return summarise_eval(records, scores, values)

    def _gather_all(self, values, n: int) -> torch.Tensor:
        """Float[n]: per-process values (contiguous shares, only trailing ones short) from every process."""
        local = torch.as_tensor(values).float().to(self.acc.device)
        return self.acc.gather(self.acc.pad_across_processes(local)).cpu()[:n]

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        """Write `<run>/checkpoints/step-N` atomically (all processes take part) and return it."""
        checkpoints = self.run_dir / "checkpoints"
        tmp = checkpoints / f"step-{self.step:06d}.tmp"
        if self.acc.is_main_process:
            begin_checkpoint(checkpoints, self.step)
        self.acc.wait_for_everyone()
        write_rng(tmp, self.rank, {"generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                                   **self.replay.state_tensors()})
        model = self.engine.inner.model
        weights, opt_state = self.engine.full_state()  # every process takes part (gathers); LoRA: the adapters
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"step": self.step, "data": self.data.state(), "skipped": self.skipped,
                     "nonfinite": self.nonfinite, "world_size": self.world, "engine": self.spec.describe(),
                     "updates": self.updates, "rollout_images": self.rollout_images,
                     "train_seconds": self.train_seconds, "prompt_stats": self.prompt_stats.state()}
            write = (lambda d: save_adapter(model, d / "adapter", weights, self.base)) if self.lora else (
                lambda d: save_folder(d / "transformer", model.config.to_dict(), state=weights))
            commit_checkpoint(tmp, write, opt_state, state, self.cfg.experiment.keep_checkpoints)
        self.acc.wait_for_everyone()
        return tmp.with_name(tmp.name[:-4])

    def resume(self, spec: str | Path) -> Path:
        """Restore weights, optimizer, prompt cursor, counters and RNG from 'latest', a run folder or a
        checkpoint folder; returns the checkpoint folder."""
        folder = resolve_checkpoint(spec, self.run_dir)
        self._restore(folder)
        return folder

    def _restore(self, folder: Path) -> None:
        """`resume` from a resolved checkpoint folder."""
        opt_state, state, rng = load_checkpoint(folder, self.rank)
        if state.get("world_size", 1) != self.world:
            raise UserError(f"{folder} was written by {state['world_size']} processes; resume with the same number.")
        if self.lora:
            names = [n for n, _ in self.engine.named_params()]
            weights = read_adapter_params(self.engine.inner.model, folder / "adapter", names)
        else:
            from ..models.transformer import URSATransformer

            weights = URSATransformer.from_pretrained(folder / "transformer", dtype=torch.float32).state_dict()
        self.engine.load_full_state(weights, opt_state)  # every process: into its shards
        self.data.load_state(state["data"])
        self.step, self.skipped, self.nonfinite = state["step"], state["skipped"], state["nonfinite"]
        self.updates = state.get("updates", self.step * self.cfg.training.updates_per_rollout)
        self.rollout_images = state.get("rollout_images", 0)
        self.train_seconds = state.get("train_seconds", 0.0)
        self.prompt_stats.load_state(state.get("prompt_stats", {}))
        self.replay.load_state_tensors(rng, self.acc.device)
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])

    # ---- the loop -----------------------------------------------------------------------------
    def train(self, max_steps: int | None = None, resume: str | Path | None = None, force: bool = False) -> dict:
        """Run until `max_steps` (the total, default training.max_steps); `resume`: 'latest', a run folder
        or a checkpoint folder. Ctrl-C (SIGINT) finishes the current step, saves a checkpoint and returns
        with "interrupted": True. Returns {"metrics", "eval", "first_eval", "step", "interrupted"}.
        The run folder is locked while it runs; a start that fails before its first step leaves it as found."""
        c, e = self.cfg, self.cfg.experiment
        max_steps = max_steps or c.training.max_steps
        resume = resume or e.resume_from_checkpoint
        folder = resolve_checkpoint(resume, self.run_dir) if resume else None
        if self.step and folder is None:  # this trainer goes on with its own run
            return self._loop(max_steps, lambda: None)
        with RunFolder(self.acc, self.run_dir, folder, force, [c.model.path]) as run:
            try:
                self._start(folder, max_steps)
                return self._loop(max_steps, run.started)
            except BaseException:
                if self.logger:  # closed before a failed start's files are removed
                    self.logger.close()
                    self.logger = None
                raise

    def _start(self, folder: Path | None, max_steps: int) -> None:
        """Resume from `folder` (if any), then the main process writes config.yaml and opens the logs."""
        c, e = self.cfg, self.cfg.experiment
        if folder is not None:
            self._restore(folder)
            if self.step >= max_steps:
                raise UserError(f"{folder} is at step {self.step}, which already reaches the {max_steps} steps asked "
                                f"for; pass the new total, e.g. --steps {self.step + max(1, e.save_every or 20)}.")
        if self.acc.is_main_process:
            if folder is not None:
                print(f"resumed from {folder} at step {self.step}")
            save_resolved(c, self.run_dir / "config.yaml")
            self.logger = RunLogger(self.run_dir, wandb_config=None if not e.wandb else vars(c))
            if folder is not None:
                self.logger.truncate_after(self.step)
            print(f"{world_layout(self.world, self.spec)}; main process on {self.acc.device}\n{self.plan.describe()}")

    def _loop(self, max_steps: int, started) -> dict:
        """Steps until `max_steps` with evaluation, logs and checkpoints; `started()` after the first step."""
        from tqdm.auto import tqdm

        e = self.cfg.experiment
        first_eval = last_eval = self._eval_and_log() if self.step == 0 and e.eval_every else {}
        metrics: dict = {}
        interrupted = False
        with StopOnSigint() as stop, tqdm(total=max_steps, initial=self.step, desc="udm-grpo",
                                          disable=not self.progress) as bar:  # closed (a new line) on errors too
            while self.step < max_steps:
                began = time.perf_counter()
                metrics = self.train_step()
                self.train_seconds += time.perf_counter() - began
                metrics.update(self._progress())
                self.step += 1
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                kl=f"{metrics.get('train/kl', float('nan')):.4f}")
                if self.logger and (self.step % e.log_every == 0 or "train/skipped" in metrics):
                    self.logger.log(self.step, metrics)
                interrupted = not all_processes(self.acc, not stop.requested)
                if e.eval_every and self.step % e.eval_every == 0 and not interrupted:
                    last_eval = self._eval_and_log()
                if interrupted or (e.save_every and self.step % e.save_every == 0) or self.step == max_steps:
                    self.save()
                if interrupted:
                    break
                started()
        if e.eval_every and self.step % e.eval_every != 0 and not interrupted:  # every process: it gathers
            last_eval = self._eval_and_log()
        if self.logger:
            plot_curves(self.run_dir)
            self.logger.close()
        return {"metrics": metrics, "eval": last_eval, "first_eval": first_eval, "step": self.step,
                "interrupted": interrupted}

    def _progress(self) -> dict:
        """`progress/rollout_images` (drawn since step 0, on all processes) and `progress/minutes` (time in
        training steps since step 0: rollouts, rewards and updates, not evaluations or checkpoints)."""
        return {"progress/rollout_images": self.rollout_images, "progress/minutes": self.train_seconds / 60}

    def _eval_and_log(self) -> dict:
        result = self.evaluate()
        if self.logger:
            self.logger.log(self.step, {**result, **self._progress()}, "eval.jsonl")
            if self._last_eval_images is not None:
                save_samples(self._last_eval_images, self.eval_records,
                             self.run_dir / "samples" / f"step-{self.step:06d}.png")
        return result


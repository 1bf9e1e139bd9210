"""UDMGRPOTrainer: rollout -> reward -> advantages -> states -> objective -> step, on accelerate.

One optimiser step (`train_step`):
1. P prompts from the stream (the same on every process), each repeated G times (prompt-major);
   process r takes its contiguous slice of the P*G samples.
2. Rollout with the live policy under no_grad (CFG-free unless rollout.guidance_scale > 1).
3. Reward; scores are gathered from all processes and group-normalised into advantages.
4. Reduced-Step: `train_steps` consecutive steps from a random start; states and actions per
   `forward_process` / `clean_response`.
5. For each (trained step, micro-batch): log-prob of the action, ratio/clip, k3 KL to the reference;
   the loss is the mean over all (sample, step) pairs; `updates_per_rollout` > 1 reuses the rollout
   with stored old log-probs. Non-finite rewards, losses or gradients skip the update.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import torch

from ..config import Config, save_resolved
from ..data.prompts import PromptStream, balance_tags, load_prompts
from ..diffusion.sampler import guided_logits
from ..errors import UserError
from ..models.pipeline import URSAPipeline
from .advantages import expand_prompts, group_advantages, group_stats
from .batching import plan_from_config
from .checkpoint import begin_checkpoint, commit_checkpoint, load_checkpoint, resolve_resume, write_rng
from .logger import RunLogger, plot_curves
from .objective import action_log_probs, grpo_loss, token_entropy
from .rollout import rollout
from .states import pick_train_steps, training_states


def eval_records(records: list[dict], e) -> list[dict]:
    """The held-out evaluation set: `eval_images_per_tag` images per tag when every record has a tag,
    else the first `num_eval_prompts` prompts with `eval_images_per_prompt` images each."""
    if e.eval_images_per_tag and all("tag" in r for r in records):
        return balance_tags(records, e.eval_images_per_tag)
    return [x for x in records[: e.num_eval_prompts] for _ in range(e.eval_images_per_prompt)]


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite updates)."""


class _ImageLogits(torch.nn.Module):
    """Routes `image_logits` through `forward`, so DDP/FSDP wrappers see the call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text_ids, image_ids, grid):
        return self.model.image_logits(text_ids, image_ids, tuple(grid))


class _Caller:
    """Gives a callable the `image_logits` method the sampler helpers expect."""

    def __init__(self, fn):
        self.image_logits = fn


class UDMGRPOTrainer:
    def __init__(self, config: Config, pipeline: URSAPipeline | None = None, reward=None, accelerator=None,
                 progress: bool = True):
        from accelerate import Accelerator

        self.cfg, c = config, config
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(),
                                              mixed_precision=c.training.mixed_precision)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.plan = plan_from_config(c, self.world)
        self.progress = progress and self.acc.is_main_process
        if pipeline is None:
            from ..tinyworld import SHIPPED_MODEL

            dtype = torch.bfloat16 if c.model.dtype == "bfloat16" else torch.float32
            pipeline = URSAPipeline.from_pretrained(c.model.path or SHIPPED_MODEL, device=self.acc.device, dtype=dtype)
        self.pipe = pipeline
        if reward is None:
            from ..rewards import build_reward

            reward = build_reward(c.reward.name, c.reward.params)
        self.reward = reward
        model = self.pipe.transformer
        model.set_gradient_checkpointing(c.model.gradient_checkpointing)
        self.lora = c.model.lora is not None
        self.reference = None
        if self.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(**c.model.lora))
        elif c.reward.kl_beta > 0:
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=c.training.lr, betas=tuple(c.training.betas),
                                weight_decay=c.training.weight_decay)
        self.policy, self.optimizer = self.acc.prepare(_ImageLogits(model), opt)
        self.generator = torch.Generator(device=self.acc.device).manual_seed(c.training.seed + 1000 * self.rank)
        train_source = c.data.train or "shapes:train"
        self.data = PromptStream(load_prompts(train_source), c.training.seed, c.data.shuffle)
        self.eval_records = eval_records(load_prompts(c.data.test or "shapes:test"), c.experiment)
        self.step, self.nonfinite, self.skipped = 0, 0, 0
        self.run_dir = Path(c.experiment.output_dir)
        self.logger = None

    # ---- one optimiser step -----------------------------------------------------------------
    def _policy_logits(self, text, states, grid, t, uncond, module=None):
        """Training logits Float[B, N, K]: the guided mixture when the rollout used guidance at t."""
        call = _Caller(module or (lambda a, b, g: self.policy(a, b, g)))
        r = self.cfg.sampling.rollout
        scale = r.guidance_scale if t < r.guidance_trunc else 1.0
        return guided_logits(call, text, states, grid, scale, uncond)

    def _reference_logp(self, text, states, actions, grid, t, uncond):
        if not self.lora and self.reference is None:
            return None
        with torch.no_grad():
            if self.lora:
                with self.acc.unwrap_model(self.policy).model.disable_adapter():
                    logits = self._policy_logits(text, states, grid, t, uncond)
            else:
                logits = self._policy_logits(text, states, grid, t, uncond, self.reference.image_logits)
            return action_log_probs(logits, actions)

    def train_step(self) -> dict:
        c, G = self.cfg, self.cfg.sampling.num_images_per_prompt
        timer = {"start": time.perf_counter()}
        records = self.data.next(c.sampling.num_prompts_per_step)
        expanded = expand_prompts(records, G)
        per = self.plan.images_per_process
        local = expanded[self.rank * per: (self.rank + 1) * per]
        r = c.sampling.rollout
        unwrapped = self.acc.unwrap_model(self.policy).model
        ro = rollout(self.pipe, unwrapped, [x["prompt"] for x in local], local, r.num_inference_steps,
                     r.guidance_scale, r.guidance_trunc, r.height, r.width, self.generator, r.batch_size)
        timer["rollout"] = time.perf_counter()
        out = self.reward(ro.images, ro.prompts, ro.metadata)
        scores = self.acc.gather(torch.as_tensor(out.scores, dtype=torch.float32, device=self.acc.device))
        timer["reward"] = time.perf_counter()
        metrics: dict = {}
        for name, values in out.values.items():
            v = self.acc.gather(torch.as_tensor(values, dtype=torch.float32, device=self.acc.device))
            metrics[f"reward_{name}"] = v.float().mean().item()
        if not torch.isfinite(scores).all():
            return self._skip(metrics, "non-finite reward", timer)
        metrics.update(group_stats(scores.cpu(), G))
        adv_all = group_advantages(scores.cpu(), G, c.reward.global_std, c.reward.advantage_eps,
                                   c.reward.advantage_clipping).float()
        adv = adv_all[self.rank * per: (self.rank + 1) * per].to(self.acc.device)
        steps = pick_train_steps(c.sampling.train_start, c.sampling.train_steps, self.generator)
        batches = training_states(ro, steps, self.pipe.scheduler.path, c.sampling.forward_process,
                                  c.sampling.clean_response, self.generator)
        mb = self.plan.micro_batch_size
        micro = [(ts, slice(i, i + mb)) for ts in batches for i in range(0, per, mb)]
        ref_logp = [self._reference_logp(ro.text_ids[s], ts.states[s], ts.actions[s], ro.grid, ts.t,
                                         None if ro.uncond_ids is None else ro.uncond_ids[s]) for ts, s in micro]
        old_logp = [None] * len(micro)
        if c.training.updates_per_rollout > 1:
            with torch.no_grad():
                old_logp = [action_log_probs(self._policy_logits(ro.text_ids[s], ts.states[s], ro.grid, ts.t,
                                                                 None if ro.uncond_ids is None else ro.uncond_ids[s]),
                                             ts.actions[s]).mean(1) for ts, s in micro]
        sums: dict[str, float] = {}
        for update in range(c.training.updates_per_rollout):
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            for i, (ts, s) in enumerate(micro):
                uncond = None if ro.uncond_ids is None else ro.uncond_ids[s]
                sync = i == len(micro) - 1
                with self.acc.no_sync(self.policy) if not sync else contextlib.nullcontext():
                    logits = self._policy_logits(ro.text_ids[s], ts.states[s], ro.grid, ts.t, uncond)
                    logp = action_log_probs(logits, ts.actions[s])
                    loss, m = grpo_loss(logp, adv[s], None if update == 0 else old_logp[i], ref_logp[i],
                                        c.reward.ratio_clipping, c.reward.kl_beta, c.reward.kl_mode)
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    self.acc.backward(loss / len(micro))
                m["entropy"] = token_entropy(logits.detach()).mean().item()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v / (len(micro) * c.training.updates_per_rollout)
            grad_norm = float("nan")
            if finite:
                max_norm = c.training.max_grad_norm or float("inf")
                grad_norm = float(self.acc.clip_grad_norm_(self.policy.parameters(), max_norm))
            if not finite or not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                return self._skip({**metrics, **sums}, "non-finite loss or gradient", timer)
            for group in self.optimizer.param_groups:  # a function of the step: resumes exactly
                group["lr"] = c.training.lr * min(1.0, (self.step + 1) / max(1, c.training.lr_warmup_steps))
            self.optimizer.step()
            metrics["grad_norm"] = grad_norm
        timer["train"] = time.perf_counter()
        self.nonfinite = 0
        if self.world > 1:  # per-process means -> means over all processes (equal shares)
            reduced = self.acc.reduce(torch.tensor(list(sums.values()), device=self.acc.device), "mean")
            sums = dict(zip(sums, reduced.tolist(), strict=True))
        metrics.update(sums)
        metrics.update(self._times(timer))
        metrics["train_steps"] = f"{steps[0]}-{steps[-1]}"
        return metrics

    def _times(self, timer: dict) -> dict:
        marks = list(timer.items())
        return {f"time_{name}": round(t - marks[i][1], 4) for i, (name, t) in enumerate(marks[1:])}

    def _skip(self, metrics: dict, why: str, timer: dict) -> dict:
        self.nonfinite += 1
        self.skipped += 1
        metrics.update({"skipped": why, "skipped_total": self.skipped})
        if self.nonfinite > self.cfg.training.max_nonfinite:
            raise TrainingError(f"{self.nonfinite} consecutive updates were skipped ({why}); stopping. Check the "
                                "reward and lower training.lr (the weights were never updated with bad values).")
        return metrics

    # ---- evaluation and samples -------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out prompts (never optimised), fixed seed. Per reward value: the mean over images
        (`NAME_images`) and, for tagged prompts, per tag (`NAME/TAG`) and their mean (`NAME`, GenEval's
        overall); `score` is the reward's own score."""
        e, records = self.cfg.experiment, self.eval_records
        per = math.ceil(len(records) / self.world)
        local = records[self.rank * per: (self.rank + 1) * per]
        gen = torch.Generator(device=self.acc.device).manual_seed(12345 + self.rank)
        r = self.cfg.sampling.rollout
        ro = rollout(self.pipe, self.acc.unwrap_model(self.policy).model, [x["prompt"] for x in local], local,
                     e.eval_num_inference_steps, e.eval_guidance_scale, r.guidance_trunc, r.height, r.width, gen,
                     r.batch_size)
        out = self.reward(ro.images, ro.prompts, ro.metadata)
        result = {"score": self._gather_all(out.scores, len(records)).mean().item()}
        tags = [x.get("tag") for x in records]
        for name, values in out.values.items():
            v = self._gather_all(values, len(records))
            result[f"{name}_images"] = v.mean().item()
            if all(tags):
                by_tag = {t: v[[i for i, x in enumerate(tags) if x == t]].mean().item() for t in dict.fromkeys(tags)}
                result[name] = sum(by_tag.values()) / len(by_tag)
                result.update({f"{name}/{t}": m for t, m in by_tag.items()})
        self._last_eval_images = ro.images
        return result

    def _gather_all(self, values, n: int) -> torch.Tensor:
        """Float[n]: per-process values (contiguous shares, only trailing ones short) from every process."""
        local = torch.as_tensor(values).float().to(self.acc.device)
        return self.acc.gather(self.acc.pad_across_processes(local)).cpu()[:n]

    def _save_samples(self) -> None:
        from ..images import make_grid, save_png

        if self.acc.is_main_process and getattr(self, "_last_eval_images", None) is not None:
            pick = sorted(set(torch.linspace(0, len(self._last_eval_images) - 1, 16).long().tolist()))
            labels = [self.eval_records[i]["prompt"] for i in pick]
            save_png(make_grid(self._last_eval_images[pick], nrow=4, scale=2),
                     self.run_dir / "samples" / f"step-{self.step:06d}.png")
            (self.run_dir / "samples" / f"step-{self.step:06d}.txt").write_text("\n".join(labels) + "\n")

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        checkpoints = self.run_dir / "checkpoints"
        tmp = checkpoints / f"step-{self.step:06d}.tmp"
        if self.acc.is_main_process:
            begin_checkpoint(checkpoints, self.step)
        self.acc.wait_for_everyone()
        write_rng(tmp, self.rank, {"generator": self.generator.get_state(), "torch": torch.get_rng_state()})
        self.acc.wait_for_everyone()
        final = tmp.with_name(tmp.name[:-4])
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.policy).model
            state = {"step": self.step, "data": self.data.state(), "skipped": self.skipped,
                     "nonfinite": self.nonfinite, "world_size": self.world}
            commit_checkpoint(tmp, lambda d: model.save_pretrained(d / ("adapter" if self.lora else "transformer")),
                              self.optimizer.state_dict(), state, self.cfg.experiment.keep_checkpoints)
        self.acc.wait_for_everyone()
        return final

    def resume(self, spec: str) -> Path:
        folder = resolve_resume(spec, self.run_dir / "checkpoints")
        opt_state, state, rng = load_checkpoint(folder, self.rank)
        if state.get("world_size", 1) != self.world:
            raise UserError(f"{folder} was written by {state['world_size']} processes; resume with the same number.")
        model = self.acc.unwrap_model(self.policy).model
        if self.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(folder / "adapter" / "adapter_model.safetensors")))
        else:
            from ..models.transformer import URSATransformer

            loaded = URSATransformer.from_pretrained(folder / "transformer", dtype=next(model.parameters()).dtype)
            model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(opt_state)
        self.data.load_state(state["data"])
        self.step, self.skipped, self.nonfinite = state["step"], state["skipped"], state["nonfinite"]
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        return folder

    # ---- the loop -----------------------------------------------------------------------------
    def train(self, max_steps: int | None = None, resume: str | None = None) -> dict:
        """Run until `max_steps` (default training.max_steps). Returns the last metrics and eval."""
        from tqdm.auto import tqdm

        c, e = self.cfg, self.cfg.experiment
        max_steps = max_steps or c.training.max_steps
        resume = resume or e.resume_from_checkpoint
        if resume:
            folder = self.resume(resume)
            if self.acc.is_main_process:
                print(f"resumed from {folder} at step {self.step}")
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(c, self.run_dir / "config.yaml")
            self.logger = RunLogger(self.run_dir, wandb_config=None if not e.wandb else vars(c))
            if resume:
                self.logger.truncate_after(self.step)
            print(self.plan.describe())
        last_eval: dict = {}
        if self.step == 0 and e.eval_every:
            last_eval = self._eval_and_log()
        bar = tqdm(total=max_steps, initial=self.step, desc="udm-grpo", disable=not self.progress)
        metrics: dict = {}
        while self.step < max_steps:
            metrics = self.train_step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.3f}",
                            kl=f"{metrics.get('kl', float('nan')):.4f}")
            if self.logger and (self.step % e.log_every == 0 or "skipped" in metrics):
                self.logger.log(self.step, metrics)
            if e.eval_every and self.step % e.eval_every == 0:
                last_eval = self._eval_and_log()
            if (e.save_every and self.step % e.save_every == 0) or self.step == max_steps:
                self.save()
        bar.close()
        if self.logger:
            if e.eval_every and self.step % e.eval_every != 0:
                last_eval = self._eval_and_log()
            plot_curves(self.run_dir)
            self.logger.close()
        return {"metrics": metrics, "eval": last_eval, "step": self.step}

    def _eval_and_log(self) -> dict:
        result = self.evaluate()
        if self.logger:
            self.logger.log(self.step, result, "eval.jsonl")
            self._save_samples()
        return result

"""The training loop. `dtrain.parallelize` builds what this rank holds (model chunks, schedule, gradient
synchronisation with the optimizer); the loop runs gradient accumulation, loss scaling, clipping, the LR
schedule, evaluation, logging and checkpoints on it.

The loss of a step is sum(target-token losses) / (target tokens in the global batch). Each micro-batch's
backward uses that same global denominator, so summing gradients over micro-batches and data-parallel
ranks yields the gradient of the global-batch mean loss exactly, whatever the layout. Every rank reads
the denominator off the dataset (`global_target_tokens`: a pure function of (seed, step), all positions
for token streams), so it costs no collective and a resume in another layout sees the same one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dtrain import checkpoint, run_folder
from dtrain.config import Config, TrainConfig, microbatches_per_rank, to_dict
from dtrain.data import build_dataset, global_target_tokens, rank_microbatches
from dtrain.data_files import read_manifest
from dtrain.metrics import MetricsLogger
from dtrain.model import Transformer, count_params, flops_per_token, freeze
from dtrain.parallelize import build_model_chunks, parallelize
from dtrain.runtime import peak_flops, peak_memory_bytes
from parallel import rng
from parallel.context_parallel import split_microbatch
from parallel.data_parallel import torch_adamw
from parallel.grad_sync import AdamWConfig, clip_
from parallel.grid import Grid
from parallel.ledger import CommLedger
from parallel.moe import aux_grad_scales, set_aux_grad_scale
from parallel.precision import LossScaler, wide


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite gradients); the last good checkpoint is left intact."""


def lr_at(step: int, t: TrainConfig) -> float:
    """The learning rate of 0-based optimizer step `step` of `t.steps`: linear warm-up, then cosine decay.

    With W = warmup_steps, S = steps, lr and min_lr from `t`:

        step < W:   lr * (step + 1) / W                       (the last warm-up step, W - 1, is lr)
        otherwise:  min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2, p = (step - P) / (S - 1 - P)

    where P = W - 1 is the step at which lr is reached (P = 0 without warm-up, whose step 0 is lr). The
    peak is reached once: p > 0 after it, so the cosine never repeats lr; p = 1 at the last step, S - 1,
    which is exactly min_lr. p is clamped to [0, 1] (steps past S - 1 stay at min_lr). With no step after
    the peak (S = 1 without warm-up, or W >= S) there is no decay: the run ends at or before the peak.
    """
    warmup, last = t.warmup_steps, t.steps - 1
    if step < warmup:
        return t.lr * ((step + 1) / warmup)  # the fraction first: exactly lr at step W - 1
    peak = max(warmup - 1, 0)
    if last <= peak:
        return t.lr
    progress = min(1.0, max(0.0, (step - peak) / (last - peak)))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """torch's AdamW as the trainer configures it (weight decay on matrices only), for reference runs."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch_adamw(params, AdamWConfig(t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay))


def trained_params(cfg: Config) -> int:
    """Canonical parameters the run trains (adapters under model.lora, all but train.freeze's otherwise),
    counted on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    freeze(model, cfg.train.freeze)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step_seed(seed: int, step: int, grid: Grid) -> int:
    """The default generator's seed for a step: a function of (seed, step) and the grid coordinates
    other than the tensor rank, so tensor ranks draw identical masks in replicated regions (split
    regions derive their own streams, parallel.rng) and a resumed run draws the same masks."""
    c = grid.coords
    key = f"{seed}/{step}/{c.pp}/{c.dp}/{c.cp}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 2**63


def build_model(cfg: Config, grid: Grid, device: torch.device) -> Transformer:
    """The whole model of a layout without pipelining (tensor-parallel layers where tp > 1)."""
    if cfg.parallel.pp != 1:
        raise ValueError("build_model builds one chunk; with parallel.pp > 1 use dtrain.parallelize")
    return build_model_chunks(cfg, grid, device)[0]


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    loss_tokens: int = 0  # target tokens of the global batch: the loss's denominator
    moe: dict = field(default_factory=dict)  # per MoE layer routing metrics (`Stage.routing_metrics`)


def _targets_per_byte(cfg: Config) -> float | None:
    """Target tokens per UTF-8 byte of the validation split of tokenised text (format text or jsonl, as
    `dtrain prepare-data` records them), for bits per byte; None for other data."""
    if cfg.data.kind != "memmap" or not cfg.data.path or not os.path.isdir(cfg.data.path):
        return None
    manifest = read_manifest(cfg.data.path)
    if not manifest or manifest.get("format") not in ("text", "jsonl"):
        return None
    val = manifest.get("splits", {}).get("val")
    return val["targets"] / val["bytes"] if val and val.get("bytes") else None


class Trainer:
    """phases: a dtrain.resilience.CollectivePhases naming the collective phases this loop enters (a
    failing collective then says which phase, group and step), or None."""

    def __init__(self, cfg: Config, grid: Grid, device: torch.device, phases=None):
        self.cfg, self.grid, self.device = cfg, grid, device
        self.phases = phases
        t = cfg.train
        built = parallelize(cfg, grid, device)
        self.model, self.grad_sync = built.model, built.grad_sync
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.accum_dtype = wide(self.params[0].detach()[:0]).dtype  # fp32, or fp64 in exactness tests
        self.lr = t.lr
        self.scaler = LossScaler(enabled=t.precision == "fp16")
        self.train_data = build_dataset(cfg, "train")
        self.val_data = build_dataset(cfg, "val")
        self.val_targets_per_byte = _targets_per_byte(cfg)
        self.global_tokens = t.global_batch_size * t.seq_len  # positions per step, targets or not
        self.step = 0  # optimizer steps completed
        self.skipped_in_a_row = 0
        self.tokens_seen = 0
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.peak_flops = peak_flops(device, t.peak_tflops)
        self.ledger: CommLedger | None = None  # counts the collectives of sampled logging steps (fit)
        self._logging_steps = 0  # logging steps fit has run, for the ledger's sampling

    def _phase(self, name: str, when: str = ""):
        return self.phases.enter(name, when) if self.phases is not None else contextlib.nullcontext()

    def _microbatches(self, dataset, step: int):
        return self._context_chunks(self._whole_microbatches(dataset, step))

    def _whole_microbatches(self, dataset, step: int):
        t, dp = self.cfg.train, self.grid.size("dp")
        rank = self.grid.coords.dp
        return rank_microbatches(dataset, step, rank, dp, t.micro_batch_size, t.global_batch_size)

    def _context_chunks(self, microbatches: list) -> list:
        """Context parallelism: this rank's load-balanced chunks of every sequence, with global positions."""
        cp = self.grid.size("cp")
        if cp == 1:
            return microbatches
        return [split_microbatch(mb, cp, self.grid.coords.cp) for mb in microbatches]

    def train_step(self) -> StepResult:
        """One optimizer step on the global batch of step `self.step` (0-based)."""
        with self._phase("forward_backward", f"in step {self.step + 1}"):
            return self._train_step()

    def _train_step(self) -> StepResult:
        t, sync = self.cfg.train, self.grad_sync
        self.lr = lr_at(self.step, t)
        rng.manual_seed(step_seed(t.seed, self.step, self.grid))
        # At least one, so a global batch without a target (all prompt) is a zero-gradient step.
        targets = max(global_target_tokens(self.train_data, self.step, t.global_batch_size), 1)
        whole = self._whole_microbatches(self.train_data, self.step)
        microbatches = self._context_chunks(whole)
        # MoE auxiliary losses of a micro-batch weigh its share of the global batch's target tokens (the
        # whole micro-batch's: a context rank's aux loss is its share of the micro-batch's).
        moe = list(self.model.moe_layers().values())
        shares = aux_grad_scales(whole, targets, self.scaler.scale) if moe else []
        loss_sum = self.model.executor.run(
            self.model.train_actions,
            microbatches,
            loss_scale=self.scaler.scale / targets,
            before_backward=lambda chunk, is_last: sync.before_backward(is_last),
            before_compute=(lambda m: set_aux_grad_scale(moe, shares[m])) if moe else None,
        )
        with self._phase("grad_sync"):
            sync.finish_grad_sync()
        with self._bookkeeping(), self._phase("loss"):  # before the step: a non-finite loss stops it too
            loss_sum = self._sum_loss(loss_sum)
        if self.scaler.enabled:
            sync.scale_grads(1.0 / self.scaler.scale)
        with self._phase("grad_norm"):
            grad_norm = sync.grad_norm()
        # The norm is reduced over every group that holds distinct gradients, so every rank sees the same
        # value and takes the same decision here without another collective.
        skipped = not bool(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
        if skipped:
            self._on_overflow(grad_norm, loss_sum, targets)
        else:
            with self._phase("optimizer_step"):
                clip_(sync, t.grad_clip, grad_norm)
                sync.step(self.lr)
            self.skipped_in_a_row = 0
        self.scaler.update(skipped)
        sync.zero_grad()
        with self._bookkeeping():
            moe = self.model.routing_metrics()
        self.step += 1
        self.tokens_seen += self.global_tokens
        return StepResult(float(loss_sum) / targets, float(grad_norm), skipped, targets, moe)

    def _bookkeeping(self):
        """Reductions that only feed the metrics: an active ledger tallies them apart from training."""
        return self.ledger.bookkeeping() if self.ledger is not None else contextlib.nullcontext()

    def held_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes of parameters, gradients and optimizer states this rank holds, counted from the real
        tensors, by where they live (device, or host for offloaded state)."""
        return self.grad_sync.held_bytes()

    def canonical_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters as canonical full tensors (tensor shards gathered; under ZeRO-3 the
        parameters gathered whole first). Collective."""
        with self.grad_sync.params_whole():
            masters = self.grad_sync.master_weights()  # fp32 weights of 16-bit parameters
            return checkpoint.canonical_model_state(self.model, self._shard_groups(), masters)

    def _shard_groups(self) -> dict:
        """The groups that `Sharding.group` names: tensor-parallel shards and experts spread over ep."""
        return {"tp": self.grid.tp_group, "ep": self.grid.ep_group}

    def _sum_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Token-loss sums live on the last pipeline stage of every data-parallel replica, each context rank
        holding the sum over its chunks of the sequence."""
        for name in ("pp", "dp", "cp"):
            if self.grid.size(name) > 1:
                dist.all_reduce(loss_sum, group=self.grid.group(name))
        return loss_sum

    def _on_overflow(self, grad_norm: torch.Tensor, loss_sum: torch.Tensor, targets: int) -> None:
        t = self.cfg.train
        step = self.step + 1
        if not self.scaler.enabled:
            what = "gradient norm" if not torch.isfinite(grad_norm) else "loss"
            value = float(grad_norm) if what == "gradient norm" else float(loss_sum) / targets
            raise TrainingError(
                f"non-finite {what} ({value}) at step {step}; lower train.lr or use "
                f"train.precision=fp32; the last checkpoint is intact"
            )
        self.skipped_in_a_row += 1
        if t.max_skipped_steps and self.skipped_in_a_row >= t.max_skipped_steps:
            raise TrainingError(
                f"{self.skipped_in_a_row} consecutive fp16 overflows up to step {step}; "
                f"use train.precision=bf16 or lower train.lr"
            )

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.val_data is None or self.cfg.train.eval_batches == 0:
            return None
        t = self.cfg.train
        total = torch.zeros((), dtype=self.accum_dtype, device=self.device)
        targets = 0
        self.model.train(False)  # and back after: a training step does not walk the modules to set it
        try:
            with self._phase("evaluation", f"after step {self.step}"):
                for k in range(t.eval_batches):
                    targets += global_target_tokens(self.val_data, k, t.global_batch_size)
                    total += self.model.executor.run(
                        self.model.eval_actions,
                        self._microbatches(self.val_data, k),
                    )
                with self._phase("loss"):
                    total = self._sum_loss(total)
        finally:
            self.model.train(True)
        loss = float(total) / max(targets, 1)
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if self.val_targets_per_byte:
            # nats per target token x target tokens per byte of the split's text, in bits
            out["val_bpb"] = loss * self.val_targets_per_byte / math.log(2)
        return out

    @torch.no_grad()
    def sample(self) -> str | None:
        """train.sample_prompt continued by the model as trained so far (train.sample_tokens tokens drawn
        at temperature 1 with seed train.seed + step), on global rank 0; None on other ranks. Collective:
        the canonical weights are gathered, the pipeline stages' parts to rank 0."""
        from dtrain.generate import sample_text

        c = self.grid.coords
        with self._phase("sample", f"after step {self.step}"):
            state = self.canonical_state()
            if self.grid.size("pp") > 1 and c.dp == 0 and c.cp == 0 and c.tp == 0:
                parts = [None] * self.grid.size("pp") if c.pp == 0 else None
                dist.gather_object(state, parts, dst=self.grid.ranks("pp")[0], group=self.grid.pp_group)
                if c.pp == 0:
                    state = {name: value for part in parts for name, value in part.items()}
        return sample_text(self.cfg, state, self.device, self.step) if self.grid.rank == 0 else None

    def save(self) -> str:
        with self._phase("save", f"after step {self.step}"):
            return self._save()

    def _save(self) -> str:
        extra = {
            "scaler": self.scaler.state_dict(),
            "tokens_seen": self.tokens_seen,
            "layout": self.grid.layout.sizes,
            "config": to_dict(self.cfg),
            "base": checkpoint.base_identity(self.cfg),  # frozen parameters are not saved
        }
        c = self.grid.coords
        with self.grad_sync.params_whole():
            return checkpoint.save(
                self.cfg.run.out_dir,
                self.step,
                self.model,
                self.grad_sync.state_dict(),  # collective where the state is sharded
                extra,
                masters=self.grad_sync.master_weights(),
                keep=self.cfg.run.keep_checkpoints,
                # One replica gathers: the expert-data-parallel index 0 spans the ep group's experts.
                gathers=c.edp == 0 and c.cp == 0,
                is_writer=c.dp == 0 and c.cp == 0 and c.tp == 0,
                part=c.pp,
                groups=self._shard_groups(),
            )

    def resume(self, path: str) -> None:
        checkpoint.check_base(path, checkpoint.load_state(path).get("base"), self.cfg)
        with self._phase("load", "at start-up"):
            with self.grad_sync.params_whole():
                state, optimizer_state = checkpoint.restore(path, self.model)
            self.grad_sync.load_state_dict(optimizer_state)
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", self.step * self.global_tokens))
        self.scaler.load_state_dict(state["scaler"])

    def resume_path(self) -> str | None:
        resume = self.cfg.run.resume
        if resume is True:
            return checkpoint.latest_valid(self.cfg.run.out_dir, warn=self._say)
        if isinstance(resume, str):
            checkpoint.verify(resume)
            return resume
        return None

    def _say(self, text: str) -> None:
        if self.grid.rank == 0:
            print(text, flush=True)

    def fit(self, resume_from: str | None = None) -> list[dict]:
        """Train to `train.steps`; returns the records logged (rank 0's view on every rank). `resume_from`:
        the checkpoint run.resume resolved to where the caller resolved it (dtrain.cli, before the process
        group: run_folder.check_resume), else resolved here."""
        cfg, t, r = self.cfg, self.cfg.train, self.cfg.run
        path = resume_from or self.resume_path()
        if path is not None:
            self.resume(path)
            self._say(f"resumed from {path} at step {self.step}")
            if self.step >= t.steps:  # nothing to train: no log files opened, nothing written
                self._say(run_folder.run_complete(path, t.steps))
                return []
        logger = MetricsLogger(r.out_dir, t.steps, r.log_every, self.step, enabled=self.grid.rank == 0)
        n_params = count_params(cfg.model)["total"]
        planned = t.steps * self.global_tokens / n_params
        frozen = cfg.model.lora.rank or cfg.train.freeze
        self._say(
            f"dtrain: {n_params / 1e6:.2f}M parameters"
            + (f" ({trained_params(cfg) / 1e6:.3g}M trained, the rest frozen)" if frozen else "")
            + f" | {planned:.3g} tokens per parameter planned "
            f"(Chinchilla-optimal: 20) | {self.grid.describe()} | "
            f"{microbatches_per_rank(cfg)} micro-batches of {t.micro_batch_size} per rank | {t.precision} | "
            f"out_dir {r.out_dir}"
        )
        records = []
        try:
            while self.step < t.steps:
                # Sampled logging steps count every collective (parallel.ledger); its dispatch mode costs
                # Python work per operator, which their step_time_s includes, so other steps run without it.
                logging = (self.step + 1) % r.log_every == 0 or self.step + 1 == t.steps
                started = time.perf_counter()
                result = self.logged_step(logging)
                elapsed = time.perf_counter() - started
                record = self._record(result, elapsed)
                last = self.step == t.steps
                if (t.eval_every and self.step % t.eval_every == 0) or last:
                    record.update(self.evaluate() or {})
                logger.log(record)
                records.append(record)
                if t.sample_every and self.step % t.sample_every == 0:
                    text = self.sample()
                    if text is not None:
                        logger.sample(self.step, t.sample_prompt, text)
                if (r.ckpt_every and self.step % r.ckpt_every == 0) or last:
                    path = self.save()
                    logger.message(f"saved checkpoint {path}")
        finally:
            self.ledger = None
            logger.close()
        return records

    def logged_step(self, logging: bool) -> StepResult:
        """train_step, with every collective counted (self.ledger, which the step's record reads) when it
        is a logging step the ledger samples."""
        self.ledger = CommLedger(self.grid) if logging and self._ledger_due() else None
        with self.ledger or contextlib.nullcontext():
            return self.train_step()

    def _ledger_due(self) -> bool:
        """Called on each logging step: whether the ledger counts it. It samples one logging step in
        run.ledger_every, the first included, because its dispatch mode costs Python work per operator
        (every operator, not only collectives); the same decision on every rank."""
        due = self._logging_steps % self.cfg.run.ledger_every == 0
        self._logging_steps += 1
        return due

    def _record(self, result: StepResult, elapsed: float) -> dict:
        tokens_per_s = self.global_tokens / elapsed
        record = {
            "step": self.step,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": self.lr,
            "tokens": self.tokens_seen,
            "loss_tokens": result.loss_tokens,
            "step_time_s": elapsed,
            "tokens_per_s": tokens_per_s,
        }
        if self.peak_flops:
            record["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.grid.world_size)
        if self.scaler.enabled:
            record["loss_scale"] = self.scaler.scale
        if result.skipped:
            record["skipped"] = True
        record.update(result.moe)
        if self.step % self.cfg.run.log_every == 0 or self.step == self.cfg.train.steps:
            # This rank's peak memory and bytes sent (on ledger steps), gathered in one collective.
            comm = float(self.ledger.total_bytes()) if self.ledger is not None else 0.0
            mine = [peak_memory_bytes(self.device), comm]
            mem = torch.tensor(mine, dtype=torch.float64, device=self.device)
            gathered = [torch.zeros_like(mem) for _ in range(self.grid.world_size)]
            with self._phase("metrics", f"after step {self.step}"):
                dist.all_gather(gathered, mem)  # after the ledger closed: not counted
            record["peak_mem_mb"] = [round(float(m[0]) / 2**20, 1) for m in gathered]
            if self.ledger is not None:
                record.update(self.ledger.metrics())
                record["comm_bytes_per_rank"] = [round(float(m[1])) for m in gathered]
        return record

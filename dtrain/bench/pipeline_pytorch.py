"""PyTorch's own pipelining for the benchmark (dtrain.bench.pipeline): the dense dtrain.model.Transformer
cut into our chunks, run as torch.distributed.pipelining stages by PyTorch's schedule classes, with our
loss normalisation, clipping and optimizer so it computes our loss and gradients."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from dtrain.bench.pipeline_bubble import CLOCK, time_forwards

PYTORCH_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}


class PyTorchPipeline:
    """The dense model's chunks as torch.distributed.pipelining stages, run by PyTorch's schedule."""

    def __init__(self, cfg, grid, schedule: str):
        from torch.distributed import pipelining

        from dtrain.data import build_dataset
        from dtrain.model import TokenCrossEntropy, Transformer, init_weights
        from dtrain.stage import balanced_split, n_chunks
        from dtrain.trainer import build_optimizer

        self.cfg, self.grid = cfg, grid
        t = cfg.train
        pp, rank = cfg.parallel.pp, grid.coords.pp
        total = n_chunks(cfg)
        self.global_tokens = t.global_batch_size * t.seq_len
        self.modules, stages = [], []
        for c, block_ids in enumerate(balanced_split(cfg.model.n_layers, total)):
            if c % pp != rank:
                continue
            chunk = Transformer(cfg.model, block_ids=block_ids, has_embedding=c == 0, has_head=c == total - 1)
            init_weights(chunk, t.seed)  # the same canonical weights as ours
            chunk.train()
            time_forwards(chunk)
            self.modules.append(chunk)
            stages.append(pipelining.PipelineStage(chunk, c, total, torch.device("cpu"), group=grid.pp_group))
        self.first = any(s.is_first for s in stages)
        self.last = any(s.is_last for s in stages)
        token_loss = TokenCrossEntropy()

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # Ours computes the loss inside its last chunk's forward; count it as forward work here too.
            started = time.perf_counter()
            loss = token_loss(logits, targets) / self.global_tokens
            CLOCK.forward += time.perf_counter() - started
            return loss

        cls = getattr(pipelining, PYTORCH_CLASSES[schedule])
        m = t.global_batch_size // t.micro_batch_size
        stage_arg = stages if schedule == "interleaved" else stages[0]
        self.schedule = cls(stage_arg, n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
        self.order = getattr(self.schedule, "pipeline_order", None)
        self.params = [p for module in self.modules for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(torch.nn.ModuleList(self.modules), t)
        self.data = build_dataset(cfg, "train")

    def step(self, index: int) -> float:
        from dtrain.data import rank_microbatches
        from dtrain.trainer import lr_at
        from parallel.sharding import clip_grads_, global_grad_norm

        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(index, t)
        mbs = rank_microbatches(self.data, index, 0, 1, t.micro_batch_size, t.global_batch_size)
        args = (torch.cat([x for x, _ in mbs]),) if self.first else ()
        target = torch.cat([y for _, y in mbs]) if self.last else None
        losses: list[torch.Tensor] = []
        try:
            self.schedule.step(
                *args, target=target, losses=losses if self.last else None, return_outputs=False
            )
        finally:
            CLOCK.pipeline_end = time.perf_counter()
        grad_norm = global_grad_norm(self.params, pp_group=self.grid.pp_group)
        clip_grads_(self.params, t.grad_clip, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.stack(losses).sum().detach() if losses else torch.zeros(())
        dist.all_reduce(loss, group=self.grid.pp_group)  # the losses live on the last stage
        return float(loss)

"""PyTorch's own tensor parallelism for the benchmark (dtrain.bench.tensor_parallel): the dense
dtrain.model.Transformer parallelised with torch.distributed.tensor.parallel, by torchtitan's Llama plan."""

from __future__ import annotations

import torch

from dtrain.bench.comm import AFTER, BACKWARD, FORWARD, UNWATCHED, Phase


def pytorch_plan(cfg, sp: bool) -> dict:
    """torchtitan's Llama tensor-parallel plan, spelled for dtrain.model.Transformer's module names.

    Each attention and MLP takes its input as one replicated DTensor (PrepareModuleInput with
    use_local_output=False, as torchtitan does), so the partial input gradients of wq, wk, wv (or w1, w3)
    are added as DTensors and reduced once per region in backward, as ours are; with plain tensor inputs
    every ColwiseParallel layer would all-reduce its own input gradient (5 backward all-reduces per layer
    instead of 2). The head's logits stay sharded on the vocabulary for loss_parallel.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    outside = Shard(1) if sp else Replicate()  # the residual stream's layout between regions
    plan = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=outside),
        "head": ColwiseParallel(input_layouts=outside, output_layouts=Shard(-1), use_local_output=False),
    }
    if sp:
        plan["norm"] = SequenceParallel()
    for i in range(cfg.model.n_layers):
        b = f"blocks.{i}"
        plan |= {
            f"{b}.attn": PrepareModuleInput(
                input_layouts=(outside, None, None),  # (x, rotary cos, rotary sin)
                desired_input_layouts=(Replicate(), None, None),
                use_local_output=False,
            ),
            f"{b}.attn.wq": ColwiseParallel(),
            f"{b}.attn.wk": ColwiseParallel(),
            f"{b}.attn.wv": ColwiseParallel(),
            f"{b}.attn.wo": RowwiseParallel(output_layouts=outside),
            f"{b}.mlp": PrepareModuleInput(
                input_layouts=(outside,), desired_input_layouts=(Replicate(),), use_local_output=False
            ),
            f"{b}.mlp.w1": ColwiseParallel(),
            f"{b}.mlp.w3": ColwiseParallel(),
            f"{b}.mlp.w2": RowwiseParallel(output_layouts=outside),
        }
        if sp:
            plan[f"{b}.attn_norm"] = SequenceParallel()
            plan[f"{b}.mlp_norm"] = SequenceParallel()
    return plan


def build_pytorch(cfg):
    """The dense model parallelised by torch.distributed.tensor.parallel; returns its step function."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    from dtrain.model import Transformer, init_weights
    from dtrain.trainer import build_optimizer

    tp = cfg.parallel.tp
    model = Transformer(cfg.model)
    init_weights(model, cfg.train.seed)  # the same canonical weights as ours
    for block in model.blocks.values():
        # The attention reshapes with its own head counts, and its local shards hold 1/tp of the heads.
        block.attn.n_heads //= tp
        block.attn.n_kv_heads //= tp
    parallelize_module(model, init_device_mesh("cpu", (tp,)), pytorch_plan(cfg, cfg.parallel.sp))
    model.train()
    opt = build_optimizer(model, cfg.train)

    def step(inputs: torch.Tensor, targets: torch.Tensor, phase: Phase = UNWATCHED) -> float:
        with loss_parallel():
            phase.name = FORWARD
            loss = model(inputs, targets) / targets.numel()
            phase.name = BACKWARD
            loss.backward()
        phase.name = AFTER
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        return float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss)

    return step

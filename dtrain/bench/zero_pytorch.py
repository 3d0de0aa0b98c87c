"""PyTorch's own data parallelism for the ZeRO benchmark (dtrain.bench.zero), and what measures it.

Three implementations train the dense dtrain.model.Transformer from the canonical initial weights, on our
data, with our loss normalisation, clipping and AdamW hyper-parameters (the recipe of
tests/reference.py `torch_ddp_run`): DistributedDataParallel with torch.optim.AdamW;
ZeroRedundancyOptimizer (optimizer_class=torch.optim.AdamW) under the same DDP; and FSDP2, fully_shard on
every transformer block and on the root, over a CPU DeviceMesh. `DispatchRecorder` records their
collectives, with bytes, where they reach the dispatcher; `held_bytes` counts the tensors they hold.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist

from dtrain.bench.comm import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, Call, Phase, _funcol_call

BROADCAST = "broadcast"
NORM_LOSS = "norm + loss"  # the phase of clip_grad_norm_ and the loss all-reduce: not model-state traffic
PYTORCH = ("torch-ddp", "torch-zero1", "torch-fsdp2")


@dataclass
class DispatchCall(Call):
    """A Call that may also be a broadcast: the root's S reaches n-1 ranks, (n-1)/n * S per rank on
    average (comm.ring_bytes has no broadcast)."""

    @property
    def sent(self) -> Fraction:
        if self.kind == BROADCAST:
            return Fraction(self.group_size - 1, self.group_size) * self.full_bytes
        return super().sent


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


# c10d.<op> (what torch.distributed's Python functions and DDP's C++ reducer dispatch to) -> (kind, the
# argument whose size is the full, gathered size S).
_C10D = {
    "allreduce_": (ALL_REDUCE, "tensors"),
    "allreduce_coalesced_": (ALL_REDUCE, "tensors"),
    "broadcast_": (BROADCAST, "tensors"),
    "_allgather_base_": (ALL_GATHER, "output_tensor"),
    "allgather_": (ALL_GATHER, "output_tensors"),
    "allgather_into_tensor_coalesced_": (ALL_GATHER, "outputs"),
    "_reduce_scatter_base_": (REDUCE_SCATTER, "input_tensor"),
    "reduce_scatter_": (REDUCE_SCATTER, "input_tensors"),
    "reduce_scatter_tensor_coalesced_": (REDUCE_SCATTER, "inputs"),
}


class DispatchRecorder:
    """Records every collective that reaches the dispatcher as a Call with its bytes: the c10d ops above
    (DDP's reducer calls them from C++, out of reach of comm.CollectiveRecorder's Python patches) and
    DTensor's functional collectives (comm._funcol_call). DTensor ops are let through first, as in
    comm.CollectiveCounter, so they desugar into what is recorded here. `counts` is calls per op."""

    def __init__(self, phase):
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        self.calls: list[Call] = []
        self.counts: dict[str, int] = {}
        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(t is DTensor for t in types):
                    return NotImplemented
                call = recorder._call(func, args, kwargs or {}, phase.name)
                if call is not None:
                    recorder.calls.append(call)
                    key = f"{func.namespace}.{func._overloadpacket.__name__}"
                    recorder.counts[key] = recorder.counts.get(key, 0) + 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    @staticmethod
    def _call(func, args, kwargs, phase: str) -> Call | None:
        namespace = getattr(func, "namespace", None)
        if namespace == "_c10d_functional":
            return _funcol_call(func, args, kwargs, phase)
        if namespace != "c10d" or func._overloadpacket.__name__ not in _C10D:
            return None
        kind, sized = _C10D[func._overloadpacket.__name__]
        bound = {a.name: v for a, v in zip(func._schema.arguments, args, strict=False)} | kwargs
        group = bound["process_group"]  # boxed as a TorchScript object at the dispatcher
        n = (group if isinstance(group, dist.ProcessGroup) else dist.ProcessGroup.unbox(group)).size()
        return DispatchCall(kind, _nbytes(bound[sized]), n, phase)

    def __enter__(self) -> DispatchRecorder:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def held_bytes(params, optimizer_states) -> dict[str, dict[str, int]]:
    """Bytes of parameters, gradients and optimizer-state tensors this rank holds (local shards of
    DTensors; 0-dim step counters left out, as Trainer.held_bytes does), in Trainer.held_bytes' layout."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> int:
        return _nbytes(t.to_local() if isinstance(t, DTensor) else t)

    optimizer = sum(local(v) for s in optimizer_states for v in s.values() if torch.is_tensor(v) and v.dim())
    return {
        "device": {
            "params": sum(local(p) for p in params),
            "grads": sum(local(p.grad) for p in params if p.grad is not None),
            "optimizer": optimizer,
        },
        "host": {"params": 0, "grads": 0, "optimizer": 0},
    }


class TorchDataParallel:
    """One of PYTORCH on every rank of the world. A step: each micro-batch's forward with targets
    (token-loss sum) / global tokens * dp, the dp undoing DDP's (and FSDP2's) averaging; backward (DDP
    reduces at the last micro-batch only, FSDP2 reduce-scatters every one, as ZeRO-2 and 3 do); global
    gradient-norm clipping; AdamW at our learning rate; zero grads. `held` is counted after the optimizer
    step, before zero_grad (gradients still there: the peak of model states) when `count_held` is set."""

    def __init__(self, cfg, name: str):
        from torch.nn.parallel import DistributedDataParallel

        from dtrain.data import build_dataset
        from dtrain.model import Transformer, init_weights
        from dtrain.trainer import build_optimizer

        t = cfg.train
        self.cfg, self.name = cfg, name
        self.dp, self.rank = dist.get_world_size(), dist.get_rank()
        self.global_tokens = t.global_batch_size * t.seq_len
        self.data = build_dataset(cfg, "train")
        model = Transformer(cfg.model)
        init_weights(model, t.seed)  # the same canonical weights as ours
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.no_sync = None
        if name == "torch-fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (self.dp,))
            for block in model.blocks.values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.params = [p for p in model.parameters() if p.requires_grad]  # now DTensor shards
            self.model, self.optimizer = model, build_optimizer(model, t)
        else:
            # Gradients as views of the reducer's buckets: no second copy (our DataParallel does the same).
            # The rotary tables are constant buffers: no broadcast of them before every forward.
            sync = "forward_sync_buffers"  # torch >= 2.13; broadcast_buffers before (deprecated since)
            if sync not in inspect.signature(DistributedDataParallel).parameters:
                sync = "broadcast_buffers"
            self.model = DistributedDataParallel(model, gradient_as_bucket_view=True, **{sync: False})
            self.no_sync = self.model.no_sync
            self.optimizer = build_optimizer(model, t)
            if name == "torch-zero1":
                from torch.distributed.optim import ZeroRedundancyOptimizer

                self.optimizer = ZeroRedundancyOptimizer(
                    [dict(g, params=list(g["params"])) for g in self.optimizer.param_groups],
                    optimizer_class=torch.optim.AdamW,
                    parameters_as_bucket_view=True,
                    lr=t.lr,
                    betas=(t.beta1, t.beta2),
                    eps=t.eps,
                )
        self.count_held = False
        self.phase = Phase()  # the counting step passes the recorders' phase
        self.held: dict | None = None
        self.steps_done = 0

    def held_bytes(self) -> dict:
        """What the last step with `count_held` set counted."""
        return self.held

    def step(self, index: int) -> float:
        from dtrain.data import rank_microbatches
        from dtrain.trainer import lr_at

        assert self.steps_done == index, (self.name, self.steps_done, index)
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(index, t)
        micro = rank_microbatches(
            self.data, index, self.rank, self.dp, t.micro_batch_size, t.global_batch_size
        )
        local = torch.zeros(())
        for j, (x, y) in enumerate(micro):
            last = j == len(micro) - 1
            with contextlib.nullcontext() if last or self.no_sync is None else self.no_sync():
                loss_sum = self.model(x, y)
                (loss_sum / self.global_tokens * self.dp).backward()
            local += loss_sum.detach()
        step_phase, self.phase.name = self.phase.name, NORM_LOSS
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
        self.phase.name = step_phase
        self.optimizer.step()
        if self.count_held:
            states = getattr(self.optimizer, "optim", self.optimizer).state.values()  # ZeRO: the local one
            self.held = held_bytes(self.params, states)
        self.optimizer.zero_grad(set_to_none=True)
        step_phase, self.phase.name = self.phase.name, NORM_LOSS
        dist.all_reduce(local)
        self.phase.name = step_phase
        self.steps_done += 1
        return float(local) / self.global_tokens

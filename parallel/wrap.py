"""Data parallelism and ZeRO 1/2/3 around any torch.nn.Module, in the user's own training loop.

    dp = wrap(model, zero=3, units=[Block, model], lr=3e-4, max_grad_norm=1.0, precision="bf16")
    for micro_batches in batches:
        for i, (x, y) in enumerate(micro_batches):
            with dp.no_sync(i < len(micro_batches) - 1):
                loss = loss_fn(dp(x), y) / len(micro_batches)
                dp.scale(loss).backward()
        dp.step()

The semantics are torch DistributedDataParallel's: every rank computes its own mean loss, gradients are
AVERAGED over the data-parallel ranks and summed over the backwards of a step. The GradSync
implementations underneath (parallel/grad_sync.py) reduce as sums, the convention of a loop that divides
by the global token count; step() multiplies the summed gradient once by 1 / (N * S), N the ranks and S
the fp16 loss scale (1 otherwise), before the norm, clipping and AdamW:

    g = (1 / (N * S)) * sum over ranks r and micro-batches m of g_rm

N and S are powers of two in the common case, so this equals torch DDP's pre-division bit for bit.

bf16 and fp16 are dtrain's mixed precision (parallel.mixed_precision), which is torch FSDP2's
MixedPrecisionPolicy(param_dtype=16-bit, reduce_dtype=fp32): the parameters are stored in the 16-bit dtype
and the forward computes in it, with no autocast; fp32 master weights live with the optimizer (whole,
sharded, or in host memory); each backward's 16-bit gradients are added into fp32 gradient buffers, which
are reduced, clipped and stepped in fp32; after the step the parameters are the masters rounded to
nearest. Floating-point inputs of the model's forward are cast to the 16-bit dtype, as FSDP2 casts them.

A forward pre-hook on the model tells the GradSync which backward is the step's last (not inside
no_sync()); under ZeRO-3 the units' own hooks (parallel/zero3.py) gather and free their parameters.
Nothing here is global: each Wrapped holds its objects and the group it was given.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from parallel.data_parallel import DataParallelAdamW
from parallel.grad_sync import AdamWConfig, Held, clip_
from parallel.grid import group_size
from parallel.mixed_precision import to_compute_
from parallel.precision import LossScaler, dtype_policy
from parallel.zero import ZeroDataParallel, plan_zero_buckets
from parallel.zero3 import output_tensors, zero3

OFFLOAD = ("none", "optimizer", "all")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class StepResult:
    grad_norm: float  # of the averaged gradient, before clipping: what torch's clip_grad_norm_ returns
    skipped: bool  # fp16 overflow: no update, the loss scale halved


def wrap(model: nn.Module, **options) -> Wrapped:
    """`Wrapped(model, **options)`: the model's training objects for this rank."""
    return Wrapped(model, **options)


class Wrapped:
    """One rank's data-parallel training of `model` (already on its device, identical on every rank
    after this call: rank 0's parameters and buffers are broadcast, as torch DDP does).

    zero:           0 plain data parallelism (bucketed all-reduce, torch's AdamW); 1, 2, 3 the ZeRO stage.
    units:          zero=3 only: the modules whose parameters are gathered together, as a list of
                    submodules and/or module classes (every module of that class). Every trainable
                    parameter must belong to exactly one unit, the nearest listed module above it; list
                    the model itself to hold the rest.
    offload:        "optimizer" (zero >= 1): moments and an fp32 master copy in host memory, stepped
                    there; "all" (zero=3): the parameter shards too.
    lr, betas, eps, weight_decay: AdamW; weight decay applies to parameters of two or more dimensions.
    max_grad_norm:  global-norm clipping of the averaged gradient (0: off).
    precision:      "fp32", or "bf16" / "fp16": parameters stored and computed in 16 bits, fp32 master
                    weights with the optimizer, gradients accumulated and reduced in fp32; fp16 adds
                    dynamic loss scaling (scale(loss) before backward; an overflow skips the step).
    group:          the data-parallel process group (default: the world); bucket_mb: bucket size.
    replica_group:  hybrid sharding (zero >= 1): `group` is this rank's shard group and replica_group
                    the ranks holding the same shard in the other replicas (parallel.grid's dp_shard and
                    dp_replicate groups); gradients are averaged over both, state sharded over `group`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        zero: int = 0,
        units: list | None = None,
        offload: str = "none",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        max_grad_norm: float = 0.0,
        precision: str = "fp32",
        group: dist.ProcessGroup | None = None,
        bucket_mb: float = 25.0,
        replica_group: dist.ProcessGroup | None = None,
    ):
        self.params = [p for p in model.parameters() if p.requires_grad]
        _check_options(model, self.params, zero, units, offload, precision)
        unit_list = resolve_units(model, units) if zero == 3 else []
        self.model, self.zero, self.lr, self.max_grad_norm = model, zero, lr, max_grad_norm
        self.group = group if group is not None else dist.group.WORLD
        self.replica_group = replica_group if group_size(replica_group) > 1 else None
        if self.replica_group is not None and zero == 0:
            raise ValueError("parallel.wrap: replica_group shards ZeRO state; it needs zero=1, 2 or 3")
        self.world = group_size(self.group) * group_size(replica_group)  # the ranks gradients average over
        self.device = self.params[0].device
        self.precision = precision
        self.master_dtype = self.params[0].dtype  # of the optimizer's state (fp32; fp64 in exactness tests)
        dtypes = dtype_policy(precision)  # 16-bit parameters, fp32 masters and gradients; fp32: as built
        self.compute_dtype = dtypes.compute(self.master_dtype)
        self.scaler = LossScaler(enabled=precision == "fp16")
        self.names = {p: name for name, p in model.named_parameters()}
        self.steps = 0
        self._sync = True
        _broadcast_from_first_rank(model, self.group)
        _broadcast_from_first_rank(model, replica_group)  # then every replica from the first one

        adamw = AdamWConfig(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if dtypes.mixed(self.master_dtype):  # frozen parameters get no master, only the compute dtype
            to_compute_([p for p in model.parameters() if not p.requires_grad], self.compute_dtype)
        if zero == 0:
            self.sync = DataParallelAdamW(model, self.group, bucket_mb, adamw, dtypes=dtypes)
        elif zero in (1, 2):
            plan = plan_zero_buckets(list(model.parameters()), int(bucket_mb * 2**20))
            self.sync = ZeroDataParallel(
                plan,
                self.group,
                zero,
                adamw,
                offload == "optimizer",
                replica_group=replica_group,
                dtypes=dtypes,
            )
        else:
            zero3_units = [(params, [(m, m)]) for m, params, _ in unit_list]
            self.sync = zero3(
                zero3_units, self.group, adamw, offload, replica_group=replica_group, dtypes=dtypes
            )

        # The first training forward under ZeRO-3 is watched for parameters used outside their unit
        # (their storage is freed there: a crash or garbage otherwise) and units whose output carries no
        # gradient (their backward could not gather them again).
        self._unit_check = _UnitUseCheck(self.sync, unit_list, self.names) if zero == 3 else None
        for module, _, name in unit_list:
            module.register_forward_hook(lambda m, a, out, name=name: self._check_unit_output(name, out))
        # Prepended, so it runs before a model-level ZeRO-3 unit's gather: completing the previous
        # backward's reductions may launch, and then free, a unit that got no gradient there.
        model.register_forward_pre_hook(self._before_forward, prepend=True)
        model.register_forward_hook(self._after_forward, always_call=True)
        if self.compute_dtype != self.master_dtype:
            model.register_forward_pre_hook(self._cast_inputs, with_kwargs=True)

    # --- the user's loop ----------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self, active: bool = True):
        """Forwards (and their backwards) inside accumulate without communicating, as torch DDP's
        no_sync(); `active=False` makes it a no-op, for the step's last micro-batch. zero=2 and 3
        reduce-scatter every backward into their gradient shards regardless."""
        previous, self._sync = self._sync, self._sync and not active
        try:
            yield
        finally:
            self._sync = previous

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: times the fp16 loss scale, unchanged otherwise."""
        return loss * self.scaler.scale if self.scaler.enabled else loss

    def step(self, lr: float | None = None) -> StepResult:
        """Finish the reductions, average, clip and take the AdamW step (at `lr`, or the wrapper's);
        gradients are zeroed afterwards. An fp16 overflow skips the update on every rank alike (the norm
        is global); a non-finite norm in fp32 or bf16 raises."""
        sync = self.sync
        sync.finish_grad_sync()
        sync.scale_grads(1.0 / (self.world * self.scaler.scale))
        norm = sync.grad_norm()
        if not bool(torch.isfinite(norm)):
            sync.zero_grad()
            if not self.scaler.enabled:
                raise FloatingPointError(
                    f"parallel.wrap: the gradient norm is {float(norm)} at step {self.steps + 1} "
                    f"({self.precision}); the model or the loss produced non-finite values"
                )
            self.scaler.update(True)
            return StepResult(float(norm), skipped=True)
        clip_(sync, self.max_grad_norm, norm)
        sync.step(self.lr if lr is None else lr)
        sync.zero_grad()
        self.scaler.update(False)
        self.steps += 1
        if self.steps == 1:
            self._check_buffers_agree()
        return StepResult(float(norm), skipped=False)

    def zero_grad(self) -> None:
        """Drop the gradients of the step so far (step() does this itself)."""
        self.sync.finish_grad_sync()
        self.sync.zero_grad()

    # --- checkpoints and inspection -----------------------------------------------------------------

    def params_whole(self):
        """Context in which every parameter is whole (ZeRO-3 gathers them; changes are kept)."""
        return self.sync.params_whole()

    def state_dict(self) -> dict:
        """Canonical state on the CPU: {"model": the model's own state_dict (16-bit parameters as their
        fp32 master weights), "optimizer": {parameter name: torch AdamW's per-parameter state (step,
        exp_avg, exp_avg_sq), whole}, "loss_scaler"}. It does not depend on zero, offload, the number of
        ranks or the precision. Collective: every rank calls it."""
        with self.sync.params_whole():
            masters = self.sync.master_weights()  # empty in fp32: the parameters are the masters
            model = {
                k: masters.get(v, v).detach().to("cpu", copy=True)
                for k, v in self.model.state_dict(keep_vars=True).items()
            }
            optimizer = {
                self.names[p]: {k: v.detach().to("cpu", copy=True) for k, v in s.items()}
                for p, s in self.sync.state_dict().items()
            }
        return {"model": model, "optimizer": optimizer, "loss_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict, from any zero, offload or number of ranks. Collective."""
        missing = [self.names[p] for p in self.params if self.names[p] not in state["optimizer"]]
        if missing:
            raise KeyError(f"parallel.wrap: the checkpoint has no optimizer state for {', '.join(missing)}")
        mixed = self.compute_dtype != self.master_dtype
        with self.sync.params_whole():
            self.model.load_state_dict(state["model"])  # 16-bit parameters: the masters rounded to nearest
            optimizer = {}
            for p in self.params:
                saved = state["optimizer"][self.names[p]]
                optimizer[p] = {
                    "step": torch.tensor(float(saved["step"])),
                    "exp_avg": saved["exp_avg"].to(p.device, self.master_dtype),
                    "exp_avg_sq": saved["exp_avg_sq"].to(p.device, self.master_dtype),
                }
                if mixed:  # the fp32 weights themselves, not their 16-bit rounding
                    optimizer[p]["master"] = state["model"][self.names[p]].to(p.device, self.master_dtype)
            self.sync.load_state_dict(optimizer)
        if self.scaler.enabled:
            self.scaler.load_state_dict(state["loss_scaler"])

    def held_bytes(self) -> Held:
        """Parameters, gradients and optimizer state this rank holds, on the device and on the host."""
        return self.sync.held_bytes()

    # --- hooks --------------------------------------------------------------------------------------

    def _before_forward(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation: no backward follows
        if self.zero <= 1:
            if self._sync and self._reduced_this_step():
                raise RuntimeError(
                    f"parallel.wrap: a second synchronising forward before step() under zero={self.zero}, "
                    "which reduces in the step's last backward; run all micro-batches but the last inside "
                    "no_sync(), as with torch DDP"
                )
            # 16-bit parameters have no .grad between backwards: each one is folded into the fp32
            # buffers and dropped (parallel.mixed_precision), so there is nothing to reset behind us.
            fp32_views = self.compute_dtype == self.master_dtype
            if fp32_views and any(p.grad is None for p in self.params):
                raise RuntimeError(
                    "parallel.wrap: gradients were set to None outside the wrapper (model.zero_grad() or "
                    "an optimizer's zero_grad()); they are views into the reduction buckets and step() "
                    "zeroes them"
                )
        self.sync.before_backward(self._sync)
        if self._unit_check is not None and not self._unit_check.done:
            self._unit_check.__enter__()

    def _cast_inputs(self, module, args, kwargs):
        """Floating-point inputs in the compute dtype (integer ids and masks unchanged), as FSDP2's mixed
        precision casts the forward inputs."""
        cast = lambda t: t.to(self.compute_dtype) if t.is_floating_point() else t  # noqa: E731
        return tree_map_only(torch.Tensor, cast, (args, kwargs))

    def _after_forward(self, module, args, out) -> None:
        check = self._unit_check
        if check is not None and check.active:
            check.__exit__(None, None, None)

    def _reduced_this_step(self) -> bool:
        # Index of the next bucket to launch: above 0 once a synchronising backward has reduced one.
        launcher = self.sync.buckets if self.zero == 0 else self.sync
        return launcher._next_launch > 0

    def _check_unit_output(self, name: str, out) -> None:
        if self._unit_check is None or not self._unit_check.active:
            return
        if not any(t.requires_grad for t in output_tensors(out)):
            raise RuntimeError(
                f"parallel.wrap: ZeRO-3 unit '{name}' returned no tensor that requires grad (in a tensor, "
                "tuple, list or dict), so its backward could not gather its parameters again; choose "
                "units whose outputs carry the gradient"
            )

    def _check_buffers_agree(self) -> None:
        """After the first step: buffers that a forward changed differently on each rank (running
        statistics) would need synchronising, which this wrapper does not do. One all-reduce (MAX) of
        every buffer's sum and its negative finds a buffer whose sums differ."""
        buffers = [(name, b) for name, b in self.model.named_buffers() if b.numel() > 0]
        if not buffers or self.world == 1:
            return
        sums = torch.stack([b.detach().double().sum().to(self.device) for _, b in buffers])
        extremes = torch.cat([sums, -sums])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.group)
        if self.replica_group is not None:
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.replica_group)
        n = len(buffers)
        differ = [name for i, (name, _) in enumerate(buffers) if extremes[i] != -extremes[n + i]]
        if differ:
            raise RuntimeError(
                f"parallel.wrap: buffer '{differ[0]}' differs between ranks after the first step; the "
                "model updates buffers from each rank's batch, which this wrapper does not synchronise"
            )


# --- checks at wrap time ------------------------------------------------------------------------------


def _check_options(model, params, zero, units, offload, precision) -> None:
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"parallel.wrap: zero must be 0, 1, 2 or 3, not {zero!r}")
    if offload not in OFFLOAD:
        raise ValueError(f"parallel.wrap: offload must be one of {', '.join(OFFLOAD)}, not {offload!r}")
    if offload == "optimizer" and zero == 0:
        raise ValueError("parallel.wrap: offload='optimizer' needs zero=1, 2 or 3 (the optimizer is sharded)")
    if offload == "all" and zero != 3:
        raise ValueError("parallel.wrap: offload='all' needs zero=3 (parameters are sharded only there)")
    if precision not in PRECISIONS:
        raise ValueError(
            f"parallel.wrap: precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
        )
    if zero == 3 and not units:
        raise ValueError(
            "parallel.wrap: zero=3 needs units: submodules or module classes, and the model itself for "
            "the parameters outside them"
        )
    if zero != 3 and units:
        raise ValueError(f"parallel.wrap: units apply to zero=3 only (zero={zero} keeps parameters whole)")
    if not params:
        raise ValueError(f"parallel.wrap: {type(model).__name__} has no parameter that requires grad")
    dtypes = {p.dtype for p in params}
    allowed = (torch.float32, torch.float64) if precision == "fp32" else (torch.float32,)
    if len(dtypes) > 1 or not dtypes <= set(allowed):
        raise ValueError(
            f"parallel.wrap: parameters must all be {' or '.join(map(str, allowed))} (master weights; "
            f"{precision} stores 16-bit copies of them), found {', '.join(sorted(map(str, dtypes)))}"
        )
    for name, module in model.named_modules():
        if (
            getattr(module, "running_mean", None) is not None
            or getattr(module, "running_var", None) is not None
        ):
            raise ValueError(
                f"parallel.wrap: '{name}' ({type(module).__name__}) keeps running statistics that each rank "
                "would update from its own batch; use track_running_stats=False, LayerNorm or GroupNorm"
            )


def resolve_units(model: nn.Module, units: list) -> list[tuple[nn.Module, list[nn.Parameter], str]]:
    """ZeRO-3 units in forward order as (module, its trainable parameters, its name). A parameter belongs
    to the nearest listed module above it (the model itself may be listed, for the rest). Raises on a
    parameter in no unit or in two (tied weights held by modules of different units), since a unit's
    parameters are freed outside its forward. Units are ordered as model.modules() lists them, which
    is forward order in most models; another order only makes prefetching fetch the wrong unit."""
    order = {id(m): i for i, m in enumerate(model.modules())}
    chosen: dict[int, nn.Module] = {}
    for item in units:
        if isinstance(item, type) and issubclass(item, nn.Module):
            found = [m for m in model.modules() if isinstance(m, item)]
            if not found:
                raise ValueError(
                    f"parallel.wrap: units name {item.__name__}, which the model does not contain"
                )
            chosen.update((id(m), m) for m in found)
        elif isinstance(item, nn.Module):
            if id(item) not in order:
                raise ValueError(f"parallel.wrap: unit {type(item).__name__} is not a submodule of the model")
            chosen[id(item)] = item
        else:
            raise TypeError(
                f"parallel.wrap: a unit is a submodule or a module class, not {type(item).__name__}"
            )
    names = {id(m): name or f"{type(model).__name__} (the model)" for name, m in model.named_modules()}

    # Every place a parameter is held (module attribute paths, shared modules and tied weights
    # included), with the unit owning that place.
    held: dict[nn.Parameter, dict[int | None, str]] = {}

    def visit(module: nn.Module, path: str, owner: int | None) -> None:
        owner = id(module) if id(module) in chosen else owner
        for pname, p in module._parameters.items():
            if p is not None and p.requires_grad:
                held.setdefault(p, {}).setdefault(owner, f"{path}.{pname}" if path else pname)
        for cname, child in module._modules.items():
            if child is not None:
                visit(child, f"{path}.{cname}" if path else cname, owner)

    visit(model, "", None)
    for places in held.values():
        if len(places) > 1:
            where = [
                f"'{path}' ({names[o] if o is not None else 'in no unit'})" for o, path in places.items()
            ]
            raise ValueError(
                f"parallel.wrap: parameter {' and '.join(where)} is shared across ZeRO-3 units; a unit's "
                "parameters are freed outside its forward, so make a module holding every use one unit"
            )
    missing = [path for places in held.values() for o, path in places.items() if o is None]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(
            f"parallel.wrap: ZeRO-3 units leave out {shown}; add their modules to units, or the model "
            "itself to hold the rest"
        )
    out = []
    for uid in sorted(chosen, key=order.__getitem__):
        params = [p for p, places in held.items() if uid in places]
        if params:  # a unit of frozen parameters only needs nothing gathered
            out.append((chosen[uid], params, names[uid]))
    return out


@torch.no_grad()
def _broadcast_from_first_rank(model: nn.Module, group) -> None:
    """Every rank starts from the first rank's parameters and buffers, as torch DDP does."""
    if group_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=src, group=group)


class _UnitUseCheck(TorchDispatchMode):
    """Active for the first training forward under ZeRO-3: every operator's tensor arguments are looked
    up by storage; an operator (other than those of the residency's own collectives) reading a unit's flat
    parameter storage while that unit is not gathered raises, naming the parameter and its unit."""

    def __init__(self, sync: ZeroDataParallel, units: list, names: dict[nn.Parameter, str]):
        super().__init__()
        self.residency = sync.residency
        self.active = self.done = False
        # Buckets are in backward order, units in forward order (zero3 builds one bucket per unit).
        self.by_storage = {
            b.flat_params.untyped_storage()._cdata: (b, name)
            for b, (_, _, name) in zip(sync.buckets[::-1], units, strict=True)
        }
        self.names = names

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active, self.done = False, True
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.namespace.startswith(("c10d", "_c10d")) and not self.residency.issuing:
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor):
                    self._check(t, func)
        return func(*args, **kwargs)

    def _check(self, t: torch.Tensor, func) -> None:
        found = self.by_storage.get(t.untyped_storage()._cdata)
        if found is None:
            return
        bucket, unit = found
        if self.residency.gathered.get(id(bucket), "freed") is None:
            return  # gathered and complete: inside the unit's forward
        offset = t.storage_offset()
        param = next(
            p
            for p, start in zip(bucket.params, bucket.offsets, strict=True)
            if start <= offset < start + p.numel()
        )
        raise RuntimeError(
            f"parallel.wrap: parameter '{self.names[param]}' of ZeRO-3 unit '{unit}' was used by {func} "
            "outside that unit's forward, where its storage is freed; make a module that contains every "
            "use of it the unit"
        )

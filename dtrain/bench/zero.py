"""Our ZeRO stages against torch DDP, ZeroRedundancyOptimizer and FSDP2, measured in the same run.

    python -m dtrain.bench.zero [--dp 2] [--steps 10] [--warmup 2] [--micro-batches 1] [--bucket-mb 25]
        [--d-model 256 --n-layers 4 --n-heads 8 --seq-len 128 --micro-batch 4 --vocab 1024] [--csv out.csv]

Every rank builds every implementation of IMPLS from the canonical initial weights, all on the same data:
ours are dtrain Trainers (parallel.zero 0 = our DataParallel, 1, 2, 3, those also with offload=optimizer;
one validate refuses is reported "not implemented"), PyTorch's are DDP + AdamW, ZeroRedundancyOptimizer
under the same DDP, and FSDP2 (fully_shard on every block and the root), by our recipe (harness.TorchSide).

Step 0 of each, right after it is built, counts: the bytes of parameters, gradients and optimizer states
each rank holds (ours: Trainer.held_bytes(); PyTorch: local tensors and shards after optimizer.step(),
before zero_grad) against docs/formulas.md per parameter; the growth of peak RSS while built and stepped; the
collectives at the dispatcher (comm.CommRecorder) against docs/formulas.md's 2Ψ·4 (stages 0-2) and 3Ψ·4 (stage
3). Ours must also equal the exact count of our padded buckets (`bucket_traffic`, stages 0-2) and what
the library's own ledger (parallel.ledger.CommLedger) counted in the same step.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import resource
import statistics
from fractions import Fraction

import torch
import torch.distributed as dist

from dtrain.bench import harness, report
from dtrain.bench.comm import ALL_GATHER, ALL_REDUCE, NORM_AND_LOSS, REDUCE_SCATTER, CommRecorder, ring_bytes
from dtrain.config import ConfigError, d_ff_of, microbatches_per_rank
from dtrain.model import count_params
from dtrain.trainer import build_optimizer
from parallel.data_parallel import plan_buckets
from parallel.grid import ProcessGrid
from parallel.ledger import BOOKKEEPING, TRAINING, CommLedger

# name: (label, short label, ZeRO stage, parallel.offload: None for PyTorch's)
IMPLS = {
    "ddp": ("ours DDP (zero=0)", "DDP", 0, "none"),
    "zero1": ("ours ZeRO-1", "Z1", 1, "none"),
    "zero1-offload": ("ours ZeRO-1 + offload", "Z1+off", 1, "optimizer"),
    "zero2": ("ours ZeRO-2", "Z2", 2, "none"),
    "zero2-offload": ("ours ZeRO-2 + offload", "Z2+off", 2, "optimizer"),
    "zero3": ("ours ZeRO-3", "Z3", 3, "none"),
    "zero3-offload": ("ours ZeRO-3 + offload", "Z3+off", 3, "optimizer"),
    "torch-ddp": ("torch DDP", "tDDP", 0, None),
    "torch-zero1": ("torch ZeroRedundancyOpt", "tZRO", 1, None),
    "torch-fsdp2": ("torch FSDP2", "tFSDP2", 3, None),
}
LABELS, SHORT = {k: v[0] for k, v in IMPLS.items()}, {k: v[1] for k, v in IMPLS.items()}
OURS, PYTORCH = [k for k, v in IMPLS.items() if v[3]], [k for k, v in IMPLS.items() if not v[3]]
HELD_KEYS = [(where, what) for where in ("device", "host") for what in ("params", "grads", "optimizer")]
SCALAR_BYTES = 8  # our all-reduces of one number (loss sum, squared gradient norm): not model-state traffic


def make_config(args, zero: int = 0, offload: str = "none"):
    """One implementation's config: dp ranks of `micro_batches` micro-batches of `micro_batch` rows."""
    rows, steps = args.dp * args.micro_batches * args.micro_batch, 1 + args.warmup + args.steps
    parallel = [f"parallel.dp={args.dp}", f"parallel.zero={zero}", f"parallel.offload={offload}"]
    train = [f"train.global_batch_size={rows}", f"train.micro_batch_size={args.micro_batch}"]
    train += [f"train.steps={steps}", "train.eval_batches=0", f"parallel.bucket_mb={args.bucket_mb}"]
    return harness.config_of(args, [*parallel, *train], args.dp)


def configs(args) -> tuple[dict, dict[str, str]]:
    """The configs of our implementations that validate accepts, and the others' ConfigError messages."""
    cfgs, refused = {}, {}
    for name in OURS:
        try:
            cfgs[name] = make_config(args, *IMPLS[name][2:])
        except ConfigError as e:
            if IMPLS[name][2] < 3:
                raise
            refused[name] = f"not implemented: {e}"
    return cfgs, refused


def bucket_traffic(trainer, n: int, pad: bool = True) -> Fraction | None:
    """Bytes one rank sends per step in our stage 0-2 gradient and parameter collectives, from the bucket
    plan (parallel.data_parallel.plan_buckets) of the trainer's parameters in backward order: stage 0
    all-reduces each bucket as it is; stages 1 and 2 pad each bucket to a multiple of n elements,
    reduce-scatter it (stage 1 once per step, stage 2 after every micro-batch) and all-gather it back
    after the optimizer step. pad=False: the same without the padding. None for stage 3."""
    cfg, params, stage = trainer.cfg, trainer.params, trainer.cfg.parallel.zero
    if stage > 2:
        return None
    numels, itemsize = [p.numel() for p in params][::-1], params[0].element_size()
    scatters = microbatches_per_rank(cfg) if stage == 2 else 1
    total = Fraction(0)
    for members in plan_buckets([k * itemsize for k in numels], int(cfg.parallel.bucket_mb * 2**20)):
        numel = sum(numels[i] for i in members)
        if stage == 0:
            total += ring_bytes(ALL_REDUCE, numel * itemsize, n)
        else:
            padded = (math.ceil(numel / n) * n if pad else numel) * itemsize
            total += scatters * ring_bytes(REDUCE_SCATTER, padded, n) + ring_bytes(ALL_GATHER, padded, n)
    return total


def predicted(name: str, n: int) -> tuple[float, float, str]:
    """docs/formulas.md's bytes per parameter (fp32 + Adam): (device, host, how). Offload moves the optimizer
    states to host memory, where ours also keeps the fp32 master copy of its shard: 8/N + 4/N."""
    stage = IMPLS[name][2]
    total = {0: 16, 1: 8 + 8 / n, 2: 4 + 12 / n, 3: 16 / n}[stage]
    if name.endswith("-offload"):
        device, how = total - 8 / n, {1: "4+4", 2: "4+4/N", 3: "8/N"}[stage]
        return device, 12 / n, f"{how} = {device:.3f} + host 12/N = {12 / n:.3f}"
    how = {0: "4+4+8", 1: "4+4+8/N", 2: "4+12/N", 3: "16/N"}[stage]
    return total, 0.0, f"{how} = {total:.3f}"


class TorchDataParallel(harness.TorchSide):
    """One of PYTORCH on this rank: each micro-batch's forward, scaled by dp against DDP's (and FSDP2's)
    averaging of the gradients over the ranks, and backward; DDP reduces at the last micro-batch only,
    FSDP2 reduce-scatters every one, as ZeRO-2 and 3 do. `held`: counted after the optimizer step."""

    def __init__(self, cfg, name: str):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(cfg, dist.get_rank(), dist.get_world_size())
        t, model = cfg.train, self.dense()
        self.no_sync, self.count_held, self.held = None, False, None
        if name == "torch-fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (self.data_ranks,))
            for block in model.blocks.values():
                fully_shard(block, mesh=mesh)
            self.model, self.optimizer = fully_shard(model, mesh=mesh), build_optimizer(model, t)
        else:
            # Gradients as views of the reducer's buckets: no second copy (our DataParallel does the same).
            # The rotary tables are constant buffers: no broadcast of them before every forward.
            sync = "forward_sync_buffers"  # torch >= 2.13; broadcast_buffers before (deprecated since)
            if sync not in inspect.signature(DistributedDataParallel).parameters:
                sync = "broadcast_buffers"
            self.model = DistributedDataParallel(model, gradient_as_bucket_view=True, **{sync: False})
            self.no_sync, self.optimizer = self.model.no_sync, build_optimizer(model, t)
            if name == "torch-zero1":
                from torch.distributed.optim import ZeroRedundancyOptimizer

                groups = [dict(g, params=list(g["params"])) for g in self.optimizer.param_groups]
                adamw = {"optimizer_class": torch.optim.AdamW, "lr": t.lr, "betas": (t.beta1, t.beta2)}
                self.optimizer = ZeroRedundancyOptimizer(
                    groups, parameters_as_bucket_view=True, eps=t.eps, **adamw
                )
        self.params = [p for p in model.parameters() if p.requires_grad]  # FSDP2's: DTensor shards

    def forward_backward(self, microbatches: list) -> torch.Tensor:
        local = torch.zeros(())
        for j, (x, y) in enumerate(microbatches):
            last = j == len(microbatches) - 1
            with contextlib.nullcontext() if last or self.no_sync is None else self.no_sync():
                loss_sum = self.model(x, y)
                (loss_sum / self.global_tokens * self.data_ranks).backward()
            local += loss_sum.detach()
        return local / self.global_tokens

    def clip(self) -> None:
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)

    def after_optimizer_step(self) -> None:
        """Bytes of parameters, gradients and optimizer-state tensors this rank holds (local shards of
        DTensors; 0-dim step counters left out, as Trainer.held_bytes does), in its layout."""
        from torch.distributed.tensor import DTensor

        def local(t: torch.Tensor) -> int:
            t = t.to_local() if isinstance(t, DTensor) else t
            return t.numel() * t.element_size()

        if self.count_held:
            states = getattr(self.optimizer, "optim", self.optimizer).state.values()  # ZeRO: the local one
            optimizer = sum(local(v) for s in states for v in s.values() if torch.is_tensor(v) and v.dim())
            grads = sum(local(p.grad) for p in self.params if p.grad is not None)
            device = {"params": sum(local(p) for p in self.params), "grads": grads, "optimizer": optimizer}
            self.held = {"device": device, "host": dict.fromkeys(device, 0)}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def build(name: str, cfgs: dict, grid) -> harness.Implementation:
    started_rss = _peak_rss()
    impl = harness.TrainerSide(cfgs[name], grid) if name in cfgs else TorchDataParallel(cfgs["ddp"], name)
    impl.started_rss = started_rss
    return impl


def _norm_loss(call) -> bool:
    """Gradient-norm and loss all-reduces: PyTorch's by phase, ours (Trainer) by size (one number each)."""
    return call.phase == NORM_AND_LOSS or (call.kind == ALL_REDUCE and call.full_bytes <= SCALAR_BYTES)


def count_step(impl, index: int) -> tuple[float, dict]:
    """The counting step: bytes held, RSS growth and collectives (every rank issues the same ones), sent
    against docs/formulas.md; ours also against the library ledger's count and the bucket plan's."""
    trainer = getattr(impl, "trainer", None)
    impl.count_held, n = True, dist.get_world_size()
    ledger = CommLedger(trainer.grid) if trainer else contextlib.nullcontext()
    with CommRecorder(impl.phase) as recorder, ledger:
        if trainer:
            trainer.ledger = ledger  # the trainer tallies its metrics-only reductions apart
        loss = impl.step(index)
    impl.count_held = False  # not in the timed steps
    calls, held = recorder.calls, trainer.held_bytes() if trainer else impl.held
    by_kind: dict[str, list] = {}
    for call in calls:
        row = by_kind.setdefault(call.kind + (" (norm, loss)" if _norm_loss(call) else ""), [0, Fraction(0)])
        row[0], row[1] = row[0] + 1, row[1] + call.sent
    out = {
        "held": [float(held[where][what]) for where, what in HELD_KEYS],
        "rss": [float(_peak_rss() - impl.started_rss), float(_peak_rss())],
        "sent": sum((x.sent for x in calls), Fraction(0)),
        "model_states": sum((x.sent for x in calls if not _norm_loss(x)), Fraction(0)),
        "by_kind": by_kind,
        "counts": recorder.counts,
        "bucket_traffic": bucket_traffic(trainer, n) if trainer else None,
    }
    if trainer:
        trainer.ledger = None
        out["ledger_agrees"] = ledger.total_bytes(TRAINING) + ledger.total_bytes(BOOKKEEPING) == out["sent"]
    if out["bucket_traffic"] is not None:
        out["padding"] = out["bucket_traffic"] - bucket_traffic(trainer, n, pad=False)
        out["buckets_match"] = out["model_states"] == out["bucket_traffic"]
    return loss, out


def measure(rank: int, args) -> dict:
    """Runs on every rank; rank 0's result is the summary (step times: slowest rank; held: every rank)."""
    cfgs, errors = configs(args)
    grid, n = ProcessGrid(dp=args.dp), args.dp
    psi = count_params(cfgs["ddp"].model)["total"]
    builders = {name: functools.partial(build, name, cfgs, grid) for name in [*cfgs, *PYTORCH]}
    done = harness.contest(rank, builders, SHORT, args.warmup, args.steps, count_step, errors=errors)
    counted = {name: figures[0] for name, figures in done.counted.items()}
    per_rank = harness.gather({k: (c.pop("held"), c.pop("rss")) for k, c in counted.items()}, n)
    impls = {}
    for name, c in counted.items():
        held = [dict(zip(HELD_KEYS, rank[name][0], strict=True)) for rank in per_rank]
        peak = max(held, key=lambda r: sum(r.values()))  # the rank holding most
        device = sum(v for (where, _), v in peak.items() if where == "device") / psi
        host = sum(v for (where, _), v in peak.items() if where == "host") / psi
        want_device, want_host, how = predicted(name, n)
        formula = (3 if IMPLS[name][2] == 3 else 2) * psi * 4
        r = impls[name] = done.summary(name) | c
        r["held_per_rank"] = [{f"{w}_{k}": v for (w, k), v in rank.items()} for rank in held]
        r |= {"device_per_param": device, "host_per_param": host, "predicted_device": want_device}
        r |= {
            "predicted_host": want_host,
            "predicted_how": how,
            "held_ratio": (device + host) / (want_device + want_host),
        }
        r |= {"rss_growth": max(rank[name][1][0] for rank in per_rank), "formula": Fraction(formula)}
        r["exact_ring"] = Fraction(formula * (n - 1), n)
        if "torch-ddp" in done.impls:
            r["loss_gap"] = done.loss_gap(name, "torch-ddp")
            r["ratio_to_torch_ddp"] = r["median_s"] / done.summary("torch-ddp")["median_s"]
    middle = statistics.median(r["losses"][0] for r in impls.values())
    return {
        "d_ff": d_ff_of(cfgs["ddp"].model),
        "n_params": psi,
        "impls": impls,
        "errors": done.errors,
        "loss_spread": max(abs(r["losses"][0] - middle) / abs(middle) for r in impls.values()),
        "peak_rss": max(r[name][1][1] for r in per_rank for name in counted),
    }


def format_table(s: dict) -> str:
    c, n, psi, mib = s["config"], s["config"]["dp"], s["n_params"], report.mib
    tokens = c["micro_batch"] * c["seq_len"]
    lines = [
        *harness.banner(
            f"ZeRO data parallelism: dp={n}",
            n,
            f"{report.model_line(c, s['d_ff'])} | Ψ = {psi:,} parameters ({mib(4 * psi)} MiB fp32)",
        ),
        f"per rank and step {c['micro_batches']} micro-batch(es) of {c['micro_batch']} x {c['seq_len']} "
        f"tokens ({n * c['micro_batches'] * tokens} tokens/step); our buckets {c['bucket_mb']} MB",
        f"{c['steps']} timed steps each after {c['warmup']} warm-up + 1 counting step, all alternating; "
        f"step time = slowest rank",
        "",
        f"{'implementation':<25}{'median ms':>10}{'mean ms':>10}{'/ torch DDP':>13}{'loss step 1':>13}"
        f"{'loss last':>11}{'loss gap':>10}",
    ]
    for name, r in s["impls"].items():
        lines.append(
            f"{LABELS[name]:<25}{1e3 * r['median_s']:>10.1f}{1e3 * r['mean_s']:>10.1f}"
            f"{report.text(r.get('ratio_to_torch_ddp'), '.3f'):>13}{r['losses'][0]:>13.6f}"
            f"{r['losses'][-1]:>11.6f}{report.text(r.get('loss_gap'), '.1e'):>10}"
        )
    lines += [f"{LABELS[name]:<25}not run: {error}" for name, error in s["errors"].items()]
    lines += [
        f"first-step losses: largest relative difference from their median {s['loss_spread']:.2e}",
        f"loss gap: largest relative difference from torch DDP's losses over all "
        f"{1 + c['warmup'] + c['steps']} steps (after updates)",
        "",
        f"model states held per rank after a step, bytes per parameter (N = {n}; the rank holding most)",
        f"{'implementation':<25}{'device':>8}{'host':>8}{'total':>8}   {'formulas (device + host)':<36}"
        f"{'meas/pred':>10}{'MiB':>9}{'RSS +MiB':>10}",
    ]
    for name, r in s["impls"].items():
        total = r["device_per_param"] + r["host_per_param"]
        lines.append(
            f"{LABELS[name]:<25}{r['device_per_param']:>8.3f}{r['host_per_param']:>8.3f}{total:>8.3f}   "
            f"{r['predicted_how']:<36}{r['held_ratio']:>10.4f}{mib(total * psi, 2):>9}"
            f"{mib(r['rss_growth'], 1):>10}"
        )
    lines += [
        *report.note(
            "ours: Trainer.held_bytes(); PyTorch: local tensors (DTensor.to_local()) after "
            "optimizer.step(), before zero_grad; ZeroRedundancyOptimizer shards whole parameters, unevenly: "
            "its largest rank holds a bit more than 8/N. RSS +MiB: growth of the peak RSS (ru_maxrss, "
            "largest rank) while the implementation was built and stepped, in build order in one process: "
            "the first pays the framework's one-time set-up, later ones reuse memory earlier ones freed. "
            f"The process peak at the end: {mib(s['peak_rss'], 1)} MiB, most of it torch, Python and Gloo's "
            "own, not model states."
        ),
        "",
        "bytes sent per rank per step (ring costs; docs/formulas.md 2Ψ·4 for stages 0-2, 3Ψ·4 for stage 3,",
        "(N-1)/N rounded to 1; exact ring = formulas x (N-1)/N)",
        f"{'implementation':<25}{'sent MiB':>10}{'states MiB':>11}{'/formulas':>10}{'/exact ring':>12}"
        f"{'buckets MiB':>12}{'equal':>7}{'padding B':>10}{'ledger':>8}",
    ]
    for name, r in s["impls"].items():
        padding = f"{float(r['padding']):.0f}" if "padding" in r else "-"
        ledger = {True: "same", False: "DIFFERS"}.get(r.get("ledger_agrees"), "-")
        lines.append(
            f"{LABELS[name]:<25}{mib(r['sent']):>10}{mib(r['model_states']):>11}"
            f"{float(r['model_states'] / r['formula']):>10.4f}"
            f"{float(r['model_states'] / r['exact_ring']):>12.6f}"
            f"{mib(r['bucket_traffic']):>12}{r.get('buckets_match', '-')!s:>7}{padding:>10}{ledger:>8}"
        )
    lines += [
        *report.note(
            "sent: every collective at the dispatcher; states: without the gradient-norm and loss "
            "all-reduces (ours: one number each; PyTorch: clip_grad_norm_'s, FSDP2's a vector of "
            "per-parameter norms, and the loss). buckets: our exact count, each bucket padded to a multiple "
            "of N, reduce-scattered and all-gathered (stage 0: all-reduced); equal: states == buckets; "
            "padding: what padding adds, all the excess over the exact ring with one micro-batch. "
            "docs/formulas.md counts one reduction per step: with several micro-batches ZeRO-2, ZeRO-3 and "
            "FSDP2 "
            "reduce-scatter per micro-batch. ledger: sent == what the library's CommLedger counted in the "
            "same step. ZeroRedundancyOptimizer all-reduces gradients (DDP) and broadcasts the updated "
            "parameters: 3(N-1)/N·Ψ·4. FSDP2 keeps the root (embedding, head, final norm) gathered from "
            "forward to backward: it gathers the blocks twice."
        ),
        "",
        "collectives per step (at the dispatcher), calls x op = MiB sent",
    ]
    for name, r in s["impls"].items():
        parts = ", ".join(f"{k} {count} = {mib(sent)}" for k, (count, sent) in sorted(r["by_kind"].items()))
        lines.append(f"  {LABELS[name]:<25}{parts}")
    return "\n".join(lines)


def csv_rows(s: dict) -> list[dict]:
    """One summary row per implementation that ran."""
    config = report.subset(
        s["config"], "dp d_model n_layers n_heads seq_len micro_batch micro_batches vocab steps"
    )
    config |= {"bucket_mb": s["config"]["bucket_mb"], "n_params": s["n_params"]}
    return [config | {"impl": name} | report.flat(r) for name, r in s["impls"].items()]


def add_arguments(p) -> None:
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per rank per step")
    p.add_argument(
        "--bucket-mb", type=float, default=25.0, help="our gradient bucket size (parallel.bucket_mb)"
    )


def check(p, args) -> None:
    if args.micro_batches < 1:
        p.error("--micro-batches must be at least 1")


parse_args, run, main = harness.commands(
    __name__,
    "dtrain's ZeRO stages against torch DDP, ZeroRedundancyOptimizer and FSDP2, one run",
    "--dp",
    "data parallelism",
    steps=10,
    warmup=2,
    model={"n_layers": 4, "seq_len": 128, "batch": ("--micro-batch", 4, "rows per micro-batch")},
)

if __name__ == "__main__":
    raise SystemExit(main())

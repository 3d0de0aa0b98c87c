"""The communication ledger (parallel/ledger.py) against the analytic volumes (dtrain/comm_volume.py).

One training step per layout runs under a CommLedger on every rank of a Gloo world; every (axis, op) it
records, calls and bytes, must equal comm_volume.predict for that rank exactly, training traffic and the
trainer's bookkeeping alike. MoE all-to-all bytes depend on the routing: the test recomputes each
layer's routing from its input (the layer's own `route`), derives the rows that leave and arrive at each
rank, and the prediction fed with those rows must equal the measurement; the balanced-routing figure
docs/formulas.md gives is checked to be close. The meta-device model comm_volume plans buckets with is checked
against the real one, parameter by parameter."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist

from tests import harness
from tests.reference import tiny_config

SMALL_BUCKETS = "parallel.bucket_mb=0.005"  # several gradient buckets even for the tiny model
MOE = ("model.moe.num_experts=4", "model.moe.top_k=2")

# name -> overrides of the tiny config; each runs on 2 ranks (dp fills what tp and pp leave).
LAYOUTS_2 = {
    "ddp": (SMALL_BUCKETS,),
    "zero1": ("parallel.zero=1", SMALL_BUCKETS),
    "zero2": ("parallel.zero=2", SMALL_BUCKETS),
    "zero3": ("parallel.zero=3",),
    # 16-bit parameters: ZeRO-3 gathers 2-byte shards; bf16 gradient buckets halve the reductions too.
    "zero3-bf16": ("parallel.zero=3", "train.precision=bf16"),
    "zero1-bf16-grads-bf16": (
        "parallel.zero=1",
        "train.precision=bf16",
        "parallel.grad_dtype=bf16",
        SMALL_BUCKETS,
    ),
    "ddp-fp16": ("train.precision=fp16", SMALL_BUCKETS),
    "tp2": ("parallel.tp=2",),
    "tp2-sp": ("parallel.tp=2", "parallel.sp=true"),
    "tp2-sp-checkpointing": ("parallel.tp=2", "parallel.sp=true", "train.activation_checkpointing=true"),
    "pp2-1f1b-tied": ("parallel.pp=2", "model.tie_embeddings=true"),
    "pp2-interleaved": (
        "parallel.pp=2",
        "parallel.pp_schedule=interleaved",
        "parallel.pp_virtual_stages=2",
        "model.n_layers=4",
    ),
    "moe-ep2": ("parallel.ep=2", *MOE, SMALL_BUCKETS),
    "cp2": ("parallel.cp=2", SMALL_BUCKETS),
    "cp2-zero3-checkpointing": ("parallel.cp=2", "parallel.zero=3", "train.activation_checkpointing=true"),
    "cp2-moe-checkpointing": ("parallel.cp=2", *MOE, "train.activation_checkpointing=true"),
    # Frozen base: only the adapters' gradients travel; the row-parallel adapters add no collective.
    "lora-zero2": ("parallel.zero=2", "model.lora.rank=4", SMALL_BUCKETS),
    "lora-tp2-sp": (
        "parallel.tp=2",
        "parallel.sp=true",
        "model.lora.rank=4",
        "model.lora.targets=[wq,wv,wo,w2]",
    ),
}

# Heavier compositions on 4 ranks (slow): ZeRO shards meet tensor-partial sums, tied pipeline ends, and
# tensor-split tokens meet expert parallelism.
LAYOUTS_4 = {
    "tp2-dp2-zero1": ("parallel.tp=2", "parallel.zero=1", SMALL_BUCKETS),
    "tp2-dp2-sp-zero2": ("parallel.tp=2", "parallel.sp=true", "parallel.zero=2"),
    "tp2-dp2-sp-zero3": ("parallel.tp=2", "parallel.sp=true", "parallel.zero=3"),
    "pp2-dp2-tied-zero1": ("parallel.pp=2", "model.tie_embeddings=true", "parallel.zero=1"),
    "pp2-dp2-tied-zero3": ("parallel.pp=2", "model.tie_embeddings=true", "parallel.zero=3"),
    "tp2-pp2-sp-replicated-kv": ("parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "model.n_kv_heads=1"),
    "dp4-ep2-zero2": ("parallel.ep=2", *MOE, "parallel.zero=2", SMALL_BUCKETS),
    "cp2-tp2-sp-zero1": ("parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "parallel.zero=1"),
    "cp2-dp2-replicated-kv": ("parallel.cp=2", "model.n_kv_heads=1", SMALL_BUCKETS),
    "cp2-pp2-tied": ("parallel.cp=2", "parallel.pp=2", "model.tie_embeddings=true"),
    "cp2-dp2-ep2": ("parallel.cp=2", "parallel.ep=2", *MOE, SMALL_BUCKETS),
    "cp2-tp2-moe": ("parallel.cp=2", "parallel.tp=2", *MOE),
    "tp2-dp2-ep2-checkpointing": (
        "parallel.tp=2",
        "parallel.ep=2",
        *MOE,
        "train.activation_checkpointing=true",
    ),
    "dp4-shard2-zero2-offload": ("parallel.zero=2", "parallel.dp_shard=2", "parallel.offload=optimizer"),
    "dp4-shard1-zero3": ("parallel.zero=3", "parallel.dp_shard=1"),
    "dp4-ep2-shard2-zero1": ("parallel.ep=2", *MOE, "parallel.zero=1", "parallel.dp_shard=2", SMALL_BUCKETS),
}
# 16-bit parameters (parallel.mixed_precision): activations and their gradients cross tp, pp, ep and cp in
# the compute dtype, while the vocabulary-parallel loss's reductions, the norms, the dK/dV ring sums, the
# routing counts and statistics and the fp32 gradient buckets keep their widths.
LAYOUTS_16_BIT = {
    "tp2-sp-bf16": ("parallel.tp=2", "parallel.sp=true", "train.precision=bf16"),
    "tp2-bf16": ("parallel.tp=2", "train.precision=bf16"),
    "tp2-fp16": ("parallel.tp=2", "train.precision=fp16"),
    "pp2-1f1b-bf16": ("parallel.pp=2", "parallel.pp_schedule=1f1b", "train.precision=bf16"),
    "moe-ep2-bf16": ("parallel.ep=2", *MOE, "train.precision=bf16", SMALL_BUCKETS),
    "cp2-bf16": ("parallel.cp=2", "train.precision=bf16", "train.activation_checkpointing=true"),
}
DEFAULT_16_BIT = ("tp2-sp-bf16", "moe-ep2-bf16")
LAYOUTS_16_BIT_4 = {  # slow: MoE tokens split over tp (gathered back in 16 bits), tp x pp boundaries
    "cp2-dp2-ep2-bf16": ("parallel.cp=2", "parallel.ep=2", *MOE, "train.precision=bf16", SMALL_BUCKETS),
    "tp2-dp2-ep2-bf16": ("parallel.tp=2", "parallel.ep=2", *MOE, "train.precision=bf16"),
    "tp2-pp2-sp-bf16": ("parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "train.precision=bf16"),
}
# Hybrid sharding in the default run: the shard group's reduce-scatters and gathers (axis dp_shard) and
# the per-step all-reduce of every gradient shard over the replicas (axis dp_replicate).
HYBRID_DEFAULT = {
    "dp4-shard2-zero1": ("parallel.zero=1", "parallel.dp_shard=2", SMALL_BUCKETS),
    "dp4-shard2-zero3-tied": ("parallel.zero=3", "parallel.dp_shard=2", "model.tie_embeddings=true"),
}


def _tallies(tallies: dict) -> dict:
    """{(axis, op): Tally} as picklable {(axis, op): (calls, bytes)}."""
    return {key: (t.calls, t.sent) for key, t in tallies.items()}


def _meta_matches_real(cfg, trainer) -> list[str]:
    """The meta-device parameters comm_volume reads against the trainer's: same order, sizes and facts."""
    from dtrain.analysis.estimate import meta_rank
    from parallel.sharding import sharding_of

    def facts(params):
        return [(q.numel(), sharding_of(q).partial_grad, sharding_of(q).expert) for q in params]

    meta = [q for q in meta_rank(cfg, trainer.grid.rank).model.parameters() if q.requires_grad]
    return (
        []
        if facts(meta) == facts(trainer.params)
        else [f"meta {facts(meta)} != real {facts(trainer.params)}"]
    )


def _routing_recorder(trainer) -> list:
    """Per MoE forward on this rank (layer by layer, micro-batch by micro-batch), the kept slots per
    expert, recomputed from the layer's input with the layer's own routing (dtrain.bench.moe.routing_of).
    Under tensor parallelism each tensor rank routes its sequence chunk of the micro-batch."""
    from dtrain.bench.moe import routing_of
    from parallel.grid import group_size

    kept: list[list[int]] = []

    def hook(layer, args, _out):
        if torch._C._current_graph_task_id() != -1:
            return  # an activation-checkpointing recompute: the same routing again
        if layer.cp_group is not None:
            if group_size(layer.ep_group) > 1:  # the dispatched rows depend on it
                kept.append(_context_routing_later(layer, args[0]))
            return
        tp = group_size(layer.tp_group)
        assert tp == 1 or layer.split_tokens, "under SP the layer input is a chunk; route the gathered one"
        # Route the whole micro-batch in priority order (sequence-major); capacity counts all of it, and
        # tensor rank j routes the j-th contiguous part, so its kept slots are that part's.
        with torch.no_grad():
            tokens, r = routing_of(layer, args[0])
        part = tokens.shape[0] // tp
        mine = slice(0, part) if tp == 1 else slice(rank_in(layer) * part, (rank_in(layer) + 1) * part)
        expert, keep = r.expert[mine], r.keep[mine]
        kept.append(torch.bincount(expert[keep], minlength=layer.num_experts).tolist())

    def rank_in(layer) -> int:
        return dist.get_rank(layer.tp_group)

    for layer in trainer.model.moe_layers().values():
        layer.register_forward_hook(hook)
    return kept


def _context_routing_later(layer, x):
    """Under context parallelism a rank holds two chunks of each sequence and places its slots with a
    gather over cp: the logits are taken now, the routing (collective) after the measured step."""
    from parallel.grid import group_size
    from parallel.moe import expert_capacity, route
    from parallel.precision import wide

    assert group_size(layer.tp_group) == 1, "route the tensor rank's piece of the chunks"
    b, s, d = x.shape
    with torch.no_grad():
        tokens = x.transpose(0, 1).reshape(s * b, d)  # the router runs in fp32 whatever the compute dtype
        logits = torch.nn.functional.linear(wide(tokens), wide(layer.router.weight))

    def kept() -> list[int]:
        total = b * s * group_size(layer.cp_group)
        capacity = expert_capacity(layer.capacity_factor, total, layer.top_k, layer.num_experts)
        r = route(logits, layer.top_k, capacity, total, None, layer._context_routing(b, s, x.device))
        return torch.bincount(r.expert[r.keep], minlength=layer.num_experts).tolist()

    return kept


def measure_step(names_and_overrides: list[tuple[str, tuple[str, ...]]]) -> dict:
    """For each layout: one training step under a ledger; this rank's tallies, the prediction's, and
    the MoE routing counts (for the exact all-to-all rows)."""
    from dtrain.analysis.comm_volume import predict
    from dtrain.trainer import Trainer
    from parallel.ledger import BOOKKEEPING, CommLedger

    out = {}
    for name, overrides in names_and_overrides:
        cfg = tiny_config(dist.get_world_size(), *overrides)
        p = cfg.parallel
        grid = harness.grid(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, dp_shard=p.dp_shard)
        trainer = Trainer(cfg, grid, torch.device("cpu"))
        kept = _routing_recorder(trainer)
        trainer.ledger = ledger = CommLedger(grid)  # the trainer tags its bookkeeping in this ledger
        with ledger:
            trainer.train_step()
        kept[:] = [k() if callable(k) else k for k in kept]  # context routing, outside the ledger
        volume = predict(cfg, dist.get_rank())
        out[name] = {
            "training": _tallies(ledger.tallies()),
            "bookkeeping": _tallies(ledger.tallies(BOOKKEEPING)),
            "predicted": _tallies(volume.tallies()),
            "predicted_bookkeeping": _tallies(volume.tallies(BOOKKEEPING)),
            "estimated": volume.estimated,
            "table": volume.table(),
            "meta": _meta_matches_real(cfg, trainer),
            "kept": kept,
            "ep_rank": grid.coords.ep,
            "ep_ranks": grid.ranks("ep"),
            "unpriced": ledger.unpriced,
        }
    return out


def exact_moe_rows(results: list[dict], rank: int, num_experts: int) -> tuple[int, int]:
    """(rows leaving, rows arriving) of `rank` summed over its dispatches, from every rank's routing:
    a kept slot for expert e goes to the ep rank holding e (dtrain.bench.moe.alltoall_rows)."""
    from dtrain.bench.moe import alltoall_rows

    group = results[rank]["ep_ranks"]
    local = num_experts // len(group)
    leaving = arriving = 0
    for call in range(len(results[rank]["kept"])):
        counts = [results[r]["kept"][call] for r in group]
        out, back = alltoall_rows(counts, results[rank]["ep_rank"], local)
        leaving, arriving = leaving + out, arriving + back
    return leaving, arriving


def check_layout(name: str, overrides: tuple[str, ...], results: list[dict]) -> None:
    """Every rank's measured tallies equal the prediction; MoE rows from the routing."""
    from dtrain.analysis.comm_volume import predict
    from parallel.ledger import ALL_TO_ALL

    world = len(results)
    cfg = tiny_config(world, *overrides)
    for rank, result in enumerate(r[name] for r in results):
        assert not result["meta"], result["meta"]
        assert not result["unpriced"], result["unpriced"]
        predicted, measured = result["predicted"], result["training"]
        context = f"{name}, rank {rank}; prediction:\n{result['table']}"
        assert result["bookkeeping"] == result["predicted_bookkeeping"], context
        if not result["estimated"]:
            assert measured == predicted, context
            continue
        # MoE: the all-to-all bytes depend on the routing; everything else is exact already.
        key = ("ep", ALL_TO_ALL)
        assert result["estimated"] == {key}
        assert {k: v for k, v in measured.items() if k != key} == {
            k: v for k, v in predicted.items() if k != key
        }, context
        rows = exact_moe_rows([r[name] for r in results], rank, cfg.model.moe.num_experts)
        exact = predict(cfg, rank, moe_rows=rows).tallies()[key]
        assert measured[key] == (exact.calls, exact.sent), context
        balanced = predicted[key][1]
        assert measured[key][0] == predicted[key][0]
        assert abs(measured[key][1] - balanced) <= Fraction(1, 10) * balanced, (measured[key], balanced)


@pytest.fixture(scope="module")
def measured_2(world2):
    results = world2.run(measure_step, list(LAYOUTS_2.items()))
    return [{name: r[name] for name in LAYOUTS_2} for r in results]


@pytest.mark.parametrize("name", LAYOUTS_2.keys())
def test_ledger_equals_analytic_volume_2_ranks(measured_2, name):
    check_layout(name, LAYOUTS_2[name], measured_2)


# One composed layout in the default run (ZeRO shards meeting tensor-partial sums and sequence parallelism);
# the rest of LAYOUTS_4 in the slow set.
COMPOSED_DEFAULT = "tp2-dp2-sp-zero2"


def test_ledger_equals_analytic_volume_composed_4_ranks(world4):
    layout = {COMPOSED_DEFAULT: LAYOUTS_4[COMPOSED_DEFAULT]}
    results = world4.run(measure_step, list(layout.items()))
    check_layout(COMPOSED_DEFAULT, layout[COMPOSED_DEFAULT], results)


def test_ledger_equals_analytic_volume_hybrid_sharding(world4):
    results = world4.run(measure_step, list(HYBRID_DEFAULT.items()))
    for name, overrides in HYBRID_DEFAULT.items():
        check_layout(name, overrides, results)
        axes = {axis for axis, _ in results[0][name]["training"]}
        assert {"dp_shard", "dp_replicate"} <= axes and "dp" not in axes, (name, axes)


def test_ledger_equals_analytic_volume_in_16_bits(world2):
    layouts = {name: LAYOUTS_16_BIT[name] for name in DEFAULT_16_BIT}
    results = world2.run(measure_step, list(layouts.items()))
    for name, overrides in layouts.items():
        check_layout(name, overrides, results)


@pytest.mark.slow
def test_ledger_equals_analytic_volume_in_16_bits_every_layout(world2, world4):
    for world, layouts in (
        (world2, {k: v for k, v in LAYOUTS_16_BIT.items() if k not in DEFAULT_16_BIT}),
        (world4, LAYOUTS_16_BIT_4),
    ):
        results = world.run(measure_step, list(layouts.items()))
        for name, overrides in layouts.items():
            check_layout(name, overrides, results)


@pytest.mark.slow
def test_ledger_equals_analytic_volume_4_ranks(world4):
    rest = {k: v for k, v in LAYOUTS_4.items() if k != COMPOSED_DEFAULT}
    results = world4.run(measure_step, list(rest.items()))
    for name, overrides in rest.items():
        check_layout(name, overrides, results)


def test_moe_rows_are_near_the_balanced_figure(measured_2):
    """The dispatch moves about (ep-1)/ep of the T*k routed rows each way (docs/formulas.md), not exactly."""
    from dtrain.analysis.comm_volume import predict
    from dtrain.config import microbatches_per_rank

    cfg = tiny_config(2, *LAYOUTS_2["moe-ep2"])
    t, layers, m = cfg.train, cfg.model.n_layers, microbatches_per_rank(cfg)
    for rank in range(2):
        leaving, arriving = exact_moe_rows([r["moe-ep2"] for r in measured_2], rank, 4)
        balanced = Fraction(1, 2) * t.micro_batch_size * t.seq_len * cfg.model.moe.top_k * layers * m
        # 16-token micro-batches route unevenly: one direction may be 10% off, the traffic is closer.
        assert abs(leaving + arriving - 2 * balanced) <= 2 * balanced / 10, (leaving, arriving, balanced)
        # Calls are exact either way: per layer and micro-batch, 3 forward all-to-alls and 2 adjoints.
        assert predict(cfg, rank).tallies()[("ep", "all-to-all")].calls == 5 * layers * m


def ledger_primitives() -> dict:
    """Each way a collective can be issued, under one ledger: sync and async, list forms, uneven
    all-to-all, batched point-to-point, inside autograd's backward and from a post-accumulate-grad hook;
    a one-rank group and the bookkeeping section."""
    from parallel.collectives import copy_to_tp
    from parallel.ledger import BOOKKEEPING, CommLedger

    rank, grid = dist.get_rank(), harness.grid(dp=2)
    alone = [dist.new_group([r]) for r in range(2)][rank]  # collective: both ranks create both
    f32 = {"dtype": torch.float32}
    weight = torch.nn.Parameter(torch.ones(4))
    weight.register_post_accumulate_grad_hook(lambda p: dist.all_reduce(p.grad, group=grid.dp_group))
    with CommLedger(grid) as ledger:
        dist.all_reduce(torch.ones(10, **f32))  # default group: "world"
        dist.all_reduce(torch.ones(10, **f32), group=grid.dp_group, async_op=True).wait()
        dist.all_gather_single(torch.empty(10, **f32), torch.ones(5, **f32), group=grid.dp_group)
        dist.all_gather([torch.empty(5, **f32) for _ in range(2)], torch.ones(5, **f32), group=grid.dp_group)
        dist.reduce_scatter_single(torch.empty(4, **f32), torch.ones(8, **f32), group=grid.dp_group)
        send = [1, 3] if rank == 0 else [2, 2]  # rows of a (4, 3) input for ranks 0 and 1
        recv = [1, 2] if rank == 0 else [3, 2]
        dist.all_to_all_single(torch.empty(sum(recv), 3), torch.ones(4, 3), recv, send, group=grid.dp_group)
        peer = 1 - rank
        ops = [
            dist.P2POp(dist.isend, torch.ones(5, **f32), peer, grid.dp_group),
            dist.P2POp(dist.irecv, torch.empty(5, **f32), peer, grid.dp_group),
        ]
        for work in dist.batch_isend_irecv(ops if rank == 0 else ops[::-1]):
            work.wait()
        copy_to_tp(weight * 1.0, grid.dp_group).sum().backward()  # backward all-reduce + the hook's
        dist.all_reduce(torch.ones(10, **f32), group=alone)  # one rank: nothing sent, not recorded
        with ledger.bookkeeping():
            dist.all_reduce(torch.ones(2, **f32), group=grid.dp_group)
        dist.barrier(group=grid.dp_group)
    return {"training": _tallies(ledger.tallies()), "bookkeeping": _tallies(ledger.tallies(BOOKKEEPING))}


def test_ledger_sees_every_way_a_collective_is_issued(world2):
    results = world2.run(ledger_primitives)
    for rank, result in enumerate(results):
        leaving = 3 if rank == 0 else 2  # all-to-all rows to the other rank, 12 bytes each
        assert result["training"] == {
            ("world", "all-reduce"): (1, 40),  # 2(n-1)/n * 40 bytes
            # async 40 B; the backward of copy_to_tp and the hook: 16 B each
            ("dp", "all-reduce"): (3, 40 + 16 + 16),
            ("dp", "all-gather"): (2, 20 + 20),  # (n-1)/n * the gathered 40 B, single and list form
            ("dp", "reduce-scatter"): (1, 16),
            ("dp", "all-to-all"): (1, leaving * 12),
            ("dp", "send"): (1, 20),
            ("dp", "recv"): (1, 0),
            ("dp", "barrier"): (1, 0),
        }, rank
        assert result["bookkeeping"] == {("dp", "all-reduce"): (1, 8)}


def test_ledger_equals_analytic_volume_with_packed_documents(world2, tmp_path):
    """Context parallelism over packed documents: the keys' document ids travel the ring with them."""
    from dtrain.prepare import prepare_data
    from tests import hf_models
    from tests.equivalence.test_sft import _records

    tok = hf_models.make_tokenizer(str(tmp_path / "tok"))
    (tmp_path / "pr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(40)))
    prepare_data(str(tmp_path / "pr.jsonl"), str(tmp_path / "data"), "prompt-response", tok, val_fraction=0.0)
    data = ("data.kind=memmap", f"data.path={tmp_path / 'data'}", "data.packing=true")
    layouts = {
        "cp2-documents": ("parallel.cp=2", *data),
        "cp2-documents-checkpointing": ("parallel.cp=2", "train.activation_checkpointing=true", *data),
    }
    results = world2.run(measure_step, list(layouts.items()))
    for name, overrides in layouts.items():
        check_layout(name, overrides, results)
        assert any(key == ("cp", "send") for key in results[0][name]["training"])

"""The communication prediction (dtrain/analysis/comm_volume.py) on its own, without processes: it
reproduces the tensor-parallel benchmark's exact count and docs/formulas.md's data-parallel volumes,
halves ZeRO-3's gathers in 16 bits, and names the key of what it does not model. (test_ledger.py holds it
equal to what a real step sends.)"""

from __future__ import annotations

from fractions import Fraction

import pytest

from tests.reference import tiny_config


def test_prediction_reproduces_the_tensor_parallel_benchmark_count():
    """bench/tensor_parallel.py counts one step of the tp model (one micro-batch, the partial-gradient sum)
    exactly; the prediction's tensor-parallel bytes are that plus the gradient norm's scalar."""
    from dtrain.analysis.comm_volume import predict
    from dtrain.bench.tensor_parallel import analytic_bytes

    for sp in ("false", "true"):
        cfg = tiny_config(
            2, "parallel.tp=2", f"parallel.sp={sp}", "model.n_kv_heads=1", "train.global_batch_size=4"
        )
        volume = predict(cfg)
        tp = sum(t.sent for t in volume.terms if t.axis == "tp" and not t.label.startswith("gradient norm"))
        assert all(t.section == "training" for t in volume.terms if t.axis == "tp")
        assert tp == analytic_bytes(cfg, cfg.train.micro_batch_size, cfg.train.seq_len).total


def test_prediction_gives_the_formulas_data_parallel_volumes():
    """docs/formulas.md: DDP and ZeRO 1/2 send 2Ψ(N-1)/N elements per step, ZeRO-3 3Ψ(N-1)/N (one
    micro-batch);
    exactly so here up to the padding of each bucket to a multiple of N."""
    from dtrain.analysis.comm_volume import predict
    from dtrain.analysis.estimate import meta_rank

    n, psi = 2, sum(q.numel() for q in meta_rank(tiny_config(2), 0).model.parameters())
    for zero, factor in ((0, 2), (1, 2), (2, 2), (3, 3)):
        cfg = tiny_config(n, f"parallel.zero={zero}", "train.global_batch_size=8")
        volume = predict(cfg)
        sent = sum(
            t.sent
            for t in volume.terms
            if t.axis == "dp" and t.section == "training" and not t.label.startswith("gradient norm")
        )
        formula = Fraction(factor * (n - 1), n) * psi * 4
        assert formula <= sent <= formula * Fraction(1001, 1000), (zero, sent, formula)


def test_zero3_gathers_half_the_bytes_in_16_bits():
    """Stage 3 all-gathers its parameters in their own dtype: bf16 shards are half the fp32 bytes, while
    fp32 gradients reduce-scatter the same bytes (parallel.grad_dtype=bf16 halves those too)."""
    from dtrain.analysis.comm_volume import predict
    from parallel.ledger import ALL_GATHER, REDUCE_SCATTER

    def dp_bytes(*overrides: str) -> dict:
        tallies = predict(tiny_config(2, "parallel.zero=3", *overrides)).tallies()
        return {op: t.sent for (axis, op), t in tallies.items() if axis == "dp"}

    fp32, bf16 = dp_bytes(), dp_bytes("train.precision=bf16")
    bf16_grads = dp_bytes("train.precision=bf16", "parallel.grad_dtype=bf16")
    assert bf16[ALL_GATHER] * 2 == fp32[ALL_GATHER]
    assert bf16[REDUCE_SCATTER] == fp32[REDUCE_SCATTER]
    assert bf16_grads[REDUCE_SCATTER] * 2 == fp32[REDUCE_SCATTER]


def test_not_modelled_names_the_key():
    from dtrain.analysis.comm_volume import NotModelled, predict

    cases = {
        "parallel.zero=2": (
            "parallel.pp=2",
            "parallel.zero=2",
            "parallel.pp_schedule=interleaved",
            "parallel.pp_virtual_stages=2",
            "model.n_layers=4",
        ),
    }
    for key, overrides in cases.items():
        with pytest.raises(NotModelled, match=key):
            predict(tiny_config(2, *overrides))


def test_ring_bytes_has_one_home():
    from dtrain.bench import comm
    from parallel import ledger

    assert comm.ring_bytes is ledger.ring_bytes
    assert (
        ledger.ring_bytes(ledger.ALL_REDUCE, 12, 4) == 18 and ledger.ring_bytes(ledger.ALL_GATHER, 12, 4) == 9
    )

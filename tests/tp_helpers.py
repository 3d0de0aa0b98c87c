"""Shared pieces of the tensor-parallel tests (test_tp_collectives, test_tp_layers): seeded full tensors,
shards and comparisons. How tensors are compared is said in test_tp_layers."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests import harness
from tests.tolerances import FP32

IGNORE = -100


def setup(tp: int, dp: int, case: int):
    """The tensor group, this rank's index and size in it, and a seed base shared by the tensor group
    but different per data-parallel replica and per case."""
    grid = harness.grid(tp=tp, dp=dp)
    group = grid.tp_group
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    assert (rank, n) == (grid.rank_in("tp"), tp)
    return group, rank, n, 1_000_000 * case + 1000 * grid.coords.dp


def randn(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randint(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    """Small integers as floats: sums of them are exact in any order, so collectives compare bitwise."""
    return torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def token_ids(seed: int, vocab: int, shape: tuple[int, int], n_ignore: int = 0) -> torch.Tensor:
    """Token ids of `shape` holding every id of the vocabulary at least once (so every rank owns some,
    including the first and last id of each rank's range) and `n_ignore` IGNORE entries, shuffled."""
    g = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    assert numel >= vocab + n_ignore
    rest = torch.randint(0, vocab, (numel - vocab - n_ignore,), generator=g)
    ids = torch.cat([torch.arange(vocab), torch.full((n_ignore,), IGNORE), rest])
    return ids[torch.randperm(numel, generator=g)].view(shape)


def gather_cat(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's x along dim, with the list all_gather (not the library's code path)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def same_on_every_rank(x: torch.Tensor, group) -> bool:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return all(torch.equal(p, parts[0]) for p in parts)


def close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = FP32["rtol"]) -> float:
    """||ours - ref|| <= rtol * ||ref|| (per tensor, as tests/reference.py's `compare_runs`)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ref_norm = ref.double().norm()
    assert ref_norm > 0, f"{what}: the reference is zero, the comparison would be vacuous"
    err = float((ours.double() - ref.double()).norm() / ref_norm)
    assert err <= rtol, f"{what}: relative 2-norm difference {err:.2e} > {rtol:.0e}"
    return err


def close_scalar(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: dict) -> None:
    """|ours - ref| <= atol + rtol * |ref| for a scalar loss (torch.testing.assert_close's rule; its first
    call costs seconds of imports in every worker)."""
    ours, ref = float(ours.detach()), float(ref.detach())
    assert abs(ours - ref) <= tol["atol"] + tol["rtol"] * abs(ref), f"{what}: {ours!r} != {ref!r}"


def zero(x: torch.Tensor) -> bool:
    return x.numel() > 0 and torch.equal(x, torch.zeros_like(x))


def pad_cols(x: torch.Tensor, width: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """x padded on the last dim to `width` with zeros (or with `fill`)."""
    extra = width - x.shape[-1]
    pad = x.new_zeros(*x.shape[:-1], extra) if fill is None else fill[..., :extra].to(x.dtype)
    return torch.cat([x, pad], dim=-1)

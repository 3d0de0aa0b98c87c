"""The process grid: `layout()` checked as a pure function over every factorization of small worlds, a
few layouts spelled out by hand, the errors, and then real Gloo groups built from it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from parallel.grid import AXES, GROUP_NAMES, GridError, layout
from tests import harness

# The coordinates each group spans (members differ there) and fixes (members agree there). ep and edp are
# the two halves of the data-parallel index, dp_i = edp_i * ep + ep_i; dp_shard and dp_replicate those of
# the index in dp x cp under hybrid sharding, edp_shard the place among a shard group's copies of an
# expert (its edp x cp ranks there).
HYBRID = ("dp_shard", "dp_replicate", "edp_shard")
SPANNED = {
    "pp": ("pp",),
    "dp": ("dp", "ep", "edp", *HYBRID),
    "cp": ("cp", "dp_shard", "edp_shard"),
    "tp": ("tp",),
    "ep": ("ep", "dp", "dp_shard"),
    "edp": ("edp", "dp", *HYBRID),
    "dp_cp": ("dp", "ep", "edp", "cp", *HYBRID),
    "edp_cp": ("edp", "dp", "cp", *HYBRID),
    "dp_shard": ("dp", "ep", "edp", "cp", "dp_shard", "edp_shard"),
    "dp_replicate": ("dp", "edp", "dp_replicate"),
    "edp_shard": ("dp", "edp", "cp", "dp_shard", "edp_shard"),
    "edp_replicate": ("dp", "edp", "dp_replicate"),
}
KEY = {  # the coordinates whose combination is unique within a group
    "pp": ("pp",),
    "dp": ("dp",),
    "cp": ("cp",),
    "tp": ("tp",),
    "ep": ("ep",),
    "edp": ("edp",),
    "dp_cp": ("dp", "cp"),
    "edp_cp": ("edp", "cp"),
    "dp_shard": ("dp", "cp"),
    "dp_replicate": ("dp",),
    "edp_shard": ("edp", "cp"),
    "edp_replicate": ("edp",),
}
ALL_COORDS = ("pp", "dp", "cp", "tp", "ep", "edp", *HYBRID)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factorizations(world: int):
    """Every (pp, dp, cp, tp, ep) with pp*dp*cp*tp == world and ep | dp."""
    for pp in divisors(world):
        for dp in divisors(world // pp):
            for cp in divisors(world // (pp * dp)):
                tp = world // (pp * dp * cp)
                for ep in divisors(dp):
                    yield pp, dp, cp, tp, ep


def rank_of(pp_i: int, dp_i: int, cp_i: int, tp_i: int, *, dp: int, cp: int, tp: int) -> int:
    return ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i


def shard_sizes(dp: int, cp: int, ep: int) -> list[int]:
    """Every valid dp_shard: divides dp*cp, a multiple of cp*ep."""
    return [k for k in divisors(dp * cp) if k % (cp * ep) == 0]


def expected_groups(
    pp: int, dp: int, cp: int, tp: int, ep: int, k: int = -1
) -> dict[str, set[tuple[int, ...]]]:
    """Every group built straight from the rank formula (independently of layout()'s bucketing)."""
    edp = dp // ep
    k = dp * cp if k == -1 else k
    ek = k // ep

    def r(p, d, c, t):
        return rank_of(p, d, c, t, dp=dp, cp=cp, tp=tp)

    def group(ranks) -> tuple[int, ...]:
        return tuple(sorted(ranks))

    out: dict[str, set[tuple[int, ...]]] = {name: set() for name in GROUP_NAMES}
    for p, d, c, t in itertools.product(range(pp), range(dp), range(cp), range(tp)):
        out["tp"].add(group(r(p, d, c, x) for x in range(tp)))
        out["cp"].add(group(r(p, d, x, t) for x in range(cp)))
        out["dp"].add(group(r(p, x, c, t) for x in range(dp)))
        out["pp"].add(group(r(x, d, c, t) for x in range(pp)))
        e_i, edp_i = d % ep, d // ep
        out["ep"].add(group(r(p, edp_i * ep + x, c, t) for x in range(ep)))
        out["edp"].add(group(r(p, x * ep + e_i, c, t) for x in range(edp)))
        out["dp_cp"].add(group(r(p, x, y, t) for x in range(dp) for y in range(cp)))
        out["edp_cp"].add(group(r(p, x * ep + e_i, y, t) for x in range(edp) for y in range(cp)))
        # Hybrid sharding: j = d * cp + c in dp x cp, shard groups of k consecutive j, replicas across;
        # an expert's copies in a shard group are its edp x cp ranks there, e = edp_i * cp + c.
        j = d * cp + c
        out["dp_shard"].add(group(r(p, x // cp, x % cp, t) for x in range(j - j % k, j - j % k + k)))
        out["dp_replicate"].add(group(r(p, x // cp, x % cp, t) for x in range(j % k, dp * cp, k)))
        copies = [(y, z) for y in range(edp) for z in range(cp) if ((y * ep + e_i) * cp + z) // k == j // k]
        out["edp_shard"].add(group(r(p, y * ep + e_i, z, t) for y, z in copies))
        place = (edp_i * cp + c) % ek
        replicas = [(y, z) for y in range(edp) for z in range(cp) if (y * cp + z) % ek == place]
        out["edp_replicate"].add(group(r(p, y * ep + e_i, z, t) for y, z in replicas))
    return out


LAYOUTS = [(world, f) for world in range(1, 17) for f in factorizations(world)]


def test_enumeration_covers_the_interesting_cases():
    assert len(LAYOUTS) > 300
    assert (16, (2, 2, 2, 2, 2)) in LAYOUTS and (12, (1, 12, 1, 1, 4)) in LAYOUTS


@pytest.mark.parametrize("world", range(1, 17))
def test_layout_invariants(world):
    for (pp, dp, cp, tp, ep), k in (
        (f, k) for f in factorizations(world) for k in shard_sizes(*f[1:3], f[4])
    ):
        where = f"world={world} pp={pp} dp={dp} cp={cp} tp={tp} ep={ep} dp_shard={k}"
        lay = layout(world, pp=pp, dp=dp, cp=cp, tp=tp, ep=ep, dp_shard=k)
        sizes = {"pp": pp, "dp": dp, "cp": cp, "tp": tp, "ep": ep, "edp": dp // ep, "dp_cp": dp * cp}
        replicas = dp * cp // k
        sizes |= {
            "edp_cp": dp // ep * cp,
            "dp_shard": k,
            "dp_replicate": replicas,
            "edp_shard": k // ep,
            "edp_replicate": replicas,
        }
        assert lay.sizes == sizes, where
        # dp=-1 infers the same layout; dp_shard=-1 is the whole dp x cp group.
        assert layout(world, pp=pp, cp=cp, tp=tp, ep=ep, dp_shard=k) == lay, where
        if k == dp * cp:
            assert layout(world, pp=pp, cp=cp, tp=tp, ep=ep) == lay, where

        # The rank formula and the ep/edp split of the data-parallel index.
        assert len(lay.coords) == world, where
        for r, c in enumerate(lay.coords):
            assert 0 <= c.pp < pp and 0 <= c.dp < dp and 0 <= c.cp < cp and 0 <= c.tp < tp, where
            assert rank_of(c.pp, c.dp, c.cp, c.tp, dp=dp, cp=cp, tp=tp) == r, (where, r, c)
            assert (c.ep, c.edp) == (c.dp % ep, c.dp // ep), (where, r, c)
        assert len(set(lay.coords)) == world, where

        assert set(lay.groups) == set(GROUP_NAMES), where
        for name in GROUP_NAMES:
            groups = lay.groups[name]
            # A partition of the world into groups of the advertised size, each in ascending order.
            assert sorted(r for g in groups for r in g) == list(range(world)), (where, name)
            assert len(groups) == world // sizes[name], (where, name)
            for g in groups:
                assert len(g) == sizes[name] and list(g) == sorted(g), (where, name, g)
                members = [lay.coords[r] for r in g]
                fixed = [a for a in ALL_COORDS if a not in SPANNED[name]]
                for a in fixed:
                    assert len({getattr(m, a) for m in members}) == 1, (where, name, g, a)
                keys = {tuple(getattr(m, a) for a in KEY[name]) for m in members}
                assert len(keys) == len(g), (where, name, g)  # pairwise different where it spans
            # And the same groups as spelled out from the rank formula.
            assert set(groups) == expected_groups(pp, dp, cp, tp, ep, k)[name], (where, name)

        # Tensor-parallel groups are runs of neighbouring ranks.
        for g in lay.groups["tp"]:
            assert g == tuple(range(g[0], g[0] + tp)), (where, g)
        # An expert group is ep consecutive data-parallel indices, starting at a multiple of ep.
        for g in lay.groups["ep"]:
            dps = sorted(lay.coords[r].dp for r in g)
            assert dps == list(range(dps[0], dps[0] + ep)) and dps[0] % ep == 0, (where, g)
        # Within one (pp, cp, tp) slice, expert and expert-data-parallel groups form a grid.
        for eg in lay.groups["ep"]:
            for xg in lay.groups["edp"]:
                a, b = lay.coords[eg[0]], lay.coords[xg[0]]
                if (a.pp, a.cp, a.tp) == (b.pp, b.cp, b.tp):
                    assert len(set(eg) & set(xg)) == 1, (where, eg, xg)
                else:
                    assert not set(eg) & set(xg), (where, eg, xg)
        # Each dp group is the union of ep groups over edp, and lies in one dp_cp group; each dp_cp group
        # is the union of the cp dp-groups it meets (and of the dp cp-groups it meets).
        for g in lay.groups["dp"]:
            parts = [e for e in lay.groups["ep"] if set(e) <= set(g)]
            assert sorted(r for e in parts for r in e) == list(g), (where, g)
        for g in lay.groups["dp_cp"]:
            for sub, count in (("dp", cp), ("cp", dp)):
                parts = [d for d in lay.groups[sub] if set(d) & set(g)]
                assert all(set(d) <= set(g) for d in parts), (where, g, sub)
                assert len(parts) == count, (where, g, sub)
                assert sorted(r for d in parts for r in d) == list(g), (where, g, sub)


def as_lists(groups) -> list[list[int]]:
    return sorted(list(g) for g in groups)


def test_spelled_out_tp2_dp2_pp2():
    lay = layout(8, tp=2, dp=2, pp=2)
    assert as_lists(lay.groups["tp"]) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert as_lists(lay.groups["dp"]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert as_lists(lay.groups["pp"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert as_lists(lay.groups["cp"]) == [[r] for r in range(8)]
    assert as_lists(lay.groups["ep"]) == [[r] for r in range(8)]
    assert as_lists(lay.groups["edp"]) == as_lists(lay.groups["dp"])
    assert as_lists(lay.groups["dp_cp"]) == as_lists(lay.groups["dp"])
    assert [(c.pp, c.dp, c.tp) for c in lay.coords] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1),
    ]  # fmt: skip


def test_spelled_out_all_axes_16():
    lay = layout(16, tp=2, cp=2, dp=2, pp=2)
    assert as_lists(lay.groups["tp"]) == [[r, r + 1] for r in range(0, 16, 2)]
    assert as_lists(lay.groups["cp"]) == [
        [0, 2],
        [1, 3],
        [4, 6],
        [5, 7],
        [8, 10],
        [9, 11],
        [12, 14],
        [13, 15],
    ]
    assert as_lists(lay.groups["dp"]) == [
        [0, 4],
        [1, 5],
        [2, 6],
        [3, 7],
        [8, 12],
        [9, 13],
        [10, 14],
        [11, 15],
    ]
    assert as_lists(lay.groups["pp"]) == [[r, r + 8] for r in range(8)]
    assert as_lists(lay.groups["dp_cp"]) == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]


def test_spelled_out_experts():
    lay = layout(4, dp=4, ep=2)
    assert as_lists(lay.groups["ep"]) == [[0, 1], [2, 3]]
    assert as_lists(lay.groups["edp"]) == [[0, 2], [1, 3]]
    assert [(c.ep, c.edp) for c in lay.coords] == [(0, 0), (1, 0), (0, 1), (1, 1)]

    lay = layout(8, dp=4, ep=2, pp=2)
    assert as_lists(lay.groups["ep"]) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert as_lists(lay.groups["edp"]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert as_lists(lay.groups["dp"]) == [[0, 1, 2, 3], [4, 5, 6, 7]]

    # With tp=2 the data-parallel neighbours are two ranks apart.
    lay = layout(8, dp=4, ep=2, tp=2)
    assert as_lists(lay.groups["ep"]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert as_lists(lay.groups["edp"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]

    lay = layout(8, dp=8, ep=4)
    assert as_lists(lay.groups["ep"]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert as_lists(lay.groups["edp"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_spelled_out_hybrid_sharding():
    # dp 8 in shard groups of 4 (one node each), two replicas; experts over ep 2 inside a shard group.
    lay = layout(8, dp=8, ep=2, dp_shard=4)
    assert as_lists(lay.groups["dp_shard"]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert as_lists(lay.groups["dp_replicate"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert as_lists(lay.groups["edp"]) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert as_lists(lay.groups["edp_shard"]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert as_lists(lay.groups["edp_replicate"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # With tp 2 and cp 2 a shard group is k consecutive members of dp x cp: whole cp groups.
    lay = layout(16, tp=2, cp=2, dp=4, dp_shard=4)
    assert as_lists(lay.groups["dp_shard"]) == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert as_lists(lay.groups["dp_replicate"]) == [[r, r + 8] for r in range(8)]
    # The default is one replica: the shard group is dp x cp, the replica groups single ranks.
    lay = layout(8, tp=2, dp=4)
    assert lay.groups["dp_shard"] == lay.groups["dp_cp"] and lay.sizes["dp_replicate"] == 1


def test_dp_is_inferred():
    assert layout(12, tp=2, pp=3).sizes["dp"] == 2
    assert layout(12, tp=2, cp=3).sizes["dp_cp"] == 6
    assert layout(1).sizes == {
        "pp": 1, "dp": 1, "cp": 1, "tp": 1, "ep": 1, "edp": 1, "dp_cp": 1, "edp_cp": 1,
        "dp_shard": 1, "dp_replicate": 1, "edp_shard": 1, "edp_replicate": 1,
    }  # fmt: skip
    assert AXES == ("pp", "dp", "cp", "tp")


@pytest.mark.parametrize(
    "world, sizes",
    [
        (6, {"tp": 4}),  # world not divisible by tp*cp*pp
        (8, {"tp": 2, "pp": 3}),
        (8, {"tp": 2, "cp": 3}),
        (8, {"tp": 2, "dp": 3}),  # explicit dp that does not multiply out
        (8, {"tp": 2, "dp": 2}),
        (8, {"dp": 16}),
        (8, {"dp": 4, "ep": 3}),  # ep must divide dp
        (8, {"dp": 2, "ep": 4}),
        (8, {"tp": 2, "ep": 8}),  # inferred dp=4
        (4, {"tp": 0}),
        (4, {"cp": 0}),
        (4, {"pp": 0}),
        (4, {"ep": 0}),
        (4, {"dp": 0}),
        (4, {"dp": -2}),
        (8, {"dp": 8, "dp_shard": 3}),  # dp_shard must divide dp x cp
        (8, {"dp": 8, "dp_shard": 0}),
        (8, {"dp": 8, "ep": 4, "dp_shard": 2}),  # ... and be a multiple of cp x ep
        (8, {"dp": 4, "cp": 2, "dp_shard": 1}),
        (4, {"tp": -1}),
        (0, {}),
    ],
)
def test_bad_sizes_raise(world, sizes):
    with pytest.raises(GridError):
        layout(world, **sizes)


def test_grid_error_is_a_value_error():
    assert issubclass(GridError, ValueError)


# --- real process groups --------------------------------------------------------------------------------

GRID_CASES = [
    {"tp": 2, "dp": 2},
    {"pp": 2, "dp": 2},
    {"dp": 4, "ep": 2},
    {"tp": 2, "dp": 2, "ep": 2},
    {"dp": 4, "dp_shard": 2},
    {"dp": 4, "ep": 2, "dp_shard": 2},
]


def grid_groups_case(cases: list[dict]) -> list[dict]:
    rank = dist.get_rank()
    out = []
    for sizes in cases:
        g = harness.grid(**sizes)
        seen = {"coords": g.coords, "first": g.is_first_stage, "last": g.is_last_stage, "groups": {}}
        seen["axes"] = {name: g.axis_of(g.group(name).group_name) for name in GROUP_NAMES}
        for name in GROUP_NAMES:
            t = torch.tensor([2**rank], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g.group(name))
            seen["groups"][name] = {
                "sum": int(t.item()),
                "rank_in": g.rank_in(name),
                "ranks": g.ranks(name),
                "size": g.size(name),
                "group_size": dist.get_world_size(g.group(name)),
                "group_rank": dist.get_rank(g.group(name)),
            }
        out.append(seen)
    return out


def test_process_groups_match_layout(world4):
    results = world4.run(grid_groups_case, GRID_CASES)
    for i, sizes in enumerate(GRID_CASES):
        lay = layout(4, **sizes)
        for rank, per_rank in enumerate(results):
            seen = per_rank[i]
            where = (sizes, rank)
            assert seen["coords"] == lay.coords[rank], where
            assert seen["first"] == (lay.coords[rank].pp == 0), where
            assert seen["last"] == (lay.coords[rank].pp == lay.sizes["pp"] - 1), where
            for name in GROUP_NAMES:
                (members,) = [g for g in lay.groups[name] if rank in g]
                got = seen["groups"][name]
                assert got["sum"] == sum(2**r for r in members), (where, name)
                assert got["ranks"] == members, (where, name)
                assert got["rank_in"] == members.index(rank), (where, name)
                assert got["size"] == got["group_size"] == len(members), (where, name)
                assert got["group_rank"] == got["rank_in"], (where, name)
            # Hybrid-sharding groups the same as an existing group are that group, so the ledger's axis
            # names stay; real hybrid groups are named by themselves.
            axes = per_rank[i]["axes"]
            sharded = lay.sizes["dp_replicate"] > 1
            assert axes["dp_shard"] == ("dp_shard" if sharded else "dp"), where
            if sharded:
                assert axes["dp_replicate"] == "dp_replicate", where


def pooled_grids_case() -> dict:
    from parallel.grid import ProcessGrid

    pool, asked = harness.GroupPool(), []

    def counted(new_group):
        return lambda ranks, **options: asked.append(ranks) or new_group(ranks, **options)

    first, second = (
        ProcessGrid(**s, new_group=counted(pool.for_grid())) for s in ({"tp": 2}, {"tp": 2, "pp": 2})
    )
    plain = ProcessGrid(tp=2, pp=2)

    def shared(grid):  # the pairs of axes a grid gives one group
        return {(a, b) for a in GROUP_NAMES for b in GROUP_NAMES if grid.group(a) is grid.group(b)}

    return {
        "tp_shared": second.tp_group is first.tp_group,
        "same_axes_share": shared(second) == shared(plain),
        "embed_apart": (second.embed_group is second.pp_group) == (plain.embed_group is plain.pp_group),
        "made": len(pool.groups),
        "asked": len(asked),
    }


def test_grids_from_one_pool_share_groups_and_keep_each_grids_axes_apart(world4):
    for result in world4.run(pooled_grids_case):
        assert result["tp_shared"]  # both grids' tp groups are {0,1} and {2,3}
        assert result["same_axes_share"]  # within a grid, only the axes the grid itself shares
        assert result["embed_apart"]  # the tied-embedding group spans a pp group's ranks, but is its own
        assert result["made"] < result["asked"]

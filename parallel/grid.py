"""The process grid: one world of W ranks factored as W = pp * dp * cp * tp.

`tp` varies fastest so that a tensor-parallel group is made of neighbouring ranks (same node, fastest
links), then `cp`, then `dp`, then `pp`:

    rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i

Expert parallelism adds no dimension: the data-parallel index is split as dp_i = edp_i * ep + ep_i, so
an `ep` group is `ep` neighbouring data-parallel ranks (experts spread over it), and the matching
expert-data-parallel group `edp` (size dp / ep) joins the ranks that hold the same experts; expert
gradients are reduced over edp x cp (`edp_cp`), dense gradients over dp x cp (`dp_cp`).

Hybrid sharding (`dp_shard` = k) splits the data-parallel group dp x cp into replicas of k ranks. With
j = dp_i * cp + cp_i the rank's index in dp x cp (its position in the `dp_cp` group), `dp_shard` = j % k
is its place in a shard group (k consecutive members of dp x cp: neighbouring ranks, one node) and
`dp_replicate` = j // k the replica it belongs to; the `dp_replicate` group joins the ranks holding the
same shard in each of the dp*cp/k replicas. k is a multiple of cp * ep, so a shard group holds whole cp
groups and k / ep ranks holding each expert, its edp x cp ranks there (expert gradients are summed over
edp x cp, as dense ones over dp x cp): `edp_shard` (those ranks) and `edp_replicate` (the same expert
shard in every replica). k = dp * cp (the default, -1) is one replica.

`layout()` is a pure function (tested without processes); `ProcessGrid` creates the torch.distributed
groups from it. `MetaGrid` is the same view of one rank with placeholder groups and no processes: the
estimator builds that rank's real modules and gradient synchronisation on the meta device with it, so
every figure it predicts is read from the objects training uses. Library code asks a group its size,
rank and members through `group_size`, `group_rank` and `group_ranks`, which answer for both kinds.
Nothing here is global: a test can build several grids in one world.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

AXES = ("pp", "dp", "cp", "tp")  # slowest to fastest
GROUP_NAMES = (
    "pp",
    "dp",
    "cp",
    "tp",
    "ep",
    "edp",
    "dp_cp",
    "edp_cp",
    "dp_shard",
    "dp_replicate",
    "edp_shard",
    "edp_replicate",
)
# Groups with the same ranks as a group named here (every hybrid-sharding one when dp_shard = dp x cp;
# edp_cp when cp = 1) reuse it: no extra torch groups, and the ledger names the traffic as before (dp,
# edp). Groups of one rank, which never communicate, reuse any earlier group of one.
REUSABLE = {
    "edp_cp": ("edp",),
    "dp_shard": ("dp", "dp_cp"),
    "dp_replicate": (),
    "edp_shard": ("edp", "edp_cp", "dp_shard"),
    "edp_replicate": ("dp_replicate",),
}


class GridError(ValueError):
    """A layout that cannot be built; the message names the sizes to change."""


@dataclass(frozen=True)
class Coords:
    pp: int
    dp: int
    cp: int
    tp: int
    ep: int
    edp: int
    dp_shard: int = 0  # place in the shard group: (dp * cp + cp) % dp_shard
    dp_replicate: int = 0  # which replica: (dp * cp + cp) // dp_shard
    edp_shard: int = 0  # place among the shard group's ranks holding the same experts (edp x cp)


@dataclass(frozen=True)
class Layout:
    """Sizes, every rank's coordinates, and for each group name the list of rank-lists partitioning the
    world (each inner list in ascending rank order)."""

    sizes: dict[str, int]
    coords: tuple[Coords, ...]
    groups: dict[str, tuple[tuple[int, ...], ...]]


def layout(
    world_size: int, *, tp: int = 1, cp: int = 1, dp: int = -1, pp: int = 1, ep: int = 1, dp_shard: int = -1
) -> Layout:
    for name, value in (("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep)):
        if value < 1:
            raise GridError(f"{name}={value} must be at least 1")
    model = tp * cp * pp
    if dp == -1:
        if world_size % model:
            raise GridError(f"world size {world_size} is not divisible by tp*cp*pp={model}")
        dp = world_size // model
    if dp < 1 or dp * model != world_size:
        raise GridError(
            f"pp*dp*cp*tp={pp}*{dp}*{cp}*{tp}={dp * model} does not match world size {world_size}"
        )
    if dp % ep:
        raise GridError(
            f"ep={ep} must divide dp={dp}: expert groups are carved out of the data-parallel ranks"
        )
    k = dp * cp if dp_shard == -1 else dp_shard
    if k < 1 or (dp * cp) % k or k % (cp * ep):
        raise GridError(
            f"dp_shard={dp_shard} must divide dp*cp={dp * cp} and be a multiple of cp*ep={cp * ep}: a shard "
            f"group holds whole cp groups and the same number of each ep rank"
        )
    ek = k // ep  # ranks of one shard group holding the same experts: its edp x cp ranks
    sizes = {"pp": pp, "dp": dp, "cp": cp, "tp": tp, "ep": ep, "edp": dp // ep, "dp_cp": dp * cp}
    sizes |= {"dp_shard": k, "dp_replicate": dp * cp // k, "edp_shard": ek, "edp_replicate": dp * cp // k}
    sizes["edp_cp"] = dp // ep * cp

    def rank_of(pp_i: int, dp_i: int, cp_i: int, tp_i: int) -> int:
        return ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i

    coords = []
    for r in range(world_size):
        tp_i, rest = r % tp, r // tp
        cp_i, rest = rest % cp, rest // cp
        dp_i, pp_i = rest % dp, rest // dp
        j = dp_i * cp + cp_i
        coords.append(
            Coords(
                pp=pp_i,
                dp=dp_i,
                cp=cp_i,
                tp=tp_i,
                ep=dp_i % ep,
                edp=dp_i // ep,
                dp_shard=j % k,
                dp_replicate=j // k,
                edp_shard=((dp_i // ep) * cp + cp_i) % ek,
            )
        )

    # A group is the set of ranks that agree on every coordinate except the ones it spans.
    def groups_spanning(key) -> tuple[tuple[int, ...], ...]:
        buckets: dict[tuple, list[int]] = {}
        for r, c in enumerate(coords):
            buckets.setdefault(key(c), []).append(r)
        return tuple(tuple(sorted(v)) for v in buckets.values())

    groups = {
        "tp": groups_spanning(lambda c: (c.pp, c.dp, c.cp)),
        "cp": groups_spanning(lambda c: (c.pp, c.dp, c.tp)),
        "dp": groups_spanning(lambda c: (c.pp, c.cp, c.tp)),
        "pp": groups_spanning(lambda c: (c.dp, c.cp, c.tp)),
        "ep": groups_spanning(lambda c: (c.pp, c.cp, c.tp, c.edp)),
        "edp": groups_spanning(lambda c: (c.pp, c.cp, c.tp, c.ep)),
        # Gradients of dense parameters are reduced over data and context ranks together.
        "dp_cp": groups_spanning(lambda c: (c.pp, c.tp)),
        # ... and those of experts over expert-data and context ranks.
        "edp_cp": groups_spanning(lambda c: (c.pp, c.tp, c.ep)),
        # ZeRO state is sharded within a replica and reduced across replicas, shard by shard; expert
        # state likewise over the shard group's ranks holding the same experts (their edp and cp ranks).
        "dp_shard": groups_spanning(lambda c: (c.pp, c.tp, c.dp_replicate)),
        "dp_replicate": groups_spanning(lambda c: (c.pp, c.tp, c.dp_shard)),
        "edp_shard": groups_spanning(lambda c: (c.pp, c.tp, c.ep, c.dp_replicate)),
        "edp_replicate": groups_spanning(lambda c: (c.pp, c.tp, c.ep, c.edp_shard)),
    }
    assert rank_of(coords[-1].pp, coords[-1].dp, coords[-1].cp, coords[-1].tp) == world_size - 1
    return Layout(sizes=sizes, coords=tuple(coords), groups=groups)


@dataclass(frozen=True)
class MetaGroup:
    """A process group's facts without a process group: what building modules on the meta device asks."""

    ranks: tuple[int, ...]
    rank: int  # this rank's index in `ranks`
    group_name: str = ""


def group_size(group: Any) -> int:
    """Ranks in `group` (None: a group of one, as for an axis of size 1 the caller never made)."""
    if group is None:
        return 1
    return len(group.ranks) if isinstance(group, MetaGroup) else dist.get_world_size(group)


def group_rank(group: Any) -> int:
    if group is None:
        return 0
    return group.rank if isinstance(group, MetaGroup) else dist.get_rank(group)


def group_ranks(group: Any) -> tuple[int, ...]:
    """The global ranks of `group`, in group-rank order."""
    if isinstance(group, MetaGroup):
        return group.ranks
    return tuple(dist.get_process_group_ranks(group))


class Grid:
    """One rank's view of a `Layout`: its coordinates and a group per axis (`_groups`, `_ranks` and
    `embed_group` are filled by the subclass that makes the groups)."""

    world_size: int
    rank: int
    layout: Layout
    coords: Coords
    embed_group: Any

    def _place(self, world_size: int, rank: int, sizes: dict) -> None:
        self.world_size, self.rank = world_size, rank
        self.layout = layout(world_size, **sizes)
        self.coords = self.layout.coords[rank]
        self._groups: dict[str, Any] = {}
        self._ranks: dict[str, tuple[int, ...]] = {}

    def size(self, name: str) -> int:
        return self.layout.sizes[name]

    def rank_in(self, name: str) -> int:
        return self._ranks[name].index(self.rank)

    def group(self, name: str):
        return self._groups[name]

    def ranks(self, name: str) -> tuple[int, ...]:
        return self._ranks[name]

    def axis_of(self, group_name: str) -> str | None:
        """The axis ("tp", "dp", ..., "embed" for the tied-embedding group) of this rank's group that torch
        calls `group_name` (ProcessGroup.group_name), or None for a group the grid did not create."""
        names: dict[str, str] = {}
        for name, g in self._groups.items():  # a reused group keeps its first name
            names.setdefault(g.group_name, name)
        if self.embed_group is not None:
            names.setdefault(self.embed_group.group_name, "embed")
        return names.get(group_name)

    tp_group = property(lambda self: self._groups["tp"])
    cp_group = property(lambda self: self._groups["cp"])
    dp_group = property(lambda self: self._groups["dp"])
    pp_group = property(lambda self: self._groups["pp"])
    ep_group = property(lambda self: self._groups["ep"])
    edp_group = property(lambda self: self._groups["edp"])
    dp_cp_group = property(lambda self: self._groups["dp_cp"])
    edp_cp_group = property(lambda self: self._groups["edp_cp"])
    dp_shard_group = property(lambda self: self._groups["dp_shard"])
    dp_replicate_group = property(lambda self: self._groups["dp_replicate"])
    edp_shard_group = property(lambda self: self._groups["edp_shard"])
    edp_replicate_group = property(lambda self: self._groups["edp_replicate"])

    def _reusable(self, name: str) -> str | None:
        """An earlier group name `name` may reuse (REUSABLE): the same partition of the world."""
        if name not in REUSABLE:
            return None
        mine = set(self.layout.groups[name])
        alone = self.layout.sizes[name] == 1
        return next(
            (
                n
                for n in self._groups
                if (alone or n in REUSABLE[name]) and set(self.layout.groups[n]) == mine
            ),
            None,
        )

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.size("pp") - 1

    def describe(self) -> str:
        s = self.layout.sizes
        shard = f" dp_shard={s['dp_shard']}" if s["dp_replicate"] > 1 else ""
        axes = f"pp={s['pp']} dp={s['dp']} cp={s['cp']} tp={s['tp']} ep={s['ep']}"
        return f"{axes}{shard} (world {self.world_size})"


def _embedding_ends(pp_ranks: tuple[int, ...]) -> list[int]:
    """Tied input/output embeddings live on the first and the last pipeline stage: their gradients are
    summed over a group of those two ranks (one per pipeline group; a single rank when pp=1)."""
    return sorted({pp_ranks[0], pp_ranks[-1]})


class ProcessGrid(Grid):
    """A `Layout` with a torch.distributed group per axis.

    Every rank of the world must construct the same grid in the same order (group creation is a
    collective over the world). A group of size 1 is still a real group, but collectives over it are
    skipped by the library (`size(name) == 1`), so unused axes cost nothing at run time.
    """

    def __init__(
        self,
        *,
        tp: int = 1,
        cp: int = 1,
        dp: int = -1,
        pp: int = 1,
        ep: int = 1,
        dp_shard: int = -1,
        backend=None,
        timeout: timedelta | None = None,
        new_group=dist.new_group,
    ):
        """`timeout` bounds every collective over the grid's groups; None is torch's default for new
        groups (30 minutes), not the world group's timeout, so a trainer passes its own. `new_group(ranks,
        backend=, timeout=)` makes each group, a collective over the world as torch's is; a program that
        builds many grids in one world may hand back groups it made for an earlier grid (each Gloo group
        keeps threads of its own), but never one group twice to the same grid."""
        if not dist.is_initialized():
            raise GridError("torch.distributed is not initialised; call init_process_group first")
        sizes = dict(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, dp_shard=dp_shard)
        self._place(dist.get_world_size(), dist.get_rank(), sizes)
        for name in GROUP_NAMES:
            same = self._reusable(name)
            if same is not None:  # decided alike on every rank: the layout is the same everywhere
                self._groups[name], self._ranks[name] = self._groups[same], self._ranks[same]
                continue
            for ranks in self.layout.groups[name]:
                # A collective: every rank calls new_group for every group, member or not.
                group = new_group(list(ranks), backend=backend, timeout=timeout)
                if self.rank in ranks:
                    self._groups[name], self._ranks[name] = group, ranks
        self.embed_group = None
        for ranks in self.layout.groups["pp"]:
            ends = _embedding_ends(ranks)
            group = new_group(ends, backend=backend, timeout=timeout)
            if self.rank in ends and self.coords.pp in (0, pp - 1):
                self.embed_group = group


class MetaGrid(Grid):
    """Rank `rank` of a world of `world_size` laid out like ProcessGrid, with `MetaGroup`s: enough to
    build that rank's modules and gradient synchronisation on the meta device, never to communicate."""

    def __init__(self, world_size: int, rank: int = 0, *, tp=1, cp=1, dp=-1, pp=1, ep=1, dp_shard=-1):
        self._place(world_size, rank, dict(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, dp_shard=dp_shard))
        for name in GROUP_NAMES:
            same = self._reusable(name)
            if same is not None:
                self._groups[name], self._ranks[name] = self._groups[same], self._ranks[same]
                continue
            ranks = next(r for r in self.layout.groups[name] if rank in r)
            self._groups[name] = MetaGroup(ranks, ranks.index(rank), name)
            self._ranks[name] = ranks
        ends = _embedding_ends(self._ranks["pp"])
        on_an_end = rank in ends and self.coords.pp in (0, pp - 1)
        self.embed_group = MetaGroup(tuple(ends), ends.index(rank), "embed") if on_an_end else None

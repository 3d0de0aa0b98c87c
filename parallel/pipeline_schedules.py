"""Pipeline schedules as data: for each pipeline rank, the ordered list of forward and backward actions
over (model chunk, micro-batch). One executor (parallel.pipeline) runs any of them, and the same lists
are printed, tested and drawn.

The model is cut into C = pp * v chunks; chunk c lives on rank c % pp (v = 1 except for the interleaved
schedule, where each rank holds v chunks spaced pp apart). With m micro-batches, in units of one
chunk's forward (F) and backward (B = 2F) time, the ideal step is m * v * (F + B) per rank and the bubble
adds (p - 1) * (F + B) for GPipe and 1F1B, (p - 1) * (F + B) / v for interleaved 1F1B (docs/formulas.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    chunk: int  # global chunk index, 0 .. pp * v - 1
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.microbatch}"


class ScheduleError(ValueError):
    """A schedule that cannot run with these sizes; the message names the key to change."""


def gpipe(pp: int, m: int) -> list[list[Action]]:
    """All forwards, then all backwards (in reverse order): holds m micro-batches of activations."""
    return [
        [Action("F", r, i) for i in range(m)] + [Action("B", r, i) for i in reversed(range(m))]
        for r in range(pp)
    ]


def one_f_one_b(pp: int, m: int) -> list[list[Action]]:
    """PipeDream-flush 1F1B: rank r runs pp - r - 1 warm-up forwards, then alternates one forward and one
    backward, then drains the remaining backwards; at most pp - r micro-batches are in flight on rank r."""
    if m < pp:
        raise ScheduleError(f"1f1b needs at least pp={pp} micro-batches per rank, got {m}")
    schedules = []
    for r in range(pp):
        warmup = pp - r - 1
        actions = [Action("F", r, i) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [Action("F", r, warmup + i), Action("B", r, i)]
        actions += [Action("B", r, i) for i in range(m - warmup, m)]
        schedules.append(actions)
    return schedules


def interleaved_one_f_one_b(pp: int, m: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: each rank holds v chunks; forwards walk the micro-batches in groups
    of pp through chunk 0, 1, .., v-1 of the rank; backwards mirror that through the chunks in reverse.
    Warm-up is (pp - r - 1) * 2 + (v - 1) * pp forward steps (Narayanan et al. 2021)."""
    if v < 2:
        raise ScheduleError(f"interleaved needs parallel.pp_virtual_stages >= 2, got {v}")
    if m % pp:
        raise ScheduleError(f"interleaved needs micro-batches per rank ({m}) to be a multiple of pp={pp}")
    total = m * v

    def forward_step(r: int, k: int) -> Action:
        group, within = divmod(k, pp * v)
        chunk_local = within // pp
        return Action("F", chunk_local * pp + r, group * pp + within % pp)

    def backward_step(r: int, k: int) -> Action:
        f = forward_step(r, k)
        chunk_local = v - 1 - f.chunk // pp
        return Action("B", chunk_local * pp + r, f.microbatch)

    schedules = []
    for r in range(pp):
        warmup = min((pp - r - 1) * 2 + (v - 1) * pp, total)
        actions = [forward_step(r, k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [forward_step(r, warmup + k), backward_step(r, k)]
        actions += [backward_step(r, k) for k in range(total - warmup, total)]
        schedules.append(actions)
    return schedules


def build(name: str, pp: int, m: int, v: int = 1) -> list[list[Action]]:
    if name == "gpipe":
        return gpipe(pp, m)
    if name == "1f1b":
        return one_f_one_b(pp, m)
    if name == "interleaved":
        return interleaved_one_f_one_b(pp, m, v)
    raise ScheduleError(f"parallel.pp_schedule={name!r} is not valid; choose gpipe, 1f1b or interleaved")


def simulate(schedules: list[list[Action]], pp: int, f_time: float = 1.0, b_time: float = 2.0) -> dict:
    """Run the schedules on an idealised machine (no communication cost) and return each action's
    (rank, start, end) plus makespan, bubble fraction and peak in-flight micro-batches per rank.

    An action starts when its rank is free and its dependency is done: F(c, i) after F(c-1, i) on the
    rank holding chunk c-1; B(c, i) after F(c, i) and after B(c+1, i). A schedule that deadlocks
    (some rank waits on an action that can never run) raises ScheduleError."""
    n_chunks = 1 + max(a.chunk for actions in schedules for a in actions)
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * pp
    cursor = [0] * pp
    timeline = []
    in_flight, peak = [0] * pp, [0] * pp
    progressed = True
    while progressed:
        progressed = False
        for r in range(pp):
            while cursor[r] < len(schedules[r]):
                a = schedules[r][cursor[r]]
                if a.kind == "F":
                    deps = [("F", a.chunk - 1, a.microbatch)] if a.chunk > 0 else []
                else:
                    deps = [("F", a.chunk, a.microbatch)]
                    deps += [("B", a.chunk + 1, a.microbatch)] if a.chunk < n_chunks - 1 else []
                if any(d not in done for d in deps):
                    break
                start = max([clock[r], *(done[d] for d in deps)])
                end = start + (f_time if a.kind == "F" else b_time)
                done[(a.kind, a.chunk, a.microbatch)] = end
                clock[r] = end
                timeline.append((r, a, start, end))
                in_flight[r] += 1 if a.kind == "F" else -1
                peak[r] = max(peak[r], in_flight[r])
                cursor[r] += 1
                progressed = True
    if any(cursor[r] < len(schedules[r]) for r in range(pp)):
        stuck = {r: str(schedules[r][cursor[r]]) for r in range(pp) if cursor[r] < len(schedules[r])}
        raise ScheduleError(f"schedule deadlocks: ranks wait on {stuck}")
    makespan = max(clock)
    busy = sum(end - start for _, _, start, end in timeline) / pp
    return {"timeline": timeline, "makespan": makespan, "bubble": 1 - busy / makespan, "peak_in_flight": peak}


def render(schedules: list[list[Action]]) -> str:
    """One line per rank: the action order, e.g. `rank 0: F0.0 F0.1 B0.0 ...`."""
    return "\n".join(f"rank {r}: " + " ".join(str(a) for a in actions) for r, actions in enumerate(schedules))

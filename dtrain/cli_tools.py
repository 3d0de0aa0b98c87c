"""The `dtrain` subcommands that train nothing, their parsers and what they run: generate, eval, schedule,
estimate and bench. dtrain/cli.py holds the command line itself, train, prepare-data and export."""

from __future__ import annotations

import argparse
import sys

from dtrain.config import ConfigError

SPLITS = ("val", "train", "all")  # dtrain.evaluate.SPLITS, named here without importing torch


def cmd_schedule(args: argparse.Namespace) -> None:
    """Draw a pipeline schedule's timeline: from the schedule data (simulated), or measured on a real
    short run of a config (--measure), or from a run's saved measurement (--from-run)."""
    from dtrain.analysis import timeline
    from parallel import pipeline_schedules as ps

    def fail(message: str) -> None:
        print(f"dtrain: error: {message}", file=sys.stderr)
        sys.exit(2)

    given = [f"--{k}" for k in ("schedule", "pp", "microbatches", "virtual") if getattr(args, k) is not None]
    try:
        if args.measure or args.from_run:
            if given:
                fail(f"{', '.join(given)}: with --measure/--from-run the layout comes from the config")
            if args.measure and args.from_run:
                fail("give --measure CONFIG or --from-run RUN_DIR, not both")
        if args.overrides and not args.measure:
            fail(f"overrides {' '.join(args.overrides)} need --measure CONFIG")
        if args.out is not None:
            timeline.check_out_path(args.out)
        if args.from_run:
            if args.out is None:
                fail("--from-run needs --out PATH (.png or .svg)")
            print(f"wrote {timeline.draw_measured(args.from_run, args.out)}")
        elif args.measure:
            result = timeline.measure(args.measure, args.overrides, args.out)
            data = result["data"]
            print(
                f"measured one step of {data['schedule']} (pp={data['pp']}, m={data['m']}, v={data['v']}) "
                f"on {data['world_size']} Gloo CPU ranks; timings in {result['path']}"
            )
            for s in result["stages"]:
                print(
                    f"rank {s['stage']}: busy {s['busy_s'] * 1e3:.1f} ms of a {s['step_s'] * 1e3:.1f} ms "
                    f"pipeline step -> bubble {s['bubble']:.1%}"
                )
            layout = (data["schedule"], data["pp"], data["m"], data["v"])
            print(timeline.bubble_report(*layout, result["bubble"], what="measured"))
            if args.out:
                print(f"wrote {args.out}")
        else:
            if args.pp is None or args.microbatches is None:
                fail("dtrain schedule needs --pp and --microbatches (or --measure CONFIG)")
            name = args.schedule or "1f1b"
            v = args.virtual if args.virtual is not None else 2 if name == "interleaved" else 1
            if args.pp < 1 or args.microbatches < 1 or v < 1:
                fail("--pp, --microbatches and --virtual must be at least 1")
            if name != "interleaved" and v != 1:
                fail(f"--virtual={v} applies to --schedule interleaved only")
            if name == "interleaved" and v < 2:
                fail(f"--virtual={v}: interleaved needs at least 2 chunks per rank")
            schedules = ps.build(name, args.pp, args.microbatches, v)
            sim = ps.simulate(schedules, args.pp)
            print(ps.render(schedules))
            print(timeline.bubble_report(name, args.pp, args.microbatches, v, sim["bubble"]))
            print(f"peak micro-batches in flight per rank: {sim['peak_in_flight']}")
            if args.out:
                timeline.draw_simulation(name, args.pp, args.microbatches, v, args.out)
                print(f"wrote {args.out}")
    except (ps.ScheduleError, timeline.TimelineError) as e:
        fail(str(e))


# --- estimate (model-state memory per rank, no processes) -----------------------------------------------


def cmd_estimate(args: argparse.Namespace) -> None:
    from dtrain.analysis.estimate import run
    from dtrain.analysis.suggest import parse_bytes, suggestions

    budget = parse_bytes(args.memory) if args.memory is not None else None  # before any work or output
    if args.top < 0:
        raise ConfigError(f"--top={args.top} must be at least 0 (0 lists every layout that fits)")
    if args.json and budget is not None:
        raise ConfigError("--json prints the estimate alone; leave out --memory")
    print(run(args.config, args.overrides, args.world, json=args.json))
    if budget is not None:
        print(suggestions(args.config, args.overrides, args.world, budget, args.top))


def add_estimate_parser(sub) -> None:
    est = sub.add_parser(
        "estimate",
        help="bytes of parameters, gradients, optimizer states and activations per rank, and layouts that "
        "fit a memory budget (no processes, no tensors)",
    )
    est.add_argument("config", help="YAML config, e.g. configs/gpu_1b.yaml")
    est.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.zero=3")
    est.add_argument(
        "--world",
        type=int,
        help="process count (default: dp*tp*pp*cp, or dist.nproc_per_node when parallel.dp=-1, else 1)",
    )
    est.add_argument(
        "--memory",
        help="memory per GPU with its unit (80GiB, 40GB, 512MiB): also list the layouts of this world "
        "that fit it, fastest first, each as the overrides that reproduce its figure",
    )
    est.add_argument(
        "--top", type=int, default=8, help="with --memory: how many layouts to list (default 8, 0: all)"
    )
    est.add_argument(
        "--json",
        action="store_true",
        help='one JSON object instead of the report: {"world", "parameters", "stages": [{"stage", '
        '"device": {"params", "grads", "optimizer", "activations", "peak"}, "host": {...}, '
        '"sent": {"axis/op": bytes}}]}',
    )
    est.set_defaults(run=cmd_estimate)


# --- bench (scaling sweeps over world sizes and layouts, spawned Gloo worlds on CPU) ----------------------


def cmd_bench(args: argparse.Namespace) -> None:
    from dtrain.bench.scaling import run_sweep

    run_sweep(args)


def add_bench_parser(sub) -> None:
    from dtrain.bench import scaling

    bench = sub.add_parser(
        "bench",
        help="scaling benchmark: throughput, memory and bytes sent per rank across worlds and layouts",
        description="Strong and weak scaling of CONFIG over world sizes and layouts, each point in a fresh "
        "spawned Gloo world on CPU (warm-up, then timed steps; the median of the slowest rank). Writes "
        "scaling.csv, throughput/memory/comm PNGs and TensorBoard scalars to --out and prints a table. "
        "Example: dtrain bench configs/tiny.yaml --worlds 1,2,4 --layouts dp,tp2,pp2+zero1 --mode both",
    )
    scaling.add_arguments(bench)
    bench.set_defaults(run=cmd_bench)


# --- generate and eval (a checkpoint or a Hugging Face folder, one process or any layout) -----------------


def cmd_generate(args: argparse.Namespace) -> None:
    from dtrain import generate

    generate.command(args)


def cmd_eval(args: argparse.Namespace) -> None:
    from dtrain import evaluate

    evaluate.command(args)


def add_generate_parsers(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="continue prompts with a checkpoint or a Hugging Face model folder (one process, KV cache)",
        description="Example: dtrain generate runs/tiny/checkpoints/step_200 --prompt 'Once upon' "
        "--max-new-tokens 40. Several prompts run as one left-padded batch; one GPU when there is one "
        "(bf16), else the CPU (fp32).",
    )
    gen.add_argument("model", help="a dtrain checkpoint folder or a Hugging Face model folder")
    given = gen.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", action="append", metavar="TEXT", help="a text prompt (repeatable)")
    given.add_argument(
        "--prompt-ids", action="append", metavar="IDS", help="a prompt as token ids, e.g. 1,2,3 (repeatable)"
    )
    given.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        help='one JSON object a line: {"prompt": "text"} or {"prompt_ids": [1, 2, 3]}',
    )
    gen.add_argument(
        "--max-new-tokens", type=int, metavar="N", default=64, help="new tokens per prompt at most (64)"
    )
    gen.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        default=1.0,
        help="logits / T before sampling; 0: greedy (1)",
    )
    gen.add_argument(
        "--top-k", type=int, metavar="K", default=0, help="sample from the k most likely tokens; 0: all (0)"
    )
    gen.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        default=1.0,
        help="sample from the most likely tokens whose mass reaches p (1)",
    )
    gen.add_argument("--seed", type=int, metavar="S", default=0, help="seed of the sampling generator (0)")
    gen.add_argument(
        "--json", action="store_true", help='one JSON object a prompt: {"prompt_ids", "ids", "text"}'
    )
    gen.set_defaults(run=cmd_generate)
    ev = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a model on a prepared data folder (any layout)",
        description="Example: dtrain eval runs/tiny/checkpoints/step_200 data/corpus. By default the "
        "validation loss the trainer logs for this checkpoint and data (train.eval_batches global batches "
        "of val.npy). Under torchrun, parallel.* overrides choose the layout.",
    )
    ev.add_argument("model", help="a dtrain checkpoint folder or a Hugging Face model folder")
    ev.add_argument("data", help="a folder `dtrain prepare-data` wrote (train.npy, val.npy)")
    ev.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides on the model's config, e.g. parallel.tp=2 train.seq_len=64",
    )
    ev.add_argument(
        "--split", choices=tuple(SPLITS), default="val", help="val (default), train, or all: both"
    )
    ev.add_argument(
        "--batches",
        metavar="N|all",
        help="global batches per split as the trainer draws them (default train.eval_batches), or all: "
        "every token once",
    )
    ev.add_argument(
        "--out", metavar="FILE", help="JSON file for the figures (default: MODEL.eval.json beside the folder)"
    )
    ev.set_defaults(run=cmd_eval)


def add_schedule_parser(sub) -> None:
    sched = sub.add_parser(
        "schedule",
        help="draw a pipeline schedule's timeline (ranks x time) to PNG/SVG",
        description="Simulated: dtrain schedule --schedule 1f1b --pp 4 --microbatches 8 --out t.png. "
        "Measured on this machine (Gloo CPU ranks, one timed step after a warm-up): "
        "dtrain schedule --measure CONFIG [key=value ...] --out t.png (timings saved to "
        "run.out_dir/pipeline_timeline.json; redraw with --from-run RUN_DIR).",
    )
    sched.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved"), help="default 1f1b")
    sched.add_argument("--pp", type=int, help="pipeline ranks")
    sched.add_argument("--microbatches", type=int, help="micro-batches per step")
    sched.add_argument("--virtual", type=int, help="chunks per rank for interleaved (default 2)")
    sched.add_argument("--measure", metavar="CONFIG", help="time a real step of this YAML config")
    sched.add_argument("--from-run", metavar="RUN_DIR", help="draw the timings a --measure run saved")
    sched.add_argument("overrides", nargs="*", help="dotted config overrides for --measure")
    sched.add_argument("--out", help="output .png or .svg (without it, only the text is printed)")
    sched.set_defaults(run=cmd_schedule)

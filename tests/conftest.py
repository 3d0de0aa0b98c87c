import functools
import inspect

import pytest

from tests.harness import World

# The session's reused Gloo worlds, by fixture name. An idle world is not free on two cores: each of its
# process groups keeps a Gloo network thread that wakes every 10 ms. So the modules that use a world run
# first, the biggest worlds first, and each world closes after the last test that names it (a test that
# asks for it again only waits for a restart).
WORLD_SIZES = {"world2": 2, "world4": 4, "world8": 8}
OPEN_WORLDS = pytest.StashKey[dict]()
CLOSE_AFTER = pytest.StashKey[dict]()


def open_world(request, name: str):
    world = World(WORLD_SIZES[name])
    request.config.stash.setdefault(OPEN_WORLDS, {})[name] = world
    yield world
    world.close(force=True)  # the session is over: nothing to wait for


@pytest.fixture(scope="session")
def world2(request):
    yield from open_world(request, "world2")


@pytest.fixture(scope="session")
def world4(request):
    yield from open_world(request, "world4")


@pytest.fixture(scope="session")
def world8(request):
    yield from open_world(request, "world8")


# Tensor-parallel layouts the layer and collective tests run in: (world fixture, tp, dp).
TP_LAYOUTS = {"tp2": ("world2", 2, 1), "tp4": ("world4", 4, 1), "tp2-dp2": ("world4", 2, 2)}


@pytest.fixture(params=TP_LAYOUTS.values(), ids=TP_LAYOUTS.keys())
def tp_layout(request):
    fixture, tp, dp = request.param
    return request.getfixturevalue(fixture), tp, dp


# Cases kept out of the default run so that it fits CI's ten minutes on two cores (`-m slow` runs them):
# test -> the parameter ids moved (their beginnings, "]" ending an exact one; () moves the test). Each
# is one more instance of a kind the default run keeps a faster representative of, in the same test or
# the one named.
SLOW_FOR_TIME = {
    "system/test_cli.py::test_rerun_into_the_same_folder_loses_nothing": (),  # test_restart.py
    "system/test_cli.py::test_pasted_suggestion_reproduces_its_figure": (),  # test_estimate.py
    "system/test_cli.py::test_bad_config_fails_in_one_line": (
        "model.",
        "parallel.tp",
        "train.steps",
        "train.lrr",
        "parallel.dp=3",  # data.kind=memmap stays; test_bad_input.py has every message in-process
    ),
    # README's torchrun and launch lines and test_hf_cli.py's torchrun run stay
    "system/test_cli.py::test_torchrun_one_and_two_ranks_log_the_same_losses": (),
    "system/test_launch.py::test_worker_error_ends_a_failed_launch": (),  # raw torchrun's root cause
    "equivalence/test_moe.py::test_torchrun_moe_run_logs_routing_and_exports_every_expert": (),
    "equivalence/test_eval.py::test_eval_under_torchrun": (),  # the layouts in a spawned world
    "unit/test_wrap_example.py::"
    "test_the_example_trains_under_torchrun_and_its_checkpoint_loads_into_the_plain_model": (),
    "equivalence/test_checkpoint.py::test_checkpoint_resumes_in_another_layout": (
        "zero2-pp2-moe-ep2-to-zero3-tp2",  # lora-zero3-tp2sp-to-zero1-pp2
        "moe-ep2dp4-to-ep4",
        "moe-ep2-to-tp2sp",
        "zero3-tp2sp-to-zero1-pp2",
    ),
    "equivalence/test_pipeline.py::test_pipeline_matches_torch_ddp_4_ranks": (
        "pp2-tp2-sp-1f1b-m2-tied",  # test_matrix.py w4-tp2-pp2
        "pp2-dp2-gpipe-m4-ckpt",
        "pp4-gpipe-m8",
        "pp4-interleaved-m4-tied",
        "pp2-dp2-1f1b-m2-tied",
    ),
    "equivalence/test_zero.py::test_zero_matches_torch_ddp_4_ranks": (
        "zero1-accumulate",  # its 2-rank cases stay
        "zero2-accumulate-clip",
        "zero2-offload",
    ),
    "equivalence/test_zero.py::test_zero_matches_torch_ddp_2_ranks": (
        "zero1-none-single",
        "zero1-optimizer-single",
        "zero2-none-single",
        "zero2-optimizer-single",
    ),
    "equivalence/test_zero.py::test_zero3_matches_torch_ddp_2_ranks": (
        "zero3-none-single",
        "zero3-optimizer-single",
        "zero3-all-single",
    ),
    "equivalence/test_zero.py::test_zero_low_precision_matches_torch_fsdp2": ("zero2-bf16", "zero2-fp16"),
    "equivalence/test_tensor_parallel.py::test_tp_matches_torch_ddp_2_ranks": ("tp2]", "tp2-sp]"),
    "equivalence/test_sft.py::test_packed_sft_layouts_match_torch_ddp": (
        "tp2-sp",
        "dp2-zero2",
        "dp2-zero3",
        "pp2-interleaved",
        "pp2-1f1b-checkpointing]",  # its MoE variant stays
    ),
    "equivalence/test_lora.py::test_lora_layouts_match_torch_ddp": ("dp2-zero3-checkpointing-accumulation",),
    "bench/test_bench_tp.py::test_benchmark_reports_both_timings_ratio_same_losses_and_exact_bytes": (
        "tp2]",
    ),
    "system/test_restart.py::test_killed_ranks_restart_and_match_an_uninterrupted_run": (),  # test_faults.py
    "system/test_cli.py::test_prepare_data_then_train_on_memmap": (),  # test_finetune_data.py's run
    "equivalence/test_tensor_parallel.py::test_tp_matches_torch_ddp_4_ranks": (),  # test_matrix.py, tp_layout
    "equivalence/test_tensor_parallel.py::test_low_precision_layouts_match_torch_fsdp2": (),  # test_zero.py
    "equivalence/test_hf.py::test_training_from_hf_weights_matches_torch_ddp": ("qwen3-tp2-sp",),
    "equivalence/test_moe.py::test_moe_matches_torch_ddp_4_ranks": ("ep2-tp2-sp-top2", "ep2-pp2-top1-every2"),
    "unit/test_wrap.py::test_matches_torch_ddp_float64": ("llama-zero3-dp4-acc2",),
    "equivalence/test_pipeline.py::test_pipeline_matches_torch_ddp_2_ranks": (
        "pp2-1f1b-m2-untied",
        "pp2-gpipe-m2-untied",
        "pp2-interleaved-m2-untied",
        "pp2-gpipe-m4-untied",
    ),
    "equivalence/test_lora.py::test_lora_on_attention_of_a_mixture_of_experts_model": ("ep2-zero1",),
    "equivalence/test_lora.py::test_lora_in_16_bits_matches_torch_ddp": ("bf16-ddp",),
}


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(items):
    for item in items:
        test, _, case = item.nodeid.removeprefix("tests/").partition("[")  # case: "id]", or ""
        moved = SLOW_FOR_TIME.get(test)
        if moved is not None and (not moved or any(case.startswith(m) for m in moved)):
            item.add_marker(pytest.mark.slow)
    # Whole modules move, so that module-scoped fixtures are still built once; file order within each size.
    items.sort(key=lambda item: -max(map(WORLD_SIZES.get, worlds_named(item.module)), default=0))


@functools.cache
def worlds_named(module) -> frozenset[str]:
    """The world fixtures a test module may ask for, read from its source: by name (an argument, a
    parameter naming one), through tp_layout, or all of them where it builds the name (f"world{n}")."""
    source = inspect.getsource(module)
    if 'f"world{' in source:
        return frozenset(WORLD_SIZES)
    names = {name for name in WORLD_SIZES if name in source}
    if "tp_layout" in source:
        names |= {fixture for fixture, _, _ in TP_LAYOUTS.values()}
    return frozenset(names)


def pytest_collection_finish(session):
    last = {name: item for item in session.items for name in worlds_named(item.module)}  # later ones win
    closing: dict = {}
    for name, item in last.items():
        closing.setdefault(item, []).append(name)
    session.config.stash[CLOSE_AFTER] = closing


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    open_worlds = item.config.stash.get(OPEN_WORLDS, {})
    for name in item.config.stash[CLOSE_AFTER].get(item, ()):
        if name in open_worlds:
            open_worlds[name].close()
    return result

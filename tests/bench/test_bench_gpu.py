"""The one-GPU benchmark (dtrain.bench.gpu) where there is no GPU: its CPU smoke run at tiny sizes trains
every configuration validate accepts, reports each refused one with validate's own message and no
figures, and holds exactly the model states `dtrain estimate` predicts; `--device cuda` on a machine
without CUDA exits with status 2 and one line naming the CPU smoke run."""

from __future__ import annotations

import math

import pytest
import torch.distributed as dist

from dtrain.bench import gpu as bench
from dtrain.config import ConfigError, load_config
from dtrain.validation import validate
from tests import harness

FAST = ["--device", "cpu", "--tiny", "--compile", "off", "--steps", "2", "--warmup", "1"]


def validate_message(layout: str) -> str:
    zero, offload = bench.LAYOUTS[layout]
    overrides = [*bench.TINY, f"parallel.zero={zero}", f"parallel.offload={offload}", "train.precision=bf16"]
    with pytest.raises(ConfigError) as e:
        validate(load_config(bench.parse_args([]).config, overrides), 1)
    return str(e.value)


def test_cpu_smoke_run_trains_what_validate_accepts_and_reports_what_it_refuses(capfd, tmp_path):
    csv_path = tmp_path / "gpu.csv"
    layouts = ["zero0-none", "zero0-optimizer", "zero3-all"]
    summary = bench.run([*FAST, "--configs", ",".join(layouts), "--csv", str(csv_path)])
    out = capfd.readouterr().out
    rows = {r["config"]: r for r in summary["rows"]}
    assert list(rows) == layouts and all(r["compile"] == "off" for r in rows.values())
    assert not dist.is_initialized()  # the one-rank world is gone with the command

    refused = rows["zero0-optimizer"]
    assert refused["status"] == "refused" and refused["message"] == validate_message("zero0-optimizer")
    assert not {"tokens_per_s", "mfu", "peak_bytes", "est_peak_bytes", "ratio"} & set(refused)
    assert f"refused: {refused['message']}" in out

    tokens_per_step = 4 * 32  # --tiny: global batch 4 x 32 tokens
    for name in ("zero0-none", "zero3-all"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step / (r["step_ms_median"] / 1e3))
        # No allocator counter and no known peak FLOP/s on CPU: no figure rather than a made-up one.
        assert r["peak_bytes"] is None and "ratio" not in r and r["mfu"] is None
        # What the trainer holds is what the estimate predicts, to the byte, on the device and the host.
        assert r["held_device_states_bytes"] == r["est_device_states_bytes"] > 0
        assert r["held_host_states_bytes"] == r["est_host_states_bytes"]
        assert r["est_peak_bytes"] == r["est_device_states_bytes"] + r["est_activation_bytes"]
        assert any(line.startswith(f"{name:<17}off") and " - " in line for line in out.splitlines()), out
    assert rows["zero3-all"]["held_host_states_bytes"] > 0  # offload=all: parameter shards and optimizer

    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + len(layouts) and lines[0].startswith("config,zero,offload,compile,status,")


def test_compile_rows_without_the_key_say_so_and_train_nothing(monkeypatch, capfd):
    monkeypatch.setattr(bench, "compile_available", lambda: False)
    assert bench.parse_args([]).compile == "off"
    summary = bench.run(["--device", "cpu", "--tiny", "--configs", "zero3-none", "--compile", "on"])
    (row,) = summary["rows"]
    assert row["status"] == "unavailable" and row["message"] == bench.NO_COMPILE
    assert "train.compile not available in this build" in capfd.readouterr().out
    assert not dist.is_initialized()


def test_with_the_key_every_configuration_sets_train_compile(monkeypatch):
    monkeypatch.setattr(bench, "compile_available", lambda: True)
    args = bench.parse_args(["--device", "cpu"])
    assert args.compile == "both" and args.compile_values == [False, True]
    assert "train.compile=true" in bench.row_overrides(args, "zero3-none", True)
    assert "train.compile=false" in bench.row_overrides(args, "zero3-none", False)


@pytest.mark.parametrize(
    "argv", [["--configs", "zero2-none"], ["parallel.zero=1"], ["train.compile=true"], ["--steps", "0"]]
)
def test_bad_flags_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2


def test_without_cuda_the_command_exits_2_in_one_line_naming_the_cpu_smoke_run():
    # No visible device: what a machine without CUDA sees, also where there is one.
    result = harness.run_python("-m", "dtrain.bench.gpu", "--steps", "1", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert "needs a GPU" in result.stderr and "--device cpu" in result.stderr


def test_a_configuration_that_fails_while_training_is_a_row_with_its_error_and_no_figures(monkeypatch):
    def out_of_memory(cfg, device, args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(bench, "train", out_of_memory)
    summary = bench.run([*FAST, "--configs", "zero3-none"])
    (row,) = summary["rows"]
    assert row["status"] == "failed"
    assert row["message"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "tokens_per_s" not in row and "peak_bytes" not in row and row["est_peak_bytes"] > 0
    assert not dist.is_initialized()

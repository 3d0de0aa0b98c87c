"""Hugging Face folders in and out, against transformers on the same files: dtrain's logits equal
transformers' for every supported family in one process and in tp2, tp2+sp, pp2 and tp2 x pp2; a load
then an export gives back the original tensors bit for bit; training from those weights in several
layouts equals torch DDP; an exported folder loads in transformers with the logits dtrain computes."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dtrain.config import load_config
from dtrain.hf import HFWeights, export_hf
from dtrain.model import Transformer, init_weights
from dtrain.validation import validate
from tests import harness, hf_models
from tests.reference import float64, layout_matches_ddp
from tests.tolerances import HF_LOGITS

TOKENS = torch.randint(0, hf_models.COMMON["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {family: hf_models.make(str(root / family), family) for family in hf_models.FAMILIES}


@pytest.fixture(scope="module")
def expected(folders) -> dict[str, torch.Tensor]:
    return {family: hf_models.reference_logits(folder, TOKENS) for family, folder in folders.items()}


def load_whole(folder: str) -> Transformer:
    """The single-process model read from `folder` through dtrain's loader."""
    cfg = load_config(None, [f"model.init_from={folder}"])
    model = Transformer(cfg.model).eval()
    weights = HFWeights(folder)
    init_weights(model, 0, weights.read)
    weights.close()
    return model


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_one_process_logits_equal_transformers(folders, expected, family):
    with torch.no_grad():
        ours = load_whole(folders[family])(TOKENS)
    torch.testing.assert_close(ours, expected[family], **HF_LOGITS)


@pytest.mark.parametrize("family", ["llama-tied-llama3-rope", "qwen3-qk-norm-head-dim"])
def test_float64_logits_equal_transformers(folders, family):
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(folders[family]).double().eval()
    with float64(), torch.no_grad():
        ours = load_whole(folders[family])(TOKENS)
        theirs = reference(TOKENS).logits
    torch.testing.assert_close(ours, theirs, **HF_LOGITS)


def layout_logits_case(folders: dict[str, str], layout: tuple[str, ...]) -> dict[str, torch.Tensor | None]:
    """This rank's model part of each folder in `layout`; the last pipeline stage returns the full logits
    (vocabulary shards gathered over tp, the padding dropped), other ranks None."""
    from dtrain.parallelize import build_model_chunks

    world = dist.get_world_size()
    out = {}
    for family, folder in folders.items():
        cfg = validate(load_config(None, [f"model.init_from={folder}", "train.seq_len=32", *layout]), world)
        p = cfg.parallel
        grid = harness.grid(tp=p.tp, pp=p.pp, dp=p.dp)
        (chunk,) = build_model_chunks(cfg, grid, torch.device("cpu")).values()
        chunk.eval()
        stage, last = grid.coords.pp, grid.size("pp") - 1
        peers = grid.ranks("pp")
        with torch.no_grad():
            if stage == 0:
                h = chunk(TOKENS)
            else:
                seq = TOKENS.shape[1] // (p.tp if p.sp else 1)
                h = torch.empty(TOKENS.shape[0], seq, cfg.model.d_model)
                dist.recv(h, peers[stage - 1])
                h = chunk(h)
            if stage < last:
                dist.send(h.contiguous(), peers[stage + 1])
                out[family] = None
                continue
        shards = [torch.empty_like(h) for _ in range(p.tp)]
        dist.all_gather(shards, h.contiguous(), group=grid.tp_group)
        out[family] = torch.cat(shards, dim=-1)[..., : cfg.model.vocab_size]
    return out


LAYOUTS = {
    "tp2": ("world2", ("parallel.tp=2",)),
    "tp2-sp": ("world2", ("parallel.tp=2", "parallel.sp=true")),
    "pp2": ("world2", ("parallel.pp=2",)),
    "tp2-pp2": ("world4", ("parallel.tp=2", "parallel.pp=2", "parallel.sp=true")),
}


@pytest.mark.parametrize(("world", "layout"), LAYOUTS.values(), ids=LAYOUTS.keys())
def test_logits_equal_transformers_in_every_layout(request, folders, expected, world, layout):
    results = request.getfixturevalue(world).run(layout_logits_case, folders, layout)
    last_stage = [r for r in results if next(iter(r.values())) is not None]
    assert last_stage, "no rank returned logits"
    for result in last_stage:
        for family, logits in result.items():
            torch.testing.assert_close(logits, expected[family], **HF_LOGITS, msg=family)


def test_load_then_export_gives_back_the_original_tensors(folders, tmp_path):
    for family, folder in folders.items():
        model = load_whole(folder)
        out = tmp_path / family
        export_hf(dict(model.named_parameters()), model.cfg, str(out), "fp32", 10**9)
        original, exported = (
            load_file(os.path.join(folder, "model.safetensors")),
            load_file(out / "model.safetensors"),
        )
        assert original.keys() == exported.keys(), family
        for key, value in original.items():
            assert torch.equal(value, exported[key]), (family, key)


def test_sharded_folders_load_and_export_with_an_index(folders, expected, tmp_path):
    family = "qwen2-biases-tied"
    sharded = hf_models.make(str(tmp_path / "in"), family, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    model = load_whole(sharded)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected[family], **HF_LOGITS)
    out = tmp_path / "out"
    files = export_hf(dict(model.named_parameters()), model.cfg, str(out), "fp32", 20_000)
    with open(out / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 2 and files == len(os.listdir(out))
    torch.testing.assert_close(hf_models.reference_logits(str(out), TOKENS), expected[family], **HF_LOGITS)


TRAINING = {
    "qwen3-tp2-sp": ("world2", "qwen3-qk-norm-head-dim", ("parallel.tp=2", "parallel.sp=true")),
    "qwen2-tied-pp2-zero1": ("world2", "qwen2-biases-tied", ("parallel.pp=2", "parallel.zero=1")),
    "llama-zero3-offload": ("world2", "llama-tied-llama3-rope", ("parallel.zero=3", "parallel.offload=all")),
}
SLOW_TRAINING = {
    "mistral-tp2-pp2-interleaved": (
        "world4",
        "mistral",
        (
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.pp_schedule=interleaved",
            "parallel.pp_virtual_stages=2",
        ),
    ),
    "llama-mha-dp4-zero2": ("world4", "llama-mha-untied", ("parallel.zero=2",)),
}


@pytest.mark.parametrize(
    ("world", "family", "layout"),
    [*TRAINING.values(), *(pytest.param(*v, marks=pytest.mark.slow) for v in SLOW_TRAINING.values())],
    ids=[*TRAINING, *SLOW_TRAINING],
)
def test_training_from_hf_weights_matches_torch_ddp(request, folders, world, family, layout):
    """From the same Hugging Face weights, every layout trains as torch DDP does (float64 to FP64, fp32
    losses and grad norms to FP32, as every layout test)."""
    results = request.getfixturevalue(world).run(
        layout_matches_ddp, layout, (f"model.init_from={folders[family]}",)
    )
    assert all(r["losses"][-1] < r["losses"][0] for r in results)  # it learned


def read_elements_case(folder: str, layout: tuple[str, ...]) -> tuple[int, int, int]:
    """(elements this rank read from the folder, elements of its model part, elements of the whole)."""
    from dtrain.parallelize import build_model_chunks

    cfg = validate(
        load_config(None, [f"model.init_from={folder}", "train.seq_len=32", *layout]), dist.get_world_size()
    )
    p = cfg.parallel
    read = 0
    original = HFWeights.read

    def counting(self, name, sharding):
        nonlocal read
        start, stop, _ = sharding.local_range() if sharding.split_dim is not None else (0, 1, 0)
        part = original(self, name, sharding)
        rows = stop - start if sharding.split_dim is not None else None
        read += part.numel() if rows is None else part.numel() // part.shape[sharding.split_dim] * rows
        return part

    HFWeights.read = counting
    try:
        chunks = build_model_chunks(cfg, harness.grid(tp=p.tp, pp=p.pp, dp=p.dp), torch.device("cpu"))
    finally:
        HFWeights.read = original
    held = sum(q.numel() for c in chunks.values() for q in c.parameters())
    whole = sum(q.numel() for q in Transformer(cfg.model).parameters())
    return read, held, whole


def test_each_rank_reads_only_its_own_part(world2, folders):
    for layout in (("parallel.tp=2",), ("parallel.pp=2",)):
        for read, held, whole in world2.run(read_elements_case, folders["qwen2-biases-tied"], layout):
            assert read <= held < whole, (layout, read, held, whole)

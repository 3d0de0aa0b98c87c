"""Process-group start-up and facts about the device (peak FLOPs, peak memory)."""

from __future__ import annotations

import os
import resource
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from dtrain.config import DistConfig

# Dense bf16 tensor-core peak (FLOP/s) by device name fragment; MFU is reported only when the peak is
# known (from this table or train.peak_tflops).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
}


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return name


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for one-machine rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Restarts under torchrun (--max-restarts N) need a fresh rendezvous store for every attempt (torch 2.13).
# torchrun tells its workers in TORCHELASTIC_USE_AGENT_STORE whether they share the agent's store:
#   static rendezvous (--master-port, --rdzv-backend static, or several nodes without rendezvous options):
#       always shared (StaticTCPRendezvous.use_agent_store is True; TORCH_DISABLE_SHARE_RDZV_TCP_STORE is
#       not read), and the agent keeps that one store for every attempt;
#   c10d rendezvous (--standalone, --rdzv-backend c10d, and one node without rendezvous options, which
#       torchrun turns into --standalone): shared unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; the shared
#       server is created once and reused for every later round. With the variable, rank 0 of every
#       attempt hosts a fresh store (torch.distributed.rendezvous._create_c10d_store).
# A shared store keeps the previous attempt's keys, which carry no attempt number, so a restarted worker
# can read the address a dead peer listened on and fail to connect, at random (pytorch/pytorch#135712).
NO_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
WHAT_RESTARTS = (
    f"a c10d rendezvous with {NO_SHARED_STORE}=1 in torchrun's environment: --standalone (or no rendezvous "
    f"options) on one node, --rdzv-backend c10d --rdzv-endpoint HOST:PORT on several (python -m launch "
    f"sets the variable)"
)


def static_restart_error(restarts: int) -> str:
    return (
        f"torchrun --max-restarts {restarts} with the static rendezvous (--master-port, --rdzv-backend "
        f"static) cannot restart reliably: it shares its store with the workers whatever {NO_SHARED_STORE} "
        f"says, and restarted workers read stale peer addresses from it; restarts need {WHAT_RESTARTS}"
    )


def check_restartable() -> None:
    """Under torchrun with --max-restarts > 0, refuse a shared rendezvous store (see above) at the first
    start, in one line saying what restarts there, rather than fail at random after a restart."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from dtrain.config import ConfigError

    if os.environ.get(NO_SHARED_STORE) == "1":  # shared all the same: only the static rendezvous does that
        raise ConfigError(static_restart_error(restarts))
    raise ConfigError(
        f"torchrun --max-restarts {restarts} with a shared rendezvous store cannot restart reliably "
        f"(restarted workers read stale peer addresses from it); restarts need {WHAT_RESTARTS}; the "
        f"static rendezvous (--master-port) shares its store whatever the variable says"
    )


def init_distributed(cfg: DistConfig) -> torch.device:
    """Join the world torchrun describes in the environment, or make a one-process world without it."""
    check_restartable()
    backend = resolve_backend(cfg.backend)
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("dist.backend=nccl needs CUDA, which this machine lacks; use dist.backend=gloo")
    if not dist.is_initialized():
        timeout = timedelta(seconds=cfg.timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)  # env:// rendezvous set up by torchrun
        else:
            init = f"tcp://127.0.0.1:{free_port()}"
            dist.init_process_group(backend, init_method=init, rank=0, world_size=1, timeout=timeout)
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def process_grid(cfg):
    """The run's ProcessGrid (a collective over the world: every rank builds it), its collectives bounded
    by dist.timeout_s."""
    from parallel.grid import ProcessGrid

    p = cfg.parallel
    sizes = dict(tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp, ep=p.ep, dp_shard=p.dp_shard)
    return ProcessGrid(**sizes, timeout=timedelta(seconds=cfg.dist.timeout_s))


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, flops in PEAK_BF16_FLOPS.items():
            if fragment in name:
                return flops
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on GPUs; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

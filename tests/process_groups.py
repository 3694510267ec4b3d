"""Local gloo process groups for the tests whose ranks are spawned processes.

Pure torch, so not in ``tests/helpers.py``: the ranks of
``tests/test_distributed_selection.py`` must not import SAELens, which the
helpers do.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_local_group(rank: int, world: int, port: int, timeout_s: float) -> None:
    """Join the gloo group of ``world`` ranks meeting at 127.0.0.1:``port``.

    Collectives wait ``timeout_s`` for a peer before failing, so a rank that
    died makes the others raise instead of hang.
    """
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )

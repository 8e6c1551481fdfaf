"""Scaling a model from outside: activation checkpointing, torch.compile and FSDP2, in that order.

The model files never import ``torch.distributed``; everything here wraps or shards the blocks of an already
built model (``model.layers``), the way torchtitan's ``parallelize`` does:

1. activation checkpointing: each block is wrapped so its activations are recomputed in the backward pass
   (``checkpoint_wrapper`` keeps state-dict names unchanged),
2. ``torch.compile`` per block (every block has the same code, so one compiled graph serves all of them),
3. FSDP2: ``fully_shard`` on each block, then on the root, so parameters are gathered one block at a time.

This module does not pick devices, set up process groups or handle checkpoints; ``loop.py`` does.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> tuple[int, int, torch.device | None]:
    """Join the process group torchrun describes in the environment; (rank, world_size, device or None).

    NCCL and one GPU per local rank when CUDA is available, else gloo on CPU. A plain ``python`` run (no
    WORLD_SIZE) is world size 1 without any process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def parallelize(model: nn.Module, *, world_size: int, activation_checkpointing: bool = False,
                compile: bool = False) -> nn.Module:
    """Apply activation checkpointing, compile and (with world_size > 1) FSDP2 to ``model`` in place."""
    layers = model.layers
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in layers:
            block.compile()
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (world_size,))
        for block in layers:
            fully_shard(block, mesh=mesh)
        # The root holds the embeddings, final norm and output layer; it reshards nothing after the forward
        # pass because the output layer is needed again first thing in the backward pass.
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model

"""Training checkpoints and export: atomic full-state checkpoints for an exact resume, and the Hugging Face
export of the trained weights. Gathered from every process (FSDP2) and written by rank 0.

A LoRA run's checkpoints hold only what it trains (the adapters) and their optimizer state: the frozen base is
read again from ``model.init_from`` on resume. Its export is ``adapter/`` in peft's format and, with
``lora.merge``, ``model/``: that base re-read in ``run.export_dtype`` with the adapters merged in (fp32 sums).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from codegen2.train.loop import Trainer


def save(t: Trainer) -> None:
    """Write ``checkpoints/step_N.pt`` (model, optimizer, data stream, RNG, config) atomically; keep the last K."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(t.model, t.optimizer, options=opts)
    if t.rank == 0:
        t.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {"step": t.step, "model": model_state, "optimizer": optim_state,
                 "stream": t.stream.state_dict(), "config": t.cfg.to_dict(),
                 "torch_rng": torch.get_rng_state()}
        final = t.ckpt_dir / f"step_{t.step:08d}.pt"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:  # a kill mid-write leaves only a .tmp file, never a torn checkpoint
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for old in sorted(t.ckpt_dir.glob("step_*.pt"))[:-t.cfg.run.keep_checkpoints]:
            old.unlink()
    if t.world > 1:
        dist.barrier()


def resume(t: Trainer) -> bool:
    """Load the newest checkpoint, if any, after checking it was written with the same model, data and
    objective config; True if one was loaded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_state_dict,
    )

    found = sorted(t.ckpt_dir.glob("step_*.pt"))
    if not found:
        return False
    state = torch.load(found[-1], map_location="cpu", weights_only=True)
    mine, theirs = t.cfg.to_dict(), state["config"]
    for section in ("model", "lora", "data", "objective"):
        if mine[section] != theirs[section]:
            raise ValueError(f"{found[-1]} was written with a different [{section}] config "
                             f"({theirs[section]}); use a new run.out_dir or the same config")
    # strict: every trained tensor is in the checkpoint; a LoRA run's frozen base is not (it was re-read).
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=not t.cfg.lora.rank)
    set_state_dict(t.model, t.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=opts)
    t.stream.load_state_dict(state["stream"])
    torch.set_rng_state(state["torch_rng"])
    t.step = state["step"]
    t.log(f"resumed from {found[-1]} at step {t.step}")
    return True


def export(t: Trainer) -> Path:
    """Write the Hugging Face directory ``out_dir/model`` from the full (gathered) weights; for a LoRA run,
    ``out_dir/adapter`` and with lora.merge also ``model/``. Returns ``model/`` if written, else ``adapter/``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from codegen2.models import build
    from codegen2.models.checkpoint import save_model

    lora = t.cfg.lora
    state = get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                   ignore_frozen_params=bool(lora.rank)))
    if lora.rank:
        return _export_lora(t, state)
    target = t.out / "model"
    if t.rank == 0:
        with torch.device("meta"):
            plain = build(t.model_config)
        plain.load_state_dict(state, assign=True)
        plain.reset_rotary()
        save_model(plain, target, dtype=t.cfg.run.export_dtype, tokenizer_dir=t.tokenizer_dir,
                   max_shard_size=t.cfg.run.export_shard_size)
    if t.world > 1:
        dist.barrier()
    return target


def _export_lora(t: Trainer, adapters: dict[str, torch.Tensor]) -> Path:
    from codegen2.models.checkpoint import load_model, save_model
    from codegen2.models.lora import merge_adapters, qkv_layout, save_adapter

    lora, base = t.cfg.lora, Path(t.tokenizer_dir)
    if t.rank == 0:
        save_adapter(adapters, t.model_config, t.out / "adapter", rank=lora.rank, alpha=lora.alpha,
                     mp_num=qkv_layout(t.model_config, base), base_model=t.cfg.model.init_from)
        if lora.merge:
            plain = merge_adapters(load_model(base, dtype=t.cfg.run.export_dtype), adapters, lora.alpha / lora.rank)
            save_model(plain, t.out / "model", dtype=t.cfg.run.export_dtype, tokenizer_dir=base,
                       max_shard_size=t.cfg.run.export_shard_size)
    if t.world > 1:
        dist.barrier()
    return t.out / ("model" if lora.merge else "adapter")

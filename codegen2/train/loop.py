"""The training loop: model, optimizer, schedule, the step, and the run that ties evaluation (evaluate.py) and
checkpoints (checkpoint.py) to it. The command line is cli.py (``codegen2 train``, ``torchrun -m codegen2.train``).

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl``, ``checkpoints/step_*.pt``
(atomic, last K kept), ``loss.png`` and ``model/``, a Hugging Face export every codegen2 command and transformers
load. Starting a run whose directory has checkpoints resumes from the newest one exactly: same data order, same
optimizer state, same weights (bit-identical on CPU) as if it had never stopped.

Every process builds the same global batch from the same deterministic row stream and trains on its slice; the
loss is normalised by the global count of target tokens, so N processes follow the trajectory of one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from codegen2.models.loss import IGNORE
from codegen2.train import checkpoint
from codegen2.train.config import LoRASection, ModelSection, OptimSection, TrainConfig
from codegen2.train.evaluate import evaluate
from codegen2.train.metrics import (
    append_jsonl,
    peak_flops,
    plot_losses,
    truncate_metrics,
)
from codegen2.train.objective import RowStream
from codegen2.train.parallelize import init_distributed, parallelize

# --- model ------------------------------------------------------------------------------------------------------


def build_model(cfg: ModelSection, lora: LoRASection | None = None, dtype: str = "fp32"
                ) -> tuple[nn.Module, str | None]:
    """The model to train (train mode) and the directory its tokenizer files come from: fp32 master weights, or
    with LoRA a frozen base in ``dtype`` (or int8) under trainable fp32 adapters (train/lora.py)."""
    from codegen2.models import build, config_from_dict, preset_config
    from codegen2.models.checkpoint import load_model, resolve

    if cfg.init_from and lora is not None and lora.rank:
        from codegen2.train.lora import prepare_lora

        source = resolve(cfg.init_from)
        base = torch.bfloat16 if dtype == "bf16" else torch.float32
        # Read straight into the base's dtype: never written to, so no private copy of mapped tensors either.
        model = prepare_lora(load_model(source, dtype=base), lora.rank, lora.alpha, lora.targets, lora.quant, base)
        return model.train(), str(source)
    if cfg.init_from:
        source = resolve(cfg.init_from)
        model = load_model(source, dtype=torch.float32)
        for p in model.parameters():  # a private copy: the loaded tensors may be memory-mapped files
            p.data = p.data.clone()
        return model.train().requires_grad_(True), str(source)
    try:
        mcfg = preset_config(cfg.preset, **cfg.shape) if cfg.preset else config_from_dict({"family": cfg.family,
                                                                                           **cfg.shape})
    except TypeError as e:
        raise ValueError(f"model.shape: {e}") from None
    model = build(mcfg)
    init_weights(model)
    return model.train(), None


def init_weights(model: nn.Module) -> None:
    """GPT-2 style initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
    std_out = 0.02 / math.sqrt(2 * len(model.layers))
    for name, p in model.named_parameters():
        if p.ndim == 1:
            nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
        else:
            nn.init.normal_(p, std=std_out if name.endswith(("attention.wo.weight", "w2.weight")) else 0.02)


def lr_at(step: int, o: OptimSection) -> float:
    """Linear warmup from 0 over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * t))


# --- one process's view of the run ---------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        from codegen2.train.corpus import TokenCorpus

        self.cfg, run = cfg, cfg.run
        self.rank, self.world, device = init_distributed()
        if device is None:
            device = torch.device("cuda" if run.device == "auto" and torch.cuda.is_available() else
                                  ("cpu" if run.device == "auto" else run.device))
        self.device = device
        self.dtype = run.dtype if run.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        if cfg.optim.batch_size % (self.world * cfg.optim.micro_batch_size):
            raise ValueError(f"optim.batch_size {cfg.optim.batch_size} must be a multiple of processes "
                             f"({self.world}) x micro_batch_size ({cfg.optim.micro_batch_size})")
        self.out = Path(run.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        torch.manual_seed(run.seed)
        model, self.tokenizer_dir = build_model(cfg.model, cfg.lora, self.dtype)
        self.tokenizer = self._tokenizer(model)
        self.model_config = model.config
        if not cfg.data.corpus:
            raise ValueError("data.corpus is not set: point it at a directory written by `codegen2 data build`")
        train_corpus, self.val_corpus = TokenCorpus(cfg.data.corpus, "train"), TokenCorpus(cfg.data.corpus, "val")
        if train_corpus.manifest["tokenizer"] != self.tokenizer.kind:
            raise ValueError(f"{cfg.data.corpus} was tokenized with the {train_corpus.manifest['tokenizer']} "
                             f"tokenizer but this model uses {self.tokenizer.kind}; rebuild it with "
                             f"`codegen2 data build --tokenizer {self.tokenizer.kind}`")
        if cfg.data.seq_len > model.config.max_seq_len:
            raise ValueError(f"data.seq_len {cfg.data.seq_len} is more than the model's "
                             f"{model.config.max_seq_len} positions")
        self.stream = RowStream(train_corpus, self.tokenizer, cfg.objective, cfg.data.seq_len, run.seed,
                                workers=run.data_workers)
        # Weights counted once (a tied output weight); an int8 base's weights are buffers.
        int8 = [(n, b) for n, b in model.named_buffers() if n.endswith(".weight")]
        self.n_params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for _, b in int8)
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # Parameters of matrix products (for MFU): all but the embedding lookup; a tied output layer counts. Those
        # frozen (LoRA's base) cost 4 flops per token instead of 6: no weight gradient is formed.
        matmul = [(n, p) for n, p in [*model.named_parameters(remove_duplicate=False), *int8]
                  if not n.startswith("tok_embeddings")]
        self.n_matmul = sum(p.numel() for _, p in matmul)
        self.n_frozen_matmul = sum(p.numel() for _, p in matmul if not p.requires_grad)
        self.model = parallelize(model.to(device), world_size=self.world,
                                 activation_checkpointing=run.activation_checkpointing, compile=run.compile)
        trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]  # LoRA: the adapters
        decay = [p for n, p in trained if p.ndim >= 2 and "tok_embeddings" not in n]
        other = [p for n, p in trained if not (p.ndim >= 2 and "tok_embeddings" not in n)]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), fused=True)
        self.step = 0
        self.val_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # fixed at the first evaluation

    def _tokenizer(self, model: nn.Module):
        from codegen2.models import family
        from codegen2.tokenizer import load_tokenizer

        if self.tokenizer_dir is not None:  # fine-tuning: the checkpoint's own tokenizer
            tok = load_tokenizer(self.tokenizer_dir)
        else:
            tok = load_tokenizer(None, kind=family(model.config).tokenizer)
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(f"the {tok.kind} tokenizer has {tok.vocab_size} ids but the model only "
                             f"{model.config.vocab_size}")
        return tok

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # --- the step ---

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16")

    def loss_sums(self, rows: torch.Tensor, valid: torch.Tensor, backward_scale: float | None):
        """Summed cross-entropy and target count over ``rows`` (n, seq_len + 1), in micro-batches; with
        backward_scale, backpropagates ``sum * backward_scale`` micro-batch by micro-batch."""
        mb = self.cfg.optim.micro_batch_size
        loss_sum, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        chunks = range(0, rows.shape[0], mb)
        for i, start in enumerate(chunks):
            x = rows[start:start + mb].to(self.device)
            ok = valid[start:start + mb, 1:].to(self.device)
            targets = x[:, 1:].masked_fill(~ok, IGNORE)  # padding is never a target
            if backward_scale is not None and self.world > 1:
                self.model.set_requires_gradient_sync(i == len(chunks) - 1)  # reduce once per step
            with self._autocast():  # summed over targets, the output layer in chunks (models/loss.py)
                loss = self.model(x[:, :-1], targets=targets)
            if backward_scale is not None:
                (loss * backward_scale).backward()
            loss_sum += loss.detach()
            count += ok.sum()
        return loss_sum, count

    def all_reduce(self, *xs: torch.Tensor) -> list[float]:
        t = torch.stack([x.float() for x in xs])
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def train_step(self) -> dict:
        o = self.cfg.optim
        rows, valid = self.stream.next_rows(o.batch_size)  # the global batch, identical on every process
        per = o.batch_size // self.world
        rows, valid = rows[self.rank * per:(self.rank + 1) * per], valid[self.rank * per:(self.rank + 1) * per]
        total = int(self.all_reduce(valid[:, 1:].sum())[0])
        lr = lr_at(self.step, o)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # FSDP averages gradients over processes, hence * world: the result is d(global sum)/d(w) / total.
        loss_sum, _ = self.loss_sums(rows, valid, backward_scale=self.world / max(total, 1))
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        (loss_total,) = self.all_reduce(loss_sum)
        return {"step": self.step, "loss": loss_total / max(total, 1), "lr": lr, "grad_norm": float(norm),
                "tokens": total}


# --- the run ---------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training to ``optim.max_steps``; returns the exported model directory."""
    t = Trainer(cfg)
    run, o = cfg.run, cfg.optim
    metrics = t.out / "metrics.jsonl"
    if t.rank == 0:
        t.out.mkdir(parents=True, exist_ok=True)
        (t.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    resumed = checkpoint.resume(t)
    if t.rank == 0:
        truncate_metrics(metrics, t.step) if resumed else metrics.unlink(missing_ok=True)
    writer = None
    if t.rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(t.out / "tensorboard"))
        except ImportError:
            pass
    # PaLM's count: 6 flops per non-embedding parameter and token (4 if frozen), plus attention's scores and mixing.
    flops_per_token = 6 * t.n_matmul - 2 * t.n_frozen_matmul \
        + 12 * t.model_config.n_layers * t.model_config.n_kv_heads * t.model_config.head_dim * cfg.data.seq_len
    peak = peak_flops(run, t.device)
    base = " on an int8 base" if cfg.lora.quant == "int8" else ""
    lora = f" (LoRA rank {cfg.lora.rank}{base}: {t.n_trainable / 1e6:.2f}M trained)" if cfg.lora.rank else ""
    t.log(f"training {t.n_params / 1e6:.1f}M parameters{lora} on {t.world} x {t.device.type} ({t.dtype}), "
          f"{o.batch_size} x {cfg.data.seq_len} tokens per step, steps {t.step} -> {o.max_steps}")
    def run_evaluation() -> None:
        ev = evaluate(t)
        t.log(f"step {t.step:>6} | val loss {ev['val_loss']:.4f} | infill exact match "
              f"{ev['infill_exact']:.1%} of {ev['infill_n']}")
        if t.rank == 0:
            append_jsonl(metrics, ev)
            if writer:
                writer.add_scalar("val/loss", ev["val_loss"], t.step)
                writer.add_scalar("val/infill_exact", ev["infill_exact"], t.step)

    if run.eval_every and t.step == 0:
        run_evaluation()  # the baseline the run is measured against
    busy, tokens_since = 0.0, 0  # training time and tokens since the last log line (evaluation excluded)
    while t.step < o.max_steps:
        tick = time.perf_counter()
        record = t.train_step()
        if t.device.type == "cuda":
            torch.cuda.synchronize()
        busy += time.perf_counter() - tick
        tokens_since += record["tokens"]
        if t.step % run.log_every == 0 or t.step == o.max_steps:
            record["tokens_per_s"] = tokens_since / busy
            if peak:
                record["mfu"] = record["tokens_per_s"] * flops_per_token / (peak * t.world)
            busy, tokens_since = 0.0, 0
            mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
            t.log(f"step {t.step:>6}/{o.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                  f"grad norm {record['grad_norm']:.2f} | {record['tokens_per_s']:,.0f} tok/s{mfu}")
        if run.eval_every and (t.step % run.eval_every == 0 or t.step == o.max_steps):
            run_evaluation()
        if t.rank == 0:
            append_jsonl(metrics, record)
            if writer:
                for key in ("loss", "lr", "grad_norm"):
                    writer.add_scalar(f"train/{key}", record[key], t.step)
        if t.step % run.checkpoint_every == 0 or t.step == o.max_steps:
            checkpoint.save(t)
    t.stream.close()
    target = checkpoint.export(t)
    if t.rank == 0 and metrics.is_file():
        if plot_losses(metrics, t.out / "loss.png"):
            t.log(f"loss curve: {t.out / 'loss.png'}")
        t.log(f"exported {target}")
    if writer:
        writer.close()
    if t.world > 1:
        dist.destroy_process_group()
    return target

"""``codegen2 train``: train or fine-tune a CodeGen2-family model with the CodeGen2 objective.

    codegen2 train --config run.toml optim.lr=1e-3 run.out_dir=runs/x        # one process
    torchrun --nproc-per-node 8 -m codegen2.train --config run.toml          # FSDP2 over 8 GPUs (or CPUs)

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl``, ``checkpoints/step_*.pt``
(atomic, last K kept), ``loss.png`` and ``model/``, a Hugging Face export every codegen2 command and transformers
load. Starting a run whose directory has checkpoints resumes from the newest one exactly: same data order, same
optimizer state, same weights (bit-identical on CPU) as if it had never stopped.

Every process builds the same global batch from the same deterministic row stream and trains on its slice; the
loss is normalised by the global count of target tokens, so N processes follow the trajectory of one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from codegen2.infill import infill_prompt, split_middles
from codegen2.models.loss import IGNORE
from codegen2.train.config import ModelSection, OptimSection, TrainConfig, load_config
from codegen2.train.metrics import (
    append_jsonl,
    peak_flops,
    plot_losses,
    truncate_metrics,
)
from codegen2.train.objective import RowStream
from codegen2.train.parallelize import init_distributed, parallelize

# --- model ------------------------------------------------------------------------------------------------------


def build_model(cfg: ModelSection) -> tuple[nn.Module, str | None]:
    """The model to train (fp32 master weights, train mode) and the directory its tokenizer files come from."""
    from codegen2.models import config_from_dict as model_config
    from codegen2.models import preset_config
    from codegen2.models.checkpoint import build, load_model, resolve

    if cfg.init_from:
        source = resolve(cfg.init_from)
        model = load_model(source, dtype=torch.float32)
        for p in model.parameters():  # a private copy: the loaded tensors may be memory-mapped files
            p.data = p.data.clone()
        return model.train().requires_grad_(True), str(source)
    try:
        mcfg = preset_config(cfg.preset, **cfg.shape) if cfg.preset else model_config({"family": cfg.family,
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
        from codegen2.train.data import TokenCorpus

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
        model, self.tokenizer_dir = build_model(cfg.model)
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
        self.n_params = sum(p.numel() for p in model.parameters())  # a tied output weight counted once
        # Parameters of matrix products (for MFU): all but the embedding lookup; a tied output layer counts.
        self.n_matmul = sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False)
                            if not n.startswith("tok_embeddings"))
        self.model = parallelize(model.to(device), world_size=self.world,
                                 activation_checkpointing=run.activation_checkpointing, compile=run.compile)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "tok_embeddings" not in n]
        other = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "tok_embeddings" not in n)]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), fused=True)
        self.step = 0
        self._val_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def _tokenizer(self, model: nn.Module):
        from codegen2.tokenizer import load_tokenizer

        if self.tokenizer_dir is not None:  # fine-tuning: the checkpoint's own tokenizer
            tok = load_tokenizer(self.tokenizer_dir)
        else:
            tok = load_tokenizer(None, kind="codegen2" if model.config.family == "codegen2" else "codegen25")
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

    def _loss_sums(self, rows: torch.Tensor, valid: torch.Tensor, backward_scale: float | None):
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

    def _all_reduce(self, *xs: torch.Tensor) -> list[float]:
        t = torch.stack([x.float() for x in xs])
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def train_step(self) -> dict:
        o = self.cfg.optim
        rows, valid = self.stream.next_rows(o.batch_size)  # the global batch, identical on every process
        per = o.batch_size // self.world
        rows, valid = rows[self.rank * per:(self.rank + 1) * per], valid[self.rank * per:(self.rank + 1) * per]
        total = int(self._all_reduce(valid[:, 1:].sum())[0])
        lr = lr_at(self.step, o)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # FSDP averages gradients over processes, hence * world: the result is d(global sum)/d(w) / total.
        loss_sum, _ = self._loss_sums(rows, valid, backward_scale=self.world / max(total, 1))
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        (loss_total,) = self._all_reduce(loss_sum)
        return {"step": self.step, "loss": loss_total / max(total, 1), "lr": lr, "grad_norm": float(norm),
                "tokens": total}

    # --- evaluation ---

    @torch.no_grad()
    def evaluate(self) -> dict:
        # Eager, even when the blocks are compiled for training: evaluation is a small share of the time, and
        # greedy decoding's growing shapes and explicit masks would mean recompiles (and, under bf16 autocast,
        # an inductor constant-folding failure seen on an H100 with torch 2.11).
        eager = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6 (older: evaluated compiled)
        with eager("force_eager") if eager and self.cfg.run.compile else contextlib.nullcontext():
            return self._evaluate()

    def _evaluate(self) -> dict:
        if self._val_rows is None:  # the first eval_rows rows of the validation stream, fixed for the run
            stream = RowStream(self.val_corpus, self.tokenizer, self.cfg.objective, self.cfg.data.seq_len,
                               self.cfg.run.seed)
            self._val_rows = stream.next_rows(self.cfg.run.eval_rows)
        rows, valid = self._val_rows
        mine = slice(self.rank, None, self.world)
        loss_sum, count = self._loss_sums(rows[mine], valid[mine], backward_scale=None)
        loss_sum, count = self._all_reduce(loss_sum, count)
        exact, n = self.infill_exact_match()
        return {"step": self.step, "val_loss": loss_sum / max(count, 1), "infill_exact": exact, "infill_n": n}

    def infill_examples(self) -> list[tuple[str, str, str]]:
        """Single-line holes (prefix, line, suffix) in held-out files: one non-blank line per file, the window
        around it cut to whole lines so the prompt plus 64 new tokens fits the context."""
        examples = []
        budget = self.cfg.data.seq_len - 64
        for i in range(min(len(self.val_corpus), self.cfg.run.infill_examples)):
            lines = self.val_corpus.text(i).splitlines(keepends=True)
            candidates = [j for j, line in enumerate(lines) if line.strip() and line.endswith("\n")]
            if not candidates:
                continue
            j = random.Random(f"infill:{i}").choice(candidates)
            before, after = lines[max(0, j - 40):j], lines[j + 1:j + 41]
            while before or after:
                prefix, suffix = "".join(before), "\n" + "".join(after)
                if len(infill_prompt(self.tokenizer, prefix, suffix)) <= budget:
                    break
                before, after = before[1:], after[:-1]
            examples.append((prefix, lines[j][:-1], suffix))
        return examples

    @torch.no_grad()
    def infill_exact_match(self, max_new: int = 48) -> tuple[float, int]:
        examples = self.infill_examples()
        if not examples:
            return 0.0, 0
        prompts = [infill_prompt(self.tokenizer, p, s) for p, _, s in examples]
        generated = greedy(self.model, prompts, max_new, {self.tokenizer.eom_id, self.tokenizer.eos_id},
                           self.device)
        hits = 0
        for (_, line, _), ids in zip(examples, generated):
            middles, closed = split_middles(self.tokenizer, ids)
            hits += closed and self.tokenizer.decode(middles[0]) == line
        return hits / len(examples), len(examples)

    # --- checkpoints ---

    def save_checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=opts)
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {"step": self.step, "model": model_state, "optimizer": optim_state,
                     "stream": self.stream.state_dict(), "config": self.cfg.to_dict(),
                     "torch_rng": torch.get_rng_state()}
            final = self.ckpt_dir / f"step_{self.step:08d}.pt"
            tmp = final.with_suffix(".tmp")
            with open(tmp, "wb") as f:  # a kill mid-write leaves only a .tmp file, never a torn checkpoint
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-self.cfg.run.keep_checkpoints]:
                old.unlink()
        if self.world > 1:
            dist.barrier()

    def resume(self) -> bool:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        found = sorted(self.ckpt_dir.glob("step_*.pt"))
        if not found:
            return False
        state = torch.load(found[-1], map_location="cpu", weights_only=True)
        mine, theirs = self.cfg.to_dict(), state["config"]
        for section in ("model", "data", "objective"):
            if mine[section] != theirs[section]:
                raise ValueError(f"{found[-1]} was written with a different [{section}] config "
                                 f"({theirs[section]}); use a new run.out_dir or the same config")
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=opts)
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.log(f"resumed from {found[-1]} at step {self.step}")
        return True

    def export(self) -> Path:
        """Write the Hugging Face directory ``out_dir/model`` from the full (gathered) weights."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        from codegen2.models.checkpoint import build, save_model

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        target = self.out / "model"
        if self.rank == 0:
            with torch.device("meta"):
                plain = build(self.model_config)
            plain.load_state_dict(state, assign=True)
            plain.reset_rotary()
            save_model(plain, target, dtype=self.cfg.run.export_dtype, tokenizer_dir=self.tokenizer_dir,
                       max_shard_size=self.cfg.run.export_shard_size)
        if self.world > 1:
            dist.barrier()
        return target


@torch.no_grad()
def greedy(model: nn.Module, prompts: list[list[int]], max_new: int, stop: set[int],
           device: torch.device) -> list[list[int]]:
    """Greedy continuations of left-padded prompts, recomputing the whole sequence each step (no cache: it
    works unchanged on a sharded model; evaluation prompts are short). Every process runs the same steps.

    In fp32 whatever the training autocast: the explicit-mask attention path keeps its scores in fp32 by design
    (under bf16 autocast they became bf16, and masking with the fp32 minimum overflowed on CUDA)."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new):
        seqs = [p + o for p, o in zip(prompts, out)]
        T = max(map(len, seqs))
        tokens = torch.tensor([[0] * (T - len(s)) + s for s in seqs], device=device)  # (B, T), left-padded
        pos = torch.tensor([[-1] * (T - len(s)) + list(range(len(s))) for s in seqs], device=device)
        with torch.autocast(device.type, enabled=False):
            logits = model(tokens, input_pos=pos, last_only=True)  # (B, 1, V)
        for b, t in enumerate(logits[:, -1].argmax(-1).tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop
        if all(done):
            break
    return out


# --- the run ---------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training to ``optim.max_steps``; returns the exported model directory."""
    t = Trainer(cfg)
    run, o = cfg.run, cfg.optim
    metrics = t.out / "metrics.jsonl"
    if t.rank == 0:
        t.out.mkdir(parents=True, exist_ok=True)
        (t.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    resumed = t.resume()
    if t.rank == 0:
        truncate_metrics(metrics, t.step) if resumed else metrics.unlink(missing_ok=True)
    writer = None
    if t.rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(t.out / "tensorboard"))
        except ImportError:
            pass
    # PaLM's count: 6 flops per non-embedding parameter and token, plus attention's scores and mixing.
    flops_per_token = 6 * t.n_matmul \
        + 12 * t.model_config.n_layers * t.model_config.n_kv_heads * t.model_config.head_dim * cfg.data.seq_len
    peak = peak_flops(run, t.device)
    t.log(f"training {t.n_params / 1e6:.1f}M parameters on {t.world} x {t.device.type} ({t.dtype}), "
          f"{o.batch_size} x {cfg.data.seq_len} tokens per step, steps {t.step} -> {o.max_steps}")
    def evaluate() -> None:
        ev = t.evaluate()
        t.log(f"step {t.step:>6} | val loss {ev['val_loss']:.4f} | infill exact match "
              f"{ev['infill_exact']:.1%} of {ev['infill_n']}")
        if t.rank == 0:
            append_jsonl(metrics, ev)
            if writer:
                writer.add_scalar("val/loss", ev["val_loss"], t.step)
                writer.add_scalar("val/infill_exact", ev["infill_exact"], t.step)

    if run.eval_every and t.step == 0:
        evaluate()  # the baseline the run is measured against
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
            evaluate()
        if t.rank == 0:
            append_jsonl(metrics, record)
            if writer:
                for key in ("loss", "lr", "grad_norm"):
                    writer.add_scalar(f"train/{key}", record[key], t.step)
        if t.step % run.checkpoint_every == 0 or t.step == o.max_steps:
            t.save_checkpoint()
    t.stream.close()
    target = t.export()
    if t.rank == 0 and metrics.is_file():
        if plot_losses(metrics, t.out / "loss.png"):
            t.log(f"loss curve: {t.out / 'loss.png'}")
        t.log(f"exported {target}")
    if writer:
        writer.close()
    if t.world > 1:
        dist.destroy_process_group()
    return target


# --- command line ------------------------------------------------------------------------------------------------


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or YAML file with sections model, data, objective, optim, run")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=1e-3 run.out_dir=x")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune with causal LM + span corruption",
                       description="Train or fine-tune a CodeGen2-family model; rerun to resume.")
    _arguments(p)


def run(args: argparse.Namespace) -> None:
    train(load_config(args.config, args.overrides))


def main(argv: list[str] | None = None) -> None:
    """``python -m codegen2.train`` / ``torchrun ... -m codegen2.train``: the same as ``codegen2 train``."""
    p = argparse.ArgumentParser(prog="codegen2.train")
    _arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

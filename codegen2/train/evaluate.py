"""Evaluation during training: validation loss on fixed held-out rows, and exact match of single-line infills
in held-out files (greedy, in the model's infill format). Every process runs the same steps; results are
reduced over processes. What this is not: the benchmark harness (``codegen2 eval``, eval/)."""

from __future__ import annotations

import contextlib
import random
from typing import TYPE_CHECKING

import torch
from torch import nn

from codegen2.infill import infill_prompt, split_middles
from codegen2.train.objective import RowStream

if TYPE_CHECKING:
    from codegen2.train.loop import Trainer


@torch.no_grad()
def evaluate(t: Trainer) -> dict:
    """{"step", "val_loss", "infill_exact", "infill_n"} for the trainer's model now."""
    # Eager, even when the blocks are compiled for training: evaluation is a small share of the time, and
    # greedy decoding's growing shapes and explicit masks would mean recompiles (and, under bf16 autocast,
    # an inductor constant-folding failure seen on an H100 with torch 2.11).
    eager = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6 (older: evaluated compiled)
    with eager("force_eager") if eager and t.cfg.run.compile else contextlib.nullcontext():
        if t.val_rows is None:  # the first eval_rows rows of the validation stream, fixed for the run
            stream = RowStream(t.val_corpus, t.tokenizer, t.cfg.objective, t.cfg.data.seq_len, t.cfg.run.seed)
            t.val_rows = stream.next_rows(t.cfg.run.eval_rows)
        rows, valid = t.val_rows
        mine = slice(t.rank, None, t.world)
        loss_sum, count = t.loss_sums(rows[mine], valid[mine], backward_scale=None)
        loss_sum, count = t.all_reduce(loss_sum, count)
        exact, n = infill_exact_match(t)
    return {"step": t.step, "val_loss": loss_sum / max(count, 1), "infill_exact": exact, "infill_n": n}


def infill_examples(t: Trainer) -> list[tuple[str, str, str]]:
    """Single-line holes (prefix, line, suffix) in held-out files: one non-blank line per file, the window
    around it cut to whole lines so the prompt plus 64 new tokens fits the context."""
    examples = []
    budget = t.cfg.data.seq_len - 64
    for i in range(min(len(t.val_corpus), t.cfg.run.infill_examples)):
        lines = t.val_corpus.text(i).splitlines(keepends=True)
        candidates = [j for j, line in enumerate(lines) if line.strip() and line.endswith("\n")]
        if not candidates:
            continue
        j = random.Random(f"infill:{i}").choice(candidates)
        before, after = lines[max(0, j - 40):j], lines[j + 1:j + 41]
        while before or after:
            prefix, suffix = "".join(before), "\n" + "".join(after)
            if len(infill_prompt(t.tokenizer, prefix, suffix)) <= budget:
                break
            before, after = before[1:], after[:-1]
        examples.append((prefix, lines[j][:-1], suffix))
    return examples


@torch.no_grad()
def infill_exact_match(t: Trainer, max_new: int = 48) -> tuple[float, int]:
    """The share of held-out single-line holes the model fills exactly, and their number."""
    examples = infill_examples(t)
    if not examples:
        return 0.0, 0
    prompts = [infill_prompt(t.tokenizer, p, s) for p, _, s in examples]
    generated = greedy(t.model, prompts, max_new, {t.tokenizer.eom_id, t.tokenizer.eos_id}, t.device)
    hits = 0
    for (_, line, _), ids in zip(examples, generated):
        middles, closed = split_middles(t.tokenizer, ids)
        hits += closed and t.tokenizer.decode(middles[0]) == line
    return hits / len(examples), len(examples)


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


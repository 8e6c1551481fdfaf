"""A small, correct generation loop for one prompt: KV cache, sampling, stop tokens and strings, streaming.

It is the reference the batched engine is checked against and what the CLI uses until the engine replaces it;
it is deliberately plain: one sequence, one static cache, one token per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from dataclasses import dataclass

import torch
from torch import nn

from codegen2.engine.kv_cache import KVCache
from codegen2.engine.sampling import SamplingParams, sample

if TYPE_CHECKING:
    from codegen2.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str  # the generated text, without a matched stop string or stop token
    token_ids: list[int]  # generated ids, without a matched stop token
    finish_reason: str  # "stop" (stop token or string), "length" (max_tokens or the context is full)


class StopStrings:
    """Finds stop strings across token boundaries and holds back text that might still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.text = ""
        self.emitted = 0

    def feed(self, chunk: str) -> tuple[str, bool]:
        """Add decoded text; return (text that is safe to emit now, whether a stop string was found)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += chunk
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = len(self.text) - self._held_back(), False
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        if stopped:
            self.text = self.text[:end]
        return out, stopped

    def _held_back(self) -> int:
        # The longest tail of the text that is a proper prefix of some stop string.
        for n in range(min(len(self.text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def rest(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
             on_text: Callable[[str], None] | None = None,
             done: Callable[[list[int]], bool] | None = None) -> Completion:
    """Generate from ``prompt_ids``. ``on_text`` receives text as it becomes final (UTF-8 and stop safe).

    Generation ends at a stop token (``params.stop_token_ids``, plus <|endoftext|> unless ``ignore_eos``), a stop
    string, ``max_tokens``, the end of the model's context, or when ``done(generated_ids)`` says so.
    """
    cfg = model.config
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt_ids) >= cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {cfg.max_seq_len}, "
                         "which leaves no room to generate")
    device = model.tok_embeddings.weight.device
    total = min(cfg.max_seq_len, len(prompt_ids) + params.max_tokens)
    cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, total, cfg.head_dim, model.tok_embeddings.weight.dtype, device)
    stop_tokens = set(params.stop_token_ids) | (set() if params.ignore_eos else {tokenizer.eos_id})
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    decoder, stops = tokenizer.incremental_decoder(), StopStrings(params.stop)
    emit = on_text or (lambda _: None)

    tokens = torch.tensor([list(prompt_ids)], device=device)
    pos = torch.arange(len(prompt_ids), device=device)[None]
    generated: list[int] = []
    finish, string_hit = "length", False
    while len(prompt_ids) + len(generated) < total:
        logits = model(tokens, pos, cache, last_only=True)[:, -1]  # (1, V)
        tok = int(sample(logits, params, generator)[0])
        if tok in stop_tokens:
            finish = "stop"
            break
        generated.append(tok)
        text, string_hit = stops.feed(decoder.push(tok))
        emit(text)
        if string_hit or (done is not None and done(generated)):
            finish = "stop"
            break
        tokens = torch.tensor([[tok]], device=device)
        pos = pos[:, -1:] + 1
    if not string_hit:  # release what the UTF-8 decoder and the stop-string check still hold
        text, string_hit = stops.feed(decoder.flush())
        emit(text if string_hit else text + stops.rest())
        finish = "stop" if string_hit else finish
    return Completion(text=stops.text, token_ids=generated, finish_reason=finish)

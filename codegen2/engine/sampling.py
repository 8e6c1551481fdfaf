"""SamplingParams, validated once, and the pure functions that turn one row of logits into a token.

One ``SamplingParams`` is shared by the CLI, the server and evaluation, so a bad value gets the same clear error
wherever it comes from. The order of operations on the logits follows vLLM / transformers:
repetition penalty (prompt + output tokens) -> presence / frequency penalties (output tokens) -> temperature ->
top-k -> top-p -> min-p -> sample. ``logprobs`` report the model's own distribution (log-softmax of the raw
logits), not the filtered one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 (or below 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of tokens already generated
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    stop_token_ids: list[int] = field(default_factory=list)  # ... or at (and without) one of these tokens
    n: int = 1  # independent completions of the prompt
    seed: int | None = None
    logprobs: int | None = None  # report the top-N log-probabilities of each generated token
    ignore_eos: bool = False  # keep going past <|endoftext|>

    MAX_N = 64
    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            (_int(self.max_tokens) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (_num(self.temperature) and self.temperature >= 0, f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}"),
            (_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}"),
            (_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}"),
            (_num(self.repetition_penalty) and self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty!r}"),
            (_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty strings, got {self.stop!r}"),
            (all(_int(i) and i >= 0 for i in self.stop_token_ids), f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}"),
            (_int(self.n) and 1 <= self.n <= self.MAX_N, f"n must be an integer in [1, {self.MAX_N}], got {self.n!r}"),
            (self.seed is None or (_int(self.seed) and 0 <= self.seed < 2**63 - self.MAX_N),
             f"seed must be an integer in [0, 2**63 - {self.MAX_N}), got {self.seed!r}"),
            (self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= self.MAX_LOGPROBS),
             f"logprobs must be an integer in [0, {self.MAX_LOGPROBS}], got {self.logprobs!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        # Below 1e-5 dividing the logits by the temperature can overflow to inf and NaN; such a temperature
        # is greedy in all but name (vLLM's rule).
        return self.temperature < 1e-5


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # rejects NaN


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int],
                    output: Sequence[int]) -> torch.Tensor:
    """(V,) fp32 logits -> penalised copy. Repetition: logit / p if positive else * p, over prompt + output
    tokens (transformers' rule); presence / frequency: minus p * [count > 0] / p * count, over output tokens
    (OpenAI's rule)."""
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), device=logits.device)
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1]).float()
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) fp32 logits -> temperature-scaled logits with tokens outside top-k / top-p / min-p at -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop_sorted[..., 0] = False  # even a top_p that rounds to 0 in fp32 keeps the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) fp32 logits (already penalised) -> (B,) token ids."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def top_logprobs(logits: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """(V,) raw logits -> (log-prob of ``token``, the top ``n`` (id, log-prob) pairs, best first)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, n) if n else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logp[token]), pairs

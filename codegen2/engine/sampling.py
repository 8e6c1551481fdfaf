"""SamplingParams, validated once, and the functions that turn a batch of logits into tokens.

One ``SamplingParams`` is shared by the CLI, the server and evaluation, so a bad value gets the same clear error
(an ``InvalidRequest`` naming the parameter) wherever it comes from. The order of operations on the logits follows
vLLM / transformers: repetition penalty (prompt + output tokens) -> presence / frequency penalties (output tokens)
-> temperature -> top-k -> top-p -> min-p -> sample. ``logprobs`` report the model's own distribution
(log-softmax of the raw logits), not the filtered one.

``sample_batch`` is the one place the engine samples: every row of a step at once, each with its own parameters
and random generator, and one transfer of the results to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from codegen2.engine.errors import InvalidRequest


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
        n_max, lp_max = self.MAX_N, self.MAX_LOGPROBS
        checks = [  # (the parameter, whether its value is valid, what it must be)
            ("max_tokens", _int(self.max_tokens) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            ("temperature", _num(self.temperature) and self.temperature >= 0,
             "temperature must be >= 0 (0 means greedy)"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            ("top_k", _int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            ("min_p", _num(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            ("repetition_penalty", _num(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty must be > 0"),
            ("presence_penalty", _num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "presence_penalty must be in [-2, 2]"),
            ("frequency_penalty", _num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "frequency_penalty must be in [-2, 2]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            ("stop_token_ids", all(_int(i) and i >= 0 for i in self.stop_token_ids),
             "stop_token_ids must be token ids >= 0"),
            ("n", _int(self.n) and 1 <= self.n <= n_max, f"n must be an integer in [1, {n_max}]"),
            ("seed", self.seed is None or (_int(self.seed) and 0 <= self.seed < 2**63 - n_max),
             f"seed must be an integer in [0, 2**63 - {n_max})"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= lp_max),
             f"logprobs must be an integer in [0, {lp_max}]"),
        ]
        for param, ok, rule in checks:
            if not ok:
                raise InvalidRequest(f"{rule}, got {getattr(self, param)!r}", param)

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
    """(B, V) fp32 logits (already penalised) -> (B,) token ids, every row with the same parameters.

    Sampling draws the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) independent picks token i with
    probability p_i (as vLLM does), so a row needs only device-side work, no multinomial call per row."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-30)  # 0 would give 0 / 0
    return (probs / race).argmax(dim=-1)


@dataclass
class Sampled:
    token: int
    logprob: float | None = None  # the token's log-probability under the model, when logprobs were asked for
    top: list[tuple[int, float]] | None = None  # the top-N (id, log-prob) pairs, best first


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None], histories: Sequence[tuple[Sequence[int], Sequence[int]]]
                 ) -> list[Sampled]:
    """One token per row of (B, V) fp32 logits: row b with params[b], generators[b] and its (prompt, output) token
    history for the penalties; log-probabilities where params[b].logprobs is set. One host transfer in all."""
    B = logits.shape[0]
    chosen = torch.stack([sample(apply_penalties(logits[b], params[b], *histories[b])[None], params[b],
                                 generators[b])[0] for b in range(B)])  # (B,)
    want = [b for b in range(B) if params[b].logprobs is not None]
    packed = [chosen.double()]
    if want:
        n = max(params[b].logprobs for b in want)
        logp = torch.log_softmax(logits[want].float(), dim=-1)  # (W, V)
        packed.append(logp.gather(1, chosen[want][:, None])[:, 0].double())  # (W,)
        if n:
            top = torch.topk(logp, n, dim=-1)
            packed += [top.indices.double().flatten(), top.values.double().flatten()]  # ids < 2**24: exact
    flat = torch.cat(packed).tolist()  # the one transfer
    out = [Sampled(int(t)) for t in flat[:B]]
    if want:
        picked, rest = flat[B:B + len(want)], flat[B + len(want):]
        for w, b in enumerate(want):
            k = params[b].logprobs
            ids, vals = rest[w * n:w * n + k], rest[len(want) * n + w * n:len(want) * n + w * n + k]
            out[b].logprob, out[b].top = picked[w], [(int(i), v) for i, v in zip(ids, vals)]
    return out

"""SamplingParams, validated once, and the functions that turn a batch of logits into tokens.

One ``SamplingParams`` is shared by the CLI, the server and evaluation, so a bad value gets the same clear error
(an ``InvalidRequest`` naming the parameter) wherever it comes from. By default the stages run in vLLM's /
transformers' order: penalties (repetition over prompt + output, presence / frequency over the output) ->
temperature -> top-k -> top-p -> min-p -> the draw. ``samplers`` names another order, or a subset, as llama.cpp's
sampler chain does (a stage not listed does not run; llama.cpp's own default puts temperature last), and adds
llama.cpp's ``infill`` stage. ``logprobs`` report the model's own distribution (log-softmax of the raw logits),
not the filtered one.

``sample_batch`` is the one place the engine samples: every row of a step, each with its own parameters and random
generator, and one transfer of the results to the host. Each row's stages shrink it to its candidate tokens
early (top-k to k tokens, top-p to the tokens it keeps, found without sorting the vocabulary), so the later
stages and the draw work on a few dozen values instead of 51,200: under 1 ms per row for the usual settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from codegen2.engine.errors import InvalidRequest

STAGES = ("penalties", "temperature", "top_k", "top_p", "min_p", "infill")
DEFAULT_ORDER = ("penalties", "temperature", "top_k", "top_p", "min_p")  # vLLM's and transformers' order


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
    samplers: list[str] | None = None  # the stages in order (a subset of STAGES); None = DEFAULT_ORDER
    min_indent: int = 0  # after the first generated line, stop at a line indented less than this (llama.cpp's n_indent)

    MAX_N = 64
    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.samplers is not None:
            self.samplers = list(self.samplers)
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
            ("samplers", self.samplers is None or (all(x in STAGES for x in self.samplers)
                                                   and len(set(self.samplers)) == len(self.samplers)),
             f"samplers must list each of {', '.join(STAGES)} at most once"),
            ("min_indent", _int(self.min_indent) and self.min_indent >= 0, "min_indent must be an integer >= 0"),
        ]
        for param, ok, rule in checks:
            if not ok:
                raise InvalidRequest(f"{rule}, got {getattr(self, param)!r}", param)

    @property
    def order(self) -> tuple[str, ...]:
        return DEFAULT_ORDER if self.samplers is None else tuple(self.samplers)

    @property
    def greedy(self) -> bool:
        # Below 1e-5 dividing the logits by the temperature can overflow to inf and NaN; such a temperature
        # is greedy in all but name (vLLM's rule). Without a temperature stage nothing is scaled (llama.cpp).
        return self.temperature < 1e-5 and "temperature" in self.order


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # rejects NaN


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int],
                    output: Sequence[int], ids: torch.Tensor | None = None) -> torch.Tensor:
    """Penalised copy of logits (V,), or of the candidates ``ids`` (n,) when the logits are theirs (n,).
    Repetition: logit / p if positive else * p, over prompt + output tokens (transformers' rule);
    presence / frequency: minus p * [count > 0] / p * count, over output tokens (OpenAI's rule)."""
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), device=logits.device)
        p, logits = params.repetition_penalty, logits.clone()
        if ids is None:
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p, vals * p)
        else:
            hit = torch.isin(ids, seen)
            logits = torch.where(hit, torch.where(logits > 0, logits / p, logits * p), logits)
    if (params.presence_penalty or params.frequency_penalty) and output:
        size = len(logits) if ids is None else int(ids.max()) + 1
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=size).float()
        counts = counts[:len(logits)] if ids is None else counts[ids]
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


_NEG_INF = float("-inf")
_TOP_P_HEAD, _TOP_P_BINS = 256, 2048  # tokens tried first, and log-probability bins, of _top_p_keep
_INFILL_MAX = 128  # candidates the infill stage compares pairwise, at most


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never chosen), +inf -> the largest float (the most likely, not NaN after softmax): extreme
    parameters (a repetition penalty of 1e-320) or a broken model row cannot turn a draw into NaN."""
    return torch.nan_to_num(logits, nan=_NEG_INF, posinf=torch.finfo(logits.dtype).max)


def _top_p_keep(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool (n,) of one row's fp64 probabilities: the tokens kept by top_p, the same set as sorting all of them and
    keeping each token whose predecessors hold less than top_p, without a full sort.

    Usually the 256 most likely tokens (topk) hold top_p, and then every kept token. Otherwise tokens go into
    2,048 bins of equal width in log-probability (a monotone map, so a higher bin never holds a less likely
    token), and one pass of cumulative bin masses finds the bin b where the mass reaches top_p: every token above
    b is kept (less than top_p precedes it), every token below b dropped (at least top_p precedes it), and only
    b's own tokens (a few dozen typically) are sorted to place the cut exactly. A full sort of 51,200 values takes
    5 ms on one core here, 30 ms when another process competes for the second."""
    top = float(p.max())
    if not top == top:  # no finite logit: nothing to filter (the draw falls back to the argmax)
        return torch.ones_like(p, dtype=torch.bool)
    if top >= top_p:  # the most likely token alone holds top_p: it is all that is kept
        return torch.zeros_like(p, dtype=torch.bool).index_fill_(0, p.argmax(), True)
    vals, order = torch.topk(p, min(_TOP_P_HEAD, p.shape[0]))  # sorted, most likely first
    if float(vals.sum()) >= top_p:  # the usual case: the head holds the mass, so it holds every kept token
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order[(torch.cumsum(vals, 0) - vals) < top_p]] = True
        return keep
    logp = torch.log(p.float())  # -inf for filtered tokens; fp32 is enough to order tokens into bins
    low = float(torch.where(logp > _NEG_INF, logp, 0.0).min())
    scale = (_TOP_P_BINS - 1) / max(float(logp.max()) - low, 1e-30)
    bins = ((logp - low) * scale).clamp_(min=-1).floor_().long() + 1  # 0: probability 0; 1..BINS: by size
    mass = torch.bincount(bins, weights=p, minlength=_TOP_P_BINS + 1)  # (BINS + 1,)
    above = torch.cumsum(mass.flip(0), 0).flip(0) - mass  # mass in the bins above each bin
    b = int(torch.nonzero(above + mass >= top_p)[-1])  # the highest bin where the mass reaches top_p
    keep = bins > b
    idx = torch.nonzero(bins == b).squeeze(-1)
    vals, order = torch.sort(p[idx], descending=True)
    before = float(above[b]) + torch.cumsum(vals, 0) - vals  # mass ranked before each of b's tokens
    keep[idx[order[before < top_p]]] = True
    return keep


@dataclass(frozen=True)
class InfillVocab:
    """What llama.cpp's infill stage needs of a tokenizer: each token's bytes, the tokens that end a middle
    (EOG: <eom>, <|endoftext|>) and the one it falls back to (<eom>)."""
    pieces: list[bytes]
    eog: frozenset[int]
    end: int

    @classmethod
    def of(cls, tokenizer) -> InfillVocab:
        return cls([tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)],
                   frozenset({tokenizer.eom_id, tokenizer.eos_id}), tokenizer.eom_id)


def _infill(ids: torch.Tensor, vals: torch.Tensor, vocab: InfillVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's infill sampler on candidates (ids, logits), most likely first: end the middle when the
    end-of-generation tokens hold more than 1 / (3n) of the text tokens' mass; else merge each token that is a
    byte prefix of another into the more likely of the two, drop text tokens under 0.2 then under
    1 / (texts left + 1) of the renormalised mass, and keep the survivors' logits for the draw. Only the 128 most
    likely candidates are compared pairwise (llama.cpp compares all; after its usual top_k there are 40)."""
    order = torch.argsort(vals, descending=True)[:_INFILL_MAX]
    ids, vals = ids[order], vals[order]
    p = torch.softmax(vals, 0, dtype=torch.float64).tolist()
    tok = ids.tolist()
    eog = [t in vocab.eog for t in tok]
    p_eog = sum(q for q, e in zip(p, eog) if e)
    if 3 * p_eog * len(tok) > sum(q for q, e in zip(p, eog) if not e):
        keep = [i for i, e in enumerate(eog) if e]
        return ids[keep], vals[keep]
    alive = [True] * len(tok)
    for i0 in range(len(tok)):  # the reference's order: a merged token's mass counts in later comparisons
        for i1 in range(len(tok)):
            if not alive[i0]:
                break
            if i0 == i1 or not alive[i1]:
                continue
            a, b = vocab.pieces[tok[i0]], vocab.pieces[tok[i1]]
            if a and len(a) <= len(b) and b.startswith(a):
                dst, src = (i1, i0) if p[i1] > p[i0] else (i0, i1)
                p[dst] += p[src]
                p[src], alive[src] = 0.0, False
    keep = [i for i in range(len(tok)) if alive[i] and (eog[i] or p[i] >= 0.2)]
    texts = sum(not eog[i] for i in keep)
    if texts == 0:  # nothing but the end is likely enough: end the middle
        return torch.tensor([vocab.end], device=ids.device), vals.new_ones(1)
    total = sum(p[i] for i in keep)
    keep = [i for i in keep if eog[i] or p[i] / total >= 1.0 / (texts + 1)]
    return ids[keep], vals[keep]


def _candidates(logits: torch.Tensor, params: SamplingParams, history: tuple[Sequence[int], Sequence[int]],
                vocab: InfillVocab | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One row's stages in params.order: (candidate ids or None for the whole vocabulary, their logits)."""
    ids, vals = None, _finite(logits)

    def keep(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        where = torch.nonzero(mask).squeeze(-1)
        return (where if ids is None else ids[where]), vals[where]

    for stage in params.order:
        if stage == "penalties":
            vals = _finite(apply_penalties(vals, params, *history, ids=ids))
        elif stage == "temperature":
            if params.temperature < 1e-5:  # greedy: only the most likely candidate stays
                j = vals.argmax().reshape(1)
                ids, vals = (j if ids is None else ids[j]), vals[j]
            else:
                vals = vals / params.temperature
        elif stage == "top_k" and 0 < params.top_k < len(vals):
            kth = torch.topk(vals, params.top_k).values[-1]
            ids, vals = keep(vals >= kth)  # ties with the k-th are kept, as a threshold keeps them
        elif stage == "top_p" and params.top_p < 1.0:
            ids, vals = keep(_top_p_keep(torch.softmax(vals, 0, dtype=torch.float64), params.top_p))
        elif stage == "min_p" and params.min_p > 0:
            probs = torch.softmax(vals, 0)
            ids, vals = keep(probs >= params.min_p * probs.max())
        elif stage == "infill":
            if vocab is None:
                raise ValueError("the infill sampler needs the tokenizer's InfillVocab")
            ids, vals = _infill(torch.arange(len(vals), device=vals.device) if ids is None else ids, vals, vocab)
    return ids, vals


def _draw(ids: torch.Tensor | None, vals: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token from the candidates: the cumulative distribution inverted at one uniform number, in fp64 (so a
    1e-9 probability keeps its share; 0.2 ms for 51,200 values against 1.7-19 ms for torch.multinomial here).
    Candidates with no finite probability fall back to the most likely."""
    if len(vals) == 1:  # greedy, or a stage left one candidate
        return ids[0] if ids is not None else torch.zeros((), dtype=torch.long, device=vals.device)
    probs = torch.softmax(vals, 0, dtype=torch.float64)
    cdf = torch.cumsum(probs, 0)
    u = torch.rand(1, generator=generator, device=vals.device, dtype=torch.float64)
    j = torch.searchsorted(cdf, u * cdf[-1:], right=True).clamp_(max=len(vals) - 1)[0]
    j = torch.where(torch.isfinite(cdf[-1]) & (cdf[-1] > 0), j, vals.argmax())
    return j if ids is None else ids[j]


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) fp32 logits -> each row's stages applied, tokens that did not survive at -inf (penalties without
    a history do nothing). What the draw samples from, as a whole row."""
    out = torch.full_like(logits, _NEG_INF)
    for b in range(logits.shape[0]):
        ids, vals = _candidates(logits[b], params, ((), ()), None)
        out[b, slice(None) if ids is None else ids] = vals
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) fp32 logits (already penalised) -> (B,) token ids, every row with the same parameters."""
    return torch.stack([_draw(*_candidates(row, params, ((), ()), None), generator) for row in logits])


@contextlib.contextmanager
def _one_thread():
    """Sampling on one CPU thread. A row is 51,200 values, enough for torch to split an op over two threads,
    which then wait for each other: with another process busy on the second core a division took 0.54 ms
    instead of 0.017 ms on one thread, a sort 30 ms instead of 5. Switching costs ~5 us."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Sampled:
    token: int
    logprob: float | None = None  # the token's log-probability under the model, when logprobs were asked for
    top: list[tuple[int, float]] | None = None  # the top-N (id, log-prob) pairs, best first


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None], histories: Sequence[tuple[Sequence[int], Sequence[int]]],
                 vocab: InfillVocab | None = None) -> list[Sampled]:
    """One token per row of (B, V) fp32 logits: row b with params[b], generators[b] and its (prompt, output) token
    history for the penalties; log-probabilities where params[b].logprobs is set. One host transfer in all."""
    with _one_thread() if logits.device.type == "cpu" else contextlib.nullcontext():
        chosen = torch.stack([_draw(*_candidates(logits[b], params[b], histories[b], vocab), generators[b])
                              for b in range(logits.shape[0])])  # (B,)
        return _with_logprobs(logits, params, chosen)


def _with_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams], chosen: torch.Tensor) -> list[Sampled]:
    B = logits.shape[0]
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


# --- speculative decoding: the rejection rule --------------------------------------------------------------------

Draft = tuple[torch.Tensor, torch.Tensor]  # a draft model's distribution for one token: (candidate ids, probs)


def draft_distribution(logits: torch.Tensor, params: SamplingParams, history: tuple[Sequence[int], Sequence[int]],
                       vocab: InfillVocab | None, generator: torch.Generator | None) -> tuple[int, Draft]:
    """A draft model's proposal for one position: a token drawn from its logits (V,) by the request's own
    stages, and the distribution it was drawn from (what the rejection rule needs as q)."""
    ids, vals = _candidates(logits, params, history, vocab)
    ids = torch.arange(len(vals), device=vals.device) if ids is None else ids
    return int(_draw(ids, vals, generator)), (ids, torch.softmax(vals, 0, dtype=torch.float64))


def _prob_of(ids: torch.Tensor, probs: torch.Tensor, token: int) -> float:
    hit = torch.nonzero(ids == token)
    return float(probs[hit[0, 0]]) if len(hit) else 0.0


def verify_row(logits: torch.Tensor, drafts: Sequence[int], qs: Sequence[Draft] | None, params: SamplingParams,
               history: tuple[Sequence[int], Sequence[int]], generator: torch.Generator | None,
               vocab: InfillVocab | None = None) -> list[int]:
    """The tokens one sequence keeps from a speculative step: the accepted drafts, then one token of the target's.

    logits (len(drafts) + 1, V): the target's at the last kept token and at each draft; position j's distribution
    p_j comes from the request's stages with the drafts before j in the history (penalties see them). Draft j is
    kept with probability min(1, p_j(d) / q_j(d)), q_j its proposer's distribution (a lookup proposes with
    certainty: q_j(d) = 1); at the first rejection the token is drawn from max(p_j - q_j, 0) renormalised, and
    after k acceptances from p_k. This keeps the target's distribution exactly (Leviathan et al., 2023; Chen et
    al., 2023); under greedy decoding p_j is one-hot, so a draft is kept exactly when it is the target's argmax."""
    prompt, output = history
    out, kept = list(output), []
    for j in range(len(drafts) + 1):
        ids, vals = _candidates(logits[j], params, (prompt, out), vocab)
        if j == len(drafts):
            kept.append(int(_draw(ids, vals, generator)))
            break
        ids = torch.arange(len(vals), device=vals.device) if ids is None else ids
        p = torch.softmax(vals, 0, dtype=torch.float64)
        d, p_d = drafts[j], _prob_of(ids, p, drafts[j])
        q_d = 1.0 if qs is None else _prob_of(*qs[j], d)
        accept = p_d >= q_d or (p_d > 0 and float(torch.rand(1, generator=generator, dtype=torch.float64,
                                                               device=vals.device)) * q_d < p_d)
        if accept:
            kept.append(d)
            out.append(d)
            continue
        # The residual max(p - q, 0) over the union of both candidate sets, dense over the vocabulary.
        dense = torch.zeros(logits.shape[-1], dtype=torch.float64, device=vals.device).index_add_(0, ids, p)
        if qs is None:
            dense[d] = 0.0
        else:
            dense.index_add_(0, qs[j][0], -qs[j][1]).clamp_(min=0.0)
        if not float(dense.sum()) > 0:  # p == q: nothing left to correct with, p itself
            dense = torch.zeros_like(dense).index_add_(0, ids, p)
        support = torch.nonzero(dense).squeeze(-1)
        kept.append(int(_draw(support, torch.log(dense[support]).float(), generator)))
        break
    return kept


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], n: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """(log-probability, top-n pairs) of each token under its row of logits (T, V): the model's own distribution."""
    logp = torch.log_softmax(logits[:len(tokens)].float(), dim=-1)
    picked = logp.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if not n:
        return [(x, []) for x in picked]
    top = torch.topk(logp, n, dim=-1)
    return [(x, list(zip(i, v))) for x, i, v in zip(picked, top.indices.tolist(), top.values.tolist())]

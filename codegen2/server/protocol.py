"""The server's wire formats: OpenAI's (legacy) completions API and llama.cpp's /completion and /infill.

What this is: pydantic request schemas (names, types, defaults as the originals document them), their mapping
to the one ``SamplingParams``, and builders for the response JSON in each API's exact shape.
What this is not: value checks (``SamplingParams`` makes those, with the same messages as the CLI; an error is
reported under the name the client's API gives the field), prompt building (``engine/prompt.py``), or anything
that touches the engine or HTTP (serving.py, app.py).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

from pydantic import BaseModel, ConfigDict

from codegen2.engine.engine import CompletionOutput, TokenLogprob
from codegen2.engine.errors import InvalidRequest
from codegen2.engine.sampling import SamplingParams
from codegen2.tokenizer import Tokenizer


class _OpenAI(BaseModel):
    # OpenAI rejects unknown arguments and wrong types ("16" for an integer, true for a number); so do we.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_OpenAI):
    include_usage: bool = False


class CompletionRequest(_OpenAI):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None  # makes the request an infill: the completion goes between prompt and suffix
    max_tokens: int | None = 16  # OpenAI's default; null means "up to the context"
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    logprobs: int | None = None
    echo: bool | None = False
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None  # accepted when equal to n: we return every completion we sample
    logit_bias: dict[str, float] | None = None  # accepted only empty
    user: str | None = None
    # Extensions, with vLLM's names, and llama.cpp's editor time budget (see app.py).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    t_max_predict_ms: int | None = None

    def sampling_params(self, max_seq_len: int) -> SamplingParams:
        """Raises InvalidRequest naming the bad field."""
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise InvalidRequest(f"best_of must equal n (ranking completions is not supported), got {self.best_of}",
                                 "best_of")
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported", "logit_bias")
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("logprobs with echo is not supported: prompt tokens have no log-probabilities here",
                                 "logprobs")
        given = dict(temperature=self.temperature, top_p=self.top_p, n=self.n, stop=self.stop, seed=self.seed,
                     logprobs=self.logprobs, presence_penalty=self.presence_penalty, top_k=self.top_k,
                     frequency_penalty=self.frequency_penalty, min_p=self.min_p,
                     repetition_penalty=self.repetition_penalty)
        given = {k: v for k, v in given.items() if v is not None}
        return _build(lambda: SamplingParams(**{"temperature": 1.0, **given},  # OpenAI's default temperature is 1
                                             max_tokens=max_seq_len if self.max_tokens is None else self.max_tokens),
                      {})


class _Llama(BaseModel):
    # llama.cpp ignores fields it does not know, and editors send many (cache_prompt, samplers, n_indent, ...).
    model_config = ConfigDict(extra="ignore", strict=True)


class ExtraChunk(_Llama):
    filename: str = ""
    text: str = ""


# llama.cpp's sampler names -> our stages. Its dry, top_n_sigma, typ_p and xtc samplers do nothing at their
# defaults and this server takes none of their parameters, so in a chain they are skipped.
LLAMA_SAMPLERS = {"penalties": "penalties", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "temperature": "temperature", "infill": "infill", "dry": None, "top_n_sigma": None, "typ_p": None,
                  "xtc": None}
LLAMA_SAMPLER_CHARS = {"e": "penalties", "d": "dry", "k": "top_k", "y": "typ_p", "p": "top_p", "s": "top_n_sigma",
                       "m": "min_p", "x": "xtc", "t": "temperature", "i": "infill"}
LLAMA_DEFAULT_SAMPLERS = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]


class LlamaCompletionRequest(_Llama):
    prompt: str | list[int] = ""
    n_predict: int = -1  # -1: until a stop or the context is full; 0: only put the prompt in the cache
    temperature: float = 0.8  # llama.cpp's sampling defaults
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    samplers: list[str] | str | None = None  # the chain, in order (names, or llama.cpp's one-letter codes)
    stop: list[str] = []
    seed: int = -1  # -1: random
    n_cmpl: int | None = None  # completions of the prompt (llama.cpp also reads n)
    n: int | None = None
    n_indent: int = 0  # after the first generated line, stop at a line indented less than this
    n_probs: int = 0  # top-N log-probabilities of each generated token (completion_probabilities)
    ignore_eos: bool = False
    stream: bool = False
    return_tokens: bool = False  # fill "tokens" with the generated ids
    response_fields: list[str] | None = None  # only these fields of the result ("a/b" paths, flattened)
    t_max_predict_ms: int = 0  # 0: no time budget
    # Accepted as llama.cpp accepts them: t_max_prompt_ms is not implemented there either; this server always
    # reuses cached prompts (cache_prompt) and picks the cache slot sharing the longest prefix (id_slot).
    t_max_prompt_ms: int = -1
    cache_prompt: bool = True
    id_slot: int = -1

    def chain(self) -> list[str]:
        """The sampler chain in our stage names; InvalidRequest for an unknown sampler."""
        names = LLAMA_DEFAULT_SAMPLERS if self.samplers is None else self.samplers
        if isinstance(names, str):
            if bad := [c for c in names if c not in LLAMA_SAMPLER_CHARS]:
                raise InvalidRequest(f"unknown sampler code {bad[0]!r}; codes: {''.join(LLAMA_SAMPLER_CHARS)}",
                                     "samplers")
            names = [LLAMA_SAMPLER_CHARS[c] for c in names]
        if bad := [x for x in names if x not in LLAMA_SAMPLERS]:
            raise InvalidRequest(f"unknown sampler {bad[0]!r}; samplers: {', '.join(LLAMA_SAMPLERS)}", "samplers")
        return list(dict.fromkeys(LLAMA_SAMPLERS[x] for x in names if LLAMA_SAMPLERS[x]))  # once each, in order

    def sampling_params(self, max_seq_len: int) -> SamplingParams:
        """Raises InvalidRequest naming the bad field by llama.cpp's name for it. n_predict 0 makes a one-token
        params (the request is prefill-only, see serving.py)."""
        n = self.n_cmpl if self.n_cmpl is not None else self.n if self.n is not None else 1
        if self.n_probs < 0:
            raise InvalidRequest(f"n_probs must be >= 0, got {self.n_probs}", "n_probs")
        return _build(lambda: SamplingParams(
            max_tokens=max_seq_len if self.n_predict < 0 else max(self.n_predict, 1), temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, stop=self.stop,
            seed=None if self.seed < 0 else self.seed, n=n, min_indent=max(self.n_indent, 0),
            logprobs=self.n_probs or None, ignore_eos=self.ignore_eos, samplers=self.chain()),
            {**LLAMA_NAMES, "n": "n_cmpl" if self.n_cmpl is not None else "n"})

    def generation_settings(self, params: SamplingParams, n_ctx: int, model: str) -> dict:
        """llama.cpp's generation_settings: the values this request runs with (n_ctx as older llama.cpp had it,
        which llama.vscode reads)."""
        return {"n_ctx": n_ctx, "n_predict": self.n_predict, "model": model, "seed": self.seed,
                "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                "repeat_penalty": self.repeat_penalty, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "stop": params.stop, "max_tokens": params.max_tokens,
                "n_probs": self.n_probs, "ignore_eos": self.ignore_eos, "stream": self.stream,
                "n_indent": self.n_indent, "samplers": params.samplers, "n_cmpl": params.n}


def _build(make: Callable[[], SamplingParams], names: dict[str, str]) -> SamplingParams:
    """SamplingParams from a request, with an error's param renamed to the request's own field name, plus limits
    for values SamplingParams accepts but a shared server must not run."""
    try:
        params = make()
    except InvalidRequest as e:
        raise InvalidRequest(e.message, names.get(e.param, e.param), e.status, e.code) from None
    if len(params.stop) > 32 or any(len(s) > 1000 for s in params.stop):  # matching costs grow with both
        raise InvalidRequest("stop takes at most 32 strings of at most 1,000 characters each", "stop")
    # Tiny temperatures and top_p values are made safe by the sampler itself (engine/sampling.py).
    return params


# SamplingParams -> llama.cpp names, for errors
LLAMA_NAMES = {"max_tokens": "n_predict", "repetition_penalty": "repeat_penalty", "min_indent": "n_indent",
               "logprobs": "n_probs"}


class InfillRequest(LlamaCompletionRequest):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []  # other files' text, prepended to the prefix as context
    n_predict: int = 64  # small, for editors (llama.cpp: -1)


# --- responses -----------------------------------------------------------------------------------------------------

def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def openai_logprobs(tok: Tokenizer, lps: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's legacy logprobs object; ``offset`` is where the first token's text starts in the choice."""
    tokens = [tok.decode([t.token]) for t in lps]
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{tok.decode([i]): lp for i, lp in t.top} for t in lps],
            "text_offset": [offset + o for o in accumulate([len(t) for t in tokens[:-1]], initial=0)][:len(tokens)]}


def openai_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def openai_completion(id: str, created: int, model: str, choices: list[dict], **extra: dict | None) -> dict:
    """A response, or a streamed chunk; extra: usage (left out of chunks unless the client asked for it)."""
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices, **extra}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def llama_result(out: CompletionOutput, index: int, model: str, prompt: list[int], cached: int, truncated: bool,
                 times: tuple[float, float, float], settings: dict, tok: Tokenizer, request: LlamaCompletionRequest,
                 drafts: tuple[int, int] = (0, 0)) -> dict:
    """llama.cpp's final result object for one whole completion, filtered by response_fields.
    cached: prompt tokens found in the cache; times: (start, first token, end) in seconds; drafts: speculative
    tokens (proposed, kept), reported as llama.cpp does (timings.draft_n, draft_n_accepted) when there were any."""
    start, first, end = times
    n_prompt, computed, n = len(prompt), len(prompt) - cached, len(out.token_ids)
    prompt_ms, predicted_ms = (first - start) * 1e3, max(end - first, 1e-6) * 1e3
    timings = {"cache_n": cached, "prompt_n": computed, "prompt_ms": prompt_ms,
               "prompt_per_token_ms": prompt_ms / max(computed, 1),
               "prompt_per_second": computed / max(prompt_ms / 1e3, 1e-9), "predicted_n": n,
               "predicted_ms": predicted_ms, "predicted_per_token_ms": predicted_ms / max(n, 1),
               "predicted_per_second": n / max(predicted_ms / 1e3, 1e-9)}
    if drafts[0]:
        timings["draft_n"], timings["draft_n_accepted"] = drafts
    stop_word = out.stop_reason if isinstance(out.stop_reason, str) else ""
    stop_type = "limit" if out.finish_reason == "length" else "word" if stop_word else "eos"
    # What the slot's cache holds afterwards: the prompt and every generated token fed back, which is all of them
    # when a stop token ended the completion (it is not part of it), else all but the last.
    fed = n if isinstance(out.stop_reason, int) else max(n - 1, 0)
    result = {"index": index, "content": out.text, "tokens": out.token_ids if request.return_tokens else [],
              "id_slot": request.id_slot, "stop": True, "model": model, "tokens_predicted": n,
              "tokens_evaluated": n_prompt, "generation_settings": settings, "prompt": tok.decode(prompt),
              "has_new_line": "\n" in out.text, "truncated": truncated, "stop_type": stop_type,
              "stopping_word": stop_word, "tokens_cached": n_prompt + fed, "timings": timings}
    if request.n_probs and out.logprobs and not request.stream:
        result["completion_probabilities"] = llama_probabilities(tok, out.logprobs)
    return result if request.response_fields is None else select_fields(result, request.response_fields)


def llama_probabilities(tok: Tokenizer, lps: list[TokenLogprob]) -> list[dict]:
    """llama.cpp's completion_probabilities (current format, log-probabilities of the model's distribution)."""
    def entry(token: int, logprob: float) -> dict:
        piece = tok.token_bytes(token)
        return {"id": token, "token": piece.decode("utf-8", errors="replace"), "bytes": list(piece),
                "logprob": logprob}
    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in lps]


def select_fields(result: dict, paths: list[str]) -> dict:
    """llama.cpp's response_fields: each "a/b" path looked up in the result and returned under its own name
    ("timings/prompt_n": 12), in the order asked; paths that do not exist are left out."""
    out = {}
    for path in paths:
        node, found = result, True
        for key in path.split("/"):
            if isinstance(node, dict) and key in node:
                node = node[key]
            else:
                found = False
                break
        if found:
            out[path] = node
    return out

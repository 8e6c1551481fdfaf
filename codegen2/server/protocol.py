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


class LlamaCompletionRequest(_Llama):
    prompt: str | list[int] = ""
    n_predict: int = -1  # -1: until a stop or the context is full
    temperature: float = 0.8  # llama.cpp's sampling defaults
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = []
    seed: int = -1  # -1: random
    stream: bool = False
    t_max_predict_ms: int = 0  # 0: no time budget

    def sampling_params(self, max_seq_len: int) -> SamplingParams:
        """Raises InvalidRequest naming the bad field by llama.cpp's name for it."""
        return _build(lambda: SamplingParams(
            max_tokens=max_seq_len if self.n_predict < 0 else self.n_predict, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, stop=self.stop,
            seed=None if self.seed < 0 else self.seed), LLAMA_NAMES)


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


LLAMA_NAMES = {"max_tokens": "n_predict", "repetition_penalty": "repeat_penalty"}  # SamplingParams -> llama.cpp


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


def llama_final(out: CompletionOutput, model: str, n_prompt: int, truncated: bool,
                times: tuple[float, float, float]) -> dict:
    """llama.cpp's last response object for a whole completion. times: (start, first token, end) in seconds."""
    start, first, end = times
    prompt_ms, predicted_ms, n = (first - start) * 1e3, (end - first) * 1e3, len(out.token_ids)
    timings = {"prompt_n": n_prompt, "prompt_ms": prompt_ms,
               "prompt_per_token_ms": prompt_ms / max(n_prompt, 1),
               "prompt_per_second": n_prompt / max(prompt_ms / 1e3, 1e-9), "predicted_n": n,
               "predicted_ms": predicted_ms, "predicted_per_token_ms": predicted_ms / max(n, 1),
               "predicted_per_second": n / max(predicted_ms / 1e3, 1e-9)}
    stop_word = out.stop_reason if isinstance(out.stop_reason, str) else ""
    stop_type = "limit" if out.finish_reason == "length" else "word" if stop_word else "eos"
    return {"index": 0, "content": out.text, "tokens": out.token_ids, "id_slot": -1, "stop": True, "model": model,
            "tokens_predicted": n, "tokens_evaluated": n_prompt, "has_new_line": "\n" in out.text,
            "truncated": truncated, "stop_type": stop_type, "stopping_word": stop_word,
            "stopped_eos": stop_type == "eos", "stopped_word": stop_type == "word",
            "stopped_limit": stop_type == "limit", "timings": timings}

"""The prompt path: one function turns what a caller asks for into the token ids and final sampling parameters
that the engine runs, or one ``InvalidRequest`` that says what is wrong.

    prepare_request(tokenizer, "def f(x):", params, max_seq_len)             # text
    prepare_request(tokenizer, [4299, 277], params, max_seq_len)             # token ids
    prepare_request(tokenizer, Infill(prefix, suffix), params, max_seq_len)  # the model's infill format
    prepare_request(..., fit=True)   # an infill too long for the context is cut, as llama.cpp's /infill does
    prepare_request(..., prefill_only=True)   # only cache the prompt (llama.cpp's n_predict 0)

The engine (``Engine.add_request``) and the server call this and nothing else, so a prompt is built, measured and
checked once, in one place, with the same messages everywhere. It only needs the tokenizer, so callers may run it
in any thread (the server does, off its event loop).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from codegen2 import infill
from codegen2.engine.errors import InvalidRequest
from codegen2.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from codegen2.tokenizer import Tokenizer

Prompt = str | list[int] | infill.Infill


@dataclass(frozen=True)
class PreparedRequest:
    prompt_ids: list[int]
    # Final: stop_token_ids hold <|endoftext|> (unless ignore_eos) and, for an infill, <eom>.
    params: SamplingParams
    truncated: bool = False  # fit=True had to cut the infill's prefix or suffix
    prefill_only: bool = False  # evaluate the prompt into the cache and generate nothing (llama.cpp's n_predict 0)


def prepare_request(tokenizer: Tokenizer, prompt: Prompt, params: SamplingParams | None, max_seq_len: int,
                    fit: bool = False, prefill_only: bool = False) -> PreparedRequest:
    """Validated prompt ids and final params for ``prompt`` in a context of ``max_seq_len`` tokens. With
    prefill_only the request only puts the prompt's K/V in the cache, for later prompts that share it (one
    completion, whatever params.n says).

    Raises InvalidRequest (param "prompt") for token ids outside the vocabulary, an empty prompt, or a prompt of
    max_seq_len tokens or more (status 413: no room is left to generate)."""
    params = params or SamplingParams()
    stops = list(params.stop_token_ids)
    truncated = False
    texts = [prompt] if isinstance(prompt, str) else [prompt.prefix, prompt.suffix] \
        if isinstance(prompt, infill.Infill) and not fit else []
    size = sum(len(t.encode("utf-8", errors="replace")) for t in texts if isinstance(t, str))
    if size > max_seq_len * tokenizer.max_token_bytes:  # too long for certain, told without tokenizing megabytes
        raise InvalidRequest(f"the prompt has more than {max_seq_len} tokens ({size} bytes; no token is longer "
                             f"than {tokenizer.max_token_bytes}); the context is {max_seq_len} tokens, which leaves "
                             "no room to generate", "prompt", status=413, code="context_length_exceeded")
    if isinstance(prompt, infill.Infill):
        if fit:  # room for the prompt: what is left after max_tokens, but at least half the context
            room = max_seq_len - min(params.max_tokens, max_seq_len // 2)
            ids, truncated = infill.fit_infill(tokenizer, prompt.prefix, prompt.suffix, room)
        else:
            ids = infill.infill_prompt(tokenizer, prompt.prefix, prompt.suffix)
        stops += infill.stop_ids(tokenizer)
    elif isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        ok = lambda t: isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size  # noqa: E731
        if not all(map(ok, ids)):
            bad = next(t for t in ids if not ok(t))
            raise InvalidRequest(f"prompt token ids must be in [0, {tokenizer.vocab_size}), got {bad!r}", "prompt")
    else:
        raise InvalidRequest(f"a prompt is text, a list of token ids or an Infill, got {type(prompt).__name__}",
                             "prompt")
    if not ids:
        raise InvalidRequest("the prompt is empty: give at least one token", "prompt")
    if len(ids) >= max_seq_len:
        raise InvalidRequest(f"the prompt has {len(ids)} tokens; the context is {max_seq_len} tokens, which leaves "
                             "no room to generate", "prompt", status=413, code="context_length_exceeded")
    if not params.ignore_eos:
        stops.append(tokenizer.eos_id)
    stops = list(dict.fromkeys(stops))  # once each, in order
    final = replace(params, stop_token_ids=stops, n=1 if prefill_only else params.n)
    return PreparedRequest(ids, final, truncated, prefill_only)

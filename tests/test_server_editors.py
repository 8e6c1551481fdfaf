"""llama.cpp's /infill as the editor plugins use it: the request bodies llama.vscode and llama.vim send (taken
from their sources: src/llama-server.ts, autoload/llama.vim) and the response read the way each plugin's code
reads it (llama.vscode: data.content, data.generation_settings.n_ctx, data.tokens_cached, data.timings.*
formatted with toFixed, data.truncated, an array with n_cmpl > 1; llama.vim: the flattened keys it asks for in
response_fields, and a raw body matching its '"content"\\s*:"' check)."""

from __future__ import annotations

import copy
import json
import re

import pytest

pytest.importorskip("fastapi", reason="the server tests need the server extra: pip install -e '.[server]'")
import httpx  # noqa: E402
import torch  # noqa: E402
from test_server import live_server, tiny  # noqa: E402, F401  (tiny is a fixture)

from codegen2.engine.engine import Engine  # noqa: E402
from codegen2.engine.sampling import SamplingParams  # noqa: E402
from codegen2.infill import Infill  # noqa: E402
from codegen2.server.app import create_app  # noqa: E402

PREFIX = "import math\n\n\ndef area(r):\n"
SUFFIX = "\n\n\ndef main():\n    print(area(2))\n"
EXTRA = [{"text": "def circle(r):\n    return 2 * math.pi * r\n", "time": 1733000000000, "filename": "geo.py"},
         {"text": "PI = 3.14159\n", "time": 1733000000001, "filename": "const.py"}]
VSCODE_FIM = {  # llama.vscode's FIM request (n_predict, t_max_*: its defaults; n_cmpl: max_parallel_completions)
    "id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": EXTRA, "prompt": "    ",
    "n_predict": 12, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 500, "n_indent": 4}
VSCODE_WARMUP = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": EXTRA, "prompt": "",
                 "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1}
VIM_FIELDS = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
              "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
              "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]
VIM_FIM = {  # llama.vim's FIM request
    "id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX,
    "input_extra": [{"text": e["text"], "time": [1733000000, 123456], "filename": e["filename"]} for e in EXTRA],
    "prompt": "    ", "n_predict": 12, "stop": [], "n_cmpl": 1, "n_indent": 4, "top_k": 40, "top_p": 0.90,
    "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 500,
    "t_max_predict_ms": 250, "response_fields": VIM_FIELDS}
VIM_WARMUP = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": VIM_FIM["input_extra"],
              "prompt": "", "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True,
              "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}
CONTEXT = "".join(e["text"] for e in EXTRA)  # the extra chunks, as this server puts them before the prefix


@pytest.fixture(scope="module")
def biased(tiny):
    """The tiny model, biased towards " x" (id 2124) so the plugins' chain (top_k 40, top_p, infill) keeps it:
    the random model's flat distribution would make the infill sampler end every middle at once."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    x = tok.encode(" x")[0]
    with torch.no_grad():
        model.output.bias[x] += 30.0
    return model, tok, x


@pytest.fixture(scope="module")
def editor_server(biased):
    model, tok, _ = biased
    engine = Engine(model, tok, max_batch=4)
    with live_server(create_app(lambda: engine, "tiny")) as url:
        yield url, engine


def infill(url, body):
    # llama.vim sends exactly this header; llama.vscode's axios sends JSON too.
    r = httpx.post(url + "/infill", content=json.dumps(body), headers={"Content-Type": "application/json"},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_llama_vscode_fim_and_warm_up(editor_server, biased):
    url, _ = editor_server
    _, tok, x = biased
    warm = infill(url, VSCODE_WARMUP).json()  # the ring buffer's warm-up: the context goes into the cache
    assert warm["content"] == "" and warm["tokens_predicted"] == 0 and warm["stop_type"] == "limit"
    results = infill(url, VSCODE_FIM).json()
    assert isinstance(results, list) and [r["index"] for r in results] == [0, 1, 2]  # n_cmpl 3: an array
    for data in results:  # what llama.vscode reads, as it reads it
        assert data["content"] == " x" * 12 and data["tokens_predicted"] == 12 and data["stop_type"] == "limit"
        n_ctx = data["generation_settings"]["n_ctx"]  # data.generation_settings.n_ctx ?? 0, then displayed
        assert n_ctx == 256 and data["tokens_cached"] <= n_ctx and data["truncated"] is False
        for key in ("prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n",
                    "predicted_ms", "predicted_per_token_ms", "predicted_per_second"):
            assert isinstance(data["timings"][key], (int, float))  # .toFixed() needs numbers
        assert data["generation_settings"]["samplers"] == ["top_k", "top_p", "infill"]
    # The warm-up paid off: the extra context was found in the cache.
    assert results[0]["timings"]["cache_n"] >= len(tok.encode(CONTEXT)) - 2
    assert results[0]["timings"]["prompt_n"] + results[0]["timings"]["cache_n"] == results[0]["tokens_evaluated"]
    # The same request alone through the engine: the chain keeps " x" only, so every completion is " x" x 12.
    ref = Engine(biased[0], tok).generate([Infill(CONTEXT + PREFIX + "    ", SUFFIX)], SamplingParams(
        max_tokens=12, top_k=40, top_p=0.99, samplers=["top_k", "top_p", "infill"], min_indent=4))[0]
    assert ref.outputs[0].text == " x" * 12 and ref.outputs[0].token_ids == [x] * 12


def test_llama_vim_fim_response_fields_and_warm_up(editor_server):
    url, _ = editor_server
    warm = infill(url, VIM_WARMUP)
    assert warm.json() == {}  # response_fields [""]: nothing
    r = infill(url, VIM_FIM)
    raw = r.text
    assert re.match(r"^\s*{", raw) and re.search(r'"content"\s*:"', raw)  # llama.vim's own check of the body
    data = r.json()
    assert list(data) == VIM_FIELDS  # flattened keys, in the order asked
    assert data["content"] == " x" * 12 and data["timings/predicted_n"] == 12
    assert all(isinstance(data[k], (int, float)) for k in VIM_FIELDS if k.startswith("timings/"))
    assert data["truncated"] is False
    # tokens_cached is the cache's fill after the request: the prompt and the 11 generated tokens fed back (the
    # 12th, sampled last, never is).
    fields = ["tokens_cached", "tokens_evaluated", "generation_settings/n_ctx", "no/such/field"]
    again = infill(url, {**VIM_FIM, "response_fields": fields}).json()
    assert again == {"tokens_cached": again["tokens_evaluated"] + 11, "tokens_evaluated": again["tokens_evaluated"],
                     "generation_settings/n_ctx": 256}


def test_n_indent_n_probs_and_streaming(editor_server, biased):
    url, _ = editor_server
    _, tok, x = biased
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 4, "temperature": 0, "n_probs": 3,
            "samplers": ["temperature"]}
    data = infill(url, body).json()
    probs = data["completion_probabilities"]
    assert len(probs) == 4 and all(p["id"] == x and p["token"] == " x" and p["bytes"] == list(b" x") for p in probs)
    assert all(len(p["top_logprobs"]) == 3 and p["top_logprobs"][0]["id"] == x and p["logprob"] <= 0 for p in probs)
    events = [json.loads(line[6:]) for line in infill(url, {**body, "stream": True}).text.split("\n\n")
              if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == " x" * 4 and events[-1]["stop"] is True
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["tokens_predicted"] == 4


def test_infill_rejects_what_llama_cpp_rejects_and_names_the_field(editor_server):
    url, _ = editor_server
    for body, param in [({"input_prefix": "x", "samplers": "kz"}, "samplers"), ({"n_indent": "4"}, "n_indent"),
                        ({"n_probs": 21}, "n_probs"), ({"prompt": [1, 2]}, "prompt")]:
        r = httpx.post(url + "/infill", json=body, timeout=60)
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == param, r.text

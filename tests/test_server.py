"""The server, live on 127.0.0.1 with a tiny random CodeGen: the official openai client, llama.cpp's /infill and
/completion, every error case, health / models / metrics, API keys, CORS, and 32 concurrent streaming clients
(some disconnecting) that all get exactly what the engine alone gives."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server tests need the server extra: pip install -e '.[server]'")
openai = pytest.importorskip("openai", reason="the server tests need the openai client (test extra)")
import httpx  # noqa: E402  (openai depends on it)
import torch  # noqa: E402

from codegen2.engine.engine import Engine  # noqa: E402
from codegen2.engine.sampling import SamplingParams  # noqa: E402
from codegen2.infill import Infill, infill_prompt  # noqa: E402
from codegen2.models.checkpoint import load_model  # noqa: E402
from codegen2.server import cli  # noqa: E402
from codegen2.server.app import create_app  # noqa: E402
from codegen2.tokenizer import load_tokenizer  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["def fibonacci(n):\n    ", "import os\n", "class Stack:\n    def push(self, x):\n        self.items",
           "# sum a list\ndef total(xs):", "x = [i * i for i in range(10)]\nprint("]


@contextlib.contextmanager
def live_server(app, wait_ready: bool = True, timeout: float = 300.0):
    """Run ``app`` under uvicorn on a free port of 127.0.0.1 in a thread; yield its URL; stop it on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed to uvicorn: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url, deadline = f"http://127.0.0.1:{sock.getsockname()[1]}", time.monotonic() + timeout
    try:
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        while wait_ready and httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def tiny(codegen_dir):
    # The machine is shared: one intra-op thread is several times faster than two fighting other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(codegen_dir, dtype="fp32"), load_tokenizer(codegen_dir)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tiny):
    engine = Engine(*tiny, max_batch=8)
    with live_server(create_app(lambda: engine, "tiny", api_keys=[KEY])) as url:
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def alone(tiny, prompts, params):
    """What the engine gives without the server (continuous batching is proven batch-invariant elsewhere)."""
    return [o.outputs for o in Engine(*tiny, max_batch=8).generate(prompts, params)]


def post(server, path, body=None, headers=AUTH, **kw):
    return httpx.post(server[0] + path, json=body, headers=headers, timeout=60, **kw)


def sse(response) -> list:
    events = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


# --- OpenAI /v1/completions ---------------------------------------------------------------------------------------

def test_completion_is_the_engines_greedy_completion(client, tiny):
    tok = tiny[1]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    ref = alone(tiny, [PROMPTS[0]], SamplingParams(max_tokens=20))[0][0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny" and r.created > 0
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [(0, ref.text, ref.finish_reason)]
    assert r.usage.prompt_tokens == len(tok.encode(PROMPTS[0])) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    default = client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0)  # OpenAI's default: 16
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"
    by_ids = client.completions.create(model="tiny", prompt=tok.encode(PROMPTS[0]), max_tokens=20, temperature=0)
    assert by_ids.choices[0].text == ref.text


def test_suffix_makes_an_infill(client, tiny):
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    r = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=24, temperature=0)
    ref = alone(tiny, [Infill(prefix, suffix)], SamplingParams(max_tokens=24))[0][0]
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(infill_prompt(tiny[1], prefix, suffix))


def test_streaming_adds_up_to_the_completion_and_ends_with_done(client, server):
    full = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    raw = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 4, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and sse(raw)[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" and "usage" not in e for e in sse(raw)[:-1])


def test_n_and_several_prompts(client, tiny):
    r = client.completions.create(model="tiny", prompt=PROMPTS[:2], n=3, max_tokens=8, temperature=0.9, seed=5)
    assert [c.index for c in r.choices] == list(range(6))
    ref = alone(tiny, PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0.9, seed=5, n=3))
    assert [c.text for c in r.choices] == [o.text for outs in ref for o in outs]
    assert r.usage.completion_tokens == sum(len(o.token_ids) for outs in ref for o in outs)


def test_stop_newline_gives_single_line_completions(client, tiny):
    params = dict(model="tiny", max_tokens=40, temperature=0, stop=["\n"])
    for prompt in PROMPTS[:3]:
        text = client.completions.create(prompt=prompt, **params).choices[0].text
        assert "\n" not in text
        assert text == alone(tiny, [prompt], SamplingParams(max_tokens=40, stop=["\n"]))[0][0].text


def test_extreme_sampling_values_do_not_break_the_engine(client, server):
    """temperature 1e-300 would overflow the logits and top_p 1e-300 would drop every token; both are taken as
    greedy, like vLLM, instead of failing the engine's step (and every request in it)."""
    greedy = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0).choices[0].text
    for kw in ({"temperature": 1e-300}, {"top_p": 1e-300, "temperature": 1.0, "seed": 0}):
        assert client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, **kw).choices[0].text == greedy
    assert httpx.get(server[0] + "/health").status_code == 200


def test_logprobs_and_echo(client):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens).startswith(r.choices[0].text) and lp.text_offset[0] == 0
    e = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, echo=True)
    assert e.choices[0].text == PROMPTS[0] + r.choices[0].text


# --- llama.cpp /infill and /completion -----------------------------------------------------------------------------

def test_llama_infill_and_completion(server, tiny):
    tok = tiny[1]
    body = {"input_prefix": "def add(a, b):\n", "prompt": "    ", "input_suffix": "\n    return c\n",
            "input_extra": [{"filename": "util.py", "text": "import math"}], "temperature": 0,
            "cache_prompt": True, "samplers": ["top_k", "temperature"], "n_indent": 4, "lora": []}  # unknown: ignored
    r = post(server, "/infill", body).json()
    prefix = "import math\ndef add(a, b):\n    "
    ref = alone(tiny, [Infill(prefix, body["input_suffix"])], SamplingParams(max_tokens=64, min_indent=4))[0][0]
    assert r["content"] == ref.text and r["tokens_predicted"] == len(ref.token_ids) and r["stop"] is True
    assert r["tokens_evaluated"] == len(infill_prompt(tok, prefix, body["input_suffix"])) and not r["truncated"]
    assert r["stop_type"] == ("limit" if ref.finish_reason == "length" else "eos")
    assert {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"} <= set(r["timings"])
    events = sse(post(server, "/infill", {**body, "stream": True}))
    assert "".join(e["content"] for e in events) == r["content"] and events[-1]["stop"] is True
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["tokens_predicted"] == r["tokens_predicted"]
    c = post(server, "/completion", {"prompt": PROMPTS[0], "n_predict": 12, "temperature": 0}).json()
    assert c["content"] == alone(tiny, [PROMPTS[0]], SamplingParams(max_tokens=12))[0][0].text
    s = post(server, "/completion", {"prompt": PROMPTS[0], "n_predict": 30, "temperature": 0, "stop": ["e"]}).json()
    assert "e" not in s["content"] and (s["stop_type"], s["stopping_word"]) in [("word", "e"), ("limit", "")]


def test_infill_truncates_a_long_file_instead_of_failing(server):
    r = post(server, "/infill", {"input_prefix": "x = 1\n" * 400, "input_suffix": "y = 2\n" * 200,
                                 "n_predict": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["truncated"] is True
    assert r.json()["tokens_evaluated"] + 8 <= 256


def test_time_budget_after_the_first_newline(tiny):
    """llama.cpp's t_max_predict_ms: past the budget, generation stops as soon as the text has a newline. The random
    model never writes one, so a copy of it is biased towards "\\n" (id 198)."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    with torch.no_grad():
        model.output.bias[198] += 1000.0
    with live_server(create_app(lambda: Engine(model, tok, max_batch=2), "tiny")) as url:
        body = {"prompt": PROMPTS[0], "n_predict": 200, "temperature": 0}
        full = httpx.post(url + "/completion", json=body, timeout=60).json()
        cut = httpx.post(url + "/completion", json={**body, "t_max_predict_ms": 1}, timeout=60).json()
        chat = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0,
                                                          "t_max_predict_ms": 1}, timeout=60).json()
    assert full["content"] == "\n" * 200 and full["stop_type"] == "limit"
    assert 0 < cut["tokens_predicted"] < 200 and cut["content"] == "\n" * cut["tokens_predicted"]
    assert cut["stop_type"] == "limit" and cut["timings"]["predicted_n"] == cut["tokens_predicted"]
    assert chat["choices"][0]["finish_reason"] == "length" and chat["usage"]["completion_tokens"] < 200


# --- errors --------------------------------------------------------------------------------------------------------

ERRORS = [  # (path, body (str: raw), status, words in the message, param)
    ("/v1/completions", '{"prompt": "x", ', 400, "malformed JSON", None),
    ("/v1/completions", "", 400, "malformed JSON", None),
    ("/v1/completions", "[1, 2]", 422, "JSON object", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "16"}, 422, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": True}, 422, "temperature", "temperature"),
    ("/v1/completions", {"prompt": 5}, 422, "expected one of", "prompt"),
    ("/v1/completions", {"prompt": "x", "foo": 1}, 422, "unrecognized request argument supplied: foo", "foo"),
    ("/v1/completions", {"max_tokens": 5}, 422, "missing required argument: prompt", "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be an integer >= 1", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens must be", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature must be >= 0", "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 65}, 400, "n must be an integer in [1, 64]", "n"),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 40}, 400, "80 completions; the limit is 64", "n"),
    ("/v1/completions", {"prompt": " x" * 300}, 413, "the prompt has 300 tokens; the context is 256 tokens", "prompt"),
    ("/v1/completions", {"prompt": "x", "suffix": "y " * 300}, 413, "context is 256 tokens", "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist", "model"),
    ("/v1/completions", {"prompt": ""}, 400, "the prompt is empty", "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "the prompt is empty", "prompt"),
    ("/v1/completions", {"prompt": [99999999]}, 400, "token ids must be in [0, 51200)", "prompt"),
    ("/v1/completions", {"prompt": [1], "suffix": "y"}, 400, "suffix needs a text prompt", "suffix"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias is not supported", "logit_bias"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of must equal n", "best_of"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "logprobs with echo", "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop strings must be non-empty", "stop"),
    ("/v1/completions", {"prompt": "x", "seed": 1 << 70}, 400, "seed must be an integer in", "seed"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 33}, 400, "at most 32 strings", "stop"),
    ("/infill", {"input_prefix": 5}, 422, "input_prefix", "input_prefix"),
    ("/infill", {"input_prefix": "x", "n_probs": 50}, 400, "logprobs must be an integer in [0, 20]", "n_probs"),
    ("/infill", {"input_prefix": "x", "samplers": ["top_k", "magic"]}, 400, "unknown sampler 'magic'", "samplers"),
    ("/infill", {"input_prefix": "x", "n_cmpl": 0}, 400, "n must be an integer in [1, 64]", "n_cmpl"),
    ("/infill", {"input_prefix": "x", "prompt": [1, 2]}, 400, "prompt must be text for /infill", "prompt"),
    ("/completion", {"prompt": "x", "repeat_penalty": 0}, 400, "repetition_penalty must be > 0", "repeat_penalty"),
    ("/infill", {"input_extra": [{"text": 3}]}, 422, "input_extra", "input_extra"),
    ("/completion", {"prompt": " x" * 300}, 413, "the prompt has 300 tokens", "prompt"),
    ("/nowhere", {}, 404, "POST /nowhere: Not Found", None),
]


@pytest.mark.parametrize("path, body, status, words, param", ERRORS)
def test_bad_input_gets_an_openai_style_error(server, path, body, status, words, param):
    kw = {"content": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, str) \
        else {"json": body, "headers": AUTH}
    r = httpx.post(server[0] + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert error["param"] == param


def test_auth_methods_body_size_and_the_openai_client_errors(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = post(server, "/v1/completions", {"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server[0] + "/v1/models").status_code == 401
    assert httpx.get(server[0] + "/health").status_code == 200  # no key needed, like llama.cpp
    r = httpx.get(server[0] + "/v1/completions", headers=AUTH)
    assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]["message"]
    host, port = server[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # refused on the header alone
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    with pytest.raises(openai.BadRequestError, match="max_tokens must be"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="davinci-002", prompt="x")
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}  # still serving


def test_models_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(server[0] + "/metrics", headers=AUTH).text
    for name in ["codegen2_requests_total{route=\"/v1/completions\",status=\"200\"}", "codegen2_prompt_tokens_total",
                 "codegen2_generation_tokens_total", "codegen2_request_duration_seconds_bucket{le=\"+Inf\"}",
                 "codegen2_time_to_first_token_seconds_count", "codegen2_requests_waiting",
                 "codegen2_requests_running", "codegen2_kv_cache_slots 8", "codegen2_kv_cache_usage"]:
        assert name in text
    assert "# TYPE codegen2_request_duration_seconds histogram" in text


def test_health_is_503_until_loaded_and_cors_is_off_unless_asked(tiny):
    release = threading.Event()

    def load():
        assert release.wait(timeout=30)
        return Engine(*tiny, max_batch=2)
    with live_server(create_app(load, "tiny"), wait_ready=False) as url:
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert httpx.get(url + "/v1/models").status_code == 200
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        origin = {"Origin": "http://editor.example"}
        assert "access-control-allow-origin" not in httpx.get(url + "/v1/models", headers=origin).headers

    def broken():
        raise ValueError("no such checkpoint")
    with live_server(create_app(broken, "tiny"), wait_ready=False) as url:
        deadline = time.monotonic() + 30
        while "no such checkpoint" not in httpx.get(url + "/health").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(url + "/health").status_code == 503
    with live_server(create_app(lambda: Engine(*tiny, max_batch=2), "tiny",
                                cors_origins=["http://editor.example"])) as url:
        r = httpx.options(url + "/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "http://editor.example"


# --- concurrency ---------------------------------------------------------------------------------------------------

def test_32_concurrent_streams_with_disconnects(server, tiny):
    """32 streaming clients at once (8 KV-cache slots, so most wait in the queue): every remaining one gets the
    engine's own greedy text; 4 disconnect after their first chunk and 2 non-streaming clients time out, and
    their requests are aborted and their slots freed."""
    url, engine = server
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{i}" for i in range(32)]
    quitters = set(range(0, 32, 8))
    ref = alone(tiny, prompts, SamplingParams(max_tokens=16))
    aborted, real_abort = [], engine.abort
    engine.abort = lambda rid: (aborted.append(rid), real_abort(rid))  # record, then abort as usual
    running_max, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            running_max[0] = max(running_max[0], len(engine.scheduler.running))
            time.sleep(0.005)

    async def one(http, i):
        body = {"prompt": prompts[i], "max_tokens": 200 if i in quitters else 16, "temperature": 0, "stream": True}
        text = ""
        async with http.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if i in quitters:
                        return None  # leaving the block closes the connection mid-stream
        return text

    async def impatient(http, prompt):
        # Only the read is impatient: connecting may take long on a loaded machine (a connect timeout of 0.25 s
        # once failed this test under load).
        with contextlib.suppress(httpx.ReadTimeout):
            await http.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 220, "temperature": 0},
                            headers=AUTH, timeout=httpx.Timeout(120, read=0.25))

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(32)),
                                        *(impatient(http, f"{p}!") for p in PROMPTS[:2]))
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        texts = asyncio.run(asyncio.wait_for(main(), timeout=900))[:32]  # seconds when quiet; a hang fails
    finally:
        stop.set()
        engine.abort = real_abort
    for i, text in enumerate(texts):
        assert text == (None if i in quitters else ref[i][0].text), i
    assert running_max[0] > 1  # requests were batched, not served one by one
    deadline = time.monotonic() + 30
    s = engine.scheduler
    while s.running or s.waiting or len(s.free) != s.n_slots:
        assert time.monotonic() < deadline, "slots were not freed"
        time.sleep(0.05)
    assert len(aborted) == len(quitters) + 2


# --- the command ---------------------------------------------------------------------------------------------------

SERVE = ("import argparse, sys\nfrom codegen2.server import cli\np = argparse.ArgumentParser()\n"
         "cli.add_parser(p.add_subparsers())\ncli.run(p.parse_args(sys.argv[1:]))")


def test_served_model_names_and_model_lookup(tiny):
    with live_server(create_app(lambda: Engine(*tiny, max_batch=2), ["main", "alias"])) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "alias", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "main"
        card = httpx.get(url + "/v1/models/alias").json()
        assert (card["id"], card["aliases"], card["max_model_len"]) == ("main", ["alias"], 256)
        assert httpx.get(url + "/v1/models").json()["data"] == [card]
        missing = httpx.get(url + "/v1/models/other")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    with pytest.raises(ValueError, match="model names must be non-empty strings"):
        create_app(lambda: None, [])


def test_serve_refuses_a_busy_port_and_an_absent_device_at_once(codegen_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        r = subprocess.run([sys.executable, "-c", SERVE, "serve", "--model", str(codegen_dir), "--port", port],
                           capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "terminate called" not in r.stderr and "Traceback" not in r.stderr
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-c", SERVE, "serve", "--model", str(codegen_dir), "--device", "cuda"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and "error: device 'cuda': CUDA is not available" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", SERVE, "serve", "--model", "m", "--device", "quantum"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "error: unknown device 'quantum'" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", SERVE, "serve", "--help"], capture_output=True, text=True, timeout=600)
    assert "(default: 16)" in r.stdout and "--served-model-name" in r.stdout and "--max-model-len" in r.stdout


def test_serve_command(codegen_dir, tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.api_key, args.max_concurrency, args.dtype, args.cors_origin) == \
        ("127.0.0.1", 8000, [], 16, "bf16", [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CODEGEN2_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--model", str(codegen_dir), "--port", str(port),
                             "--dtype", "fp32", "--max-concurrency", "2", "--max-model-len", "128", "--kv-cache-gib",
                             "0.5", "--served-model-name", "tiny", "tiny-alias"], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # model load in a fresh process; minutes only on a loaded machine
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "codegen2 serve did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "model": "tiny-alias"},
                       headers={"Authorization": "Bearer env-key"}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        card = httpx.get(url + "/v1/models/tiny", headers={"Authorization": "Bearer env-key"}).json()
        assert card["max_model_len"] == 128  # --max-model-len
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-c", SERVE, "serve", "--model", str(tmp_path / "missing"), "--port",
                          str(port)], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "error: CheckpointError" in bad.stderr and "neither a model directory" in bad.stderr

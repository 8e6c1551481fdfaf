"""The server against hostile and careless clients: no input reaches a 5xx or hurts another request, web pages
cannot drive it, big bodies cost only their sender, and a fuzz run of malformed requests leaves it healthy."""

from __future__ import annotations

import json
import random
import select
import socket
import threading

import pytest

pytest.importorskip("fastapi", reason="the server tests need the server extra: pip install -e '.[server]'")
import httpx  # noqa: E402
import psutil  # noqa: E402
from test_server import PROMPTS, alone, live_server, tiny  # noqa: E402, F401  (tiny is a fixture)

from codegen2.engine.engine import Engine  # noqa: E402
from codegen2.engine.sampling import SamplingParams  # noqa: E402
from codegen2.server.app import MAX_BODY, create_app  # noqa: E402


@pytest.fixture(scope="module")
def url(tiny):
    engine = Engine(*tiny, max_batch=4)
    with live_server(create_app(lambda: engine, "tiny")) as u:
        yield u


def normal_request_works(url, tiny) -> None:
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == alone(tiny, [PROMPTS[0]], SamplingParams(max_tokens=6))[0][0].text
    assert httpx.get(url + "/health", timeout=60).json() == {"status": "ok"}


HOSTILE = [  # (route, body): each once stopped the engine for everyone, or answered 500
    ("/v1/completions", {"prompt": "def f(x):\n    ", "max_tokens": 2, "repetition_penalty": 1e-320,
                         "temperature": 1.0}),
    ("/v1/completions", {"prompt": "def f(x):\n    ", "max_tokens": 2, "repetition_penalty": 1e-320,
                         "temperature": 1.0, "stream": True}),
    ("/completion", {"prompt": "def f(x):\n    ", "n_predict": 2, "repeat_penalty": 1e-40}),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 2, "repeat_penalty": 1e-40}),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 2, "repeat_penalty": 1e-40, "stream": True}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 1e308, "top_p": 1e-300, "min_p": 1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "presence_penalty": 2, "frequency_penalty": -2,
                         "repetition_penalty": 1e300, "temperature": 1.5, "top_k": 2**40}),
]


@pytest.mark.parametrize("route, body", HOSTILE)
def test_extreme_values_are_served_and_the_next_request_works(url, tiny, route, body):
    r = httpx.post(url + route, json=body, timeout=120)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        assert "error" not in r.json()
    else:
        assert '"error"' not in r.text
    normal_request_works(url, tiny)


@pytest.mark.parametrize("prompt", [[1, 2], [], [-1]])
def test_infill_with_token_ids_as_prompt_is_a_400(url, tiny, prompt):
    r = httpx.post(url + "/infill", json={"input_prefix": "def f(x):\n", "prompt": prompt, "n_predict": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    normal_request_works(url, tiny)


@pytest.mark.parametrize("headers, body", [
    ({"Content-Type": "text/plain"}, '{"prompt": "x", "max_tokens": 1}'),  # what fetch() sends with a string body
    ({"Content-Type": "application/x-www-form-urlencoded"}, "prompt=x"),
    ({"Content-Type": "multipart/form-data; boundary=b"}, "--b--"),
    ({}, '{"prompt": "x", "max_tokens": 1}'),
])
def test_only_json_bodies_are_read(url, headers, body):
    """Browsers send text/plain, form and multipart bodies across origins without a CORS preflight: refusing
    them means no web page can drive the server behind its user's back."""
    for route in ("/v1/completions", "/completion", "/infill"):
        r = httpx.post(url + route, content=body, headers=headers, timeout=60)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    ok = httpx.post(url + "/completion", content='{"prompt": "x", "n_predict": 1}',
                    headers={"Content-Type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(url, tiny):
    """A body without Content-Length, sent in 1 MiB chunks: the 413 arrives once 16 MiB are in, not after the
    sender has pushed all 48 MiB (the server used to read 24 MiB to the end, and tokenize it, before refusing)."""
    host, port = url.removeprefix("http://").split(":")
    answer, sent = b"", 0
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * (1 << 20)
        while sent < 3 * MAX_BODY and not answer:
            try:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except OSError:  # the server closed the connection after answering
                break
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:
                answer = sock.recv(65536)
        while b"request_too_large" not in answer:  # the rest of the response (headers and body may come apart)
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer[:300]
    assert MAX_BODY <= sent < 3 * MAX_BODY
    normal_request_works(url, tiny)


def test_big_inputs_cost_only_their_sender(url, tiny):
    """A 3 MB /infill prefix is cut to the context near the hole without tokenizing 3 MB (fit_infill's windows);
    a 3 MB OpenAI prompt is refused as too long from its size; other requests are served meanwhile; memory comes
    back (RSS growth over ten rounds bounded by a few hundred MB, a fraction of what the first round may take)."""
    big = "def f(x):\n    return x * 2  # comment\n" * 80000  # 3 MB
    process = psutil.Process()

    def round_trip() -> None:
        r = httpx.post(url + "/infill", json={"input_prefix": big, "input_suffix": big, "n_predict": 2}, timeout=300)
        assert r.status_code == 200 and r.json()["truncated"] is True and r.json()["tokens_evaluated"] < 256
        r = httpx.post(url + "/v1/completions", json={"prompt": big, "max_tokens": 2}, timeout=300)
        assert r.status_code == 413 and "more than 256 tokens" in r.json()["error"]["message"]
    others: list[int] = []

    def other() -> None:
        for _ in range(5):
            r = httpx.post(url + "/completion", json={"prompt": "x", "n_predict": 2}, timeout=300)
            others.append(r.status_code)
    round_trip()
    before = process.memory_info().rss
    side = threading.Thread(target=other)
    side.start()
    for _ in range(10):
        round_trip()
    side.join()
    growth = process.memory_info().rss - before
    assert others == [200] * 5
    assert growth < 300 << 20, f"RSS grew by {growth >> 20} MiB over 10 rounds"
    normal_request_works(url, tiny)


# --- fuzzing ---------------------------------------------------------------------------------------------------

VALUES = [None, True, False, 0, -1, 1, 2**31, 2**70, -(2**70), 0.5, -0.5, 1e308, -1e308, 1e-320, "", "x", "🎉" * 50,
          "\x00", [], [1, "a"], [[1]], {}, {"a": {"b": {"c": [None]}}}, [2**70], [-5], "<|endoftext|><eom><sep>"]
TEMPLATES = {
    "/v1/completions": {"prompt": "def f(x):", "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "n": 1, "seed": 1,
                        "stop": ["\n"], "logprobs": 1, "suffix": "\n", "echo": False, "stream": False},
    "/completion": {"prompt": "def f(x):", "n_predict": 2, "temperature": 0.7, "top_k": 40, "top_p": 0.9,
                    "min_p": 0.05, "repeat_penalty": 1.1, "stop": [], "seed": 1, "samplers": ["top_k", "temperature"],
                    "n_probs": 1, "response_fields": ["content"], "n_indent": 2, "stream": False},
    "/infill": {"input_prefix": "def f(x):\n", "input_suffix": "\n", "prompt": "    ", "n_predict": 2,
                "input_extra": [{"filename": "a.py", "text": "import os\n"}], "samplers": ["top_k", "top_p", "infill"],
                "n_cmpl": 2, "t_max_predict_ms": 1, "stream": False},
}


def mutations(rng: random.Random, n: int):
    """(route, raw body, content type): one field changed, removed or added, or the body itself broken."""
    for _ in range(n):
        route = rng.choice(list(TEMPLATES))
        body = json.loads(json.dumps(TEMPLATES[route]))
        kind = rng.random()
        if kind < 0.65:
            body[rng.choice(list(body))] = rng.choice(VALUES)
        elif kind < 0.75:
            body.pop(rng.choice(list(body)))
        elif kind < 0.82:
            body[rng.choice(["foo", "n_predict", "max_tokens", "model", "logit_bias", "id_slot", "n_cmpl"])] = \
                rng.choice(VALUES)
        elif kind < 0.9:
            text = json.dumps(body)
            yield route, text[:rng.randrange(len(text))], "application/json"  # cut short
            continue
        elif kind < 0.95:
            yield route, json.dumps(rng.choice(VALUES)), "application/json"  # not an object
            continue
        else:
            yield route, json.dumps(body), rng.choice(["text/plain", "", "application/xml"])
            continue
        yield route, json.dumps(body), "application/json"


def test_fuzz_ends_with_no_5xx_and_a_healthy_server(url, tiny):
    statuses = []
    for route, raw, kind in mutations(random.Random(0), 520):
        headers = {"Content-Type": kind} if kind else {}
        r = httpx.post(url + route, content=raw, headers=headers, timeout=300)
        statuses.append(r.status_code)
        assert r.status_code < 500, (route, raw[:300], r.status_code, r.text[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"] and set(error) == {"message", "type", "param", "code"}
    assert len(statuses) == 520 and {200, 400, 415, 422} <= set(statuses)
    normal_request_works(url, tiny)

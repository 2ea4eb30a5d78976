"""`lite serve`: the OpenAI-compatible server, driven over real HTTP by the official `openai`
client (and httpx for raw bodies and early disconnects). One uvicorn server per module, on a free
port, serving the small text model on the reference backend."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

import lite

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from lite.server import create_app  # noqa: E402

MODEL_ID = "lite-tiny-text"
N_CTX = 256
USER = [{"role": "user", "content": "write a function"}]


@pytest.fixture(scope="module")
def model(text_model_path):
    return lite.load(text_model_path, backend="reference", n_ctx=N_CTX)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, MODEL_ID)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield app, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="x", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[1], timeout=30) as c:
        yield c


def chat_stream_text(client, **kw):
    chunks = list(client.chat.completions.create(model=MODEL_ID, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    return err


def test_health_and_models(client, http):
    assert http.get("/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    assert http.get("/v1/models/other").status_code == 404
    assert_error(http.get("/v1/nothing"), 404)


def test_chat_matches_library_and_stream(client, model):
    r = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=12, temperature=0)
    ids = model.chat_prompt(USER)
    expected = model.generate(ids, max_tokens=12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL_ID
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant" and c.message.content == expected.text
    assert c.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), expected.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    text, chunks = chat_stream_text(client, messages=USER, max_tokens=12, temperature=0)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == c.finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completion_text_tokens_and_stream(client, model):
    prompt = "def add(a, b):"
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0)
    expected = model.generate(prompt, max_tokens=10)
    assert r.object == "text_completion" and r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens == len(model.tokenize(prompt))
    by_ids = client.completions.create(model=MODEL_ID, prompt=model.tokenize(prompt), max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == expected.text
    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 10
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_and_default(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=USER, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model=MODEL_ID, prompt="import os", temperature=0)
    assert r.usage.completion_tokens == 16        # OpenAI's default for completions


def test_stop_strings_never_in_output(client, model):
    prompt = "def add(a, b):"
    full = model.generate(prompt, max_tokens=20).text
    stop = full[8:12]
    assert stop and stop in full
    want = full[:full.index(stop)]
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    def run(seed):
        return client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=16, temperature=0.9,
                                              seed=seed).choices[0].message.content
    a, b, c = run(11), run(11), run(12)
    assert a == b and a != c
    streamed, _ = chat_stream_text(client, messages=USER, max_tokens=16, temperature=0.9, seed=11)
    assert streamed == a


def test_logprobs(client, model):
    r = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=6, temperature=0, logprobs=True)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert all(e.logprob <= 0 for e in content)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content
    r = client.completions.create(model=MODEL_ID, prompt="import os", max_tokens=5, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 5 and lp.text_offset[0] == 0
    r = client.completions.create(model=MODEL_ID, prompt="import os", max_tokens=5, temperature=0)
    assert r.choices[0].logprobs is None


def test_concurrent_streams_do_not_mix(client):
    reqs = [dict(messages=USER, max_tokens=24, temperature=0.9, seed=1),
            dict(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}],
                 max_tokens=24, temperature=0.9, seed=2)]
    alone = [chat_stream_text(client, **kw)[0] for kw in reqs]
    assert alone[0] != alone[1]
    got: list = [None, None]
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        got[i] = chat_stream_text(client, **reqs[i])[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == alone


def test_disconnect_cancels_generation(server, client, http, model, slow_steps):
    app, _ = server
    slow_steps(model, 0.02)    # 200 tokens take seconds on any machine
    body = {"model": MODEL_ID, "prompt": "import os", "max_tokens": 200, "temperature": 0.9, "seed": 0,
            "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
        assert httpx.get(server[1] + "/health", timeout=5).json() == {"status": "ok"}   # loop not blocked
    # The abandoned generation would run ~4 s more; the next request must not wait for it.
    t0 = time.monotonic()
    r = client.completions.create(model=MODEL_ID, prompt="import os", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    assert time.monotonic() - t0 < 3
    cancelled = [g for g in app.state.engine.finished if g.finish_reason == "cancelled"]
    assert cancelled and cancelled[-1].completion_tokens < 200

    # A non-streaming request whose client gives up is cancelled too.
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=0.3)
    t0 = time.monotonic()
    r = client.completions.create(model=MODEL_ID, prompt="import os", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and time.monotonic() - t0 < 3
    assert app.state.engine.finished[-2].finish_reason == "cancelled"


def test_bad_requests(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert assert_error(r, 400)["code"] == "invalid_json"
    assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400)
    cases = [
        ({"model": MODEL_ID}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": USER, "max_tokens": "ten"}, "max_tokens"),
        ({"messages": USER, "max_tokens": -1}, "max_tokens"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "temperature": 3}, "temperature"),
        ({"messages": USER, "stop": 5}, "stop"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": USER, "seed": 1.5}, "seed"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "logprobs": 3}, "logprobs"),
    ]
    for body, param in cases:
        assert_error(http.post("/v1/chat/completions", json=body), 400, param)
    for body, param in [({}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
                        ({"prompt": [1, 99999]}, "prompt"), ({"prompt": "x", "logprobs": True}, "logprobs")]:
        assert_error(http.post("/v1/completions", json=body), 400, param)
    assert http.get("/health").status_code == 200


def test_overlong_prompt_is_400_and_server_keeps_serving(client, http):
    long_text = "the quick brown fox jumps over the lazy dog " * 40
    err = assert_error(http.post("/v1/completions", json={"prompt": long_text, "max_tokens": 4}), 400, "prompt")
    assert err["code"] == "context_length_exceeded" and str(N_CTX) in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": long_text}],
                                       stream=True)
    r = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_api_key(model):
    from starlette.testclient import TestClient
    with TestClient(create_app(model, "m", api_key="secret")) as tc:
        assert tc.get("/health").status_code == 200
        r = tc.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert tc.get("/v1/models", headers={"Authorization": "Bearer secret"}).json()["data"][0]["id"] == "m"

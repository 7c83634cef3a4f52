"""Streams as the worker samples: text arrives token by token, and a client that closes its stream mid-way frees its
sequence: the sampler stops generating it at once rather than
running on to max_tokens. In process (tinkerd's own ``build``, real uvicorn on 127.0.0.1, the real `openai` client),
so the test can look at the sampler itself."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import uvicorn

from tinkerd.server import Components, build, listen_socket
from tinkerd.settings import Settings

pytestmark = pytest.mark.openai

LONG = 8192  # positions: generating all of them would take minutes on the tiny model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[Components, str]]:
    tmp_path = tmp_path_factory.mktemp("openai-live")
    model_dir = tmp_path / "tiny-long"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = LONG
    (model_dir / "config.json").write_text(json.dumps(config))
    settings = Settings.load(
        models=[str(model_dir)], data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", host="127.0.0.1"
    )
    components = build(settings)
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(components.app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    components.start_worker()
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.01)
        yield components, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        components.close()


def _sample_futures(components: Components) -> list[tuple[str, str | None]]:
    db = components.settings.resolved_data_dir / "tinkerd.db"
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT state, error_message FROM futures WHERE kind = 'sample'"))


def _wait_for(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(served: tuple[Components, str]) -> None:
    components, url = served
    (name,) = components.worker.runtime.hosts
    host = components.worker.runtime.hosts[name]
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="tml-any", max_retries=0, timeout=60)
    stream = oai.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Tell me everything."}], max_tokens=LONG - 64,
        temperature=1.0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    assert _wait_for(lambda: host.sampler.has_work(), 30), "the request never reached the sampler"
    time.sleep(0.3)  # decoding now, with thousands of tokens to go
    assert host.sampler.has_work()
    stream.close()
    assert _wait_for(lambda: not host.sampler.has_work(), 10), "the sampler went on generating for a gone client"
    assert components.worker.sampling.in_flight_count() == 0
    assert _wait_for(lambda: bool(_sample_futures(components)) and _sample_futures(components)[0][0] == "failed", 5)
    ((state, message), *_) = _sample_futures(components)
    assert state == "failed" and message is not None and message.startswith("cancelled")

    # the sampler serves the next request as usual
    done = oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert done.usage is not None and done.usage.completion_tokens >= 1


def test_streamed_text_arrives_as_it_is_sampled_and_equals_the_whole_answer(served: tuple[Components, str]) -> None:
    components, url = served
    (name,) = components.worker.runtime.hosts
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="tml-any", max_retries=0, timeout=60)
    request = {
        "model": name,
        "prompt": "Once upon a time",
        "max_tokens": 48,
        "seed": 3,
        "extra_body": {"ignore_eos": True},
    }
    whole = oai.completions.create(**request)  # type: ignore[call-overload]
    pieces = [c.choices[0].text for c in oai.completions.create(stream=True, **request) if c.choices]  # type: ignore[call-overload]
    assert "".join(pieces) == whole.choices[0].text
    assert len([p for p in pieces if p]) > 3  # many deltas, not one burst at the end

"""Structure-aware fuzzing of the routes that feed the engine: forward_backward (protobuf, as SDK 0.38 sends it, and
the JSON of older SDKs), optim_step, save and load, and sampling, against a live tinkerd with a real worker.

Bodies are near-valid (right run, right seq_id, mostly valid tokens) so that most get past the first checks; the
broken part is one thing at a time: a token outside the vocabulary, a sequence longer than the context, a loss
input of the wrong shape or dtype, NaN or infinite values, an unknown loss, a corrupt message. Every answer must
be a 2xx or a 4xx with a message; every accepted request must finish, as a success or as a "user" failure with a
message (a "server" failure means the engine hit a bug the API let through).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tests.hardening.checks import check_answer, check_future
from tests.hardening.conftest import tally
from tests.hardening.fixtures import World
from tests.hardening.live import BOB, PROTOBUF, Live
from tests.hardening.protos import corrupted, fwdbwd_bytes, fwdbwd_messages, token_lists
from tests.hardening.strategies import EDGE_INTS, edge_floats, edge_ints, hostile_text, json_values, mostly
from tests.worker.harness import BASE
from tinkerd.store.tables import futures

pytestmark = [pytest.mark.integration, pytest.mark.fuzz]

EXAMPLES = int(os.environ.get("TINKERD_FUZZ_EXAMPLES", "80"))
# CI replays the same cases every run (a landing must not depend on luck); TINKERD_FUZZ_RANDOM=1 explores new ones.
RANDOM = os.environ.get("TINKERD_FUZZ_RANDOM") == "1"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def _has_seq(live: Live, model_id: str, seq_id: int) -> bool:
    query = select(futures.c.request_id).where(futures.c.model_id == model_id, futures.c.seq_id == seq_id)
    return live.store.db.read(lambda conn: conn.execute(query).first()) is not None


def send_in_order(live: Live, model_id: str, endpoint: str, send: Callable[[int], Any]) -> Any:
    """Send a request to a run with the run's next seq_id and check the answer; an accepted request is followed to
    its end. A refused one keeps the run moving (the server fills its seq_id) unless it was refused before the
    server could tell which run it was for: then the seq_id is not used up."""
    seq = live.next_seq(model_id)
    try:
        response = send(seq)
    except BaseException:  # e.g. hypothesis ended the example inside send: nothing was sent
        live._seq[model_id] = seq
        raise
    tally(endpoint, response.status_code)
    if not _has_seq(live, model_id, seq):
        live._seq[model_id] = seq  # not recorded: the next request may use it
    check_answer(response, f"{endpoint}: {response.request.content[:300]!r}")
    if response.status_code == 200:
        check_future(live, response)
    return response


def _post_proto(live: Live, body: bytes) -> Any:
    return live.client.post("/api/v1/forward_backward", content=body, headers={"content-type": PROTOBUF})


# -- forward_backward ----------------------------------------------------------------------------------------------


def test_forward_backward_protobuf(live: Live) -> None:
    run_id = live.run(rank=2)

    @FUZZ
    @given(st.data())
    def case(data: st.DataObject) -> None:
        message = data.draw(fwdbwd_messages(run_id, 0))

        def send(seq: int) -> Any:
            message.seq_id = seq
            return _post_proto(live, message.SerializeToString())

        send_in_order(live, run_id, "POST /forward_backward (protobuf)", send)

    case()


def test_corrupt_protobuf_bodies(live: Live) -> None:
    """Truncated, bit-flipped and padded SDK messages, and bytes that are no message at all. Aimed at a run of
    its own: a flipped bit may change the seq_id or model id, so nothing here is followed to its end."""
    run_id = live.run(rank=1)

    @FUZZ
    @given(st.integers(1, 2**20), token_lists(), st.data())
    def case(seq: int, tokens: list[int], data: st.DataObject) -> None:
        valid = fwdbwd_bytes(run_id, seq, tokens or [1])
        body = data.draw(corrupted(valid) | st.binary(max_size=200))
        response = _post_proto(live, body)
        tally("POST /forward_backward (corrupt protobuf)", response.status_code)
        check_answer(response, repr(body[:200]))

    case()


def _json_tensor(n: int) -> st.SearchStrategy[dict[str, Any]]:
    values = st.lists(edge_ints, min_size=n, max_size=n) | st.lists(edge_floats, min_size=n, max_size=n)
    return st.fixed_dictionaries(
        {"data": values | json_values, "dtype": st.sampled_from(["int64", "float32"]) | hostile_text},
        optional={
            "shape": st.just([n]) | st.lists(edge_ints, max_size=3) | st.none(),
            "sparse_crow_indices": st.lists(edge_ints, max_size=4),
            "sparse_col_indices": st.lists(edge_ints, max_size=4),
        },
    )


@st.composite
def json_datums(draw: st.DrawFn) -> dict[str, Any]:
    tokens = draw(token_lists())
    n = len(tokens)
    inputs = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "target_tokens": mostly(
                    st.just({"data": [*tokens[1:], 0][:n], "dtype": "int64", "shape": [n]}), _json_tensor(n)
                ),
                "weights": mostly(st.just({"data": [1.0] * n, "dtype": "float32", "shape": [n]}), _json_tensor(n)),
                "advantages": _json_tensor(n),
                "logprobs": _json_tensor(n),
            },
        )
    )
    chunk_type = draw(mostly(st.sampled_from(["encoded_text", None]), st.just("image")))
    chunk: dict[str, Any] = {"tokens": tokens} if chunk_type is None else {"type": chunk_type, "tokens": tokens}
    return {"model_input": {"chunks": [chunk]}, "loss_fn_inputs": inputs}


def test_forward_backward_and_forward_json(live: Live) -> None:
    """The JSON bodies of SDKs before 0.25 (/forward_backward and /forward)."""
    run_id = live.run(rank=1)

    @FUZZ
    @given(st.data(), st.booleans())
    def case(data: st.DataObject, forward: bool) -> None:
        config = data.draw(mostly(st.none(), st.dictionaries(hostile_text, edge_floats | hostile_text, max_size=2)))
        fb_input = {
            "data": data.draw(st.lists(json_datums(), min_size=1, max_size=3) | st.just([])),
            "loss_fn": data.draw(mostly(st.just("cross_entropy"), st.sampled_from(["ppo", "dro"]) | hostile_text)),
            "loss_fn_config": config,
        }
        endpoint = "forward" if forward else "forward_backward"
        key = "forward_input" if forward else "forward_backward_input"

        def send(seq: int) -> Any:
            return live.post(endpoint, {key: fb_input, "model_id": run_id, "seq_id": seq})

        send_in_order(live, run_id, f"POST /{endpoint} (JSON)", send)

    case()


# -- optimizer, checkpoints ----------------------------------------------------------------------------------------


def test_optim_step_save_and_load(live: Live, world: World) -> None:
    run_id = live.run(rank=2)
    paths = [world.alice.weights_path, world.alice.sampler_path, world.bob.weights_path, "tinker://x/weights/y"]
    path = st.sampled_from(paths) | hostile_text
    adam = st.fixed_dictionaries(
        {},
        optional={k: edge_floats for k in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")},
    )
    requests = st.one_of(
        st.tuples(st.just("optim_step"), st.fixed_dictionaries({}, optional={"adam_params": adam | st.none()})),
        st.tuples(
            st.just("save_weights"),
            st.fixed_dictionaries(
                {},
                optional={
                    "path": st.sampled_from(["c1", "c2", "ok-name_1.x"]) | hostile_text,
                    "ttl_seconds": edge_ints | st.none(),
                    "overwrite": st.booleans(),
                    "user_metadata": st.dictionaries(st.text(max_size=5), json_values, max_size=3),
                },
            ),
        ),
        st.tuples(
            st.just("save_weights_for_sampler"),
            st.fixed_dictionaries(
                {},
                optional={
                    "path": st.sampled_from(["s1", "s2"]) | hostile_text | st.none(),
                    "sampling_session_seq_id": st.sampled_from(EDGE_INTS) | st.integers(0, 5),
                    "ttl_seconds": edge_ints,
                },
            ),
        ),
        st.tuples(
            st.just("load_weights"),
            st.fixed_dictionaries({"path": path}, optional={"optimizer": st.booleans()}),
        ),
    )

    @FUZZ
    @given(requests)
    def case(request: tuple[str, dict[str, Any]]) -> None:
        endpoint, body = request

        def send(seq: int) -> Any:
            return live.post(endpoint, {**body, "model_id": run_id, "seq_id": seq})

        send_in_order(live, run_id, f"POST /{endpoint}", send)

    case()


def test_create_model_and_samplers(live: Live, world: World) -> None:
    """New runs (LoRA configs at and past every bound, foreign sessions) and samplers of checkpoints."""
    session_id = live.session()
    lora = st.fixed_dictionaries(
        {"rank": st.sampled_from([1, 2, 32, 0, -1, 10**6, 2**63]) | edge_ints},
        optional={k: st.booleans() | st.none() for k in ("train_attn", "train_mlp", "train_unembed")}
        | {"seed": edge_ints | st.none()},
    )
    counter = iter(range(10**6))
    paths = [world.alice.weights_path, world.alice.sampler_path, world.bob.sampler_path, world.bob.weights_path]

    @FUZZ
    @given(
        st.sampled_from([session_id, world.bob.session_id]) | hostile_text,
        lora | st.none(),
        st.sampled_from([BASE, "nope"]),
        st.sampled_from(paths) | hostile_text | st.none(),
    )
    def case(session: str, lora_config: Any, base_model: str, model_path: str | None) -> None:
        n = next(counter)
        body = {"session_id": session, "model_seq_id": n, "base_model": base_model, "lora_config": lora_config}
        response = live.post("create_model", body)
        tally("POST /create_model (structured)", response.status_code)
        check_answer(response, repr(body))
        if response.status_code == 200:
            check_future(live, response)
        body = {"session_id": session, "sampling_session_seq_id": n, "model_path": model_path, "base_model": None}
        response = live.post("create_sampling_session", body)
        tally("POST /create_sampling_session (structured)", response.status_code)
        check_answer(response, repr(body))

    case()


# -- sampling ------------------------------------------------------------------------------------------------------


def test_asample(live: Live, world: World) -> None:
    samplers = [world.alice.sampler_id, live.sampler(), world.bob.sampler_id]
    params = st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": mostly(st.integers(1, 8) | st.none(), st.sampled_from([0, -1, 250, 256, 2**31, 10**20])),
            "seed": mostly(st.integers(0, 2**32) | st.none(), edge_ints),
            "temperature": mostly(st.floats(0, 2) | st.none(), edge_floats),
            "top_k": mostly(st.sampled_from([-1, 1, 5]) | st.none(), edge_ints),
            "top_p": mostly(st.floats(0.01, 1) | st.none(), edge_floats),
            "stop": mostly(
                st.none() | st.lists(st.integers(0, 95), max_size=2),
                hostile_text | st.lists(hostile_text, max_size=2) | st.lists(edge_ints, max_size=3),
            ),
        },
    )
    seqs = iter(range(10**6))

    @FUZZ
    @given(
        mostly(st.sampled_from(samplers), hostile_text),
        token_lists(),
        params,
        mostly(st.integers(1, 4) | st.none(), st.sampled_from([0, -1, 256, 257, 10**9])),
        st.fixed_dictionaries(
            {},
            optional={
                "prompt_logprobs": st.booleans() | st.none(),
                "topk_prompt_logprobs": mostly(st.integers(0, 3), edge_ints),
                "topk_sample_logprobs": mostly(st.just(0), edge_ints),
                "prompt_logprobs_last_n": mostly(st.none(), edge_ints),
            },
        ),
    )
    def case(sampler: str, prompt: list[int], sampling: Any, num_samples: Any, extra: dict[str, Any]) -> None:
        body = {
            "sampling_session_id": sampler,
            "seq_id": next(seqs),
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "sampling_params": sampling,
            "num_samples": num_samples,
            **extra,
        }
        response = live.post("asample", body, headers={"X-Tinker-Sampling-Backpressure": "1"})
        tally("POST /asample (structured)", response.status_code)
        check_answer(response, repr(body)[:500])
        if response.status_code == 200:
            check_future(live, response)

    case()


def test_foreign_run_is_never_reached(live: Live, world: World) -> None:
    """Bob's run, addressed by alice in every way: 404, and nothing is queued for it."""
    before = live.store.db.read(
        lambda conn: conn.execute(select(futures.c.request_id).where(futures.c.model_id == world.bob.run_id)).all()
    )
    for seq in range(1, 30):
        response = _post_proto(live, fwdbwd_bytes(world.bob.run_id, seq, [1, 2, 3]))
        assert response.status_code == 404, response.text
    after = live.store.db.read(
        lambda conn: conn.execute(select(futures.c.request_id).where(futures.c.model_id == world.bob.run_id)).all()
    )
    assert after == before
    assert live.post("get_info", {"model_id": world.bob.run_id}, key=BOB).status_code == 200

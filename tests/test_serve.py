"""``tunesmith serve`` checked with the real ``openai`` client against a running server.

One server for the whole module, on a tiny random Llama (varied enough that its greedy replies
are not one repeated token) with one LoRA adapter, runs in a thread of this process, so that
tests can pause its batcher and read the batches it ran.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.helpers import run_cli
from tunesmith.generation import GenerationOptions, generate_batch, generate_reply, prompt_ids

API_KEY = "test-key"
BASE = "tiny"
ADAPTER = "tiny-lora"
MAX_QUEUE = 40
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def model_folders(tiny_model_dir, tmp_path_factory):
    """A tiny model whose greedy replies vary, and a LoRA adapter that changes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model_dir = tmp_path_factory.mktemp("serve-model")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        adapter_dir = tmp_path_factory.mktemp("serve-adapter")
        get_peft_model(model, lora).save_pretrained(adapter_dir)
    return model_dir, adapter_dir


@pytest.fixture(scope="module")
def server(model_folders):
    """The running server: its base URL and its batcher."""
    import uvicorn

    from tunesmith import models
    from tunesmith.adapters import load_named_adapters
    from tunesmith.plugins import create_plugin_manager
    from tunesmith.runtime import select_runtime
    from tunesmith.serving.batcher import Batcher
    from tunesmith.serving.server import ServerSettings, create_app

    model_dir, adapter_dir = model_folders
    runtime = select_runtime(create_plugin_manager(), "cpu", "fp32")
    loaded, tokenizer = models.load_for_inference(str(model_dir), runtime)
    loaded = load_named_adapters(loaded, {ADAPTER: adapter_dir})
    batcher = Batcher(loaded, tokenizer, adapters=(ADAPTER,), max_queue=MAX_QUEUE, max_batch_rows=32)
    settings = ServerSettings(
        base_model=BASE, adapters=(ADAPTER,), api_key=API_KEY, max_body_bytes=64 * 1024, context_length=256, default_max_tokens=16
    )
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(batcher, settings), log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [listening]}, daemon=True)
    batcher.start()
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{listening.getsockname()[1]}", batcher
    uvicorn_server.should_exit = True
    thread.join()
    batcher.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def batcher(server):
    return server[1]


def post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server[0]}{path}", content=content, headers=headers, timeout=60)


def chat(client, **fields):
    return client.chat.completions.create(model=fields.pop("model", BASE), messages=fields.pop("messages", MESSAGES), **fields)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting until {what}"
        time.sleep(0.01)


def last_batch(batcher):
    with batcher.paused():  # waits for the batch in progress to end
        return batcher.recent_batches[-1]


@pytest.mark.parametrize("model", [BASE, ADAPTER])
def test_greedy_replies_equal_generate_reply_for_the_base_model_and_the_adapter(client, model_folders, model):
    from tunesmith import models
    from tunesmith.plugins import create_plugin_manager
    from tunesmith.runtime import select_runtime

    model_dir, adapter_dir = model_folders
    runtime = select_runtime(create_plugin_manager(), "cpu", "fp32")
    reference, tokenizer = models.load_for_inference(str(model_dir), runtime, adapter_dir if model == ADAPTER else None)
    expected = generate_reply(reference, tokenizer, MESSAGES, GenerationOptions(max_new_tokens=12))
    reply = chat(client, model=model, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected and expected.strip()
    assert reply.model == model and reply.usage.completion_tokens == 12


def test_the_adapter_is_chosen_by_the_model_name(client):
    replies = {model: chat(client, model=model, temperature=0, max_tokens=12).choices[0].message.content for model in (BASE, ADAPTER)}
    assert replies[BASE] != replies[ADAPTER]
    assert [m.id for m in client.models.list().data] == [BASE, ADAPTER]


def test_streaming_sends_the_same_text_in_pieces(client):
    whole = chat(client, temperature=0, max_tokens=12).choices[0].message.content
    chunks = list(chat(client, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_a_stream_ends_with_done_and_completions_stream_too(server):
    body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_n_choices_sampled_with_a_seed_are_reproducible(client):
    first = chat(client, n=3, temperature=1.0, seed=7, max_tokens=10)
    again = chat(client, n=3, temperature=1.0, seed=7, max_tokens=10)
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in again.choices]
    assert len(set(texts)) > 1
    completion = client.completions.create(model=BASE, prompt="Once", n=2, seed=3, max_tokens=6, temperature=1.0)
    assert len(completion.choices) == 2


def test_a_stop_string_ends_the_reply_before_it(client):
    whole = chat(client, temperature=0, max_tokens=16).choices[0].message.content
    stop = whole[6:9]
    reply = chat(client, temperature=0, max_tokens=16, stop=[stop, "never appears"])
    assert reply.choices[0].message.content == whole[: whole.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, temperature=0, max_tokens=16, stop=stop, stream=True))
    assert streamed == whole[: whole.find(stop)]


def test_max_tokens_and_logprobs(client):
    reply = chat(client, temperature=0, max_tokens=3, logprobs=True)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    logprobs = reply.choices[0].logprobs.content
    assert len(logprobs) == 3 and all(entry.logprob <= 0 for entry in logprobs)
    assert "".join(entry.token for entry in logprobs) == reply.choices[0].message.content


def test_requests_without_the_api_key_are_refused_but_health_answers(server):
    wrong = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(wrong, max_tokens=2)
    assert refused.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server[0]}/v1/models").status_code == 401
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        ({"model": BASE}, 400, "messages"),
        ({"model": "no-such-model", "messages": MESSAGES}, 404, "model"),
        ({"model": BASE, "messages": MESSAGES, "temperature": 3}, 400, "temperature"),
        ({"model": BASE, "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": BASE, "messages": MESSAGES, "n": "2"}, 400, "n"),
        ({"model": BASE, "messages": MESSAGES, "temprature": 0.5}, 400, "temprature"),
        ({"model": BASE, "messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages"),
        ({"model": BASE, "messages": MESSAGES, "max_tokens": 250}, 400, "max_tokens"),
        ({"model": BASE, "messages": [{"role": "user", "content": "x" * 70_000}]}, 413, None),
    ],
    ids=["malformed-json", "no-messages", "unknown-model", "temperature", "negative-max-tokens", "n-string", "misspelled-field",
         "prompt-too-long", "prompt-plus-max-tokens-too-long", "oversized-body"],
)
def test_a_bad_request_gets_its_status_and_an_error_body_and_the_server_stays_up(server, client, body, status, param):
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert chat(client, max_tokens=2).choices[0].message.content is not None


def test_an_unknown_route_gets_an_error_body(server):
    response = httpx.get(f"{server[0]}/v1/engines", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and "/v1/chat/completions" in response.json()["error"]["message"]


def test_many_concurrent_requests_are_all_answered(client, batcher):
    def ask(index: int) -> str:
        return chat(client, messages=[{"role": "user", "content": f"Count to {index}."}], max_tokens=4, seed=index).id

    with ThreadPoolExecutor(32) as pool:
        ids = list(pool.map(ask, range(32)))
    assert len(set(ids)) == 32


def test_concurrent_requests_are_generated_in_one_batch(client, batcher):
    with ThreadPoolExecutor(8) as pool:
        with batcher.paused():
            futures = [pool.submit(chat, client, max_tokens=3, seed=index) for index in range(8)]
            wait_for(lambda: batcher.waiting == 8, "8 requests wait")
        replies = [future.result() for future in futures]
    assert all(reply.choices[0].finish_reason for reply in replies)
    assert last_batch(batcher).requests == 8 and last_batch(batcher).rows == 8
    # Requests for different adapters are never batched together.
    with ThreadPoolExecutor(4) as pool:
        with batcher.paused():
            futures = [pool.submit(chat, client, model=model, max_tokens=2) for model in (BASE, ADAPTER, BASE, ADAPTER)]
            wait_for(lambda: batcher.waiting == 4, "4 requests wait")
        [future.result() for future in futures]
    last = last_batch(batcher)
    assert sorted((b.adapter or "", b.requests) for b in (batcher.recent_batches[-2], last)) == [("", 2), (ADAPTER, 2)]


class Submitted:
    """A job given straight to the batcher (for the base model), and the tokens each choice got.

    ``after_first_step`` is called from the worker thread once the job has its first tokens.
    """

    def __init__(self, prompt: list[int], options: GenerationOptions, *, n: int = 1, after_first_step=None):
        from tunesmith.serving.batcher import Job

        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.outcome: BaseException | None = None
        self.done = threading.Event()
        self.after_first_step = after_first_step
        self.job = Job(prompt, options, n=n, stop=(), adapter=None, deliver=self._deliver)

    def _deliver(self, item) -> None:
        if item is None or isinstance(item, BaseException):
            self.outcome = item
            self.done.set()
            return
        for piece in item:
            self.token_ids[piece.index] += piece.token_ids
        if self.after_first_step is not None:
            after, self.after_first_step = self.after_first_step, None
            after()

    def result(self) -> list[list[int]]:
        assert self.done.wait(30) and self.outcome is None, self.outcome
        return self.token_ids


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_a_request_joins_a_running_batch_and_gets_the_reply_it_gets_alone(batcher, temperature):
    tokenizer = batcher.tokenizer
    joining_prompt = prompt_ids(tokenizer, [{"role": "user", "content": "Say hi."}])
    options = GenerationOptions(max_new_tokens=6, temperature=temperature, seed=3)
    joining = Submitted(joining_prompt, options, n=2)
    # The long request is running when the other arrives: it is queued after the long one's first step.
    running = Submitted(
        prompt_ids(tokenizer, MESSAGES), GenerationOptions(max_new_tokens=30), after_first_step=lambda: batcher.submit(joining.job)
    )
    batcher.submit(running.job)
    replies = joining.result()
    record = last_batch(batcher)
    assert record.joined_at_step == (0, 1) and record.requests == 2 and record.rows == 3 and record.most_rows == 3
    assert len(running.result()[0]) == record.steps == 30, "the long request ran through, the other joined and left inside it"
    with batcher.paused(), batcher.model.disable_adapter():
        alone = generate_batch(batcher.model, tokenizer, [joining_prompt], options, num_return_sequences=2)
    assert replies == [completion.token_ids for completion in alone] and len(replies[0]) == 6


def test_a_request_that_ends_frees_its_rows_for_a_waiting_one(batcher):
    prompt = prompt_ids(batcher.tokenizer, MESSAGES)
    long = Submitted(prompt, GenerationOptions(max_new_tokens=20))
    wide = Submitted(prompt, GenerationOptions(max_new_tokens=2), n=batcher.max_batch_rows - 1)
    waiting = Submitted(prompt, GenerationOptions(max_new_tokens=2))
    with batcher.paused():
        for submitted in (long, wide, waiting):
            batcher.submit(submitted.job)
    assert waiting.result() == [long.result()[0][:2]]
    record = last_batch(batcher)
    assert record.joined_at_step == (0, 0, len(wide.result()[0])), "the waiting request joined when the wide one ended"
    assert record.most_rows == batcher.max_batch_rows and record.rows == batcher.max_batch_rows + 1


def test_a_full_queue_answers_429_and_serves_the_rest(client, batcher):
    def ask(index: int):
        try:
            return chat(client, max_tokens=2, seed=index)
        except openai.RateLimitError as refused:
            return refused

    with ThreadPoolExecutor(MAX_QUEUE + 8) as pool:
        with batcher.paused():
            futures = [pool.submit(ask, index) for index in range(MAX_QUEUE + 8)]
            wait_for(lambda: batcher.waiting == MAX_QUEUE and sum(f.done() for f in futures) == 8, "the queue is full")
        outcomes = [future.result() for future in futures]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(refused) == 8 and all(r.status_code == 429 and r.body["code"] == "queue_full" for r in refused)
    assert sum(not isinstance(o, Exception) for o in outcomes) == MAX_QUEUE


def test_a_client_that_disconnects_mid_stream_frees_its_row(client, batcher):
    stream = chat(client, max_tokens=200, temperature=1.0, seed=1, stream=True)
    next(stream)
    next(stream)
    stream.close()
    assert last_batch(batcher).steps < 200, batcher.recent_batches[-1]
    assert chat(client, max_tokens=2).choices[0].message.content is not None


def test_the_serve_command_loads_the_model_and_adapters_it_is_given(model_folders, monkeypatch):
    import uvicorn
    from starlette.testclient import TestClient

    model_dir, adapter_dir = model_folders
    answers = []

    def run(app, host, port, log_level):  # instead of listening: one request through the app
        assert (host, port) == ("127.0.0.1", 8123)
        with TestClient(app) as test_client:
            headers = {"Authorization": "Bearer env-key"}
            answers.append(test_client.get("/v1/models", headers=headers).json())
            body = {"model": "mine", "messages": MESSAGES, "max_tokens": 2}
            answers.append(test_client.post("/v1/chat/completions", json=body, headers=headers).json())

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setenv("TUNESMITH_API_KEY", "env-key")
    args = ("--model", model_dir, "--model-name", "base", "--adapter", f"mine={adapter_dir}", "--port", "8123", "--device", "cpu")
    assert run_cli("serve", *args) == 0
    assert [model["id"] for model in answers[0]["data"]] == ["base", "mine"]
    assert answers[1]["model"] == "mine" and answers[1]["usage"]["completion_tokens"] == 2


def test_serve_refuses_bad_options_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TUNESMITH_API_KEY", raising=False)
    assert run_cli("serve", "--host", "0.0.0.0") == 2
    assert "set --api-key" in capsys.readouterr().err
    assert run_cli("serve", "--adapter", "no-equals-sign") == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
    assert run_cli("serve", "--adapter", f"Bad={tmp_path}") == 2
    assert "invalid adapter name 'Bad'" in capsys.readouterr().err


class CharacterTokenizer:
    """Token i is the i-th character of ``alphabet``; enough to drive ChoiceText."""

    alphabet = "abc END\ufffd"

    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in token_ids)


def test_choice_text_holds_back_what_may_start_a_stop_string_and_cuts_at_it():
    from tunesmith.serving.choice_text import ChoiceText

    text = ChoiceText(CharacterTokenizer(), stop=["END"])
    tokens, sent = [], []
    for character in "ab EN":  # "EN" might begin "END": held back
        tokens.append(CharacterTokenizer.alphabet.index(character))
        sent.append(text.advance(tokens, finished=False))
    assert "".join(piece for piece, _ in sent) == "ab " and not any(stopped for _, stopped in sent)
    tokens.append(CharacterTokenizer.alphabet.index("D"))
    assert text.advance(tokens, finished=False) == ("", True)  # the reply is "ab ", already sent

    text = ChoiceText(CharacterTokenizer(), stop=["END"])
    assert text.advance([0, 3, 4], finished=False) == ("a ", False)
    assert text.advance([0, 3, 4, 0], finished=False) == ("Ea", False)  # "Ea" cannot start "END" any more
    assert text.advance([0, 3, 4, 0, 7], finished=False) == ("", False)  # a character not yet whole
    assert text.advance([0, 3, 4, 0, 7], finished=True) == ("\ufffd", False)

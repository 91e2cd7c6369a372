"""`tunesmith serve --engine vllm`, started as a user would, checked with the real `openai` client.

Greedy replies are compared with tunesmith's own generation on the same model and adapter
(transformers, fp32), so the engine's answers, its stop strings and its adapters are checked
against an independent implementation.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tunesmith import GenerationOptions, generate_batch

API_KEY = "test-key"
ADAPTER = "tiny-lora"
QUESTIONS = ["Name three colours.", "What is two plus two?", "Say hello.", "Where is Paris?"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        )
        folder = tmp_path_factory.mktemp("adapter")
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dir, tmp_path_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "serve", "--engine", "vllm", "--model", str(tiny_model_dir), "--model-name", "tiny",
         "--adapter", f"{ADAPTER}={adapter_dir}", "--device", "cpu", "--precision", "fp32", "--port", str(port),
         "--api-key", API_KEY, "--max-batch-size", "8", "--max-queue", "64"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TUNESMITH_PLUGINS": "tunesmith-vllm"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, open(log.name).read()[-3000:]
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dir):
    """Greedy replies of tunesmith's own generation, by model name and question."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False) for q in QUESTIONS]
    greedy = GenerationOptions(max_new_tokens=12)
    replies = {"tiny": [c.text for c in generate_batch(base, tokenizer, prompts, greedy)]}
    adapted = PeftModel.from_pretrained(base, adapter_dir)
    replies[ADAPTER] = [c.text for c in generate_batch(adapted, tokenizer, prompts, greedy)]
    return replies


def chat(client, question=QUESTIONS[0], **fields):
    return client.chat.completions.create(
        model=fields.pop("model", "tiny"), messages=[{"role": "user", "content": question}], **fields
    )


@pytest.mark.parametrize("model", ["tiny", ADAPTER])
def test_greedy_replies_equal_tunesmith_s_own_for_the_base_model_and_the_adapter(client, reference, model):
    replies = [chat(client, question, model=model, temperature=0, max_tokens=12).choices[0].message.content for question in QUESTIONS]
    assert replies == reference[model]
    assert reference["tiny"] != reference[ADAPTER]


def test_concurrent_requests_are_all_answered_as_alone(client, reference):
    jobs = [(model, index) for model in ("tiny", ADAPTER) for index in range(len(QUESTIONS))] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: chat(client, QUESTIONS[job[1]], model=job[0], temperature=0, max_tokens=12), jobs))
    assert [reply.choices[0].message.content for reply in replies] == [reference[model][index] for model, index in jobs]


def test_streaming_sends_the_same_text_in_pieces(client):
    whole = chat(client, temperature=0, max_tokens=12).choices[0].message.content
    chunks = list(chat(client, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_a_stop_string_ends_the_reply_before_it(client):
    whole = chat(client, temperature=0, max_tokens=16).choices[0].message.content
    stop = whole[6:9]
    reply = chat(client, temperature=0, max_tokens=16, stop=[stop, "never appears"])
    assert reply.choices[0].message.content == whole[: whole.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, temperature=0, max_tokens=16, stop=stop, stream=True))
    assert streamed == whole[: whole.find(stop)]


def test_n_choices_sampled_with_a_seed_are_reproducible_and_logprobs_come_back(client):
    first = chat(client, n=3, temperature=1.0, seed=7, max_tokens=10, logprobs=True)
    again = chat(client, n=3, temperature=1.0, seed=7, max_tokens=10)
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in again.choices] and len(set(texts)) > 1
    logprobs = first.choices[0].logprobs.content
    assert all(entry.logprob <= 0 for entry in logprobs) and "".join(entry.token for entry in logprobs) == texts[0]


def test_the_server_answers_on_after_a_client_goes_away_mid_stream(server, client, reference):
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 400, "stream": True, "n": 8}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        next(response.iter_lines())
    # The abandoned request held every row (n=8 of 8); the next is answered once they are freed.
    reply = chat(client, QUESTIONS[1], temperature=0, max_tokens=12, timeout=60)
    assert reply.choices[0].message.content == reference["tiny"][1]


def test_past_the_queue_bound_requests_are_refused_with_429_and_the_rest_answered(client, reference):
    """8 rows run and 64 requests wait (--max-queue 64); 150 at once overflow the queue."""

    def ask(index):
        try:
            return chat(client, QUESTIONS[index % len(QUESTIONS)], temperature=0, max_tokens=12).choices[0].message.content
        except openai.RateLimitError as refused:
            return refused

    with ThreadPoolExecutor(150) as pool:
        outcomes = list(pool.map(ask, range(150)))
    refused = [outcome for outcome in outcomes if isinstance(outcome, openai.RateLimitError)]
    answered = [(index, outcome) for index, outcome in enumerate(outcomes) if isinstance(outcome, str)]
    assert refused and len(answered) >= 72
    assert all(reply == reference["tiny"][index % len(QUESTIONS)] for index, reply in answered)
    assert refused[0].status_code == 429 and refused[0].body["code"] == "queue_full"

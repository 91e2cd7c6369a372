"""``tunesmith eval``: each metric checked against an independent computation on the same data.

Perplexity against a plain transformers forward pass and cross-entropy over the tokens the
test picks out itself; exact_match against replies generated one at a time; bleu and rouge
against sacrebleu and rouge-score called directly; a reward against the function called directly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import run_cli, write_jsonl
from tunesmith.generation import GenerationOptions, generate_reply

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Rain falls softly on the old tin roof tonight.", "One two three."]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris, of course."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend!"}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}],
]
QUESTIONS = ["Hello!", "What is the capital of France?", "Write a haiku about rain.", "Count to three."]
MAX_NEW_TOKENS = 6


def evaluate(model_dir, dataset, output, *metrics_and_options) -> dict:
    assert run_cli("eval", "--model", model_dir, "--dataset", dataset, "--output", output, "--precision", "fp32", *metrics_and_options) == 0
    return json.loads(output.read_text())["metrics"]


def summed_nll(model, input_ids: list[int], predicted_from: int) -> tuple[float, int]:
    """Cross-entropy of tokens ``predicted_from`` onwards, each predicted from those before it, in one unpadded forward pass."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    losses = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")[predicted_from - 1 :]
    return losses.sum().item(), len(losses)


@pytest.fixture(scope="module")
def model_and_tokenizer(talkative_model_dir):
    return AutoModelForCausalLM.from_pretrained(talkative_model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(talkative_model_dir)


def test_perplexity_of_text_counts_every_token(talkative_model_dir, model_and_tokenizer, tmp_path):
    dataset = write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in TEXTS])
    metrics = evaluate(talkative_model_dir, dataset, tmp_path / "results.json", "--metric", "perplexity", "--batch-size", "2")
    model, tokenizer = model_and_tokenizer
    total, count = 0.0, 0
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # pt's closing eos is predicted too
        nll, tokens = summed_nll(model, ids, 1)
        total, count = total + nll, count + tokens
    assert metrics["perplexity"]["tokens"] == count and metrics["perplexity"]["rows"] == len(TEXTS)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.json", "text.jsonl"], "a staging file was left behind"
    assert metrics["perplexity"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_of_chats_counts_assistant_tokens_only(talkative_model_dir, model_and_tokenizer, tmp_path):
    dataset = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    metrics = evaluate(talkative_model_dir, dataset, tmp_path / "results.json", "--metric", "perplexity", "--batch-size", "2")
    model, tokenizer = model_and_tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    total, count = 0.0, 0
    for chat in CHATS:
        prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(chat, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        # The reply's tokens through its end-of-turn marker: what the model must produce.
        reply_end = ids.index(end_of_turn, len(prompt_ids)) + 1
        nll, tokens = summed_nll(model, ids[:reply_end], len(prompt_ids))
        total, count = total + nll, count + tokens
    assert metrics["perplexity"]["tokens"] == count
    assert metrics["perplexity"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_reference_metrics_on_known_replies(talkative_model_dir, model_and_tokenizer, tmp_path, capsys):
    import sacrebleu
    from rouge_score import rouge_scorer

    model, tokenizer = model_and_tokenizer
    options = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)
    replies = [generate_reply(model, tokenizer, [{"role": "user", "content": q}], options) for q in QUESTIONS]
    # Two references equal to the reply up to whitespace, one sharing its first word, one unrelated.
    references = [f"  {replies[0]}  ", replies[1].replace(" ", "\n "), replies[2].split()[0] + " and more", "Something else entirely."]
    assert len({r.strip() for r in replies}) == len(replies)
    # Two references in an 'answer' column, two as the assistant reply the conversation ends with.
    rows = [{"messages": [{"role": "user", "content": q}], "answer": ref} for q, ref in zip(QUESTIONS[:2], references[:2])]
    rows += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ref}]} for q, ref in zip(QUESTIONS[2:], references[2:])]
    dataset = write_jsonl(tmp_path / "qa.jsonl", rows)
    metrics = evaluate(
        talkative_model_dir, dataset, tmp_path / "results.json",
        "--metric", "exact_match", "--metric", "bleu", "--metric", "rouge", "--max-new-tokens", MAX_NEW_TOKENS, "--batch-size", "3",
    )
    assert metrics["exact_match"] == {"score": 0.5, "matches": 2, "rows": 4}
    assert metrics["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(replies, [references]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for kind in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(ref, reply)[kind].fmeasure for ref, reply in zip(references, replies)) / len(replies)
        assert metrics["rouge"][kind] == pytest.approx(expected)
    table = capsys.readouterr().out
    assert "exact_match" in table and "2 of 4 rows" in table and "rougeL" in table


def test_replies_written_to_predictions_are_reused(talkative_model_dir, model_and_tokenizer, tmp_path, monkeypatch):
    import tunesmith.batch_inference as batch_inference

    model, tokenizer = model_and_tokenizer
    options = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)
    replies = [generate_reply(model, tokenizer, [{"role": "user", "content": q}], options) for q in QUESTIONS]
    dataset = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "answer": reply} for q, reply in zip(QUESTIONS, replies)])
    predictions = tmp_path / "predictions.jsonl"
    arguments = ("--metric", "exact_match", "--predictions", predictions, "--max-new-tokens", MAX_NEW_TOKENS)
    assert evaluate(talkative_model_dir, dataset, tmp_path / "results.json", *arguments)["exact_match"]["score"] == 1.0
    written = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert written == [{"prompt": q, "answer": reply, "response": reply} for q, reply in zip(QUESTIONS, replies)]

    def no_generation(*args, **kwargs):
        raise AssertionError("a reply in --predictions was generated again")

    monkeypatch.setattr(batch_inference, "generate_batch", no_generation)
    assert evaluate(talkative_model_dir, dataset, tmp_path / "again.json", *arguments)["exact_match"]["score"] == 1.0


def longer_than(prompts, completions, limit, **columns):
    """A test reward: 1 when the reply has more characters than the row's ``limit``, None without a limit."""
    return [None if cap is None else float(len(completion) > cap) for completion, cap in zip(completions, limit)]


def test_a_reward_metric_averages_the_scored_rows(talkative_model_dir, model_and_tokenizer, tmp_path, monkeypatch):
    from tunesmith_rewards.length import length_reward

    model, tokenizer = model_and_tokenizer
    options = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)
    replies = [generate_reply(model, tokenizer, [{"role": "user", "content": q}], options) for q in QUESTIONS]
    limits = [len(replies[0]) - 1, len(replies[1]) + 1, None, 0]
    targets = [10, 20, 30, 40]
    rows = [{"prompt": q, "limit": cap, "target_length": target} for q, cap, target in zip(QUESTIONS, limits, targets)]
    dataset = write_jsonl(tmp_path / "prompts.jsonl", rows)
    monkeypatch.setenv("TUNESMITH_PLUGINS", "rewards")
    metrics = evaluate(
        talkative_model_dir, dataset, tmp_path / "results.json", "--metric", "reward:length",
        "--metric", "reward:tests.test_evaluation:longer_than", "--max-new-tokens", MAX_NEW_TOKENS,
    )
    # Rows given as text get their replies as text. Longer than 1 shorter, not than 1 longer, unscored, longer than empty.
    assert metrics["reward:tests.test_evaluation:longer_than"] == {"mean": pytest.approx(2 / 3), "scored": 3, "unscored": 1}
    expected = length_reward(QUESTIONS, replies, target_length=targets)
    assert metrics["reward:length"] == {"mean": pytest.approx(sum(expected) / len(expected)), "scored": 4, "unscored": 0}


def test_a_missing_reference_is_named_before_the_model_loads(talkative_model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi", "answer": "Hello"}, {"prompt": "Bye"}])
    assert run_cli("eval", "--model", talkative_model_dir, "--dataset", dataset, "--metric", "exact_match") != 0
    assert f"{dataset}:2: --metric exact_match needs a reference" in capsys.readouterr().err


def test_an_unknown_metric_is_refused(talkative_model_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    assert run_cli("eval", "--model", talkative_model_dir, "--dataset", dataset, "--metric", "accuracy") != 0
    assert "--metric accuracy: unknown metric; expected perplexity, exact_match, bleu, rouge or reward:NAME" in capsys.readouterr().err

"""The ``tunesmith`` model type of lm-evaluation-harness, and ``tunesmith eval --lm-eval-tasks``.

Scores are checked against a plain transformers forward pass (a peft-merged model for an
adapter) and against lm-eval's own ``hf`` model; generations against tunesmith's greedy
generation of the same prompt without stop strings, cut by the test. Tasks are YAML files
written here over local JSON Lines files: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when datasets is imported: task data is local

import pytest
import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunesmith.lm_eval  # noqa: F401  (registers the tunesmith model type)
from tests.helpers import run_cli, write_jsonl
from tunesmith.generation import GenerationOptions, generate_batch

TASK = "tiny_choices"
# Choices carry their own leading space (the task's target_delimiter is empty), so that one can
# be the model's own greedy continuation, whatever its first character.
QUESTIONS = [
    {"question": "What is two plus two?", "choices": [" three", " four", " five"], "answer": 1},
    {"question": "Which of these is a colour?", "choices": [" red", " running"], "answer": 0},
    {"question": "Where do fish live?", "choices": [" in trees", " in water", " on the moon"], "answer": 1},
]
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
FP32_ON_CPU = {"precision": "fp32", "device": "cpu"}


def context(question: dict) -> str:
    """The prompt the task YAML renders for ``question``."""
    return f"Question: {question['question']}\nAnswer:"


@pytest.fixture(scope="module")
def questions(talkative_model_dir, tokenizer):
    """QUESTIONS plus one whose first choice is the model's own greedy continuation, so that an
    is_greedy flag of True is checked too."""
    model = AutoModelForCausalLM.from_pretrained(talkative_model_dir, dtype=torch.float32).eval()
    prompt = {"question": "Say something.", "answer": 0}
    ids = tokenizer(context(prompt), add_special_tokens=False)["input_ids"]
    greedy = generate_batch(model, tokenizer, [ids], GenerationOptions(max_new_tokens=2)).pop().token_ids
    return [*QUESTIONS, {**prompt, "choices": [tokenizer.decode(greedy), " something else"]}]


@pytest.fixture(scope="module")
def tokenizer(talkative_model_dir):
    return AutoTokenizer.from_pretrained(talkative_model_dir)


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory, questions):
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = write_jsonl(folder / "questions.jsonl", questions)
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, cache=tmp_path_factory.mktemp("datasets-cache")))
    return folder


def direct_loglikelihood(model, tokenizer, context_text: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's definition computed with one unpadded transformers forward pass in fp32: the
    continuation's tokens are those the whole text has beyond the context's own tokens."""
    context_ids = tokenizer(context_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context_text + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    log_probs = F.log_softmax(logits[len(context_ids) - 1 : -1], dim=-1)
    continuation_ids = torch.tensor(ids[len(context_ids) :])
    logp = log_probs.gather(1, continuation_ids[:, None]).sum().item()
    return logp, bool((log_probs.argmax(dim=-1) == continuation_ids).all())


def expected_choices(model, tokenizer, questions) -> list[list[tuple[float, bool]]]:
    return [[direct_loglikelihood(model, tokenizer, context(q), choice) for choice in q["choices"]] for q in questions]


def assert_scores_equal(actual: list[tuple[float, bool]], expected: list[tuple[float, bool]]) -> None:
    assert [greedy for _, greedy in actual] == [greedy for _, greedy in expected]
    assert [logp for logp, _ in actual] == pytest.approx([logp for logp, _ in expected], abs=1e-4)


def test_a_local_multiple_choice_task_scores_each_choice_as_transformers_does(
    talkative_model_dir, tokenizer, questions, task_folder
):
    results = simple_evaluate(
        model="tunesmith",
        model_args={"model": str(talkative_model_dir), "batch_size": 2, **FP32_ON_CPU},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
    )
    model = AutoModelForCausalLM.from_pretrained(talkative_model_dir, dtype=torch.float32).eval()
    expected = expected_choices(model, tokenizer, questions)
    assert any(greedy for row in expected for _, greedy in row), "no greedy choice: the is_greedy check would test only False"
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    for sample, row in zip(samples, expected, strict=True):
        assert_scores_equal([tuple(response[0]) for response in sample["resps"]], row)
    right = [max(range(len(row)), key=lambda i: row[i][0]) == q["answer"] for q, row in zip(questions, expected, strict=True)]
    assert results["results"][TASK]["acc,none"] == pytest.approx(sum(right) / len(right))


def test_rolling_loglikelihood_in_short_windows_equals_lm_eval_hf_model(talkative_model_dir, tokenizer):
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the green forest."
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) > 16, "the text must need several windows"
    tunesmith_model = get_model("tunesmith").create_from_arg_string(
        f"model={talkative_model_dir},precision=fp32,device=cpu,max_length=8"
    )
    model = AutoModelForCausalLM.from_pretrained(talkative_model_dir, dtype=torch.float32).eval()
    # lm-eval's hf model feeds max_length tokens and predicts the one after; tunesmith feeds every token it scores.
    reference = HFLM(pretrained=model, tokenizer=tokenizer, max_length=7, batch_size=1, device="cpu")
    request = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    assert tunesmith_model.loglikelihood_rolling(request) == pytest.approx(reference.loglikelihood_rolling(request), abs=1e-4)


def test_generate_until_is_tunesmith_greedy_generation_cut_at_the_stop_string(talkative_model_dir, tokenizer):
    lm = get_model("tunesmith").create_from_arg_string(f"model={talkative_model_dir},precision=fp32,device=cpu,batch_size=2")
    prompts = ["Question: Where do fish live?\nAnswer:", "Once upon a time", "The capital of France is"]
    uncut = [
        completion.text
        for completion in generate_batch(
            lm.model,
            tokenizer,
            [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
            GenerationOptions(max_new_tokens=12),
        )
    ]
    stop = uncut[0][len(uncut[0]) // 2 :][:2]
    assert stop.strip(), f"no stop string to pick from {uncut[0]!r}"
    requests = [
        Instance(
            request_type="generate_until", doc={}, arguments=(p, {"until": [stop], "max_gen_toks": 12, "do_sample": False}), idx=0
        )
        for p in prompts
    ]
    replies = lm.generate_until(requests)
    assert replies == [text[: text.find(stop)] if stop in text else text for text in uncut]
    assert len(replies[0]) < len(uncut[0])


def test_an_adapter_scores_as_the_peft_merged_model(talkative_model_dir, tokenizer, tmp_path):
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(talkative_model_dir, dtype=torch.float32)
    # Random (not zero) LoRA B, so the adapter really changes the scores.
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter"
    )
    lm = get_model("tunesmith").create_from_arg_obj(
        {"model": str(talkative_model_dir), "adapter": str(tmp_path / "adapter"), **FP32_ON_CPU}
    )
    pairs = [(context(q), choice) for q in QUESTIONS for choice in q["choices"]]
    scores = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0) for pair in pairs])

    base_model = AutoModelForCausalLM.from_pretrained(talkative_model_dir, dtype=torch.float32).eval()
    base_scores = [direct_loglikelihood(base_model, tokenizer, *pair) for pair in pairs]
    merged = PeftModel.from_pretrained(base_model, tmp_path / "adapter").merge_and_unload().eval()
    assert_scores_equal(scores, [direct_loglikelihood(merged, tokenizer, *pair) for pair in pairs])
    assert max(abs(a[0] - b[0]) for a, b in zip(scores, base_scores)) > 0.01, "the adapter left the scores unchanged"


def test_tunesmith_eval_runs_lm_eval_tasks_into_its_results(
    talkative_model_dir, tokenizer, questions, task_folder, tmp_path, capsys
):
    output = tmp_path / "results.json"
    code = run_cli(
        "eval",
        "--model",
        talkative_model_dir,
        "--lm-eval-tasks",
        TASK,
        "--lm-eval-include",
        task_folder,
        "--output",
        output,
        "--precision",
        "fp32",
        "--device",
        "cpu",
    )
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(talkative_model_dir, dtype=torch.float32).eval()
    expected = expected_choices(model, tokenizer, questions)
    right = [max(range(len(row)), key=lambda i: row[i][0]) == q["answer"] for q, row in zip(questions, expected, strict=True)]
    summary = json.loads(output.read_text())
    assert summary["lm_eval"]["tasks"] == [TASK] and summary["metrics"] == {}
    assert summary["lm_eval"]["results"][TASK]["acc,none"] == pytest.approx(sum(right) / len(right))
    assert f"{TASK} acc" in capsys.readouterr().out


def test_without_lm_eval_installed_the_extra_to_install_is_named(talkative_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` finds when it is not installed
    monkeypatch.delitem(sys.modules, "tunesmith.lm_eval")
    assert run_cli("eval", "--model", talkative_model_dir, "--lm-eval-tasks", TASK, "--device", "cpu") != 0
    assert "pip install 'tunesmith[lm-eval]'" in capsys.readouterr().err

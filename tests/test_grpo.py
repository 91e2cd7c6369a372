"""``tunesmith grpo``: agreement with TRL's GRPOTrainer, learning, crash-safe resume, and the
reward protocol's failures (a hung reward, a missing column).

The numerical reference is TRL's own ``GRPOTrainer`` (a test-only dependency) given the same
weights, token ids, advantages and old and reference log-probabilities: its forward pass
(attention mask and right padding, where ours lays out rows with position ids), its loss code
and autograd. Its advantages come from its own rollout code, with generation replaced by our
completions and its rewards by the same functions ours calls.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import adapter_weights, cpu_device, read_metrics, run_cli, write_jsonl
from tunesmith.data.tokenize import tokenize_prompt_and_responses
from tunesmith.hooks import hookimpl
from tunesmith.models import load_model, load_tokenizer
from tunesmith.plugins import create_plugin_manager
from tunesmith.records import RewardSpec
from tunesmith.reference import ReferenceModel
from tunesmith.rewards import RewardRunner, load_rewards
from tunesmith.strategy import SingleDeviceStrategy
from tunesmith.trainer import TrainerContext
from tunesmith_trainers.grpo import GRPOTrainer, Rollout, group_advantages
from tunesmith_trainers.plugin import GRPO_OPTIONS

GROUP = 4


def grpo_options(**chosen) -> dict:
    return {**{spec.name: spec.default for spec in GRPO_OPTIONS}, "reward": ("fixed",), **chosen}


class FixedRewards:
    """In-test reward plugin: ``fixed`` gives the ``score`` column; ``other`` a second opinion, None on every third."""

    @hookimpl
    def tunesmith_register_rewards(self):
        return [RewardSpec("fixed", fixed_reward), RewardSpec("other", other_reward)]


def fixed_reward(prompts, completions, score, **columns):
    return list(score)


def other_reward(prompts, completions, **columns):
    return [None if index % 3 == 0 else float(len(text) % 5) for index, text in enumerate(completions)]


def our_trainer(model_dir, options: dict) -> GRPOTrainer:
    """The GRPO trainer set up as the engine sets it up, on the cpu device in fp32; the reference is the starting weights."""
    tokenizer = load_tokenizer(model_dir)
    trainer = GRPOTrainer(tokenizer)
    trainer.name = "grpo"
    strategy = SingleDeviceStrategy(cpu_device(), "fp32")
    strategy.setup_environment()
    manager = create_plugin_manager()
    manager.register(FixedRewards(), "fixed-rewards")

    def make_reference(path):
        return ReferenceModel(strategy, shares_weights=False, load_copy=lambda: load_model(model_dir, attn_implementation="sdpa"))

    trainer.setup(TrainerContext(strategy, strategy.device, "fp32", manager, options, make_reference))
    return trainer


def trl_trainer(model_dir, tmp_path, model, options: dict, batch_size: int):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), bf16=False, fp16=False, use_cpu=True, report_to="none", seed=0, disable_dropout=True,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, num_generations=GROUP,
        max_completion_length=options["max_completion_length"], temperature=options["temperature"], loss_type=options["loss_type"],
        scale_rewards=options["scale_rewards"], epsilon=options["epsilon"], epsilon_high=options["epsilon_high"] or options["epsilon"],
        beta=0.0, num_iterations=options["num_iterations"], use_bias_correction_kl=options["kl_bias_correction"],
    )
    # Only needed to build the trainer: the inputs compared are our ids.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}], "score": 0.0}])
    theirs = TRLGRPOTrainer(model=model, reward_funcs=[fixed_reward, other_reward], args=args, train_dataset=dataset,
                            processing_class=AutoTokenizer.from_pretrained(model_dir))
    theirs.beta = options["beta"]  # set after building: beta 0 at build time spares TRL loading its own reference
    theirs.current_gradient_accumulation_steps = 1
    return theirs


def make_rollouts(policy, count: int, seed: int) -> list[Rollout]:
    """Completions of different lengths after prompts of one length (TRL would left-pad shorter prompts and
    shift their positions); old and reference log-probabilities near the policy's, so ratios straddle the clip range."""
    generator = torch.Generator().manual_seed(seed)
    vocab = policy.config.vocab_size
    prompt_length, rollouts = 5, []
    for index in range(count):
        prompt_ids = torch.randint(10, vocab, (prompt_length,), generator=generator).tolist()
        completion_ids = torch.randint(10, vocab, (2 + index % 4,), generator=generator).tolist()
        rollouts.append(Rollout(prompt_ids, completion_ids, advantage=float(torch.randn((), generator=generator))))
    return rollouts


def add_logps(trainer, policy, rollouts, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batch = trainer.collate([[r] for r in rollouts])
    with torch.no_grad():
        logps = trainer.token_logps(policy, batch).logps
    values = logps.tolist()
    for rollout in rollouts:
        count = len(rollout.completion_ids)
        own, values = values[:count], values[count:]
        rollout.old_logps = [v + 0.3 * float(torch.randn((), generator=generator)) for v in own]
        rollout.ref_logps = [v + 0.5 * float(torch.randn((), generator=generator)) for v in own]


def trl_inputs(rollouts, with_old: bool) -> dict:
    width = max(len(r.completion_ids) for r in rollouts)

    def padded(values, fill):
        return torch.tensor([list(v) + [fill] * (width - len(v)) for v in values])

    completion_ids = padded([r.completion_ids for r in rollouts], 0)
    completion_mask = padded([[1] * len(r.completion_ids) for r in rollouts], 0)
    inputs = {
        "prompt_ids": torch.tensor([r.prompt_ids for r in rollouts]),
        "prompt_mask": torch.ones(len(rollouts), len(rollouts[0].prompt_ids), dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([r.advantage for r in rollouts]),
        "ref_per_token_logps": padded([r.ref_logps for r in rollouts], 0.0).float(),
        "num_items_in_batch": completion_mask.sum(),
    }
    if with_old:
        inputs["old_per_token_logps"] = padded([r.old_logps for r in rollouts], 0.0).float()
    return inputs


LOSS_CASES = {
    "grpo": dict(loss_type="grpo", beta=0.0),
    "bnpo-kl": dict(loss_type="bnpo", beta=0.04, num_iterations=2),
    "grpo-plain-k3": dict(loss_type="grpo", beta=0.2, num_iterations=2, kl_bias_correction=False),
    "dr_grpo-clip-higher": dict(loss_type="dr_grpo", beta=0.0, epsilon_high=0.28, num_iterations=2, max_completion_length=7),
    "dapo-kl-temperature": dict(loss_type="dapo", beta=0.1, temperature=0.7, num_iterations=2),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_and_gradients_equal_trl(tiny_model_dir, tmp_path, case):
    options = grpo_options(**LOSS_CASES[case])
    policy = load_model(tiny_model_dir, attn_implementation="sdpa")
    trainer = our_trainer(tiny_model_dir, options)
    rollouts = make_rollouts(policy, 2 * GROUP, seed=1)
    add_logps(trainer, policy, rollouts, seed=2)
    with_old = options["num_iterations"] > 1
    if not with_old:
        for rollout in rollouts:
            rollout.old_logps = None
    theirs = trl_trainer(tiny_model_dir, tmp_path, copy.deepcopy(policy), options, len(rollouts))
    policy.train()
    theirs.model.train()

    batch = trainer.collate([[r] for r in rollouts])
    output = trainer.compute_loss(policy, batch)
    ours = output.loss / trainer.count_items(batch)  # the engine's division, for a step of one micro-batch
    ours.backward()
    their_loss = theirs._compute_loss(theirs.model, trl_inputs(rollouts, with_old))
    their_loss.backward()

    torch.testing.assert_close(ours, their_loss, rtol=1e-5, atol=1e-6)
    their_parameters = dict(theirs.model.named_parameters())
    largest = max(float(p.grad.abs().max()) for p in policy.parameters())
    for name, parameter in policy.named_parameters():
        torch.testing.assert_close(parameter.grad, their_parameters[name].grad, rtol=1e-5, atol=1e-5 * largest, msg=name)
    if options["loss_type"] == "dapo":  # where our metrics are token means, as TRL's always are
        their_metrics = {key: values[-1] for key, values in theirs._metrics["train"].items()}
        items = trainer.count_items(batch)
        assert output.metrics["entropy"] / items == pytest.approx(their_metrics["entropy"], rel=1e-5)
        assert output.metrics["kl"] / items == pytest.approx(their_metrics["kl"], rel=1e-5)
        assert output.metrics["clip_ratio"] / items == pytest.approx(their_metrics["clip_ratio/region_mean"], abs=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(tiny_model_dir, tmp_path, monkeypatch, scale_rewards):
    """TRL's rollout code, its generation replaced by fixed completions, turns the same rewards
    (two functions, weighted, one giving None for some completions and both for one) into advantages."""
    options = grpo_options(scale_rewards=scale_rewards, reward=("fixed:1.5", "other:0.5"))
    policy = load_model(tiny_model_dir, attn_implementation="sdpa")
    trainer = our_trainer(tiny_model_dir, options)
    texts = ["4", "five", "", "6 6", "x", "yy", "zzz", "wwww"]
    scores = [1.0, 0.0, 1.0, None, 0.5, 0.5, 0.5, 0.5]  # the second group scores alike: its advantages are 0
    prompts = ["p0"] * GROUP + ["p1"] * GROUP

    runner = RewardRunner(trainer.rewards, timeout=10)
    result = runner(prompts, texts, {"score": scores}, [f"data.jsonl:{i}" for i in range(len(texts))])
    totals = torch.tensor([math.nan if t is None else t for t in result.totals(trainer.rewards)], dtype=torch.float64)
    ours = group_advantages(totals, GROUP, scale_rewards)

    theirs = trl_trainer(tiny_model_dir, tmp_path, policy, options, len(texts))
    theirs.reward_weights = torch.tensor([1.5, 0.5])
    tokenizer = trainer.tokenizer

    def generate(prompt_list):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for t in texts]
        return [[1, 2]] * len(texts), ids, None, texts, None, {}, None, None

    monkeypatch.setattr(theirs, "_generate", generate)
    outputs = theirs._generate_and_score_completions([{"prompt": p, "score": s} for p, s in zip(prompts, scores)])
    torch.testing.assert_close(ours.float(), outputs["advantages"].float(), rtol=1e-5, atol=1e-6)
    assert not torch.isnan(ours).any()


def test_group_advantages_leave_out_unscored_completions():
    rewards = torch.tensor([1.0, math.nan, 3.0, 5.0, 2.0, 2.0, math.nan, math.nan], dtype=torch.float64)
    advantages = group_advantages(rewards, 4, "group")
    first = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    expected = (first - first.mean()) / (first.std() + 1e-4)
    torch.testing.assert_close(advantages[[0, 2, 3]], expected)
    assert advantages[1] == 0 and (advantages[4:] == 0).all()  # unscored, and a group that scored alike


# -- end to end ------------------------------------------------------------------------------------

SUM_PROMPTS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(3)]


def write_reward_module(folder):
    """A module:function reward in the working directory, as a user would write one."""
    (folder / "sum_rewards.py").write_text(
        "def exact(prompts, completions, answer, **columns):\n"
        "    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]\n"
        "\n"
        "def one_number(prompts, completions, **columns):\n"
        "    return [1.0 if len(c.strip()) == 1 and c.strip().isdigit() else 0.0 for c in completions]\n"
        "\n"
        "def slow(prompts, completions, **columns):\n"
        "    import time\n"
        "    time.sleep(30)\n"
        "    return [1.0] * len(completions)\n",
        encoding="utf-8",
    )


def grpo_command(model_dir, data, output, *extra):
    return ["grpo", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(output), "--precision", "fp32",
            "--reward", "sum_rewards:exact", "--num-generations", "4", "--batch-size", "4", "--grad-accum", "2",
            "--max-completion-length", "4", "--learning-rate", "1e-3", *extra]


def test_sigkill_then_rerun_is_bit_identical(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_reward_module(tmp_path)
    data = write_jsonl(tmp_path / "sums.jsonl", SUM_PROMPTS)

    def command(output):
        # Two updates per generation, with the KL penalty: the rollouts of a generation, their old and
        # reference log-probabilities are in the checkpoint between its two updates.
        return grpo_command(tiny_model_dir, data, output, "--max-steps", "6", "--save-steps", "3", "--num-iterations", "2", "--beta", "0.05")

    uninterrupted = tmp_path / "uninterrupted"
    assert run_cli(*command(uninterrupted)) == 0

    output = tmp_path / "killed"
    argv = [sys.executable, "-m", "tunesmith", *command(output)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (output / "checkpoint-3").is_dir():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never wrote its first checkpoint"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (output / "final").exists(), "the run finished before it could be killed"

    saved = torch.load(output / "checkpoint-3" / "steps.pt", weights_only=True)
    assert saved["updates"] == 1 and len(saved["rollouts"][0]) == 8  # the pending rollouts of the second generation
    rerun = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout
    expected, resumed = adapter_weights(uninterrupted / "final"), adapter_weights(output / "final")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert rewards_logged(uninterrupted) == rewards_logged(output)
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [s["step"] for s in map(json.loads, (uninterrupted / "samples.jsonl").read_text().splitlines())]


def rewards_logged(folder) -> list[tuple[int, float]]:
    return [(r["step"], r["reward"]) for r in read_metrics(folder) if "reward" in r]


def probability_of_the_right_sums(model_dir) -> float:
    """The policy's expected exact-sum reward, computed rather than sampled: the mean over prompts of
    the probability of generating the right answer (its tokens, then the end of the turn)."""
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    probabilities = []
    for row in LEARNING_PROMPTS:
        prompt_ids, (answer_ids,) = tokenize_prompt_and_responses(
            tokenizer, [{"role": "user", "content": row["prompt"]}], [[{"role": "assistant", "content": row["answer"]}]]
        )
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0, len(prompt_ids) - 1 : -1].float()
        probabilities.append(float(torch.log_softmax(logits, -1).gather(1, torch.tensor(answer_ids)[:, None]).sum().exp()))
    return sum(probabilities) / len(probabilities)


LEARNING_PROMPTS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in (1, 2) for b in (1, 2)]


def test_grpo_raises_the_reward_of_a_warmed_up_model(tiny_model_dir, tmp_path, monkeypatch):
    """Sums of two small numbers. A few SFT steps on every prompt paired with each of the sums 2, 3
    and 4 teach the answer's shape (one number, then the end of the turn) and leave the right one
    at about a third; GRPO, rewarded for the exact sum (and half as much for answering with one
    number: pushing wrong sums down must not push garbage up), then raises the chance of it."""
    monkeypatch.chdir(tmp_path)
    write_reward_module(tmp_path)
    warmup = write_jsonl(tmp_path / "warmup.jsonl", [
        {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": str(answer)}]}
        for row in LEARNING_PROMPTS for answer in (2, 3, 4)
    ])
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", warmup, "--output-dir", tmp_path / "sft", "--adapter", "full",
                   "--precision", "fp32", "--max-steps", "30", "--batch-size", "12", "--learning-rate", "1e-2", "--warmup-steps", "0") == 0
    data = write_jsonl(tmp_path / "sums.jsonl", LEARNING_PROMPTS)
    output = tmp_path / "grpo"
    assert run_cli(*grpo_command(tmp_path / "sft" / "final", data, output, "--adapter", "full", "--max-steps", "20",
                                 "--learning-rate", "2e-3", "--warmup-steps", "0", "--lr-scheduler", "constant",
                                 "--num-generations", "8", "--batch-size", "8", "--max-completion-length", "3",
                                 "--reward", "sum_rewards:one_number:0.5")) == 0
    before, after = probability_of_the_right_sums(tmp_path / "sft" / "final"), probability_of_the_right_sums(output / "final")
    logged = [reward for _, reward in rewards_logged(output)]
    assert after > before + 0.08, (before, after, logged)
    assert sum(logged[-5:]) > sum(logged[:5]), logged


def test_two_processes_resume_their_own_pending_rollouts(tiny_model_dir, tmp_path, monkeypatch):
    """Two DDP processes, each generating for its own prompts: a run stopped between the two updates
    of a generation, then continued, ends exactly like one that was not stopped."""
    monkeypatch.chdir(tmp_path)
    write_reward_module(tmp_path)
    data = write_jsonl(tmp_path / "sums.jsonl", SUM_PROMPTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}

    def run(output, steps):
        command = grpo_command(tiny_model_dir, data, output, "--strategy", "ddp", "--nproc-per-node", "2", "--batch-size", "4",
                               "--grad-accum", "1", "--num-iterations", "2", "--beta", "0.05", "--save-steps", "3",
                               "--lr-scheduler", "constant", "--warmup-steps", "0", "--max-steps", str(steps))
        done = subprocess.run([sys.executable, "-m", "tunesmith", *command], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run(tmp_path / "whole", 4)
    # The run as it stood after step 3, between the two updates of its second generation: what a
    # run stopped there leaves (the same command writes the same checkpoint), without a third launch.
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "stopped" / "checkpoint-3")
    saved = torch.load(tmp_path / "stopped" / "checkpoint-3" / "steps.pt", weights_only=True)
    assert saved["updates"] == 1 and [len(rank) for rank in saved["rollouts"]] == [4, 4]
    assert "resuming from" in run(tmp_path / "stopped", 4)
    expected, resumed = adapter_weights(tmp_path / "whole" / "final"), adapter_weights(tmp_path / "stopped" / "final")
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    losses = {folder: {line["step"]: line["loss"] for line in read_metrics(tmp_path / folder)} for folder in ("whole", "stopped")}
    assert losses["stopped"] == {4: losses["whole"][4]}  # the update on the restored rollouts, and only it


def test_a_hung_reward_scores_nothing_and_the_run_goes_on(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_reward_module(tmp_path)
    data = write_jsonl(tmp_path / "sums.jsonl", SUM_PROMPTS)
    output = tmp_path / "run"
    started = time.monotonic()
    assert run_cli(*grpo_command(tiny_model_dir, data, output, "--reward", "sum_rewards:slow", "--reward-timeout", "0.5", "--max-steps", "2")) == 0
    assert time.monotonic() - started < 25  # the 30 s reward never held a step up
    logged = [r for r in read_metrics(output) if "reward" in r]
    assert logged and all(r["rewards/sum_rewards:slow"] in (None, "nan") for r in logged)
    assert all(r["reward_timeouts/sum_rewards:slow"] == 8 for r in logged)  # every completion of each step left unscored
    assert (output / "final").is_dir()


def test_a_reward_needing_a_missing_column_fails_before_step_0(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_reward_module(tmp_path)
    data = write_jsonl(tmp_path / "sums.jsonl", [{"prompt": row["prompt"]} for row in SUM_PROMPTS])
    output = tmp_path / "run"
    assert run_cli(*grpo_command(tiny_model_dir, data, output)) != 0
    error = capsys.readouterr().err
    assert "sum_rewards:exact" in error and "answer" in error and "sums.jsonl" in error
    assert not list(output.glob("checkpoint-*")) and not (output / "metrics.jsonl").exists()


def test_load_rewards_from_the_plugin_manager_and_weights():
    manager = create_plugin_manager()
    manager.register(FixedRewards(), "fixed-rewards")
    rewards = load_rewards(["fixed:2", "other"], manager)
    assert [(r.name, r.weight, r.required_columns) for r in rewards] == [("fixed", 2.0, ("score",)), ("other", 1.0, ())]

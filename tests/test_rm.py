"""``tunesmith rm`` (a reward model: a score head trained with a Bradley-Terry loss on preference
pairs) and ``tunesmith score`` (scoring rows with it)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import adapter_weights, read_metrics, run_cli, write_jsonl
from tunesmith_trainers import rm
from tunesmith_trainers.rm import RewardModelTrainer, bradley_terry_losses

SUBJECTS = ["apples", "rivers", "clocks", "tigers", "lamps", "boats", "stones", "clouds", "forks", "maps", "bells", "kites"]
HELD_OUT = ["owls", "chairs", "drums", "ferns", "gloves", "hills", "jars", "moons"]


def pairs(subjects, repeat: int = 1) -> list[dict]:
    """Learnable pairs: the chosen response calls its subject great, the rejected one awful; every other pair asks for a margin."""
    rows = []
    for i in range(len(subjects) * repeat):
        subject = subjects[i % len(subjects)]
        row = {"prompt": f"What do you think of {subject} ({i})?", "chosen": f"{subject.capitalize()} are great.", "rejected": f"{subject.capitalize()} are awful."}
        if i % 2:
            row["margin"] = 0.5
        rows.append(row)
    return rows


def rm_args(model_dir, data, output, *extra):
    return ["rm", "--model", model_dir, "--dataset", data, "--output-dir", output, "--precision", "fp32", "--save-steps", "0",
            "--lora-dropout", "0", *extra]


# -- the loss ----------------------------------------------------------------------------------
CHOSEN = torch.tensor([1.0, 0.2, -0.5, 2.0])
REJECTED = torch.tensor([0.0, 0.5, -0.5, -1.0])
MARGINS = torch.tensor([0.0, 0.3, 1.0, 0.5])


def test_bradley_terry_loss_with_margins_matches_a_hand_computation():
    expected = [math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(CHOSEN.tolist(), REJECTED.tolist(), MARGINS.tolist())]
    assert bradley_terry_losses(CHOSEN, REJECTED, MARGINS).tolist() == pytest.approx(expected, rel=1e-6)
    assert bradley_terry_losses(CHOSEN, REJECTED).tolist() == pytest.approx([math.log1p(math.exp(r - c)) for c, r in zip(CHOSEN.tolist(), REJECTED.tolist())], rel=1e-6)


def test_compute_loss_sums_over_pairs_and_logs_per_pair_sums(monkeypatch):
    # Unpacked batches list every chosen sequence first, then every rejected one.
    monkeypatch.setattr(rm, "sequence_scores", lambda model, batch: torch.cat([CHOSEN, REJECTED]))
    batch = {"chosen_index": torch.arange(4), "rejected_index": torch.arange(4, 8), "margins": MARGINS, "num_pairs": 4}
    output = RewardModelTrainer(tokenizer=None).compute_loss(None, batch)
    differences = [c - r - m for c, r, m in zip(CHOSEN.tolist(), REJECTED.tolist(), MARGINS.tolist())]
    assert float(output.loss) == pytest.approx(sum(-math.log(1 / (1 + math.exp(-d))) for d in differences), rel=1e-6)
    assert output.metrics["accuracy"] == 2.0  # 1 > 0 and 2 > -1; 0.2 < 0.5; a tie is no win
    assert output.metrics["rewards/chosen"] == pytest.approx(2.7)
    assert output.metrics["rewards/rejected"] == pytest.approx(-1.0)
    assert output.metrics["rewards/margins"] == pytest.approx(3.7)


def test_loss_matches_trl_reward_trainer():
    pytest.importorskip("trl")
    from trl import RewardTrainer

    # TRL's compute_loss on the same rewards: its model returns chosen then rejected logits; TRL takes the mean over pairs.
    stub = SimpleNamespace(
        model=SimpleNamespace(training=False),
        args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )

    def model(**inputs):
        return SimpleNamespace(logits=torch.cat([CHOSEN, REJECTED]).unsqueeze(-1))

    with_margin = RewardTrainer.compute_loss(stub, model, {"margin": MARGINS})
    without = RewardTrainer.compute_loss(stub, model, {})
    assert float(bradley_terry_losses(CHOSEN, REJECTED, MARGINS).sum()) / 4 == pytest.approx(float(with_margin), rel=1e-6)
    assert float(bradley_terry_losses(CHOSEN, REJECTED).sum()) / 4 == pytest.approx(float(without), rel=1e-6)


def test_a_margin_that_is_not_a_number_names_the_row(tiny_model_dir, tmp_path, capsys):
    rows = pairs(SUBJECTS[:2])
    rows[1]["margin"] = "big"
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert run_cli(*rm_args(tiny_model_dir, data, tmp_path / "run", "--max-steps", "1")) != 0
    assert f"{data}:2: margin: expected a number" in capsys.readouterr().err


# -- training, resuming and scoring --------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A LoRA reward model trained on the learnable pairs, evaluated on pairs about subjects it never saw."""
    folder = tmp_path_factory.mktemp("rm")
    data = write_jsonl(folder / "train.jsonl", pairs(SUBJECTS, repeat=2))
    held_out = write_jsonl(folder / "held_out.jsonl", pairs(HELD_OUT))
    output = folder / "run"
    code = run_cli(*rm_args(tiny_model_dir, data, output, "--eval-dataset", held_out, "--eval-steps", "100", "--max-steps", "12",
                            "--batch-size", "8", "--learning-rate", "1e-2", "--lr-scheduler", "constant"))
    assert code == 0
    return SimpleNamespace(output=output, held_out=held_out, folder=folder)


def test_reward_model_learns_held_out_preferences(trained):
    lines = read_metrics(trained.output)
    train_lines = [m for m in lines if "loss" in m]
    assert {"accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(train_lines[-1])
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    final_eval = [m for m in lines if "eval_loss" in m][-1]
    assert final_eval["eval_accuracy"] > 0.9, final_eval
    assert final_eval["eval_rewards/margins"] == pytest.approx(final_eval["eval_rewards/chosen"] - final_eval["eval_rewards/rejected"], rel=1e-5)
    # peft saves the trained score head with the adapter
    assert any(key.endswith("score.weight") for key in adapter_weights(trained.output / "final"))


def test_score_writes_one_score_per_row_as_training_computed_them(trained, tmp_path, capsys):
    held_out = [json.loads(line) for line in trained.held_out.read_text().splitlines()]
    rows = []
    for pair in held_out:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "id": len(rows)})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "id": len(rows)})
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    scored_file = tmp_path / "out" / "scored.jsonl"
    assert run_cli("score", "--adapter", trained.output / "final", "--file", data, "--output", scored_file,
                   "--precision", "fp32", "--batch-size", "3") == 0
    assert f"scored {len(rows)} rows" in capsys.readouterr().out
    scored = [json.loads(line) for line in scored_file.read_text().splitlines()]
    assert [row["id"] for row in scored] == list(range(len(rows)))
    assert all(scored_row == {**row, "score": scored_row["score"]} for row, scored_row in zip(rows, scored))
    chosen, rejected = [row["score"] for row in scored[0::2]], [row["score"] for row in scored[1::2]]
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 0.9 * len(chosen)
    # The same rewards training's evaluation computed on those pairs.
    final_eval = [m for m in read_metrics(trained.output) if "eval_loss" in m][-1]
    assert sum(chosen) / len(chosen) == pytest.approx(final_eval["eval_rewards/chosen"], rel=1e-4, abs=1e-5)
    assert sum(rejected) / len(rejected) == pytest.approx(final_eval["eval_rewards/rejected"], rel=1e-4, abs=1e-5)

    # A conversation in the messages shape scores the same as the prompt/completion row it spells out.
    messages = [{"messages": [{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": rows[0]["completion"]}]}]
    run_folder_as_model = tmp_path / "messages.jsonl"
    assert run_cli("score", "--model", trained.output / "final", "--file", write_jsonl(tmp_path / "m.jsonl", messages),
                   "--output", run_folder_as_model, "--precision", "fp32") == 0
    assert json.loads(run_folder_as_model.read_text())["score"] == pytest.approx(scored[0]["score"], rel=1e-5)


def test_score_names_the_file_and_line_of_a_malformed_row(trained, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Hi?", "completion": "Hello."}) + "\n" + json.dumps({"prompt": "Hi?"}) + "\n")
    output = tmp_path / "scored.jsonl"
    assert run_cli("score", "--adapter", trained.output / "final", "--file", data, "--output", output, "--precision", "fp32") != 0
    assert f"{data}:2: completion: missing" in capsys.readouterr().err
    assert not output.exists()  # complete or not at all
    # A plain language model is not a reward model.
    assert run_cli("score", "--model", tiny_model_dir, "--file", data, "--output", output) != 0
    assert "not a reward model" in capsys.readouterr().err


def test_resume_restores_the_score_head(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(SUBJECTS))
    common = ("--batch-size", "4", "--learning-rate", "1e-2", "--lr-scheduler", "constant")
    resumed, whole = tmp_path / "resumed", tmp_path / "whole"
    assert run_cli(*rm_args(tiny_model_dir, data, resumed, "--max-steps", "2", *common), "--save-steps", "2") == 0
    assert run_cli(*rm_args(tiny_model_dir, data, resumed, "--max-steps", "4", *common), "--save-steps", "2") == 0
    assert "resuming from" in capsys.readouterr().out
    assert run_cli(*rm_args(tiny_model_dir, data, whole, "--max-steps", "4", *common)) == 0

    head = [key for key in adapter_weights(whole / "final") if key.endswith("score.weight")]
    assert head
    # the head trained: it moved between step 2 and step 4, so a resume that lost it would show
    assert not torch.equal(adapter_weights(resumed / "checkpoint-2")[head[0]], adapter_weights(whole / "final")[head[0]])
    first, second = adapter_weights(resumed / "final"), adapter_weights(whole / "final")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6)

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "What do you think of owls?", "completion": text} for text in ("Owls are great.", "Owls are awful.")])
    scores = []
    for run in (resumed, whole):
        assert run_cli("score", "--adapter", run / "final", "--file", rows, "--output", tmp_path / f"{run.name}.jsonl", "--precision", "fp32") == 0
        scores.append([json.loads(line)["score"] for line in (tmp_path / f"{run.name}.jsonl").read_text().splitlines()])
    assert scores[0] == pytest.approx(scores[1], rel=1e-4, abs=1e-6)


def test_packing_gives_each_pair_the_rewards_it_gets_unpacked(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(SUBJECTS[:8]))
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    common = ("--max-steps", "1", "--batch-size", "8", "--adapter", "full")
    assert run_cli(*rm_args(tiny_model_dir, data, plain, *common)) == 0
    assert run_cli(*rm_args(tiny_model_dir, data, packed, "--packing", "--max-length", "256", *common)) == 0
    assert "8 training samples in 4 rows" in capsys.readouterr().out
    plain_line, packed_line = read_metrics(plain)[0], read_metrics(packed)[0]
    for key in ("loss", "rewards/chosen", "rewards/rejected"):
        assert packed_line[key] == pytest.approx(plain_line[key], rel=1e-4, abs=1e-6), key
    # a full fine-tune's final folder is a reward model of its own
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "What do you think of owls?", "completion": "Owls are great."}])
    assert run_cli("score", "--model", packed / "final", "--file", rows, "--output", tmp_path / "scored.jsonl", "--precision", "fp32") == 0
    assert math.isfinite(json.loads((tmp_path / "scored.jsonl").read_text())["score"])


def test_an_exported_reward_model_scores_like_base_plus_adapter(trained, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "What do you think of owls?", "completion": text} for text in ("Owls are great.", "Owls are awful.")])
    merged = tmp_path / "merged"
    assert run_cli("export", "--adapter", trained.output / "final", "--output", merged) == 0
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    scores = []
    for source in (("--adapter", trained.output / "final"), ("--model", merged)):
        output = tmp_path / f"{source[0].strip('-')}.jsonl"
        assert run_cli("score", *source, "--file", rows, "--output", output, "--precision", "fp32") == 0
        scores.append([json.loads(line)["score"] for line in output.read_text().splitlines()])
    assert scores[0] == pytest.approx(scores[1], rel=1e-4, abs=1e-5)

"""tunesmith kto: the loss against the paper's formula (and TRL's when installed), the KL reference
point and its mismatched pairs (one mean over two processes included), learning end to end on a
tiny model, and a malformed row."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

from tests.helpers import QUESTIONS_AND_ANSWERS, read_metrics, run_cli, write_jsonl
from tunesmith import IGNORE_INDEX
from tunesmith_trainers.kto import KTOTrainer, LabelledCompletion, kto_losses, truncate_completion

LOGRATIOS = [0.7, -1.3, 2.5, 0.05, -0.4, 3.0]
DESIRABLE = [True, False, True, False, True, False]
KL, BETA, LAMBDA_D, LAMBDA_U = 0.35, 0.5, 1.0, 1.33


def paper_loss(logratio: float, desirable: bool, kl: float, beta: float, lambda_d: float, lambda_u: float) -> float:
    """Eq. (7) of Ethayarajh et al. (2024): L = lambda_y - v(x, y), with v = lambda sigma(+-beta (r - z_ref))."""
    if desirable:
        return lambda_d - lambda_d / (1 + math.exp(-beta * (logratio - kl)))
    return lambda_u - lambda_u / (1 + math.exp(-beta * (kl - logratio)))


def test_loss_matches_the_paper_by_hand():
    losses = kto_losses(torch.tensor(LOGRATIOS), torch.tensor(DESIRABLE), torch.tensor(KL), BETA, LAMBDA_D, LAMBDA_U)
    expected = [paper_loss(r, d, KL, BETA, LAMBDA_D, LAMBDA_U) for r, d in zip(LOGRATIOS, DESIRABLE)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # One worked by hand: desirable, r = 0.7, z_ref = 0.35, beta 0.5: 1 - sigmoid(0.175) = 0.456361...
    assert float(losses[0]) == pytest.approx(0.4563611, abs=1e-6)


def test_loss_and_metrics_match_trl():
    """TRL 1.16 computes KTO inline in ``KTOTrainer._compute_loss``: drive it with per-token log-probability tables."""
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import KTOTrainer as TRLKTOTrainer

    vocab, beta, lambda_d, lambda_u = 16, 0.5, 1.0, 1.33
    policy, reference = FixedLogits(vocab, shift=0.5), FixedLogits(vocab)
    units = [LabelledCompletion([2, 4], [3, 5, 7], True), LabelledCompletion([6], [9, 11], False),
             LabelledCompletion([8, 10, 12], [1, 13, 15, 3], True), LabelledCompletion([14, 2], [5, 2], False)]
    trainer = make_trainer(lambda tensor, op="sum": tensor, reference=reference)
    trainer.context.options.update(beta=beta, desirable_weight=lambda_d, undesirable_weight=lambda_u)
    ours = trainer.compute_loss(policy, trainer.collate([[unit] for unit in units]))

    def padded(sequences):
        length = max(len(ids) for ids, _ in sequences)
        ids = torch.tensor([ids + [0] * (length - len(ids)) for ids, _ in sequences])
        attention = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in sequences])
        completion = torch.tensor([[0] * prompt + [1] * (len(ids) - prompt) + [0] * (length - len(ids)) for ids, prompt in sequences])
        return ids, attention, completion

    completions = [unit.completion_ids for unit in units]
    cycled = completions[-1:] + completions[:-1]  # TRL's mismatched pairs: completions cycled by +1 within the batch
    input_ids, attention_mask, completion_mask = padded([(u.prompt_ids + u.completion_ids, len(u.prompt_ids)) for u in units])
    kl_ids, kl_attention, kl_completion = padded([(u.prompt_ids + c, len(u.prompt_ids)) for u, c in zip(units, cycled)])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
             "label": torch.tensor([u.desirable for u in units]),
             "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion}

    class TableModel:
        def __init__(self, fixed):
            self.table = torch.log_softmax(fixed(torch.zeros(1, 1, dtype=torch.long), None, False).logits[0, 0], 0)

        def __call__(self, input_ids, attention_mask, use_cache, labels, fused_lm_head):
            log_probs = self.table[input_ids[:, 1:]] * (labels[:, 1:] != IGNORE_INDEX)
            return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs), mean_logits=torch.zeros_like(log_probs))

    stub = torch.nn.Module()  # what TRL reads of the policy: its training mode, gradient checkpointing off, not peft
    stub.is_gradient_checkpointing = False
    owner = SimpleNamespace(
        model=stub, ref_model=TableModel(reference),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda tensor: tensor),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False,
        precompute_ref_logps=False, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=lambda_d,
        undesirable_weight=lambda_u, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    owner._compute_kl_logps = MethodType(TRLKTOTrainer._compute_kl_logps, owner)
    trl_loss = TRLKTOTrainer._compute_loss(owner, TableModel(policy), batch, return_outputs=False)
    trl_metrics = {key: values[-1] for key, values in owner._metrics["train"].items()}
    # (These tables score a token the same whatever precedes it, so the pairing itself is checked by the collate test.)
    count, metrics = len(units), ours.metrics
    assert trl_metrics["kl"] > 0.05  # the reference point is exercised, not clamped away
    torch.testing.assert_close(float(ours.loss) / count, float(trl_loss), rtol=0, atol=1e-5)
    torch.testing.assert_close(metrics["kl"] / count, trl_metrics["kl"], rtol=0, atol=1e-5)
    for side in ("chosen", "rejected"):
        for kind in ("rewards", "logps"):
            torch.testing.assert_close(metrics[f"{kind}/{side}_sum"] / metrics[f"count/{side}"], trl_metrics[f"{kind}/{side}"], rtol=0, atol=1e-5)


class FixedLogits(torch.nn.Module):
    """A 'model' whose log-probability of token t is -t / 10 at every position (so a sequence's score is easy to predict)."""

    def __init__(self, vocab: int, shift: float = 0.0):
        super().__init__()
        self.vocab, self.shift = vocab, shift

    def forward(self, input_ids, position_ids, use_cache):
        logits = -torch.arange(self.vocab, dtype=torch.float32) / 10 + self.shift * (torch.arange(self.vocab) % 2)
        return SimpleNamespace(logits=logits.expand(*input_ids.shape, self.vocab))


def make_trainer(reduce, config=None, reference=None):
    trainer = KTOTrainer(SimpleNamespace(pad_token_id=0), config)
    trainer.context = SimpleNamespace(strategy=SimpleNamespace(reduce=reduce), options={"beta": 0.1})
    trainer.reference = lambda policy: contextlib.nullcontext(reference)
    return trainer


def test_kl_batch_pairs_each_prompt_with_the_previous_completion_and_keeps_the_layout():
    units = [LabelledCompletion([10 + i, 20 + i], [30 + i] * (i + 1), i % 2 == 0) for i in range(3)]
    trainer = make_trainer(reduce=None)
    batch = trainer.collate([[unit] for unit in units])
    for i, unit in enumerate(units):
        expected = unit.prompt_ids + units[i - 1].completion_ids
        assert batch["kl_input_ids"][i, : len(expected)].tolist() == expected
        targets = batch["kl_targets"][i].tolist()
        assert targets[: len(unit.prompt_ids) - 1] == [IGNORE_INDEX] * (len(unit.prompt_ids) - 1)
        assert [t for t in targets if t != IGNORE_INDEX] == units[i - 1].completion_ids
    assert batch["desirable"].tolist() == [True, False, True] and batch["num_completions"] == 3 and batch["kl_weight"] == 1.0
    packed = trainer.collate([[units[0], units[1]], [units[2]]])
    assert packed["kl_input_ids"].shape[0] == 2
    assert packed["kl_sample_ids"][0].unique().tolist() == [0, 1] and packed["kl_sample_ids"][1].max() == 2
    # --max-length also bounds the mismatched sequences, keeping the prompt's end.
    short = make_trainer(reduce=None, config=SimpleNamespace(max_length=3)).collate([[units[0]], [units[2]]])
    assert short["kl_input_ids"][0].tolist() == [20, 32, 32]
    assert make_trainer(reduce=None).collate([[units[0]]])["kl_weight"] == 0.0


def test_reference_point_is_the_clamped_mean_over_every_rank():
    units = [LabelledCompletion([5, 6], [1, 2], True), LabelledCompletion([7, 8], [3], False)]
    other_rank = torch.tensor([6.0, 6.0])  # another rank's [sum, count]: mean 1.0 over its 6 pairs
    reduced = []

    def reduce(tensor, op="sum"):
        reduced.append(tensor.clone())
        return tensor + other_rank

    # The mismatched pairs are [5, 6] + [3] and [7, 8] + [1, 2]: targets 3, 1 and 2, summed over 2 pairs.
    trainer = make_trainer(reduce, reference=FixedLogits(16))
    batch = trainer.collate([[unit] for unit in units])
    kl = trainer.kl_reference_point(FixedLogits(16, shift=0.5), batch)
    shifted_log_softmax = torch.log_softmax(-torch.arange(16.0) / 10 + 0.5 * (torch.arange(16) % 2), 0)
    plain_log_softmax = torch.log_softmax(-torch.arange(16.0) / 10, 0)
    per_token = shifted_log_softmax - plain_log_softmax
    local_sum = float(per_token[3] + per_token[1] + per_token[2])
    assert reduced[0].tolist() == pytest.approx([local_sum, 2.0], abs=1e-5)
    assert float(kl) == pytest.approx(max(0.0, (local_sum + 6.0) / 8.0), abs=1e-5)
    # A negative mean is clamped to 0.
    trainer = make_trainer(lambda tensor, op="sum": tensor + torch.tensor([-50.0, 6.0]), reference=FixedLogits(16))
    assert float(trainer.kl_reference_point(FixedLogits(16, shift=0.5), batch)) == 0.0


def kto_rows() -> list[dict]:
    """Each question twice: its right answer, desirable, and another question's answer, undesirable."""
    rows = []
    for index, (question, answer) in enumerate(QUESTIONS_AND_ANSWERS):
        wrong = QUESTIONS_AND_ANSWERS[(index + 3) % len(QUESTIONS_AND_ANSWERS)][1]
        rows.append({"prompt": question, "completion": answer, "label": True})
        rows.append({"prompt": question, "completion": wrong, "label": False})
    return rows


def class_means(line: dict) -> tuple[float, float]:
    return line["rewards/chosen_sum"] / line["count/chosen"], line["rewards/rejected_sum"] / line["count/rejected"]


def test_kto_learns_to_prefer_the_desirable_completions(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows()[:8])  # four questions, each with a right and a wrong answer
    output = tmp_path / "run"
    code = run_cli(
        "kto", "--model", tiny_model_dir, "--dataset", data, "--output-dir", output, "--precision", "fp32",
        "--save-steps", "0", "--learning-rate", "1e-2", "--lora-dropout", "0", "--lr-scheduler", "constant",
        "--max-steps", "6", "--batch-size", "8", "--beta", "1.0",
    )
    assert code == 0
    lines = [line for line in read_metrics(output) if "loss" in line]
    first, last = lines[0], lines[-1]
    # The first step's policy is the reference (LoRA starts at zero): every reward and z_ref is 0, each loss 1/2.
    assert first["loss"] == pytest.approx(0.5, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["count/chosen"] == pytest.approx(0.5) and first["count/rejected"] == pytest.approx(0.5)
    assert last["loss"] < 0.8 * first["loss"], [line["loss"] for line in lines]
    chosen, rejected = class_means(last)
    assert chosen > rejected, (chosen, rejected)
    assert last["rewards/agreement"] > 0.5
    assert last["kl"] >= 0.0


def test_two_processes_share_one_reference_point(tiny_model_dir, tmp_path):
    """Every row has the same prompt, so one process with batches of 8 and two with 4 each score the same mismatched
    pairs: the runs match only if each rank's z_ref is the mean over both ranks' pairs (a rank-local mean differs)."""
    answers = [answer for _, answer in QUESTIONS_AND_ANSWERS]
    data = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Say something true.", "completion": answer, "label": index % 2 == 0}
                                                for index, answer in enumerate(answers)])
    common = ["--model", tiny_model_dir, "--dataset", data, "--precision", "fp32", "--save-steps", "0", "--learning-rate", "1e-2",
              "--lora-dropout", "0", "--lr-scheduler", "constant", "--max-steps", "5", "--beta", "1.0"]
    assert run_cli("kto", *common, "--batch-size", "8", "--output-dir", tmp_path / "single") == 0
    result = subprocess.run(
        [sys.executable, "-m", "tunesmith", "kto", *map(str, common), "--batch-size", "4", "--strategy", "ddp", "--nproc-per-node", "2",
         "--output-dir", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    single, ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert max(line["kl"] for line in single) > 0.05  # the reference point took part
    for key in ("loss", "kl", "rewards/chosen_sum", "rewards/rejected_sum"):
        # kl is a mean of differences of nearly equal log-probabilities: rounding weighs more in it.
        relative = 1e-4 if key == "kl" else 1e-5
        assert [line[key] for line in ddp] == pytest.approx([line[key] for line in single], rel=relative, abs=1e-6), key


def test_batch_size_one_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows()[:2])
    code = run_cli("kto", "--model", tiny_model_dir, "--dataset", data, "--output-dir", tmp_path / "run", "--batch-size", "1",
                   "--max-steps", "1", "--save-steps", "0")
    assert code != 0
    assert "--batch-size 2" in capsys.readouterr().err


def test_a_label_that_is_not_a_bool_names_file_line_and_field(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "kto.jsonl"
    rows = kto_rows()[:2] + [{"prompt": "Is it?", "completion": "Yes.", "label": "yes"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    output = tmp_path / "run"
    code = run_cli("kto", "--model", tiny_model_dir, "--dataset", data, "--output-dir", output, "--max-steps", "1", "--save-steps", "0")
    err = capsys.readouterr().err
    assert code != 0
    for fragment in ("kto.jsonl:3", "label", "expected true"):
        assert fragment in err, err
    assert not (output / "final").exists()


def test_truncation_keeps_the_prompt_end_then_cuts_the_completion():
    assert truncate_completion([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6])
    assert truncate_completion([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], 6) == ([4, 5, 6], [7, 8, 9])
    assert truncate_completion([1, 2], [3, 4, 5, 6, 7], 4) == ([1, 2], [3, 4])

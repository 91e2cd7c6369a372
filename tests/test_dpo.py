"""``tunesmith dpo``: agreement with TRL, exact packing, no second copy of the weights under LoRA,
learning, crash-safe resume and bad preference rows.

The numerical reference is TRL's own ``DPOTrainer`` (a test-only dependency) run on the same
model weights and the same token ids: its collator, its forward pass (attention mask and
padding, where ours packs with position restarts), its loss code and autograd. Nothing is
compared with numbers written down by hand; only thresholds are.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import adapter_weights, cpu_device, read_metrics, run_cli, write_jsonl
from tunesmith.config import TrainConfig
from tunesmith.data.examples import PAIRED_PREFERENCE_FORMATS, read_examples
from tunesmith.data.packing import pack
from tunesmith.data.tokenize import ensure_chat_template
from tunesmith.engine import train
from tunesmith.hooks import hookimpl
from tunesmith.losses import sequence_logps
from tunesmith.models import apply_adapter, load_model, load_tokenizer
from tunesmith.plugins import create_plugin_manager
from tunesmith.records import TrainerSpec
from tunesmith.reference import ReferenceModel
from tunesmith.strategy import SingleDeviceStrategy
from tunesmith.trainer import TrainerContext
from tunesmith_trainers.dpo import DPOTrainer
from tunesmith_trainers.plugin import DPO_OPTIONS

# Responses of different lengths (so padding and per-token averages matter), prompts as a string,
# as messages with a system turn, and multi-turn.
PAIRS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome, I think."},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}],
        "chosen": [{"role": "assistant", "content": "1, 2, 3."}],
        "rejected": [{"role": "assistant", "content": "3, 2, 1, 0 and then more numbers."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Say yes."},
        ],
        "chosen": "Yes.",
        "rejected": "No, I would rather not.",
    },
]


def dpo_options(**chosen) -> dict:
    return {**{spec.name: spec.default for spec in DPO_OPTIONS}, **chosen}


def our_trainer(model_dir, options: dict, reference_copy=None) -> DPOTrainer:
    """The DPO trainer set up as the engine sets it up (``engine._train``), on the cpu device in fp32."""
    tokenizer = load_tokenizer(model_dir)
    ensure_chat_template(tokenizer)
    trainer = DPOTrainer(tokenizer)
    trainer.name = "dpo"
    strategy = SingleDeviceStrategy(cpu_device(), "fp32")
    strategy.setup_environment()

    def make_reference(path):
        return ReferenceModel(strategy, shares_weights=reference_copy is None and path is None, load_copy=reference_copy)

    trainer.setup(TrainerContext(strategy, strategy.device, "fp32", create_plugin_manager(), options, make_reference))
    return trainer


def our_pairs(trainer, path):
    return [trainer.prepare(example) for example in read_examples(path, formats=PAIRED_PREFERENCE_FORMATS)]


def perturb(model, scale: float, seed: int) -> None:
    """Add seeded noise to every trainable weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


LOSS_CASES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.1),
    "sigmoid-label-smoothing": dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.2),
    "robust-label-smoothing": dict(loss_type="robust", beta=0.1, label_smoothing=0.2),
    "hinge": dict(loss_type="hinge", beta=0.1),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "sigmoid-rpo": dict(loss_type="sigmoid", beta=0.1, rpo_alpha=0.7),
    "bco_pair": dict(loss_type="bco_pair", beta=0.1),
    "sppo_hard": dict(loss_type="sppo_hard", beta=0.1),
    "nca_pair": dict(loss_type="nca_pair", beta=0.1),
    "apo_zero": dict(loss_type="apo_zero", beta=0.1),
    "apo_down": dict(loss_type="apo_down", beta=0.1),
}


def trl_trainer(model_dir, tmp_path, policy, reference, peft_config):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                     report_to="none", disable_dropout=True, seed=0)
    # TRL tokenizes this itself; it is only needed to build the trainer: the inputs compared are our ids.
    dataset = Dataset.from_list([{
        "prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "y"}],
        "rejected": [{"role": "assistant", "content": "z"}],
    }])
    return TRLDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config)


def configure_trl(trainer, options: dict) -> float:
    """Set the loss attributes TRL's ``__init__`` takes from its ``DPOConfig`` (building one trainer per
    loss costs seconds); returns the label smoothing to apply to the sigmoid loss by flipping pairs.

    TRL 1.16 has no label smoothing on the sigmoid loss. Conservative DPO is by definition the
    sigmoid loss on pairs flipped with probability eps: (1 - eps) L(pairs) + eps L(swapped pairs),
    both computed by TRL. RPO in TRL is the sigmoid loss plus its "sft" loss (mean NLL of the
    chosen tokens) weighted by alpha.
    """
    trainer.beta = options["beta"]
    trainer.loss_types, trainer.loss_weights = [options["loss_type"]], [1.0]
    if options["rpo_alpha"]:
        trainer.loss_types, trainer.loss_weights = [options["loss_type"], "sft"], [1.0, options["rpo_alpha"]]
    trainer.label_smoothing = options["label_smoothing"] if options["loss_type"] == "robust" else 0.0
    return options["label_smoothing"] if options["loss_type"] == "sigmoid" else 0.0


def trl_inputs(trainer, pairs, swapped=False):
    return trainer.data_collator([
        {"prompt_ids": pair.prompt_ids, "chosen_ids": pair.rejected_ids if swapped else pair.chosen_ids,
         "rejected_ids": pair.chosen_ids if swapped else pair.rejected_ids}
        for pair in pairs
    ])


def trl_metrics(trainer) -> dict[str, float]:
    """What TRL's last ``compute_loss`` logged: means over the batch's pairs."""
    return {key: values[-1] for key, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize(
    ("adapter", "cases"),
    # The losses are the same code for both; full fine-tuning checks the other reference (a frozen copy).
    [("lora", list(LOSS_CASES)), ("full", ["sigmoid"])],
)
def test_logps_losses_and_gradients_equal_trl(tiny_model_dir, tmp_path, adapter, cases):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)

    def base():
        return load_model(tiny_model_dir, attn_implementation="sdpa")

    # Ours: the policy as the engine builds it; the reference is its base with the adapter off
    # (LoRA), or a frozen copy of the starting weights (full fine-tuning), as the engine decides.
    torch.manual_seed(0)  # the adapter's initial weights
    policy = apply_adapter(base(), adapter, lora_rank=4, lora_alpha=8, lora_dropout=0.0)
    trainer = our_trainer(tiny_model_dir, dpo_options(), reference_copy=base if adapter == "full" else None)
    pairs = our_pairs(trainer, data)
    batch = trainer.collate([[pair] for pair in pairs])

    # TRL: the same weights, its own reference handling (a new adapter disabled, or the ref_model given).
    if adapter == "lora":
        theirs = trl_trainer(tiny_model_dir, tmp_path, base(), None, copy.deepcopy(policy.peft_config["default"]))
    else:
        theirs = trl_trainer(tiny_model_dir, tmp_path, base(), base(), None)
    # The policy leaves the reference: new weights for the adapter (or every weight), the same on both sides.
    perturb(policy, 0.2 if adapter == "lora" else 0.01, seed=1)
    trained = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    their_trained = {name: p for name, p in theirs.model.named_parameters() if p.requires_grad}
    assert their_trained.keys() == trained.keys()
    with torch.no_grad():
        for name, parameter in their_trained.items():
            parameter.copy_(trained[name])
    policy.train()
    theirs.model.train()

    # (a) Each sequence's log-probability under the policy and the reference: ours from the function
    # compute_loss uses, TRL's from what its loss logs for each pair alone.
    with torch.no_grad():
        ours_logps, _ = sequence_logps(policy, batch, 2 * len(pairs))
        with trainer.reference(policy) as reference:
            ours_reference_logps, _ = sequence_logps(reference, batch, 2 * len(pairs))
        configure_trl(theirs, dpo_options(beta=1.0))
        for index, pair in enumerate(pairs):
            theirs.compute_loss(theirs.model, trl_inputs(theirs, [pair]))
            alone = trl_metrics(theirs)
            for side, position in (("chosen", batch["chosen_index"][index]), ("rejected", batch["rejected_index"][index])):
                assert float(ours_logps[position]) == pytest.approx(alone[f"logps/{side}"], abs=1e-5, rel=1e-6)
                their_reference_logp = alone[f"logps/{side}"] - alone[f"rewards/{side}"]  # rewards are logp - ref logp at beta 1
                assert float(ours_reference_logps[position]) == pytest.approx(their_reference_logp, abs=1e-5, rel=1e-6)
    # The comparison means something only if the reference really differs from the policy.
    assert (ours_logps - ours_reference_logps).abs().min() > 0.01

    for case in cases:
        options = dpo_options(**LOSS_CASES[case])
        trainer.context.options.update(options)
        eps = configure_trl(theirs, options)
        policy.zero_grad()
        theirs.model.zero_grad()

        # (b) Ours through the trainer, collate -> compute_loss, per pair as the engine normalises it.
        output = trainer.compute_loss(policy, batch)
        ours_loss = output.loss / trainer.count_items(batch)
        ours_loss.backward()
        their_loss = theirs.compute_loss(theirs.model, trl_inputs(theirs, pairs))
        their_metrics = trl_metrics(theirs)
        if eps:
            their_loss = (1 - eps) * their_loss + eps * theirs.compute_loss(theirs.model, trl_inputs(theirs, pairs, swapped=True))
        their_loss.backward()

        # Squared losses (ipo, sppo_hard) double the relative error of log-probability sums of about a hundred fp32 terms.
        torch.testing.assert_close(ours_loss.detach(), their_loss.detach(), rtol=1e-5, atol=1e-5, msg=lambda message: f"{case}: {message}")
        # Metrics: log-probabilities are sums of about a hundred in fp32, good to about 1e-6 relative.
        scale = float(ours_logps.abs().max())
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
            tolerance = 1e-6 * scale * (options["beta"] if key.startswith("rewards/") else 1.0)
            assert output.metrics[key] / len(pairs) == pytest.approx(their_metrics[key], abs=max(tolerance, 1e-5)), (case, key)
        # (c) The gradient of every trained weight.
        # Tolerances relative to the largest gradient, which the squared losses make large.
        for name, parameter in trained.items():
            atol = 1e-5 * max(1.0, float(their_trained[name].grad.abs().max()))
            torch.testing.assert_close(parameter.grad, their_trained[name].grad, rtol=1e-5, atol=atol, msg=lambda message: f"{case}: {name}: {message}")


@pytest.mark.parametrize("case", ["sigmoid-rpo", "ipo"])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_unpacked_one(tiny_model_dir, tmp_path, case):
    trainer = our_trainer(tiny_model_dir, dpo_options(**LOSS_CASES[case]))
    pairs = our_pairs(trainer, write_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    torch.manual_seed(0)  # the adapter's initial weights
    policy = apply_adapter(load_model(tiny_model_dir, attn_implementation="sdpa"), "lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0)
    perturb(policy, 0.2, seed=1)
    rows = pack(pairs, max_length=2 * max(len(pair) for pair in pairs))
    # The check means something only if a row holds several pairs side by side, and rows differ in length.
    assert any(len(row) > 1 for row in rows) and len({sum(len(pair) for pair in row) for row in rows}) > 1

    def step(rows):
        policy.zero_grad()
        batch = trainer.collate(rows)
        output = trainer.compute_loss(policy, batch)
        (output.loss / trainer.count_items(batch)).backward()
        grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.requires_grad}
        return output.loss.detach() / trainer.count_items(batch), output.metrics, grads

    packed_loss, packed_metrics, packed_grads = step(rows)
    # The same pairs unpacked, in the order the packed rows hold them (the metrics are sums over pairs).
    plain_loss, plain_metrics, plain_grads = step([[pair] for row in rows for pair in row])
    torch.testing.assert_close(packed_loss, plain_loss, rtol=0, atol=1e-5)
    assert packed_metrics == pytest.approx(plain_metrics, abs=1e-4)  # sums of log-probabilities of a few hundred
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


class StorageProbeDPO(DPOTrainer):
    """The built-in DPO trainer, recording what its reference pass reads.

    For every reference pass: the storages of all tensors held by the policy and by the module
    the pass runs, and the storage of every tensor an operation of the pass reads.
    """

    passes: list = []

    def setup(self, context):
        super().setup(context)
        self.real_reference = self.reference
        self.reference = self._recording_reference

    @contextmanager
    def _recording_reference(self, policy):
        with self.real_reference(policy) as reference, ReadStorages() as reads:
            yield reference
        StorageProbeDPO.passes.append({
            "reference_is_policy": reference is policy,
            "policy": storages(policy),
            "reference": storages(reference),
            "read": reads.storages,
            "base_weights": {p.untyped_storage().data_ptr() for name, p in policy.named_parameters() if "lora_" not in name},
            "adapter_weights": {p.untyped_storage().data_ptr() for name, p in policy.named_parameters() if "lora_" in name},
            "copy_loaded": self.real_reference._copy is not None,
        })


class ReadStorages(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for value in pytree.tree_leaves((args, kwargs or {})):
            if isinstance(value, torch.Tensor):
                self.storages.add(value.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def storages(module) -> set[int]:
    return {tensor.untyped_storage().data_ptr() for tensor in itertools.chain(module.parameters(), module.buffers())}


class ProbePlugin:
    @hookimpl
    def tunesmith_register_trainers(self):
        return [TrainerSpec(name="dpo-probe", trainer=StorageProbeDPO, row_formats=PAIRED_PREFERENCE_FORMATS, options=DPO_OPTIONS)]


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_lora_dpo_holds_no_second_copy_of_the_weights(tiny_model_dir, tmp_path, adapter):
    StorageProbeDPO.passes = []
    manager = create_plugin_manager()
    manager.register(ProbePlugin(), "dpo-probe")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = TrainConfig(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "run"), adapter=adapter,
                         precision="fp32", batch_size=3, max_steps=1, save_steps=0)
    train("dpo-probe", config, manager=manager)
    (seen,) = StorageProbeDPO.passes
    if adapter == "lora":
        # The reference is the policy itself with its adapter off: every tensor it holds is the
        # policy's; its pass reads the policy's own base weights and none of the adapter's.
        assert seen["reference_is_policy"] and not seen["copy_loaded"]
        assert seen["reference"] == seen["policy"]
        assert seen["base_weights"] <= seen["read"]
        assert not seen["adapter_weights"] & seen["read"]
    else:
        # Full fine-tuning needs a frozen copy: the probe tells the two apart.
        assert not seen["reference_is_policy"] and seen["copy_loaded"]
        assert not seen["reference"] & seen["policy"]
        assert not seen["base_weights"] & seen["read"]


TOPICS = ["rain", "bread", "trains", "music", "cats", "rivers", "stars", "tea", "chess", "boats", "snow", "honey",
          "clocks", "maps", "bees", "glass", "wolves", "paper", "salt", "bridges", "owls", "ink", "caves", "kites"]


def preference_rows(topics: list[str]) -> list[dict]:
    """Kind answers preferred to rude ones, alike up to their last words: a pattern that carries over to unseen prompts."""
    return [
        {"prompt": f"Tell me about {topic}.", "chosen": f"Here is a note about {topic}: they are lovely.",
         "rejected": f"Here is a note about {topic}: they are awful."}
        for topic in topics
    ]


def test_dpo_learns_held_out_preferences(tiny_model_dir, tmp_path):
    train_data = write_jsonl(tmp_path / "train.jsonl", preference_rows(TOPICS[:18]))
    held_out = write_jsonl(tmp_path / "eval.jsonl", preference_rows(TOPICS[18:]))
    output = tmp_path / "run"
    # There is no evaluation before the first step, so the first step has learning rate 0 (one
    # warm-up step: the rate rises from 0): the evaluation after it sees the starting weights,
    # where the policy is its reference, every reward is 0 and no chosen response wins (a tie
    # is no win, as in TRL). Then evaluations after every step of the constant rate.
    code = run_cli("dpo", "--model", tiny_model_dir, "--dataset", train_data, "--eval-dataset", held_out, "--output-dir", output,
                   "--max-steps", "5", "--batch-size", "6", "--learning-rate", "5e-3", "--lr-scheduler", "constant",
                   "--warmup-steps", "1", "--eval-steps", "1", "--save-steps", "0", "--precision", "fp32", "--beta", "0.1")
    assert code == 0
    evaluations = [line for line in read_metrics(output) if "eval_rewards/accuracies" in line]
    first, last = evaluations[0], evaluations[-1]
    assert first["step"] == 1 and first["eval_rewards/margins"] == 0.0
    assert first["eval_rewards/accuracies"] <= 0.7
    assert last["eval_rewards/accuracies"] > 0.9
    assert last["eval_rewards/margins"] > 0 and last["eval_loss"] < first["eval_loss"]


@pytest.mark.slow  # about 20 s: a subprocess start and three runs
def test_sigkill_then_rerun_is_bit_identical(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", preference_rows(TOPICS[:12]))

    def command(output):
        return ["dpo", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(output), "--max-steps", "16",
                "--save-steps", "2", "--batch-size", "2", "--precision", "fp32", "--learning-rate", "1e-3", "--loss-type", "sigmoid",
                "--rpo-alpha", "0.5", "--precompute-ref-logps"]

    uninterrupted = tmp_path / "uninterrupted"
    assert run_cli(*command(uninterrupted)) == 0

    output = tmp_path / "killed"
    argv = [sys.executable, "-m", "tunesmith", *command(output)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (output / "checkpoint-4").is_dir():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never wrote its second checkpoint"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (output / "final").exists(), "the run finished before it could be killed"

    saved = torch.load(output / "checkpoint-4" / "trainer.pt", weights_only=True)  # the reference log-probs computed so far
    assert saved["reference_logps"].shape == (len(saved["reference_keys"]), 2) and len(saved["reference_keys"]) == 8
    rerun = subprocess.run(argv, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout
    expected, resumed = adapter_weights(uninterrupted / "final"), adapter_weights(output / "final")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_precomputed_reference_logps_skip_the_reference_pass_and_train_alike(tiny_model_dir, tmp_path, monkeypatch):
    from tunesmith.reference import ReferenceModel

    passes = []
    real_call = ReferenceModel.__call__

    def counted(self, policy):
        passes.append(1)
        return real_call(self, policy)

    monkeypatch.setattr(ReferenceModel, "__call__", counted)
    data = write_jsonl(tmp_path / "train.jsonl", preference_rows(TOPICS[:4]))
    runs, reference_passes = {}, {}
    for name, extra in {"plain": (), "precomputed": ("--precompute-ref-logps",)}.items():
        runs[name] = tmp_path / name
        passes.clear()
        assert run_cli("dpo", "--model", tiny_model_dir, "--dataset", data, "--output-dir", runs[name], "--epochs", "3", "--batch-size", "2",
                       "--save-steps", "0", "--precision", "fp32", "--learning-rate", "1e-2", "--lora-dropout", "0", *extra) == 0
        reference_passes[name] = len(passes)
    assert reference_passes == {"plain": 6, "precomputed": 2}  # 2 batches an epoch, 3 epochs: only the first needs the reference
    plain, precomputed = read_metrics(runs["plain"]), read_metrics(runs["precomputed"])
    # Later epochs reuse the first epoch's reference log-probs (same values, up to how a batch's padding rounds them).
    for first, second in zip(plain, precomputed):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-4, abs=1e-6)
    expected, actual = adapter_weights(runs["plain"] / "final"), adapter_weights(runs["precomputed"] / "final")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6)


def test_a_malformed_preference_row_names_file_line_and_field(tiny_model_dir, tmp_path, capsys):
    rows = preference_rows(TOPICS[:3])
    rows[1]["rejected"] = 7
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = ("dpo", "--model", tiny_model_dir, "--dataset", data, "--output-dir", tmp_path / "run", "--max-steps", "1", "--save-steps", "0")
    assert run_cli(*args) != 0
    err = capsys.readouterr().err
    assert "pairs.jsonl:2" in err and "rejected" in err and "number" in err, err
    assert not (tmp_path / "run" / "final").exists()
    assert run_cli(*args, "--skip-bad-rows") == 0
    assert "1 bad rows skipped" in capsys.readouterr().out
    assert (tmp_path / "run" / "final").is_dir()


MESSAGE_LIST_ROWS = [
    {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Tell me about {topic}."}],
     "chosen": [{"role": "assistant", "content": f"{topic.capitalize()} are lovely."}],
     "rejected": [{"role": "assistant", "content": f"{topic.capitalize()} are awful."}]}
    for topic in TOPICS[:2]
]
MESSAGES_AND_REJECTED_ROWS = [
    {"messages": [{"role": "user", "content": f"Tell me about {topic}."}, {"role": "assistant", "content": f"{topic} are lovely."}],
     "rejected_response": f"{topic} are awful."}
    for topic in TOPICS[:2]
]


@pytest.mark.parametrize("rows", [preference_rows(TOPICS[:2]), MESSAGE_LIST_ROWS, MESSAGES_AND_REJECTED_ROWS],
                         ids=["prompt-chosen-rejected-strings", "prompt-chosen-rejected-messages", "messages-rejected-response"])
def test_both_preference_row_formats_train(tiny_model_dir, tmp_path, rows):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    output = tmp_path / "run"
    assert run_cli("dpo", "--model", tiny_model_dir, "--dataset", data, "--output-dir", output, "--max-steps", "1",
                   "--batch-size", "2", "--save-steps", "0", "--precision", "fp32") == 0
    (step,) = read_metrics(output)
    assert step["step"] == 1 and step["rewards/margins"] == 0.0 and step["loss"] == pytest.approx(math.log(2))
    assert (output / "final").is_dir()

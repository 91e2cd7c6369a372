"""tunesmith orpo, simpo and cpo: each loss against its paper's formula worked by hand, against TRL's
CPOTrainer/ORPOTrainer where TRL is installed, and learning on a tiny model through the CLI."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import QUESTIONS_AND_ANSWERS, read_metrics, run_cli, write_jsonl
from tunesmith import ConfigError
from tunesmith_trainers.cpo import CPOTrainer, cpo_losses
from tunesmith_trainers.orpo import ORPOTrainer, log1mexp, odds_ratio_losses
from tunesmith_trainers.preference import PreferencePair
from tunesmith_trainers.simpo import SimPOTrainer, simpo_losses

# Two pairs: the first prefers its chosen response, the second its rejected one. Per-token means
# on both sides of -log 2, where log(1 - exp(x)) changes branch.
MEAN_CHOSEN, MEAN_REJECTED = [-0.5, -2.0], [-1.5, -0.25]
SUM_CHOSEN, SUM_REJECTED = [-5.0, -12.0], [-9.0, -4.0]


def tensor(values):
    return torch.tensor(values, dtype=torch.float32)


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


# -- each loss from its paper, worked by hand --------------------------------------------------


def test_orpo_odds_ratio_loss_is_the_papers():
    orpo_lambda = 0.1

    def log_odds(mean_logp: float) -> float:  # log(p / (1 - p)) with p = exp(mean log-prob)
        p = math.exp(mean_logp)
        return math.log(p / (1 - p))

    losses, ratios = odds_ratio_losses(tensor(MEAN_CHOSEN), tensor(MEAN_REJECTED), orpo_lambda)
    for pair, (chosen, rejected) in enumerate(zip(MEAN_CHOSEN, MEAN_REJECTED)):
        ratio = log_odds(chosen) - log_odds(rejected)
        assert ratios[pair].item() == pytest.approx(ratio, rel=1e-5)
        assert losses[pair].item() == pytest.approx(-orpo_lambda * log_sigmoid(ratio), rel=1e-5)
    assert ratios[0] > 0 > ratios[1]  # the first pair already prefers its chosen response


def test_log1mexp_is_stable_on_both_branches():
    x = torch.tensor([-1e-7, -0.1, -math.log(2), -5.0, -40.0], dtype=torch.float32)
    expected = [math.log(-math.expm1(v)) for v in x.double().tolist()]
    assert log1mexp(x).tolist() == pytest.approx(expected, rel=1e-5)


def test_simpo_loss_is_the_papers_with_label_smoothing():
    beta, gamma, eps = 2.0, 0.5, 0.1
    losses = simpo_losses(tensor(MEAN_CHOSEN), tensor(MEAN_REJECTED), beta, gamma, eps)
    for pair, (chosen, rejected) in enumerate(zip(MEAN_CHOSEN, MEAN_REJECTED)):
        z = beta * chosen - beta * rejected - gamma  # beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma
        assert losses[pair].item() == pytest.approx(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z), rel=1e-5)
    # with no smoothing: -log s(2 (-0.5 + 1.5) - 0.5) = log(1 + e^-1.5)
    assert simpo_losses(tensor(MEAN_CHOSEN), tensor(MEAN_REJECTED), beta, gamma, 0.0)[0].item() == pytest.approx(0.201413, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_cpo_losses_are_the_papers(loss_type):
    beta = 0.1
    losses = cpo_losses(tensor(SUM_CHOSEN), tensor(SUM_REJECTED), loss_type, beta, 0.0)
    for pair, (chosen, rejected) in enumerate(zip(SUM_CHOSEN, SUM_REJECTED)):
        margin = chosen - rejected
        expected = {
            "sigmoid": -log_sigmoid(beta * margin),  # CPO's preference term, Xu et al. eq. 3
            "hinge": max(0.0, 1 - beta * margin),
            "ipo": (margin - 1 / (2 * beta)) ** 2,
        }[loss_type]
        assert losses[pair].item() == pytest.approx(expected, rel=1e-5)


def test_cpo_refuses_label_smoothing_outside_the_sigmoid_loss():
    trainer = CPOTrainer(SimpleNamespace(pad_token_id=0))
    options = {"loss_type": "hinge", "beta": 0.1, "label_smoothing": 0.1, "cpo_alpha": 1.0}
    with pytest.raises(ConfigError, match="--label-smoothing"):
        trainer.setup(SimpleNamespace(options=options))


# -- a whole batch: the summed loss, the chosen NLL, the metrics ------------------------------

VOCAB = 11
# (prompt, chosen, rejected) token ids; responses of different lengths so that means and sums differ
PAIRS = [([1, 2, 3], [4, 5], [6, 7, 8, 9]), ([2, 3], [7, 8, 9, 10, 4], [5, 6]), ([9, 1, 5, 2], [3], [10, 4, 2])]


class TableModel(torch.nn.Module):
    """Logits looked up from a fixed table by input token: a model whose log-probs can be checked by hand."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=generator))

    def forward(self, input_ids, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def reference_scores(model: TableModel, average: bool):
    """Each pair's chosen and rejected score, and the chosen NLL per token over the batch, directly from the table."""
    log_probs = torch.log_softmax(model.table.detach().double(), dim=-1)

    def score(prompt, response):
        sequence = prompt + response
        logps = [log_probs[sequence[t - 1], sequence[t]].item() for t in range(len(prompt), len(sequence))]
        return sum(logps) / len(logps) if average else sum(logps), sum(logps), len(logps)

    chosen = [score(prompt, c) for prompt, c, _ in PAIRS]
    rejected = [score(prompt, r) for prompt, _, r in PAIRS]
    nll = -sum(s for _, s, _ in chosen) / sum(n for _, _, n in chosen)
    return [c for c, _, _ in chosen], [r for r, _, _ in rejected], nll


def trainer_with(trainer_class, **options):
    trainer = trainer_class(SimpleNamespace(pad_token_id=0))
    trainer.context = SimpleNamespace(options=options)
    return trainer


def batch_of_pairs(trainer, packed: bool):
    pairs = [PreferencePair(*pair) for pair in PAIRS]
    return trainer.collate([pairs[:2], pairs[2:]] if packed else [[pair] for pair in pairs])


@pytest.mark.parametrize("packed", [False, True])
def test_orpo_batch_loss_is_the_mean_pair_loss_plus_the_chosen_nll_summed_over_pairs(packed):
    model, orpo_lambda = TableModel(), 0.2
    chosen, rejected, nll = reference_scores(model, average=True)
    trainer = trainer_with(ORPOTrainer, orpo_lambda=orpo_lambda)
    output = trainer.compute_loss(model, batch_of_pairs(trainer, packed))
    ratios = [
        (c - math.log(-math.expm1(c))) - (r - math.log(-math.expm1(r))) for c, r in zip(chosen, rejected)
    ]
    pairs = len(PAIRS)
    assert output.loss.item() == pytest.approx(pairs * nll - orpo_lambda * sum(map(log_sigmoid, ratios)), rel=1e-5)
    metrics = output.metrics
    assert metrics["nll_loss"] == pytest.approx(pairs * nll, rel=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(sum(chosen), rel=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(orpo_lambda * sum(rejected), rel=1e-5)
    assert metrics["rewards/accuracies"] == sum(c > r for c, r in zip(chosen, rejected))
    assert metrics["log_odds_chosen"] == pytest.approx(sum(ratios), rel=1e-5)
    assert metrics["log_odds_ratio"] == pytest.approx(sum(map(log_sigmoid, ratios)), rel=1e-5)
    output.loss.backward()
    assert model.table.grad.abs().sum() > 0


@pytest.mark.parametrize("packed", [False, True])
def test_simpo_and_cpo_batch_losses_add_the_chosen_nll_with_its_weight(packed):
    model = TableModel()
    mean_chosen, mean_rejected, nll = reference_scores(model, average=True)
    sum_chosen, sum_rejected, _ = reference_scores(model, average=False)
    pairs = len(PAIRS)

    simpo = trainer_with(SimPOTrainer, beta=2.0, gamma=0.5, label_smoothing=0.0, cpo_alpha=0.5)
    output = simpo.compute_loss(model, batch_of_pairs(simpo, packed))
    expected = sum(-log_sigmoid(2.0 * (c - r) - 0.5) for c, r in zip(mean_chosen, mean_rejected)) + 0.5 * pairs * nll
    assert output.loss.item() == pytest.approx(expected, rel=1e-5)
    assert output.metrics["rewards/chosen"] == pytest.approx(2.0 * sum(mean_chosen), rel=1e-5)

    cpo = trainer_with(CPOTrainer, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, cpo_alpha=1.0)
    output = cpo.compute_loss(model, batch_of_pairs(cpo, packed))
    expected = sum(-log_sigmoid(0.1 * (c - r)) for c, r in zip(sum_chosen, sum_rejected)) + pairs * nll
    assert output.loss.item() == pytest.approx(expected, rel=1e-5)
    assert output.metrics["logps/rejected"] == pytest.approx(sum(sum_rejected), rel=1e-5)
    assert output.metrics["rewards/margins"] == pytest.approx(0.1 * (sum(sum_chosen) - sum(sum_rejected)), rel=1e-5)


# -- against TRL ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_trainers():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns that trl.experimental is experimental
        from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer
        from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer
    return TRLCPOTrainer, TRLORPOTrainer


def trl_self(**attributes):
    """What TRL's loss methods read from their trainer: the config's values and the accelerator's device."""
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0, **attributes)


def trl_batch(model: TableModel):
    """TRL's concatenated batch for PAIRS: chosen rows then rejected rows, labels -100 on prompts and padding."""
    sequences = [prompt + chosen for prompt, chosen, _ in PAIRS] + [prompt + rejected for prompt, _, rejected in PAIRS]
    prompts = [len(prompt) for prompt, _, _ in PAIRS] * 2
    length = max(map(len, sequences))
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for row, (sequence, prompt) in enumerate(zip(sequences, prompts)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, prompt : len(sequence)] = torch.tensor(sequence[prompt:])
    return model.table.detach()[input_ids], labels


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("hinge", 0.1, 0.0), ("ipo", 0.5, 0.0)])
def test_cpo_losses_match_trl(trl_trainers, loss_type, beta, label_smoothing):
    trl_cpo, _ = trl_trainers
    chosen, rejected = tensor(SUM_CHOSEN), tensor(SUM_REJECTED)
    expected, chosen_rewards, rejected_rewards = trl_cpo.cpo_loss(
        trl_self(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type), chosen, rejected
    )
    torch.testing.assert_close(cpo_losses(chosen, rejected, loss_type, beta, label_smoothing), expected, rtol=1e-5, atol=1e-5)
    scored = trainer_with(CPOTrainer, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, cpo_alpha=1.0).score_pairs(chosen, rejected)
    torch.testing.assert_close(scored.chosen_rewards, chosen_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored.rejected_rewards, rejected_rewards, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_simpo_loss_matches_trls_cpo_simpo_loss(trl_trainers, label_smoothing):
    trl_cpo, _ = trl_trainers
    chosen, rejected = tensor(MEAN_CHOSEN), tensor(MEAN_REJECTED)
    attributes = dict(beta=2.5, label_smoothing=label_smoothing, loss_type="simpo", simpo_gamma=0.7)
    expected, chosen_rewards, _ = trl_cpo.cpo_loss(trl_self(**attributes), chosen, rejected)
    torch.testing.assert_close(simpo_losses(chosen, rejected, 2.5, 0.7, label_smoothing), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(2.5 * chosen, chosen_rewards)


def test_orpo_odds_ratio_matches_trl(trl_trainers):
    _, trl_orpo = trl_trainers
    chosen, rejected = tensor(MEAN_CHOSEN), tensor(MEAN_REJECTED)
    trl_terms, chosen_rewards, _, mean_ratio, mean_log_odds = trl_orpo.odds_ratio_loss(trl_self(beta=0.1), chosen, rejected)
    losses, log_odds = odds_ratio_losses(chosen, rejected, 0.1)
    torch.testing.assert_close(losses, -trl_terms, rtol=1e-5, atol=1e-5)  # TRL's loss is nll - terms.mean()
    torch.testing.assert_close(log_odds.mean(), mean_log_odds, rtol=1e-5, atol=1e-5)
    scored = trainer_with(ORPOTrainer, orpo_lambda=0.1).score_pairs(chosen, rejected)
    torch.testing.assert_close(scored.metrics["log_odds_ratio"].mean(), mean_ratio, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored.chosen_rewards, chosen_rewards)


@pytest.mark.parametrize("objective", ["cpo", "simpo", "cpo-ipo", "orpo"])
def test_a_micro_batch_mean_loss_is_trls_batch_loss(trl_trainers, objective):
    """Our summed loss over the pairs equals TRL's batch loss (``losses.mean() + alpha * nll``) times the pairs.

    TRL's scores come from its own get_batch_logps on its concatenated batch; its chosen NLL is its
    cross-entropy mean over the chosen rows' labels (ORPOTrainer takes its NLL over the prompt too:
    here the response-only one, the paper's, is used for both).
    """
    trl_cpo, trl_orpo = trl_trainers
    model = TableModel()
    logits, labels = trl_batch(model)
    pairs = len(PAIRS)
    nll = F.cross_entropy(logits[:pairs, :-1].flatten(0, 1), labels[:pairs, 1:].flatten(), ignore_index=-100)
    if objective == "orpo":
        logps = trl_orpo.get_batch_logps(logits, labels.clone(), average_log_prob=True)
        terms = trl_orpo.odds_ratio_loss(trl_self(beta=0.2), logps[:pairs], logps[pairs:])[0]
        expected = nll - terms.mean()
        trainer = trainer_with(ORPOTrainer, orpo_lambda=0.2)
    else:
        loss_type = {"cpo": "sigmoid", "simpo": "simpo", "cpo-ipo": "ipo"}[objective]
        beta, alpha = {"cpo": (0.1, 1.0), "simpo": (2.0, 0.3), "cpo-ipo": (0.5, 0.7)}[objective]
        logps = trl_cpo.get_batch_logps(logits, labels.clone(), average_log_prob=loss_type in ("ipo", "simpo"))
        attributes = dict(beta=beta, label_smoothing=0.1 if loss_type != "ipo" else 0.0, loss_type=loss_type, simpo_gamma=0.5)
        losses = trl_cpo.cpo_loss(trl_self(**attributes), logps[:pairs], logps[pairs:])[0]
        expected = losses.mean() + alpha * nll
        options = dict(beta=beta, label_smoothing=attributes["label_smoothing"], cpo_alpha=alpha)
        if objective == "simpo":
            trainer = trainer_with(SimPOTrainer, gamma=0.5, **options)
        else:
            trainer = trainer_with(CPOTrainer, loss_type=loss_type, **options)
    output = trainer.compute_loss(model, batch_of_pairs(trainer, packed=False))
    torch.testing.assert_close(output.loss / pairs, expected.float(), rtol=1e-5, atol=1e-5)
    assert output.metrics["nll_loss"] / pairs == pytest.approx(nll.item(), rel=1e-5)


# -- learning through the CLI -----------------------------------------------------------------


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    """Pairs a tiny model learns in a few steps: the chosen response opens with "Yes", the rejected
    one with "No", the rest the same, so the two are as long and only the preference differs."""
    rows = [{"prompt": question, "chosen": f"Yes, {answer}", "rejected": f"No, {answer}"} for question, answer in QUESTIONS_AND_ANSWERS]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


@pytest.mark.parametrize("command", ["orpo", "simpo", "cpo"])
def test_training_lowers_the_loss_and_raises_the_reward_accuracy(command, tiny_model_dir, preference_data, tmp_path):
    output = tmp_path / "run"
    assert run_cli(command, "--model", tiny_model_dir, "--dataset", preference_data, "--output-dir", output,
                   "--max-steps", "4", "--batch-size", "4", "--learning-rate", "1e-2", "--lr-scheduler", "constant",
                   "--lora-dropout", "0", "--precision", "fp32", "--save-steps", "0") == 0
    metrics = read_metrics(output)
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < first["loss"]
    assert last["rewards/accuracies"] > first["rewards/accuracies"]
    assert last["rewards/margins"] > first["rewards/margins"]
    for line in metrics:
        assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "nll_loss"} <= line.keys()
    if command == "orpo":
        assert {"log_odds_ratio", "log_odds_chosen"} <= first.keys()

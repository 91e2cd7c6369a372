"""Entry-point module registering the built-in trainers and their options (classes are named by path: torch loads later)."""

import click

from tunesmith import PAIRED_PREFERENCE_FORMATS, PROMPT_FORMATS, UNPAIRED_PREFERENCE_FORMATS, OptionSpec, TrainerSpec, hookimpl

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down")

DPO_OPTIONS = (
    OptionSpec("loss_type", "sigmoid", "The DPO loss: sigmoid (DPO), robust (rDPO), hinge (SLiC), ipo (IPO), bco_pair (BCO), sppo_hard (SPPO), nca_pair (NCA), apo_zero or apo_down (APO).", click.Choice(DPO_LOSS_TYPES)),
    OptionSpec("beta", 0.1, "Temperature of the implicit reward: how far the policy may move from the reference.", click.FloatRange(min=0.0, min_open=True)),
    OptionSpec("label_smoothing", 0.0, "The share of pairs assumed mislabelled (sigmoid and robust losses).", click.FloatRange(min=0.0, max=0.5, max_open=True)),
    OptionSpec("rpo_alpha", 0.0, "Weight of the chosen responses' negative log-likelihood added to the loss (RPO); 0 is off.", click.FloatRange(min=0.0)),
    OptionSpec("ref_model", "", "A model folder to use as the reference instead of the starting weights."),
    OptionSpec("precompute_ref_logps", False, "Keep each pair's reference log-probs once computed (also in checkpoints) and skip the reference pass for known pairs."),
)

GRPO_OPTIONS = (
    OptionSpec("reward", (), "A reward function scoring completions: an installed reward's name, module:function, or rm:PATH (a 'tunesmith rm' model), each optionally :WEIGHT (default 1); repeat for several."),
    OptionSpec("reward_timeout", 60.0, "Seconds a reward may take for one generation's completions; one that takes longer scores none of them.", click.FloatRange(min=0.0, min_open=True)),
    OptionSpec("reward_errors", "raise", "A reward that raises: raise (stop, naming the reward and the row) or skip (it scores none of that generation's completions).", click.Choice(("raise", "skip"))),
    OptionSpec("num_generations", 8, "Completions generated per prompt: the group whose mean reward is each one's baseline.", click.IntRange(min=2)),
    OptionSpec("max_completion_length", 256, "Most tokens generated per completion.", click.IntRange(min=1)),
    OptionSpec("temperature", 1.0, "Sampling temperature of the completions (also applied to the log-probabilities trained on).", click.FloatRange(min=0.0, min_open=True)),
    OptionSpec("top_p", 1.0, "Nucleus sampling: sample from the smallest set of tokens holding this probability; 1 is off.", click.FloatRange(min=0.0, max=1.0, min_open=True)),
    OptionSpec("top_k", 0, "Sample from the k most likely tokens only; 0 is off.", click.IntRange(min=0)),
    OptionSpec("scale_rewards", "group", "Divide advantages by the reward deviation of the group, of the whole batch, or none (Dr. GRPO).", click.Choice(("group", "batch", "none"))),
    OptionSpec("loss_type", "dapo", "How token losses are averaged: grpo (per completion), bnpo (per micro-batch), dr_grpo (by --max-completion-length), dapo (over the step's tokens).", click.Choice(("grpo", "bnpo", "dr_grpo", "dapo"))),
    OptionSpec("epsilon", 0.2, "Clipping: the probability ratio counts down to 1 - epsilon (and up to 1 + epsilon unless --epsilon-high).", click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True)),
    OptionSpec("epsilon_high", 0.0, "Upper clipping bound 1 + epsilon_high (DAPO's clip-higher); 0 uses --epsilon.", click.FloatRange(min=0.0)),
    OptionSpec("beta", 0.0, "Weight of the KL penalty against the reference model (k3 estimator); 0 loads no reference.", click.FloatRange(min=0.0)),
    OptionSpec("kl_bias_correction", True, "Weight the KL penalty's tokens by the probability ratio, for an unbiased reverse-KL gradient (as TRL does by default)."),
    OptionSpec("num_iterations", 1, "Policy updates per generation of completions (mu in the GRPO paper).", click.IntRange(min=1)),
    OptionSpec("ref_model", "", "A model folder to use as the reference instead of the starting weights (with --beta above 0)."),
    OptionSpec(
        "generation_backend", "auto",
        "What generates the completions: an installed generation backend (tunesmith plugins lists them); auto takes merged "
        "for a LoRA policy held whole by each process (a merged copy: faster, the model's memory once more), else transformers.",
    ),
)


@hookimpl
def tunesmith_register_trainers():
    return [
        TrainerSpec(
            name="sft",
            trainer="tunesmith_trainers.sft:SFTTrainer",
            description="supervised fine-tuning on conversations; loss on assistant tokens only",
        ),
        TrainerSpec(
            name="pt",
            trainer="tunesmith_trainers.pt:PretrainTrainer",
            description="continued pre-training on plain text; loss on every token",
        ),
        TrainerSpec(
            name="dpo",
            trainer="tunesmith_trainers.dpo:DPOTrainer",
            description="direct preference optimisation on chosen/rejected pairs, against a reference model",
            row_formats=PAIRED_PREFERENCE_FORMATS,
            options=DPO_OPTIONS,
        ),
        TrainerSpec(
            name="kto",
            trainer="tunesmith_trainers.kto:KTOTrainer",
            description="Kahneman-Tversky optimisation on unpaired completions labelled desirable or not, against a reference model",
            row_formats=UNPAIRED_PREFERENCE_FORMATS,
            options=(
                OptionSpec("beta", 0.1, "Temperature of the implicit reward: how far the policy may move from the reference.", click.FloatRange(min=0.0, min_open=True)),
                OptionSpec("desirable_weight", 1.0, "Weight lambda_D of the desirable completions' losses.", click.FloatRange(min=0.0, min_open=True)),
                OptionSpec("undesirable_weight", 1.0, "Weight lambda_U of the undesirable completions' losses.", click.FloatRange(min=0.0, min_open=True)),
                OptionSpec("ref_model", "", "A model folder to use as the reference instead of the starting weights."),
            ),
        ),
        TrainerSpec(
            name="rm",
            trainer="tunesmith_trainers.rm:RewardModelTrainer",
            description="reward model on chosen/rejected pairs (Bradley-Terry, optional per-pair 'margin'); a score head on the base",
            row_formats=PAIRED_PREFERENCE_FORMATS,
            model_kind="sequence_classification",
        ),
        # Reference-free preference objectives: the policy's own scores only, one forward pass a batch.
        TrainerSpec(
            name="orpo",
            trainer="tunesmith_trainers.orpo:ORPOTrainer",
            description="odds ratio preference optimisation: chosen NLL plus an odds-ratio term, no reference model",
            row_formats=PAIRED_PREFERENCE_FORMATS,
            options=(
                OptionSpec("orpo_lambda", 0.1, "Weight of the odds-ratio term against the chosen NLL (TRL's beta).", click.FloatRange(min=0.0, min_open=True)),
            ),
        ),
        TrainerSpec(
            name="simpo",
            trainer="tunesmith_trainers.simpo:SimPOTrainer",
            description="simple preference optimisation: length-normalised rewards with a target margin, no reference model",
            row_formats=PAIRED_PREFERENCE_FORMATS,
            options=(
                OptionSpec("beta", 2.0, "Scale of the length-normalised reward beta * mean log-probability.", click.FloatRange(min=0.0, min_open=True)),
                OptionSpec("gamma", 0.5, "Target reward margin of the chosen over the rejected response (TRL's simpo_gamma).", click.FloatRange(min=0.0)),
                OptionSpec("label_smoothing", 0.0, "The share of pairs assumed mislabelled.", click.FloatRange(min=0.0, max=0.5, max_open=True)),
                OptionSpec("cpo_alpha", 0.0, "Weight of the chosen responses' negative log-likelihood added to the loss (CPO-SimPO); 0 is off.", click.FloatRange(min=0.0)),
            ),
        ),
        TrainerSpec(
            name="grpo",
            trainer="tunesmith_trainers.grpo:GRPOTrainer",
            description="group relative policy optimisation: completions generated per prompt, scored by reward functions, pushed toward the better ones",
            row_formats=PROMPT_FORMATS,
            options=GRPO_OPTIONS,
        ),
        TrainerSpec(
            name="cpo",
            trainer="tunesmith_trainers.cpo:CPOTrainer",
            description="contrastive preference optimisation: DPO's loss without a reference model, plus the chosen NLL",
            row_formats=PAIRED_PREFERENCE_FORMATS,
            options=(
                OptionSpec("loss_type", "sigmoid", "The preference loss: sigmoid (CPO), hinge (SLiC) or ipo (IPO, on per-token means).", click.Choice(("sigmoid", "hinge", "ipo"))),
                OptionSpec("beta", 0.1, "Temperature of the implicit reward beta * log-probability.", click.FloatRange(min=0.0, min_open=True)),
                OptionSpec("label_smoothing", 0.0, "The share of pairs assumed mislabelled (sigmoid loss only).", click.FloatRange(min=0.0, max=0.5, max_open=True)),
                OptionSpec("cpo_alpha", 1.0, "Weight of the chosen responses' negative log-likelihood (behaviour cloning); 0 is off.", click.FloatRange(min=0.0)),
            ),
        ),
    ]

"""A third-party style trainer for the lifecycle tests: it uses only the public ``tunesmith`` API,
declares an option, keeps state across a resume and compares the policy with its reference."""

from __future__ import annotations

import torch

from tunesmith import LossOutput, OptionSpec, Trainer, TrainerSpec, causal_lm_loss, collate_causal, hookimpl, tokenize_chat


class EchoTrainer(Trainer):
    """SFT's loss, logging its option's value, the batches it has seen, and how far the policy is from the reference."""

    def setup(self, context):
        super().setup(context)
        self.batches_seen = 0
        self.reference = context.make_reference(None)

    def prepare(self, example):
        return tokenize_chat(self.tokenizer, example.messages, columns=example.columns)

    def collate(self, rows):
        return collate_causal(rows, pad_token_id=self.tokenizer.pad_token_id)

    def count_items(self, batch):
        return 1

    def compute_loss(self, model, batch):
        self.batches_seen += 1
        loss = causal_lm_loss(model, batch) / batch["num_target_tokens"]
        with self.reference(model) as reference:
            reference_loss = causal_lm_loss(reference, batch) / batch["num_target_tokens"]
        return LossOutput(loss, {
            "echo": self.options["echo_value"],
            "batches_seen": float(self.batches_seen),
            "reference_is_policy": float(reference is model),
            "from_reference": float(loss.detach() - reference_loss),
        })

    def state_dict(self):
        return {"batches_seen": torch.tensor(self.batches_seen)}

    def load_state_dict(self, state):
        self.batches_seen = int(state["batches_seen"])


@hookimpl
def tunesmith_register_trainers():
    return [TrainerSpec(name="echo", trainer=EchoTrainer, description="SFT that echoes its option",
                        options=(OptionSpec("echo_value", 1.0, "A number the trainer logs as 'echo'."),))]

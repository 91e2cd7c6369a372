"""Entry-point module registering the built-in trainers."""

from tunesmith import TrainerSpec, hookimpl


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
    ]

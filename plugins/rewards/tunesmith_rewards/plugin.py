"""The entry-point module: registers the reward functions by dotted path."""

from tunesmith import RewardSpec, hookimpl


@hookimpl
def tunesmith_register_rewards():
    return [
        RewardSpec(
            name="accuracy",
            fn="tunesmith_rewards.accuracy:accuracy_reward",
            description="1 when the completion's final answer equals the `answer` column (as text or mathematically), else 0",
        ),
        RewardSpec(
            name="format",
            fn="tunesmith_rewards.format:format_reward",
            description="1 when the completion is <think>...</think> then <answer>...</answer> (or the row's `format_pattern`), else 0",
        ),
        RewardSpec(
            name="cosine",
            fn="tunesmith_rewards.cosine:cosine_reward",
            description="correctness scaled by length in words: 1 to 0.5 when right (shorter is better), -1 to -0.5 when wrong",
        ),
        RewardSpec(
            name="repetition",
            fn="tunesmith_rewards.repetition:repetition_reward",
            description="0 without repeated 3-word n-grams, down to -1 as the completion repeats itself",
        ),
        RewardSpec(
            name="soft_overlong",
            fn="tunesmith_rewards.overlong:soft_overlong_reward",
            description="DAPO's overlong punishment: 0 up to 800 words, linearly down to -1 at 1000",
        ),
        RewardSpec(
            name="length",
            fn="tunesmith_rewards.length:length_reward",
            description="0 at the target length in characters, down to -1 as the completion strays from it",
        ),
        RewardSpec(
            name="code",
            fn="tunesmith_rewards.code:code_reward",
            description="the fraction of the row's `tests` that the completion's Python passes, run in a sandbox",
        ),
    ]

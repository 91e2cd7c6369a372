"""The entry-point module: registers the reward functions by dotted path."""

from tunesmith import RewardSpec, hookimpl


@hookimpl
def tunesmith_register_rewards():
    return [
        RewardSpec(
            name="accuracy",
            fn="tunesmith_rewards.rewards:accuracy_reward",
            description="1 when the completion's final answer equals the `answer` column, else 0",
        ),
        RewardSpec(
            name="format",
            fn="tunesmith_rewards.rewards:format_reward",
            description="1 when the completion is <think>...</think> then <answer>...</answer>, else 0",
        ),
        RewardSpec(
            name="length",
            fn="tunesmith_rewards.rewards:length_reward",
            description="0 at the target length in characters, down to -1 as the completion strays from it",
        ),
        RewardSpec(
            name="code",
            fn="tunesmith_rewards.code:code_reward",
            description="the fraction of the row's `tests` that the completion's Python passes, run in a sandbox",
        ),
    ]

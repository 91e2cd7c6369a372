"""An example tunesmith plugin registering one reward, ``contains_keyword``."""

from tunesmith import RewardSpec, hookimpl


def contains_keyword(prompts, completions, keyword, **columns) -> list[float | None]:
    """1.0 when the row's ``keyword`` column appears in the completion (ignoring case), else 0.0;
    None for a row without a keyword. ``keyword`` has no default, so tunesmith checks before
    training that the dataset has that column."""
    rewards = []
    for completion, word in zip(completions, keyword, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        rewards.append(None if not word else float(word.casefold() in text.casefold()))
    return rewards


@hookimpl
def tunesmith_register_rewards():
    return [
        RewardSpec(
            name="contains_keyword",
            fn=contains_keyword,
            description="1 when the row's `keyword` column appears in the completion (ignoring case), else 0",
        )
    ]

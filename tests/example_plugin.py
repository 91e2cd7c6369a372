"""A plugin module used by the allow-list test through a synthetic entry point."""

from tunesmith.hooks import hookimpl
from tunesmith.records import RewardSpec


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


@hookimpl
def tunesmith_register_rewards():
    return [RewardSpec(name="example-length", fn=length_reward, description="length of the completion")]

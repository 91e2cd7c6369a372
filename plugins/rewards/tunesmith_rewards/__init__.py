"""Reward functions for tunesmith, each ``fn(prompts, completions, **columns) -> list[float | None]``."""

from tunesmith_rewards.rewards import accuracy_reward, final_answer, format_reward, length_reward

__all__ = ["accuracy_reward", "final_answer", "format_reward", "length_reward"]

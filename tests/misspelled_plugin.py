"""A plugin whose hook name is misspelled; loading it must not break tunesmith."""

from tunesmith.hooks import hookimpl


@hookimpl
def tunesmith_register_reward():
    return []

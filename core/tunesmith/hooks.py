"""The two pluggy markers of the ``tunesmith`` project.

Plugins decorate their hook implementations with :data:`hookimpl`::

    from tunesmith import hookimpl

    @hookimpl
    def tunesmith_register_rewards():
        yield RewardSpec(name="length", fn=length_reward)
"""

import pluggy

PROJECT_NAME = "tunesmith"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

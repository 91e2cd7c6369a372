"""The built-in device selection policy, registered as the last ``tunesmith_select_device``."""

from __future__ import annotations

from tunesmith.errors import PluginError
from tunesmith.hooks import hookimpl
from tunesmith.records import DeviceCandidate, DeviceChoice


def describe(candidates: list[DeviceCandidate]) -> str:
    return ", ".join(
        f"{c.name} ({'available' if c.available else 'unavailable'}, priority {c.priority})" for c in candidates
    ) or "none"


@hookimpl(trylast=True)
def tunesmith_select_device(requested: str, candidates: list[DeviceCandidate]) -> DeviceChoice:
    if requested != "auto":
        for candidate in candidates:
            if candidate.name == requested:
                if not candidate.available:
                    raise PluginError(
                        f"--device {requested}: the device is installed but not available here ({candidate.reason}); "
                        f"installed devices: {describe(candidates)}"
                    )
                return DeviceChoice(candidate, f"requested with --device {requested}", candidates)
        raise PluginError(f"--device {requested}: no such device is installed; installed devices: {describe(candidates)}")

    available = [c for c in candidates if c.available]
    if not available:
        raise PluginError(f"--device auto: no available device; installed devices: {describe(candidates)}")
    best = max(c.priority for c in available)
    top = [c for c in available if c.priority == best]
    if len(top) > 1:
        names = ", ".join(c.name for c in top)
        raise PluginError(f"--device auto: devices {names} tie at priority {best}; choose one with --device NAME")
    others = [c.name for c in available if c is not top[0]]
    reason = f"highest priority ({best}) among available devices"
    if others:
        reason += f"; also available: {', '.join(others)}"
    return DeviceChoice(top[0], reason, candidates)

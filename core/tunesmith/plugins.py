"""Plugin discovery and the registry of everything plugins provide.

Plugins are modules named by entry points in the ``tunesmith`` group. tunesmith's own
built-ins (the cpu device, the ``single`` strategy, the ``sft``/``pt`` trainers, the
optimizers, the generation backends, the serving engine, the metrics loggers, the ``serve`` command) register through the same entry points and always load. Third-party plugins obey
the ``TUNESMITH_PLUGINS`` allow-list: unset loads all, empty loads none, otherwise a
comma-separated list of entry-point or distribution names; a name there that matches no
installed plugin is reported once as a warning. A plugin that fails to import is reported as a
warning naming it, and everything else keeps working.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from tunesmith import hookspecs
from tunesmith.errors import ConfigError, PluginError
from tunesmith.hooks import PROJECT_NAME
from tunesmith.records import (
    CommandSpec,
    DeviceCandidate,
    DeviceChoice,
    DeviceSpec,
    GenerationBackendSpec,
    LoggerSpec,
    OptimizerSpec,
    Registered,
    RewardSpec,
    ServingEngineSpec,
    StrategySpec,
    TrainerSpec,
)

ENTRY_POINT_GROUP = "tunesmith"
ALLOW_LIST_VARIABLE = "TUNESMITH_PLUGINS"
BUILTIN_DISTRIBUTION = "tunesmith"

logger = logging.getLogger(__name__)

KINDS = {
    "device": "tunesmith_register_devices",
    "strategy": "tunesmith_register_strategies",
    "trainer": "tunesmith_register_trainers",
    "optimizer": "tunesmith_register_optimizers",
    "reward": "tunesmith_register_rewards",
    "generation backend": "tunesmith_register_generation_backends",
    "serving engine": "tunesmith_register_serving_engines",
    "logger": "tunesmith_register_loggers",
    "command": "tunesmith_register_commands",
}
RECORD_TYPES = {
    "device": DeviceSpec,
    "strategy": StrategySpec,
    "trainer": TrainerSpec,
    "optimizer": OptimizerSpec,
    "reward": RewardSpec,
    "generation backend": GenerationBackendSpec,
    "serving engine": ServingEngineSpec,
    "logger": LoggerSpec,
    "command": CommandSpec,
}


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded and was skipped."""


class AllowListWarning(UserWarning):
    """``TUNESMITH_PLUGINS`` names a plugin that is not installed (often a typo)."""


# Unknown allow-list names already warned about: every command builds more than one manager.
_reported_unknown_names: set[tuple[str, ...]] = set()


def normalize_name(name: str) -> str:
    """Compare names as pip does: case-insensitive, with '-', '_' and '.' alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def allowed_plugin_names() -> dict[str, str] | None:
    """Names allowed by ``TUNESMITH_PLUGINS``, normalized, each mapped to its spelling there;
    ``None`` means every plugin is allowed."""
    value = os.environ.get(ALLOW_LIST_VARIABLE)
    if value is None:
        return None
    return {normalize_name(name.strip()): name.strip() for name in value.split(",") if name.strip()}


def _warn_about_unknown_names(allowed: dict[str, str], entry_points: list[metadata.EntryPoint]) -> None:
    """Warn, once per process, about names in the allow-list that match no installed plugin's
    entry point or distribution: such a name (often a typo) would otherwise load nothing silently."""
    known = {normalize_name(name) for entry_point in entry_points for name in (entry_point.name, _distribution(entry_point))}
    unknown = tuple(spelling for name, spelling in allowed.items() if name not in known)
    if not unknown or unknown in _reported_unknown_names:
        return
    _reported_unknown_names.add(unknown)
    installed = sorted(
        f"{_distribution(entry_point)} (entry point {entry_point.name})"
        for entry_point in entry_points
        if normalize_name(_distribution(entry_point)) != BUILTIN_DISTRIBUTION
    )
    warnings.warn(
        f"{ALLOW_LIST_VARIABLE} names {' and '.join(map(repr, unknown))}, but no installed plugin distribution or "
        f"entry point is called that, so nothing is loaded for it; installed plugins: "
        f"{', '.join(installed) or 'none besides the built-ins'}",
        AllowListWarning,
        stacklevel=3,
    )


def _distribution(entry_point: metadata.EntryPoint) -> str:
    return entry_point.dist.name if entry_point.dist else "<unknown>"


@dataclass
class PluginManager:
    """A pluggy manager plus where each plugin came from."""

    pm: pluggy.PluginManager
    origins: dict[str, tuple[str, str]] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    _collected: dict[str, dict[str, Registered]] = field(default_factory=dict)

    @property
    def hook(self):
        return self.pm.hook

    def register(self, plugin, name: str, distribution: str = "<local>", version: str = "") -> None:
        self.pm.register(plugin, name=name)
        self.origins[name] = (distribution, version)
        self._collected.clear()

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.origins.pop(name, None)
        self._collected.clear()

    def _skip(self, plugin_name: str, what: str, error: object) -> None:
        """Report a misbehaving plugin once, by name and distribution, and carry on without it."""
        distribution = self.origins.get(plugin_name, ("<local>", ""))[0]
        failure = (plugin_name, distribution, f"{what}: {error}" if error else what)
        if failure in self.failures:
            return
        self.failures.append(failure)
        warnings.warn(
            f"tunesmith plugin {plugin_name!r} (distribution {distribution!r}) {what} and was skipped: {error}",
            PluginLoadWarning,
            stacklevel=3,
        )

    def load_entry_points(self) -> None:
        allowed = allowed_plugin_names()
        entry_points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
        if allowed:
            _warn_about_unknown_names(allowed, entry_points)
        for entry_point in entry_points:
            distribution = _distribution(entry_point)
            version = entry_point.dist.version if entry_point.dist else ""
            builtin = normalize_name(distribution) == BUILTIN_DISTRIBUTION
            if not builtin and allowed is not None and not (
                normalize_name(entry_point.name) in allowed or normalize_name(distribution) in allowed
            ):
                continue
            plugin_name = f"{distribution}:{entry_point.name}"
            if self.pm.has_plugin(plugin_name):
                continue
            try:
                plugin = entry_point.load()
                self.register(plugin, plugin_name, distribution, version)
            except Exception as error:  # a broken plugin must not break the others
                self.origins[plugin_name] = (distribution, version)
                self._skip(plugin_name, "failed to load", repr(error))
        self._drop_unknown_hooks()

    def _drop_unknown_hooks(self) -> None:
        """Unregister plugins implementing hooks no spec declares (a misspelled hook name)."""
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as error:
                plugin_name = self.pm.get_name(error.plugin)
                self.pm.unregister(error.plugin)
                self._collected.clear()
                self._skip(plugin_name, "implements an unknown hook", error)

    def collect(self, kind: str) -> dict[str, Registered]:
        """Every record of ``kind`` by name; a duplicate name is an error naming both sources.

        Each registration hook runs once per manager (the result is kept until a plugin is
        registered or unregistered). A hook that raises or returns something other than
        records is reported and skipped.
        """
        if kind not in self._collected:
            self._collected[kind] = self._collect(kind)
        return self._collected[kind]

    def _collect(self, kind: str) -> dict[str, Registered]:
        hook_caller = getattr(self.pm.hook, KINDS[kind])
        record_type = RECORD_TYPES[kind]
        found: dict[str, Registered] = {}
        # Called one implementation at a time, so each record is attributed to its plugin.
        for impl in reversed(hook_caller.get_hookimpls()):
            plugin_name = self.pm.get_name(impl.plugin)
            distribution, version = self.origins.get(plugin_name, ("<local>", ""))
            try:
                specs = list(impl.function() or ())
            except Exception as error:
                self._skip(plugin_name, f"raised in {KINDS[kind]}", repr(error))
                continue
            wrong = [spec for spec in specs if not isinstance(spec, record_type)]
            if wrong:
                self._skip(plugin_name, f"returned {wrong[0]!r} from {KINDS[kind]}, not a {record_type.__name__}", "")
                continue
            for spec in specs:
                registered = Registered(spec, plugin_name, distribution, version)
                if spec.name in found:
                    first = found[spec.name]
                    raise PluginError(
                        f"{kind} {spec.name!r} is registered twice: by {first.plugin} "
                        f"(distribution {first.distribution}) and by {plugin_name} "
                        f"(distribution {distribution}); uninstall one of them"
                    )
                found[spec.name] = registered
        return found

    def get(self, kind: str, name: str) -> Registered:
        """The record of ``kind`` named ``name``, or an error listing what is installed."""
        registered = self.collect(kind)
        if name not in registered:
            installed = ", ".join(sorted(registered)) or "none"
            raise PluginError(f"no {kind} named {name!r} is installed; installed: {installed}")
        return registered[name]

    def load_class(self, kind: str, name: str, base: type, device: str) -> type:
        """The class the record of ``kind`` named ``name`` gives (a generation backend, a serving
        engine), checked to subclass ``base`` and, where the record lists ``devices``, to run on
        ``device``; a refusal lists the ones that do."""
        registered = self.get(kind, name)
        devices = registered.spec.devices
        if devices and device not in devices:
            fitting = sorted(other for other, record in self.collect(kind).items() if not record.spec.devices or device in record.spec.devices)
            raise ConfigError(
                f"{kind} {name!r} runs on {', '.join(devices)}, not on device {device!r}; {kind}s for {device}: {', '.join(fitting) or 'none'}"
            )
        loaded = registered.load()
        if not (isinstance(loaded, type) and issubclass(loaded, base)):
            raise PluginError(
                f"{kind} {name!r} from plugin {registered.plugin} (distribution {registered.distribution}) "
                f"is {loaded!r}, not a {base.__module__}.{base.__qualname__} subclass"
            )
        return loaded

    def device_candidates(self) -> list[DeviceCandidate]:
        candidates = []
        for registered in self.collect("device").values():
            try:
                answer = registered.spec.probe()
                available = bool(answer)
                reason = None if available else getattr(answer, "reason", "its probe found no usable device")
            except Exception as error:
                available, reason = False, f"its probe failed: {error!r}"
            candidates.append(DeviceCandidate(registered, available, reason))
        return sorted(candidates, key=lambda c: (-c.priority, c.name))

    def select_device(self, requested: str = "auto", candidates: list[DeviceCandidate] | None = None) -> DeviceChoice:
        """Run the selection hooks over ``candidates`` (probed now when not given)."""
        if candidates is None:
            candidates = self.device_candidates()
        choice = self.pm.hook.tunesmith_select_device(requested=requested, candidates=candidates)
        if choice is None:
            raise PluginError("no plugin chose a device")
        if isinstance(choice, DeviceCandidate):
            choice = DeviceChoice(choice, f"chosen by a plugin for --device {requested}", candidates)
        return choice


def build_device(registered: Registered, option_values: dict | None = None):
    """Instantiate a registered device class, with its registered name and capabilities and its options' values."""
    device = registered.load()()
    device.name = registered.spec.name
    device.capabilities = registered.spec.capabilities
    device.options = {spec.name: (option_values or {}).get(spec.name, spec.default) for spec in registered.spec.options}
    return device


def create_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """A fresh manager with the hook specs and the built-in selection policy registered."""
    from tunesmith import selection

    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    manager = PluginManager(pm)
    manager.register(selection, "tunesmith:selection", BUILTIN_DISTRIBUTION, _own_version())
    if load_entry_points:
        manager.load_entry_points()
    return manager


def _own_version() -> str:
    try:
        return metadata.version(BUILTIN_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return ""

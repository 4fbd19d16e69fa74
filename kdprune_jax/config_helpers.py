r"""Helpers for the config files (configs/\*.py): the only part of kdprune_jax they import.

A config file is loaded by path (``--config=configs/x.py:arg`` through ml_collections'
config_flags, or `kdprune_jax.study`), not as a package module, so it cannot import its
siblings; `load_config_module` does that. `parse_config_arg` reads the ``:arg`` string, one
style for every config: comma-separated tokens, each a flag (``smoke``, ``tfds``) or the value
of a named choice (a pruning method), e.g. ``configs/cifar10_kd.py:el2n,smoke``.

Light on purpose: the standard library and `kdprune_jax.errors` only (no jax, flax, numpy),
so loading a config costs nothing and works before any accelerator is set up.
"""

import importlib.util
import os
import re
import sys
from collections.abc import Iterable, Mapping

from kdprune_jax.errors import UserError


class ConfigArgError(UserError, ValueError):
    """A config file's ``:arg`` is not one it accepts. The message is one line naming the
    config file, the bad arg and every allowed arg. A `UserError` (printed as one line, exit
    status 2, by `kdprune_jax.main` and `kdprune_jax.study`) and a `ValueError`."""


def _caller_file() -> str:
    """``__file__`` of the nearest calling frame outside this module (the config file)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    path = frame.f_globals.get("__file__") if frame is not None else None
    if not path:
        raise RuntimeError("config_helpers: call from a config file loaded by path, or pass "
                           "relative_to= / config_file=")
    return os.path.abspath(path)


def _shown(path: str) -> str:
    """The path as a message shows it: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def load_config_module(name: str, relative_to: str | None = None):
    """Load the config file ``name`` (e.g. ``"base.py"``, ``"cifar10_kd.py"``) from the
    directory of ``relative_to`` (a file or directory; default: the calling config file).

    Returns the freshly executed module (a new one each call, not registered in
    sys.modules), so ``load_config_module("base.py").get_config()`` is a new ConfigDict and
    ``.optim(...)`` etc. are its functions. A missing file is a FileNotFoundError naming it.
    """
    where = os.path.abspath(relative_to) if relative_to else _caller_file()
    folder = where if os.path.isdir(where) else os.path.dirname(where)
    path = os.path.normpath(os.path.join(folder, name))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {_shown(path)} (loaded by {_shown(where)}) "
                                "does not exist")
    module_name = "kdprune_config_" + re.sub(r"\W", "_", os.path.splitext(name)[0])
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def base_config():
    """``get_config()`` of the base.py next to the calling config file: a new, unlocked
    ConfigDict with every default (configs/base.py)."""
    return load_config_module("base.py", relative_to=_caller_file()).get_config()


class ConfigArg:
    """A parsed ``:arg``. Attributes: each allowed flag -> bool (given or not), each choice ->
    its value (a str) or None if not given; ``flags`` -> the flags given, as a tuple in the
    order they were declared (to pass the arg on to another config). Reading a name that is
    neither an allowed flag nor a choice is an AttributeError (a typo in the config)."""

    def __init__(self, flags: Mapping[str, bool], choices: Mapping[str, str | None]):
        object.__setattr__(self, "_flags", dict(flags))
        object.__setattr__(self, "_choices", dict(choices))

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(f for f, given in self._flags.items() if given)

    def __getattr__(self, name):
        if name in self._flags:
            return self._flags[name]
        if name in self._choices:
            return self._choices[name]
        raise AttributeError(f"no flag or choice {name!r} in this config arg; declared: "
                             f"{', '.join([*self._flags, *self._choices]) or 'none'}")

    def __setattr__(self, name, value):
        raise AttributeError("ConfigArg is read-only")

    def __repr__(self):
        items = [*(f"{k}={v!r}" for k, v in self._flags.items()),
                 *(f"{k}={v!r}" for k, v in self._choices.items())]
        return f"ConfigArg({', '.join(items)})"


def allowed_args(flags: Iterable[str] = (), choices: Mapping[str, Iterable[str]] | None = None
                 ) -> str:
    """Human-readable list of every arg a config takes, e.g. ``"smoke, tfds, and at most one
    method of: random, el2n (comma-separated)"``, or ``"none (it takes no arg)"``."""
    flags, choices = tuple(flags), {k: tuple(v) for k, v in (choices or {}).items()}
    parts = [", ".join(flags)] if flags else []
    parts += [f"at most one {k} of: {', '.join(v)}" for k, v in choices.items()]
    if not parts:
        return "none (it takes no arg)"
    text = ", and ".join(parts)
    many = len(flags) + len(choices) > 1
    return f"{text} (comma-separated)" if many else text


def parse_config_arg(arg: str, flags: Iterable[str] = (),
                     choices: Mapping[str, Iterable[str]] | None = None,
                     config_file: str | None = None) -> ConfigArg:
    """Parse a config's ``:arg``: comma-separated tokens (empty ones ignored, whitespace
    stripped), each one of ``flags`` (repeating one is harmless) or a value of one of
    ``choices`` ({name: allowed values}, at most one value per choice).

    Returns a `ConfigArg`: ``a.smoke`` is True/False, ``a.method`` the chosen value or None.
    Raises `ConfigArgError` (a ValueError) for an unknown token or two values of one choice;
    the one-line message names ``config_file`` (default: the calling config file), the bad
    arg and every allowed arg.
    """
    flags = tuple(flags)
    choices = {k: tuple(v) for k, v in (choices or {}).items()}
    if "flags" in (*flags, *choices):
        raise ValueError("'flags' cannot be a flag or choice name (it is ConfigArg.flags)")
    owner = {f: None for f in flags}
    for name, values in choices.items():
        for v in values:
            if v in owner:
                raise ValueError(f"config arg token {v!r} is declared twice")
            owner[v] = name
    shown = _shown(os.path.abspath(config_file) if config_file else _caller_file())
    allowed = allowed_args(flags, choices)
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    unknown = [t for t in tokens if t not in owner]
    if unknown:
        what = "arg" if len(unknown) == 1 else "args"
        within = f" in {arg!r}" if len(tokens) > 1 else ""
        raise ConfigArgError(f"unknown config {what} {', '.join(map(repr, unknown))}{within} "
                             f"for {shown}; allowed: {allowed}")
    given = {f: f in tokens for f in flags}
    chosen: dict[str, str | None] = dict.fromkeys(choices)
    for t in tokens:
        name = owner[t]
        if name is None:
            continue
        if chosen[name] not in (None, t):
            raise ConfigArgError(f"config arg {arg!r} for {shown} gives two values of "
                                 f"{name}, {chosen[name]!r} and {t!r}; allowed: {allowed}")
        chosen[name] = t
    return ConfigArg(given, chosen)

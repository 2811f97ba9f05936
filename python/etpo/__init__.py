"""etpo's environments from Python: every etpo spec (a YAML file) as a Gymnasium environment.

    import etpo
    env = etpo.make("envs/balance_scale.yaml", seed=0)
    observation, info = env.reset()
    observation, reward, terminated, truncated, info = env.step(" LogisticRegression(max_iter=500)")

    etpo.register("envs/")                       # gymnasium.make("etpo/balance_scale-v0")
    etpo.check("my_spec.yaml")                   # raises etpo.SpecError("file:line:col: error: ...")
    etpo.remote.make("http://127.0.0.1:8765", "balance_scale")   # the same over `etpo serve`
    etpo.ray.rollouts("/abs/envs/games/guess.yaml", policy, n_workers=4)   # on a Ray cluster (optional: etpo[ray])

Actions run in the same hardened sandbox worker pool as the `etpo` command line; see `EtpoEnv`
for the semantics and `configure` for the pool's settings.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import _etpo, remote
from ._etpo import EnvError, SpecError
from .env import EtpoEnv, PromptText, make
from .registration import register

try:
    __version__ = version("etpo")
except PackageNotFoundError:  # imported from the source tree without being installed
    __version__ = "0+unknown"

__all__ = [
    "EnvError",
    "EtpoEnv",
    "PromptText",
    "SpecError",
    "check",
    "configure",
    "find_specs",
    "make",
    "register",
    "remote",
    "sandbox",
]


def __getattr__(name: str) -> Any:
    # `etpo.ray` is imported on first use: Ray is optional, and `import etpo` never imports it.
    if name == "ray":
        import importlib

        return importlib.import_module(".ray", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validates the spec at `path` as `etpo check` does. Returns its description (name,
    description, path, kind, format, max_steps, failure_reward, seeds, extract, max_new_tokens,
    stop); raises `SpecError`, whose message is the CLI's `file:line:col: error: ...` report."""
    return _etpo.check(os.fspath(path))


def find_specs(*paths: str | os.PathLike[str]) -> list[str]:
    """The spec files in `paths` (files as given, folders' `*.yaml`/`*.yml` files), sorted."""
    return [os.fspath(p) for p in _etpo.find_specs([os.fspath(p) for p in paths])]


def configure(python: str | os.PathLike[str] | None = None, workers: int | None = None) -> None:
    """Settings of the sandbox worker pool, shared by every environment of the process; only
    before the first environment is made (afterwards, only the settings in force are accepted).

    `python`: the interpreter the sandboxed workers run; it needs numpy and scikit-learn (default:
    `$ETPO_PYTHON`, else the etpo repository's `.venv/bin/python`, else `python3`). `workers`: how
    many actions are evaluated at the same time (default: one per core)."""
    _etpo.configure(None if python is None else os.fspath(python), workers)


def sandbox() -> dict[str, Any]:
    """The sandbox pool's settings: python, workers, and in_use: whether an environment was made
    with them (they are fixed from then on)."""
    python, workers, in_use = _etpo.sandbox()
    return {"python": os.fspath(python), "workers": workers, "in_use": in_use}

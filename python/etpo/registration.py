"""Registering specs under Gymnasium ids, so that `gymnasium.make("etpo/<name>-v0")` works."""

from __future__ import annotations

import os
from typing import Any

import gymnasium
from gymnasium.envs.registration import registry

from . import _etpo

__all__ = ["register"]


def register(
    *paths: str | os.PathLike[str],
    namespace: str = "etpo",
    version: int = 0,
    **kwargs: Any,
) -> list[str]:
    """Registers the specs at `paths` (spec files, or folders whose `*.yaml`/`*.yml` files are
    specs, not recursively) as Gymnasium environments `<namespace>/<spec name>-v<version>`, each
    spec validated first (`SpecError` otherwise). `kwargs` become the environments' default
    arguments (`seed`, `chat_template`, ...; see `EtpoEnv`). Registering the same spec again is
    a no-op; another spec under a taken id is a `ValueError`. Returns the ids, in path order.
    """
    if not paths:
        raise TypeError("register() needs at least one spec file or folder")
    files = _etpo.find_specs([os.fspath(p) for p in paths])
    ids = []
    for file in files:
        info = _etpo.check(os.fspath(file))
        env_id = f"{namespace}/{info['name']}-v{version}"
        path = os.path.abspath(os.fspath(file))
        env_kwargs = {"path": path, **kwargs}
        existing = registry.get(env_id)
        if existing is not None:
            if existing.entry_point == "etpo.env:EtpoEnv" and existing.kwargs == env_kwargs:
                ids.append(env_id)
                continue
            raise ValueError(f"{env_id} is already registered (for {existing.kwargs.get('path', existing.entry_point)}); spec {path} has the same name")
        gymnasium.register(
            id=env_id,
            entry_point="etpo.env:EtpoEnv",
            nondeterministic=True,
            kwargs=env_kwargs,
        )
        ids.append(env_id)
    return ids

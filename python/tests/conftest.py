"""Shared fixtures: the repository, the `etpo` command line (to compare with), spec variants.

These tests need the project's venv with the package installed (`scripts/setup.sh python pybind`)
and the CLI built (`cargo build --bin etpo`, done by `cargo test`); they fail, not skip, without."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import etpo

REPO = Path(__file__).resolve().parents[2]
ENVS = REPO / "envs"
BALANCE_SCALE = ENVS / "balance_scale.yaml"

# Two workers, so that two environments can evaluate at the same time (the parallel test) on any
# machine; set before the first environment starts the process's pool.
etpo.configure(workers=2)


def etpo_bin() -> Path:
    """The CLI binary: $ETPO_BIN, else <target dir>/debug/etpo."""
    if os.environ.get("ETPO_BIN"):
        path = Path(os.environ["ETPO_BIN"])
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
        path = target / "debug" / "etpo"
    if not path.is_file():
        pytest.fail(f"{path} is missing: build the CLI first (`cargo build --bin etpo`) or set ETPO_BIN")
    return path


def run_cli(*args: str | os.PathLike[str], cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(etpo_bin()), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if check and out.returncode != 0:
        pytest.fail(f"etpo {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def cli_exec(spec: Path, action: str, seed: int, tmp: Path) -> dict:
    """`etpo exec --json` on one action: the CLI's verdict."""
    file = tmp / f"action-{abs(hash((action, seed)))}.txt"
    file.write_text(action)
    return json.loads(run_cli("exec", "--json", "--seed", str(seed), spec, file).stdout)


def spec_variant(tmp: Path, name: str, replacements: dict[str, str], base: Path = BALANCE_SCALE) -> Path:
    """A copy of `base` (in `tmp`, with its data paths still valid) with top-level sections
    replaced: {"limits": "limits:\\n  wall_s: 3\\n..."}; a key not in the spec is appended."""
    text = base.read_text()
    for section, body in replacements.items():
        m = re.search(rf"^{section}:.*?(?=^\S|\Z)", text, flags=re.S | re.M)
        body = body.rstrip("\n") + "\n\n"
        text = text[: m.start()] + body + text[m.end() :] if m else text + "\n" + body
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def venv_python() -> Path:
    python = REPO / ".venv" / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"{python} is missing: run `scripts/setup.sh python` first")
    return python

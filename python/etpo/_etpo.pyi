"""Type stubs of `etpo._etpo`, the native half of the package (Rust, pyo3)."""

import os
from typing import Any, TypedDict

class SpecError(ValueError):
    """An invalid spec file. `str(e)` is the CLI's report, one `file:line:col: error: ...` line per
    problem (with `  help: ...` lines where there is a suggestion)."""

    file: str
    #: (line, column, message, help); line and column are None for the file as a whole.
    diagnostics: list[tuple[int | None, int | None, str, str | None]]

class EnvError(RuntimeError):
    """The environment itself failed (data, templates, sandbox infrastructure); never raised for
    a failing action."""

class SpecInfo(TypedDict):
    name: str
    description: str
    path: str
    kind: str
    format: str
    max_steps: int
    failure_reward: float
    seeds: list[int]
    extract: str
    max_new_tokens: int
    stop: list[str]

class ObservationDict(TypedDict):
    observation: str
    messages: list[dict[str, str]] | None
    step: int

class StepDict(ObservationDict):
    reward: float
    terminated: bool
    truncated: bool
    action: str
    error: str
    ran: bool
    wall_s: float
    cpu_s: float
    peak_rss_mb: float

def configure(python: str | os.PathLike[str] | None = None, workers: int | None = None) -> None: ...
def sandbox() -> tuple[str, int, bool]: ...  # python, workers, in use
def find_specs(paths: list[str | os.PathLike[str]]) -> list[str]: ...
def check(path: str | os.PathLike[str]) -> SpecInfo: ...

class Task:
    def __init__(self, path: str | os.PathLike[str]) -> None: ...
    @property
    def info(self) -> SpecInfo: ...
    def env(
        self, seed: int, chat_template: str | None = None, bos_token: str = "", eos_token: str = ""
    ) -> Env: ...

class TestScoreDict(TypedDict):
    test_score: float | None
    error: str
    ran: bool
    wall_s: float
    cpu_s: float
    peak_rss_mb: float

class Env:
    @property
    def seed(self) -> int: ...
    def reset(self) -> ObservationDict: ...
    def step(self, generation: str) -> StepDict: ...
    def score_test(self, action: str) -> TestScoreDict: ...

"""The Gymnasium environment over one etpo spec, and its text spaces."""

from __future__ import annotations

import os
import string
from typing import Any, SupportsFloat

import gymnasium
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec
from gymnasium.error import ResetNeeded

from . import _etpo

__all__ = ["EtpoEnv", "PromptText", "make"]

#: Characters `PromptText.sample` draws from: printable ASCII, including newline and tab.
SAMPLE_CHARSET = string.printable

#: Default bounds of the spaces, in characters. Prompts of the shipped specs are 2-4 thousand
#: characters; reflection states add an error message, which the sandbox caps.
MAX_OBSERVATION_LENGTH = 1 << 20
MAX_ACTION_LENGTH = 1 << 13


class PromptText(spaces.Text):
    """A space of text: any `str` of `min_length` to `max_length` characters.

    Unlike `gymnasium.spaces.Text`, membership is not limited to a character set: prompts and
    actions are arbitrary Unicode (feature names, tracebacks, model output). The character set
    (printable ASCII with newlines) is used only by `sample`.
    """

    def __init__(self, max_length: int, *, min_length: int = 0, seed: int | None = None) -> None:
        super().__init__(max_length, min_length=min_length, charset=SAMPLE_CHARSET, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"PromptText({self.min_length}, {self.max_length})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PromptText)
            and self.min_length == other.min_length
            and self.max_length == other.max_length
        )

    def __hash__(self) -> int:
        return hash((PromptText, self.min_length, self.max_length))


class EtpoEnv(gymnasium.Env[str, str]):
    """One etpo spec as a Gymnasium environment.

    The observation is the rendered state as text: the prompt η(g) after `reset`, the reflection
    state η(g, a, e) after a failed action. For chat-format specs the text is the messages rendered
    with `chat_template` (Jinja source, e.g. a tokenizer's `chat_template`; ChatML by default), and
    the messages themselves are in `info["messages"]`.

    The action is the policy's raw generated text: the spec's extraction cuts the action out of
    it (e.g. its first line) exactly as during training; `info["action"]` is what was run. For
    data tasks (`kind: sklearn`) an action that runs ends the episode (`terminated`, reward = its
    score) and one that fails gets the spec's failure reward and the reflection state; for text
    games (`kind: wasm`) the game gives the rewards and says when it is over. The episode is
    `truncated` at the spec's `max_steps`. Failing actions never raise.

    Seeds: the seed picks the episode's task instance, as `--seeds` does for `etpo run` (for data
    tasks, the train/validation split; for games, the game's reset seed). `EtpoEnv(path, seed=s)` starts on seed `s` (default: the
    spec's first seed); `reset(seed=s)` switches to seed `s` for this and later episodes, and
    also seeds `np_random`. Episodes on one seed all start from the same state.

    The environment is `nondeterministic` in Gymnasium's sense: the reward of an action that uses
    randomness (e.g. a random forest without `random_state`) can change from one run to the next,
    and `info` carries measured times.

    `reset` and `step` release the GIL: environments stepped from several Python threads evaluate
    their actions in parallel, up to the sandbox pool's workers (see `etpo.configure`). One
    environment is meant for one thread at a time.
    """

    # No rendering: the observation already is the text a person would read.
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        path: str | os.PathLike[str],
        seed: int | None = None,
        *,
        render_mode: None = None,
        python: str | os.PathLike[str] | None = None,
        chat_template: str | None = None,
        bos_token: str = "",
        eos_token: str = "",
        max_observation_length: int = MAX_OBSERVATION_LENGTH,
        max_action_length: int = MAX_ACTION_LENGTH,
    ) -> None:
        if render_mode is not None:
            raise ValueError(f"etpo environments have no render modes (the observation is text), got {render_mode!r}")
        if python is not None:
            _etpo.configure(python=os.fspath(python))
        self.render_mode = render_mode
        self._path = os.path.abspath(os.fspath(path))
        self._task = _etpo.Task(self._path)
        self._info: dict[str, Any] = self._task.info
        seeds = self._info["seeds"]
        self._chat = (chat_template, bos_token, eos_token)
        self._env: _etpo.Env | None = self._task.env(
            _split_seed(seed if seed is not None else (seeds[0] if seeds else 0)), *self._chat
        )
        self._needs_reset = True

        self.observation_space = PromptText(max_observation_length)
        self.action_space = PromptText(max_action_length)
        # A spec that rebuilds this environment (gymnasium.make replaces it with the registered one).
        self.spec = EnvSpec(
            id=f"etpo/{self._info['name']}-v0",
            entry_point="etpo.env:EtpoEnv",
            nondeterministic=True,
            kwargs={
                "path": self._path,
                "seed": seed,
                "chat_template": chat_template,
                "bos_token": bos_token,
                "eos_token": eos_token,
                "max_observation_length": max_observation_length,
                "max_action_length": max_action_length,
            },
        )

    # -- what the spec says ---------------------------------------------------------------------

    @property
    def etpo_spec(self) -> dict[str, Any]:
        """The spec's description: name, description, path, kind, format, max_steps,
        failure_reward, seeds, extract, max_new_tokens, stop (a copy)."""
        return dict(self._info, seeds=list(self._info["seeds"]), stop=list(self._info["stop"]))

    @property
    def split_seed(self) -> int:
        """The seed of the current (or next) episode's task instance."""
        return self._live().seed

    # -- Gymnasium API --------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode; `seed` (optional) switches the task instance (see the class).
        `options` is accepted for the API and unused."""
        seed = None if seed is None else _split_seed(seed)
        super().reset(seed=seed)
        env = self._live()
        if seed is not None and seed != env.seed:
            env = self._env = self._task.env(seed, *self._chat)
        out = env.reset()
        self._needs_reset = False
        return out["observation"], self._step_info(out)

    def step(self, action: str) -> tuple[str, SupportsFloat, bool, bool, dict[str, Any]]:
        """Runs the action extracted from `action` (raw generated text) and scores it."""
        env = self._live()
        if self._needs_reset:
            raise ResetNeeded("call reset() before step(), and again after the episode ended")
        if not isinstance(action, str):
            raise TypeError(f"the action must be str (the generated text), got {type(action).__name__}")
        out = env.step(action)
        self._needs_reset = out["terminated"] or out["truncated"]
        info = self._step_info(out)
        for key in ("action", "error", "ran", "wall_s", "cpu_s", "peak_rss_mb"):
            info[key] = out[key]
        return out["observation"], out["reward"], out["terminated"], out["truncated"], info

    def score_test(self, action: str) -> dict[str, Any]:
        """The held-out score of `action` (an `info["action"]` a step gave: already extracted) on
        the test part of the current split (`dataset.test_fraction`), which no reward uses; score
        the action of your best validation reward once, for an honest figure. Returns a dict:
        test_score (None when the program failed), error, ran, wall_s, cpu_s, peak_rss_mb.
        ValueError for a game or a spec without a test part."""
        return dict(self._live().score_test(action))

    def render(self) -> None:
        """Nothing to render: the observation is the text."""
        return None

    def close(self) -> None:
        """Lets go of the environment (the process's sandbox pool keeps running for others).
        Closing twice is allowed."""
        self._env = None

    # -- helpers --------------------------------------------------------------------------------

    def _live(self) -> _etpo.Env:
        if self._env is None:
            raise gymnasium.error.ClosedEnvironmentError("the environment is closed")
        return self._env

    def _step_info(self, out: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {"step": out["step"], "split_seed": self._live().seed}
        if out["messages"] is not None:
            info["messages"] = out["messages"]
        return info

    def __repr__(self) -> str:
        return f"<EtpoEnv {self._info['name']} ({self._path}), seed {self._env.seed if self._env else 'closed'}>"


def _split_seed(seed: Any) -> int:
    """A seed as the runtime takes it: an integer from 0 to 2**64 - 1."""
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise TypeError(f"a seed must be an integer, got {seed!r}") from None
    if value != seed or not 0 <= value < 1 << 64:
        raise ValueError(f"a seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    return value


def make(path: str | os.PathLike[str], seed: int | None = None, **kwargs: Any) -> EtpoEnv:
    """The environment of the spec at `path` (a YAML file) on `seed` (default: the spec's first
    seed). Keyword arguments go to `EtpoEnv`: render_mode, python, chat_template, bos_token,
    eos_token, max_observation_length, max_action_length. Raises `SpecError` for an invalid spec."""
    return EtpoEnv(path, seed, **kwargs)

"""etpo environments served by `etpo serve`, as Gymnasium environments over HTTP.

    etpo serve envs/ --listen 127.0.0.1:8765          # on the machine with the sandbox
    env = etpo.remote.make("http://127.0.0.1:8765", "balance_scale", seed=0)
    observation, info = env.reset()
    observation, reward, terminated, truncated, info = env.step(" LogisticRegression(max_iter=500)")
    env.close()                                        # frees the server's episode

Only the standard library is used (`urllib`); one HTTP request per `reset`, `step` and `close`.
The semantics are `etpo.EtpoEnv`'s: the observation is the state's text (chat specs: rendered
as ChatML by the server, the messages in `info["messages"]`), the action the raw generation.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, SupportsFloat

import gymnasium
from gymnasium.envs.registration import EnvSpec
from gymnasium.error import ResetNeeded

from .env import MAX_ACTION_LENGTH, MAX_OBSERVATION_LENGTH, PromptText

__all__ = ["RemoteEnv", "RemoteError", "make", "specs"]


class RemoteError(RuntimeError):
    """The server refused a request or could not be reached; the message has its answer."""


def _request(url: str, path: str, body: dict[str, Any] | None, token: str | None, timeout: float) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        raise RemoteError(f"{url}{path}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RemoteError(f"{url}{path}: {e}") from None


def specs(url: str, token: str | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The specs the server at `url` serves: name, description, kind, max_steps, seeds, ..."""
    return _request(url, "/specs", None, token, timeout)


class RemoteEnv(gymnasium.Env[str, str]):
    """One spec served by `etpo serve` at `url`, as a Gymnasium environment.

    `seed` picks the task instance as in `etpo.EtpoEnv` (default: the spec's first seed);
    `reset(seed=s)` switches to seed `s` for this and later episodes. `token` (default:
    `$ETPO_SERVE_TOKEN`) is sent as `Authorization: Bearer` for servers off loopback.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        url: str,
        spec: str,
        seed: int | None = None,
        token: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.url = url
        self.token = token if token is not None else os.environ.get("ETPO_SERVE_TOKEN")
        self.timeout = timeout
        served = {s["name"]: s for s in specs(url, self.token, timeout)}
        if spec not in served:
            raise RemoteError(f"{url} does not serve {spec!r}; it serves: {', '.join(sorted(served))}")
        self.description = served[spec]
        self.spec_name = spec
        self.task_seed = seed if seed is not None else self.description["seeds"][0]
        self.observation_space = PromptText(MAX_OBSERVATION_LENGTH)
        self.action_space = PromptText(MAX_ACTION_LENGTH)
        self._episode: str | None = None
        self._done = False
        # As etpo.EtpoEnv: rewards of actions that use randomness, and measured times, vary.
        self.spec = EnvSpec(
            id=f"etpo-remote/{spec}-v0",
            entry_point="etpo.remote:RemoteEnv",
            nondeterministic=True,
            kwargs={"url": url, "spec": spec, "seed": seed, "timeout": timeout},
        )

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return _request(self.url, path, body, self.token, self.timeout)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self.task_seed = seed
        self._close_episode()
        answer = self._post("/reset", {"spec": self.spec_name, "seed": self.task_seed})
        self._episode, self._done = answer["episode_id"], False
        return answer["observation"], answer.get("info", {})

    def step(self, action: str) -> tuple[str, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._episode is None or self._done:
            raise ResetNeeded("call reset() before step(), and again after the episode ended")
        answer = self._post("/step", {"episode_id": self._episode, "action": action})
        terminated, truncated = bool(answer["terminated"]), bool(answer["truncated"])
        self._done = terminated or truncated
        return answer["observation"], float(answer["reward"]), terminated, truncated, answer.get("info", {})

    def score_test(self, action: str) -> dict[str, Any]:
        """The held-out score of `action` (an `info["action"]` a step gave) on the test part of
        the current split, computed by the server (`POST /score_test`), which keeps the test
        labels; the same dict as `etpo.make(...).score_test`."""
        answer = self._post("/score_test", {"spec": self.spec_name, "seed": self.task_seed, "action": action})
        return {k: answer[k] for k in ("test_score", "error", "ran", "wall_s", "cpu_s", "peak_rss_mb")}

    def _close_episode(self) -> None:
        if self._episode is not None:
            episode, self._episode = self._episode, None
            try:
                self._post("/close", {"episode_id": episode})
            except RemoteError:
                pass  # already expired or the server is gone: nothing to free

    def close(self) -> None:
        self._close_episode()
        super().close()


def make(url: str, spec: str, seed: int | None = None, token: str | None = None, timeout: float = 120.0) -> RemoteEnv:
    """A Gymnasium environment over the spec named `spec` served by `etpo serve` at `url`."""
    return RemoteEnv(url, spec, seed=seed, token=token, timeout=timeout)

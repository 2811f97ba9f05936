"""etpo environments on a Ray cluster: environment workers as Ray actors.

    import ray, etpo.ray
    ray.init()                                   # one machine; ray.init(address="auto") on a cluster
    episodes = etpo.ray.rollouts("/abs/path/envs/games/guess.yaml", policy, n_workers=4, episodes=20)
    for e in episodes:
        print(e.index, e.seed, e.total_reward, len(e.transitions))

Two ways to put environments on the cluster:

- `EnvWorker`: an actor holding `etpo.make` environments of one spec (one per seed given); the
  driver (or anything holding the handle) calls `reset(i)` / `step(i, action)` on environment
  `i`. `rollouts` spreads episodes over N such actors and gathers their transitions.
- `ServeWorker`: an actor that runs `etpo serve` on its node and hands out the URL, for trainers
  that speak HTTP (`etpo.remote.make(url, spec)`); `serve_per_node` starts one on every node.

Ray is optional: `pip install "etpo[ray]"`. `import etpo` does not import Ray; this module does.

What every node needs: the same `etpo` package (and, for data specs, the sandbox's Python with
numpy and scikit-learn), and the spec files at the paths given, with whatever they point to
(data files, the games' .wasm modules: `scripts/setup.sh games`). Paths are opened on the node
that runs the actor: a relative path is taken from the actor's working directory, which is the
driver's for a cluster started by `ray.init()` on one machine but not on other machines, so give
absolute paths that exist on every node (e.g. the same checkout path everywhere).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

try:
    import ray
except ImportError as e:  # ray is an optional dependency
    raise ImportError(
        'etpo.ray needs Ray, which is optional: pip install "etpo[ray]" (or pip install "ray>=2.60") '
        f"into this environment ({e})"
    ) from e

__all__ = [
    "EnvWorker",
    "Episode",
    "ServeWorker",
    "Transition",
    "rollouts",
    "serve_per_node",
]


class Transition(NamedTuple):
    """One step: the observation the action answered (the prompt), the action (the policy's raw
    text), and what `step` returned for it."""

    observation: str
    action: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


@dataclass
class Episode:
    """One episode collected by `rollouts`.

    `index` is its place in the request (episode k ran on task seed `seed`), `worker` and `env`
    where it ran. `final_observation` is the observation after the last step (the next state of
    the last transition); `reset_info` the `info` of `reset`."""

    index: int
    seed: int
    worker: int
    env: int
    reset_info: dict[str, Any]
    transitions: list[Transition] = field(default_factory=list)
    final_observation: str = ""

    @property
    def total_reward(self) -> float:
        return float(sum(t.reward for t in self.transitions))

    @property
    def complete(self) -> bool:
        """Whether the episode ended (its last step terminated or truncated it)."""
        return bool(self.transitions) and (self.transitions[-1].terminated or self.transitions[-1].truncated)


def _node_ip() -> str:
    """The address of this node in the cluster (what `ray start --node-ip-address` set)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


@ray.remote
class EnvWorker:
    """A Ray actor holding `etpo.make` environments of the spec at `spec`, one per seed in
    `seeds` (default: one, on the spec's first seed); environment `i` starts on `seeds[i]`.

    `spec` is a path on the node that runs the actor (see the module's notes on paths).
    `sandbox_workers` sizes the actor process's sandbox pool (`etpo.configure(workers=...)`;
    default: one per core of the node, per actor: lower it when several actors share a node and
    evaluate data-task actions); `python` is the sandbox's interpreter. `env_kwargs` go to
    `etpo.make` (e.g. `chat_template`).

    Methods (call with `.remote(...)`, get results with `ray.get`): `reset(i, seed=None)` →
    (observation, info), `step(i, action)` → (observation, reward, terminated, truncated, info),
    `num_envs()`, `spec()` (the spec's description), `node()` (the node's IP), `close()`, and
    `run_episodes(i, policy, seeds)`, which plays whole episodes inside the actor.

    An actor runs one call at a time unless made with `.options(max_concurrency=n)`; then calls on
    different environments run in parallel threads (etpo releases the GIL while stepping). One
    environment must not be used by two calls at once.
    """

    def __init__(
        self,
        spec: str | os.PathLike[str],
        seeds: Sequence[int] | None = None,
        *,
        sandbox_workers: int | None = None,
        python: str | os.PathLike[str] | None = None,
        **env_kwargs: Any,
    ) -> None:
        import etpo

        if sandbox_workers is not None or python is not None:
            etpo.configure(python=python, workers=sandbox_workers)
        if not os.path.isfile(spec):
            raise FileNotFoundError(
                f"{spec}: no such spec file on node {_node_ip()} (cwd {os.getcwd()}): the spec, and what it "
                "points to, must exist on every node that runs an EnvWorker; give an absolute path"
            )
        seeds = [None] if seeds is None else list(seeds)
        if not seeds:
            raise ValueError("an EnvWorker needs at least one seed (one environment per seed)")
        self._envs = [etpo.make(spec, seed=s, **env_kwargs) for s in seeds]

    def num_envs(self) -> int:
        return len(self._envs)

    def node(self) -> str:
        return _node_ip()

    def spec(self) -> dict[str, Any]:
        return self._envs[0].etpo_spec

    def reset(self, i: int, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        return self._envs[i].reset(seed=seed)

    def step(self, i: int, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self._envs[i].step(action)
        return obs, float(reward), bool(terminated), bool(truncated), info

    def run_episodes(
        self, i: int, policy: Callable[[str], str], seeds: Sequence[int]
    ) -> list[tuple[dict[str, Any], list[Transition], str]]:
        """Plays one episode per seed on environment `i` with `policy` (called here, in the
        actor). Returns (reset info, transitions, final observation) per episode."""
        out = []
        for seed in seeds:
            obs, reset_info = self.reset(i, seed)
            transitions: list[Transition] = []
            done = False
            while not done:
                action = policy(obs)
                next_obs, reward, terminated, truncated, info = self.step(i, action)
                transitions.append(Transition(obs, action, reward, terminated, truncated, info))
                obs, done = next_obs, terminated or truncated
            out.append((reset_info, transitions, obs))
        return out

    def close(self) -> None:
        for env in self._envs:
            env.close()


def rollouts(
    spec: str | os.PathLike[str],
    policy: Callable[[str], str] | Callable[[list[str]], list[str]],
    *,
    n_workers: int = 2,
    episodes: int | None = None,
    seeds: Sequence[int] | None = None,
    envs_per_worker: int = 1,
    policy_on: Literal["driver", "workers"] = "driver",
    batched: bool = False,
    workers: Sequence[Any] | None = None,
    worker_options: dict[str, Any] | None = None,
    **worker_kwargs: Any,
) -> list[Episode]:
    """Plays `episodes` episodes of the spec at `spec` on `n_workers` `EnvWorker` actors (each
    with `envs_per_worker` environments) and returns them in request order, whatever order they
    finished in: episode k runs on task seed `seeds[k % len(seeds)]` (default seeds: the spec's;
    default `episodes`: one per seed), on slot k % (n_workers × envs_per_worker), where slot j is
    environment j // n_workers of worker j % n_workers. The slots and the order of each slot's
    episodes are fixed, so the same call collects the same transitions wherever it runs (as long
    as the policy and the spec's rewards are deterministic).

    `policy` maps a prompt (the observation text) to the action text, e.g. a scripted function, a
    call to an HTTP model server, or a vLLM engine. Where it runs:

    - `policy_on="driver"` (default): in this process. Every round, the prompts of all running
      episodes are collected, the policy answers each (or, with `batched=True`, is called once
      with the list of prompts and returns the list of actions: one batched generation per round),
      and the steps are sent to the actors together. Any callable works, pickled or not.
    - `policy_on="workers"`: the policy is pickled to the actors, and each slot plays its episodes
      there without a round trip per step (a model behind an HTTP endpoint every node can reach,
      or a scripted policy). `batched` does not apply.

    `workers`: actors to use instead of starting `n_workers` new ones (each with at least
    `envs_per_worker` environments of this spec; they stay up, for the next call); new ones are
    made with `EnvWorker.options(max_concurrency=envs_per_worker, **worker_options)` and killed at
    the end. `worker_kwargs` are `EnvWorker`'s (`sandbox_workers`, `python`, `chat_template`, ...).

    A policy run on the workers is pickled with cloudpickle: functions defined in `__main__` or
    inside a function travel by value; others must be importable on the nodes.
    """
    if policy_on not in ("driver", "workers"):
        raise ValueError(f"policy_on must be 'driver' or 'workers', got {policy_on!r}")
    if batched and policy_on != "driver":
        raise ValueError("batched=True needs policy_on='driver' (one call per round over every running episode)")
    if envs_per_worker < 1:
        raise ValueError("envs_per_worker must be at least 1")
    spec = os.fspath(spec)
    own = workers is None
    if own:
        if n_workers < 1:
            raise ValueError("n_workers must be at least 1")
        options = {"max_concurrency": envs_per_worker, **(worker_options or {})}
        # The actors' environments start on the spec's first seed; every episode resets to its own.
        workers = [
            EnvWorker.options(**options).remote(spec, [None] * envs_per_worker, **worker_kwargs)
            for _ in range(n_workers)
        ]
    else:
        workers = list(workers)
        if not workers:
            raise ValueError("workers is empty")
    try:
        if seeds is None:
            seeds = ray.get(workers[0].spec.remote())["seeds"] or [0]
        seeds = list(seeds)
        if not seeds:
            raise ValueError("seeds is empty")
        count = len(seeds) if episodes is None else episodes
        plan = [(k, seeds[k % len(seeds)]) for k in range(count)]
        n_slots = len(workers) * envs_per_worker
        slots: list[list[tuple[int, int]]] = [plan[j::n_slots] for j in range(n_slots)]

        def where(j: int) -> tuple[int, int]:
            return j % len(workers), j // len(workers)

        if policy_on == "workers":
            results = {}
            futures = {}
            for j, queue in enumerate(slots):
                if queue:
                    w, e = where(j)
                    futures[j] = workers[w].run_episodes.remote(e, policy, [s for _, s in queue])
            for j, future in futures.items():
                w, e = where(j)
                for (k, seed), (reset_info, transitions, final) in zip(slots[j], ray.get(future)):
                    results[k] = Episode(k, seed, w, e, reset_info, list(transitions), final)
            return [results[k] for k in range(count)]
        return _lockstep(workers, slots, where, policy, batched, count)
    finally:
        if own:
            for w in workers:
                ray.kill(w)


def _lockstep(workers, slots, where, policy, batched, count) -> list[Episode]:
    """`rollouts` with the policy in the driver: rounds of (policy over every running episode's
    prompt, then every step at once)."""
    results: dict[int, Episode] = {}
    running: dict[int, tuple[Episode, str]] = {}  # slot -> (its episode, the current observation)
    cursor = [0] * len(slots)

    def start(js: list[int]) -> None:
        calls = {}
        for j in js:
            if cursor[j] < len(slots[j]):
                k, seed = slots[j][cursor[j]]
                cursor[j] += 1
                w, e = where(j)
                calls[j] = (Episode(k, seed, w, e, {}), workers[w].reset.remote(e, seed))
        for j, (episode, future) in calls.items():
            obs, episode.reset_info = ray.get(future)
            running[j] = (episode, obs)

    start(list(range(len(slots))))
    while running:
        order = sorted(running)
        prompts = [running[j][1] for j in order]
        if batched:
            actions = list(policy(prompts))
            if len(actions) != len(prompts):
                raise ValueError(f"the batched policy returned {len(actions)} actions for {len(prompts)} prompts")
        else:
            actions = [policy(p) for p in prompts]
        futures = [workers[where(j)[0]].step.remote(where(j)[1], a) for j, a in zip(order, actions)]
        ended = []
        for j, prompt, action, answer in zip(order, prompts, actions, ray.get(futures)):
            obs, reward, terminated, truncated, info = answer
            episode = running[j][0]
            episode.transitions.append(Transition(prompt, action, reward, terminated, truncated, info))
            if terminated or truncated:
                episode.final_observation = obs
                results[episode.index] = episode
                del running[j]
                ended.append(j)
            else:
                running[j] = (episode, obs)
        start(ended)
    return [results[k] for k in range(count)]


# -- etpo serve on the nodes -------------------------------------------------------------------


def _default_binary() -> str:
    if os.environ.get("ETPO_BIN"):
        return os.environ["ETPO_BIN"]
    found = shutil.which("etpo")
    if found is None:
        raise FileNotFoundError(
            f"no `etpo` on PATH on node {_node_ip()} and $ETPO_BIN is not set: pass binary=... "
            "(the etpo command line, built with `cargo build --release --bin etpo`)"
        )
    return found


@ray.remote
class ServeWorker:
    """A Ray actor that runs `etpo serve PATHS` on its node and hands out the URL
    (`url()`), for `etpo.remote.make(url, spec)`. The server stops with the actor (`stop()`,
    `ray.kill`, or the end of the job).

    `paths`: spec files or folders on the node. `binary`: the `etpo` command line (default:
    `$ETPO_BIN`, else `etpo` on PATH, as seen by the actor). `listen` defaults to
    `127.0.0.1:0` (loopback, a free port): only processes on the same node can connect, e.g.
    actors placed next to it. To reach it from other machines, listen on the node's address
    (`"0.0.0.0:0"` or `"<ip>:8765"`) and give a `token`: `etpo serve` refuses a non-loopback
    address without one; clients send it (`etpo.remote.make(url, spec, token=...)`). The token
    is passed in the environment (`ETPO_SERVE_TOKEN`), not on the command line. There is no TLS.
    A URL on 0.0.0.0 is handed out with the node's IP instead. `args`: more `etpo serve`
    arguments (`["--idle-timeout-s", "60"]`); `workers`: its `--workers`.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        listen: str = "127.0.0.1:0",
        token: str | None = None,
        workers: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        start_timeout_s: float = 120.0,
    ) -> None:
        binary = os.fspath(binary) if binary is not None else _default_binary()
        command = [binary, "serve", *map(os.fspath, paths), "--listen", listen, *args]
        if workers is not None:
            command += ["--workers", str(workers)]
        env = dict(os.environ)
        if token is not None:
            env["ETPO_SERVE_TOKEN"] = token
        self._log: deque[str] = deque(maxlen=200)
        self._proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        found: list[str] = []
        ready = threading.Event()

        def drain() -> None:
            # Reads the server's stderr for its whole life (a full pipe would block it).
            assert self._proc.stderr is not None
            for line in self._proc.stderr:
                self._log.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m and not found:
                    found.append(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(start_timeout_s) or not found:
            self._proc.kill()
            raise RuntimeError(
                f"etpo serve did not start on node {_node_ip()} ({' '.join(command)}):\n" + "".join(self._log)
            )
        url = found[0]
        if "//0.0.0.0:" in url or "//[::]:" in url:
            url = re.sub(r"//(0\.0\.0\.0|\[::\]):", f"//{_node_ip()}:", url)
        self._url = url

    def url(self) -> str:
        return self._url

    def node(self) -> str:
        return _node_ip()

    def log(self) -> str:
        """The server's last 200 lines of stderr."""
        return "".join(self._log)

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Stops the server (SIGTERM, then SIGKILL); returns its exit status."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()


def serve_per_node(
    paths: Sequence[str | os.PathLike[str]], *, timeout_s: float = 120.0, **serve_kwargs: Any
) -> list[tuple[Any, str]]:
    """Starts one `ServeWorker` on every alive node of the cluster (pinned to it) and returns
    (actor, URL) pairs, in node order. `serve_kwargs` are `ServeWorker`'s (`listen`, `token`,
    `binary`, ...). Keep the actors: the servers stop when they go."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])
    actors = [
        ServeWorker.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        ).remote(paths, **serve_kwargs)
        for n in nodes
    ]
    deadline = time.monotonic() + timeout_s
    urls = [ray.get(a.url.remote(), timeout=max(1.0, deadline - time.monotonic())) for a in actors]
    return list(zip(actors, urls))

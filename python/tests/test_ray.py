"""`etpo.ray`: environment workers as Ray actors, on a local Ray cluster on loopback that the tests
start and stop. Ray is an optional dependency of the package but required here (`scripts/setup.sh
pybind-dev` installs it): without it these tests fail, they do not skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

import etpo
from conftest import ENVS, REPO, etpo_bin

GUESS = ENVS / "games" / "guess.yaml"

# Loopback only: by default Ray registers the node under the machine's routable address and its
# servers listen on every interface; with this variable (read when ray is imported, and inherited
# by the cluster's processes) it takes 127.0.0.1 for the node and binds there, as a one-node
# cluster. Nothing else in this process imports ray before these tests.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def binary_search_policy():
    """A scripted guess policy: the middle of the last range the game stated. (Made by a function
    so that cloudpickle ships it by value to the actors, which cannot import this test module.)"""

    def policy(prompt: str) -> str:
        low, high = map(int, re.findall(r"from (\d+) to (\d+)", prompt)[-1])
        return str((low + high) // 2)

    return policy


def local_episode(seed: int, policy) -> list[tuple[str, str, float, bool, bool]]:
    env = etpo.make(GUESS, seed=seed)
    obs, _ = env.reset(seed=seed)
    steps, done = [], False
    while not done:
        action = policy(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        steps.append((obs, action, float(reward), terminated, truncated))
        obs, done = next_obs, terminated or truncated
    env.close()
    return steps


def python(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_etpo_does_not_import_ray():
    out = python("import sys, etpo; assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_without_ray_etpo_ray_says_how_to_install_it():
    # sys.modules["ray"] = None makes `import ray` fail as if it were not installed.
    out = python("import sys; sys.modules['ray'] = None\nimport etpo\ntry:\n    etpo.ray\nexcept ImportError as e:\n    print(e)")
    assert out.returncode == 0, out.stderr
    assert 'pip install "etpo[ray]"' in out.stdout, out.stdout


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        import ray
    except ImportError:
        pytest.fail('ray is not installed: `scripts/setup.sh pybind-dev` installs it (or pip install "etpo[ray]")')
    import etpo.ray  # noqa: F401  (the actor classes register with the cluster on first use)

    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    # address="local": always a new cluster of our own, never one found through RAY_ADDRESS or
    # /tmp/ray. Loopback only; no dashboard.
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    print(f"\nray {ray.__version__}: local cluster started in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    yield ray
    t0 = time.perf_counter()
    ray.shutdown()
    print(f"\nray: shut down in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def test_rollouts_from_two_workers_equal_local_episodes(ray_cluster):
    policy = binary_search_policy()
    seeds = [0, 1, 2, 3, 4]
    t0 = time.perf_counter()
    episodes = etpo.ray.rollouts(GUESS, policy, n_workers=2, episodes=7, seeds=seeds)
    print(f"\n7 guess episodes from 2 EnvWorker actors (started here): {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    assert [e.index for e in episodes] == list(range(7))
    assert [e.seed for e in episodes] == [0, 1, 2, 3, 4, 0, 1]
    # Episode k on slot k % 2: worker k % 2, its only environment.
    assert [(e.worker, e.env) for e in episodes] == [(k % 2, 0) for k in range(7)]
    for e in episodes:
        assert e.complete and e.transitions[-1].terminated, e
        assert all(not t.terminated and not t.truncated for t in e.transitions[:-1])
        assert e.reset_info == {"step": 0, "split_seed": e.seed}
        assert [t.info["step"] for t in e.transitions] == list(range(1, len(e.transitions) + 1))
        local = local_episode(e.seed, policy)
        assert [(t.observation, t.action, t.reward, t.terminated, t.truncated) for t in e.transitions] == local
        assert e.total_reward == pytest.approx(sum(r for _, _, r, _, _ in local))
        # Binary search wins within the ten guesses: 1 for the win plus the shaping.
        assert 1.0 < e.total_reward <= 1.1
    assert [t[:5] for t in episodes[5].transitions] == [t[:5] for t in episodes[0].transitions]


def test_the_policy_can_run_on_the_workers_or_batched(ray_cluster):
    ray = ray_cluster
    policy = binary_search_policy()
    workers = [etpo.ray.EnvWorker.options(max_concurrency=2).remote(str(GUESS), [0, 0]) for _ in range(2)]
    try:
        first = etpo.ray.rollouts(GUESS, policy, workers=workers, envs_per_worker=2, seeds=[4, 3, 2, 1, 0])
        calls = []

        def batched(prompts: list[str]) -> list[str]:
            calls.append(len(prompts))
            return [policy(p) for p in prompts]

        second = etpo.ray.rollouts(GUESS, batched, workers=workers, envs_per_worker=2, seeds=[4, 3, 2, 1, 0], batched=True)
        on_workers = etpo.ray.rollouts(
            GUESS, policy, workers=workers, envs_per_worker=2, seeds=[4, 3, 2, 1, 0], policy_on="workers"
        )
    finally:
        for w in workers:
            ray.kill(w)
    # Four slots: slot j is environment j // 2 of worker j % 2; episode k on slot k % 4.
    assert [(e.worker, e.env) for e in first] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0)]
    assert calls[0] == 4 and max(calls) == 4
    for a, b, c in zip(first, second, on_workers):
        assert (a.index, a.seed, a.worker, a.env) == (b.index, b.seed, b.worker, b.env) == (c.index, c.seed, c.worker, c.env)
        strip = lambda e: [t[:5] for t in e.transitions]  # noqa: E731 (info has measured times)
        assert strip(a) == strip(b) == strip(c)
        assert a.final_observation == c.final_observation and a.complete and c.complete


def test_an_env_worker_steps_its_environments(ray_cluster):
    ray = ray_cluster
    worker = etpo.ray.EnvWorker.remote(str(GUESS), [1, 2])
    local = etpo.make(GUESS, seed=2)
    try:
        assert ray.get(worker.num_envs.remote()) == 2
        assert ray.get(worker.spec.remote())["name"] == "guess"
        assert ray.get(worker.node.remote()) == "127.0.0.1"
        assert ray.get(worker.reset.remote(1)) == local.reset()
        obs, reward, terminated, truncated, info = ray.get(worker.step.remote(1, "50"))
        l_obs, l_reward, l_terminated, l_truncated, _ = local.step("50")
        assert (obs, reward, terminated, truncated) == (l_obs, l_reward, l_terminated, l_truncated)
        assert info["action"] == "50" and info["step"] == 1
        ray.get(worker.close.remote())
    finally:
        ray.kill(worker)


def test_a_missing_spec_says_it_must_exist_on_the_node(ray_cluster):
    ray = ray_cluster
    worker = etpo.ray.EnvWorker.remote("/nonexistent/guess.yaml")
    with pytest.raises(ray.exceptions.RayActorError, match="must exist on every node"):
        ray.get(worker.num_envs.remote())


def test_serve_workers_hand_out_urls_for_etpo_remote(ray_cluster):
    ray = ray_cluster
    (actor, url), = etpo.ray.serve_per_node([str(GUESS)], binary=str(etpo_bin()), workers=1)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
        policy = binary_search_policy()
        env = etpo.remote.make(url, "guess", seed=3)
        obs, _ = env.reset()
        steps, done = [], False
        while not done:
            action = policy(obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            steps.append((obs, action, float(reward), terminated, truncated))
            obs, done = next_obs, terminated or truncated
        env.close()
        assert steps == local_episode(3, policy)
        assert ray.get(actor.alive.remote())
    finally:
        assert ray.get(actor.stop.remote()) is not None
        ray.kill(actor)


def test_serve_worker_off_loopback_needs_a_token(ray_cluster):
    ray = ray_cluster
    actor = etpo.ray.ServeWorker.remote([str(GUESS)], binary=str(etpo_bin()), listen="0.0.0.0:0")
    with pytest.raises(ray.exceptions.RayActorError, match="needs a token"):
        ray.get(actor.url.remote())

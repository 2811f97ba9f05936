"""Hostile actions from Python are contained as from the command line (tests/cli/sandbox.rs), and the
environment keeps working; environments stepped from two threads evaluate in parallel."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import gymnasium
import pytest

import etpo
from conftest import REPO, spec_variant

# Whole programs as actions (extraction `raw`, assembled as they are), with small limits so that
# the bombs end quickly.
SMALL_LIMITS = "limits:\n  wall_s: 3\n  cpu_s: 3\n  memory_mb: 512\n  output_kb: 16\n  max_processes: 32"
PROGRAMS = 'action:\n  extract: raw\n  assemble: "{{ action }}"'
GOOD = (
    "from sklearn.naive_bayes import GaussianNB\n"
    "def build_model(x_train, y_train):\n    return GaussianNB().fit(x_train, y_train)\n"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    spec = spec_variant(tmp_path_factory.mktemp("spec"), "hostile", {"limits": SMALL_LIMITS, "action": PROGRAMS})
    env = etpo.make(spec, seed=0)
    yield env
    env.close()


def failing(env, program: str) -> str:
    """Steps `program` in a fresh episode; it must fail with the failure reward and return, within
    the limits, its error; the next action must still run and score."""
    env.reset()
    start = time.monotonic()
    _, reward, terminated, truncated, info = env.step(program)
    assert time.monotonic() - start < 20, "the wall-clock limit is 3 s"
    assert (reward, terminated, truncated, info["ran"]) == (-1.0, False, False, False), info
    _, reward, terminated, _, after = env.step(GOOD)
    assert terminated and after["ran"] and 0.5 < reward <= 1.0, after
    return info["error"]


def test_a_good_program_runs(env):
    env.reset()
    _, reward, terminated, _, info = env.step(GOOD)
    assert terminated and info["ran"] and 0.5 < reward <= 1.0 and info["error"] == ""


def test_resource_bombs_are_contained(env):
    fork_bomb = (
        "import os\ndef build_model(x_train, y_train):\n    while True:\n        try:\n"
        "            os.fork()\n        except OSError:\n            pass\n"
    )
    error = failing(env, fork_bomb)
    assert "wall-clock limit of 3 s" in error or "memory limit" in error, error
    memory_bomb = "def build_model(x_train, y_train):\n    a = []\n    while True:\n        a.append(bytearray(100 << 20))\n"
    assert failing(env, memory_bomb).startswith("the program exceeded the memory limit of 512 MB")
    spin = "def build_model(x_train, y_train):\n    while True:\n        pass\n"
    assert "limit of 3 s" in failing(env, spin)


def test_files_outside_cannot_be_read_or_written(env):
    home = os.environ.get("HOME", "/root")
    targets = ["/etc/shadow", f"{home}/.bashrc", str(REPO / "Cargo.toml"), str(REPO / "envs" / "balance_scale.yaml")]
    read = (
        "def build_model(x_train, y_train):\n    res = []\n"
        f"    for p in {targets!r}:\n"
        "        try:\n            open(p).read()\n            res.append('read ' + p)\n"
        "        except OSError as e:\n            res.append(type(e).__name__)\n"
        "    raise RuntimeError(' '.join(res))\n"
    )
    error = failing(env, read)
    assert error.splitlines()[-1].startswith("RuntimeError: ") and "read " not in error, error

    marker = f"etpo-python-evil-{uuid.uuid4().hex}"
    paths = [f"/tmp/{marker}", str(REPO / marker), f"/{marker}"]
    write = (
        "def build_model(x_train, y_train):\n    res = []\n"
        f"    for p in {paths!r}:\n"
        "        try:\n            open(p, 'w').write('x')\n            res.append('wrote')\n"
        "        except OSError as e:\n            res.append(type(e).__name__)\n"
        "    raise RuntimeError(' '.join(res))\n"
    )
    error = failing(env, write)
    # The sandbox has a private /tmp: writing there may succeed, but never on the host. Elsewhere
    # the write fails (read-only file system, or permission denied on the private /tmp's mount
    # points when the checkout lives under /tmp).
    outcomes = error.splitlines()[-1].split()[1:]
    assert outcomes[0] == "wrote" and all(o in ("OSError", "PermissionError") for o in outcomes[1:]), error
    assert not any(Path(p).exists() for p in paths)


def test_network_and_the_host_processes_are_out_of_reach(env):
    tcp = (
        "import socket\ndef build_model(x_train, y_train):\n    res = []\n"
        "    for host in ('127.0.0.1', '1.1.1.1'):\n        try:\n"
        "            socket.create_connection((host, 80), timeout=1)\n            res.append('connected')\n"
        "        except OSError as e:\n            res.append(type(e).__name__)\n"
        "    raise RuntimeError(','.join(res))\n"
    )
    assert failing(env, tcp).endswith("RuntimeError: PermissionError,PermissionError")
    kill = (
        "import os, signal\ndef build_model(x_train, y_train):\n"
        "    for pid in (os.getppid(), 1, -1):\n        try:\n            os.kill(pid, signal.SIGKILL)\n"
        "        except OSError:\n            pass\n    raise RuntimeError('still here')\n"
    )
    # This Python process (the sandbox's host) survives too: we are still running.
    assert failing(env, kill).endswith("RuntimeError: still here")


SLEEPY = "__import__('time').sleep(1.5) or GaussianNB()"


def test_two_threads_step_in_parallel():
    envs = [etpo.make(REPO / "envs" / "balance_scale.yaml", seed=s) for s in (0, 1)]

    def episode(env):
        env.reset()
        _, reward, terminated, _, info = env.step(SLEEPY)
        assert terminated and info["ran"] and reward > 0.5, info

    for env in envs:  # warm: the pool is up and each worker has run an action
        episode(env)

    start = time.monotonic()
    for env in envs:
        episode(env)
    sequential = time.monotonic() - start

    errors = []

    def guarded(env):
        try:
            episode(env)
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(env,)) for env in envs]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parallel = time.monotonic() - start
    assert not errors, errors
    assert sequential > 2 * 1.5, f"each action sleeps 1.5 s: {sequential:.2f} s sequentially"
    # Side by side the two sleeps overlap: about half the time, with a wide margin for a busy machine.
    assert parallel < 0.75 * sequential, f"parallel {parallel:.2f} s, sequential {sequential:.2f} s"


def test_async_vector_env_in_forked_processes():
    # Forked after this process's pool started: each child must start a pool of its own.
    etpo.make(REPO / "envs" / "balance_scale.yaml").close()
    assert etpo.sandbox()["in_use"]
    spec = str(REPO / "envs" / "balance_scale.yaml")
    # Text observations travel through pipes, not shared memory (which holds only charset indices).
    envs = gymnasium.vector.AsyncVectorEnv(
        [lambda: etpo.make(spec, seed=0), lambda: etpo.make(spec, seed=1)], shared_memory=False, context="fork"
    )
    try:
        obs, info = envs.reset()
        assert len(obs) == 2 and all(o.rstrip().endswith("model =") for o in obs)
        _, rewards, terminated, truncated, info = envs.step(["NoSuch()", "GaussianNB()"])
        # Each child runs its own sandbox workers (its child processes), not the parent's.
        for process in envs.processes:
            assert children_of(process.pid), f"process {process.pid} started no sandbox worker"
        assert list(rewards[:1]) == [-1.0] and 0.5 < rewards[1] <= 1.0
        assert list(terminated) == [False, True] and not truncated.any()
    finally:
        envs.close()
    want = etpo.make(spec, seed=1)
    want.reset()
    assert want.step("GaussianNB()")[1] == rewards[1]


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children

"""Rollouts of a scripted policy on the guess game from N Ray actors (`etpo.ray.rollouts`).

One machine (starts a local Ray cluster, stops it at the end):

    PYTHONPATH=python .venv/bin/python python/examples/ray_rollouts.py --workers 2 --episodes 10

On a cluster (`ray start --head` / `ray start --address=...`, see the README), from any node:

    .venv/bin/python python/examples/ray_rollouts.py --address auto --workers 8 --episodes 100

The spec path is opened on the nodes that run the actors: by default this checkout's
envs/games/guess.yaml as an absolute path, so every node needs the checkout at the same path,
with the games built (`scripts/setup.sh games`) and the etpo package importable.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import ray

import etpo.ray

GUESS = Path(__file__).resolve().parents[2] / "envs" / "games" / "guess.yaml"


def binary_search(prompt: str) -> str:
    """The scripted policy: guess the middle of the last range the game stated. Any callable
    prompt -> action text fits here: a vLLM engine, an HTTP model server, a person."""
    low, high = map(int, re.findall(r"from (\d+) to (\d+)", prompt)[-1])
    return str((low + high) // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None, help="Ray cluster to join ('auto', or host:port); default: start a local one")
    parser.add_argument("--spec", default=str(GUESS), help="spec file (a path on every node; default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="EnvWorker actors (default: %(default)s)")
    parser.add_argument("--envs-per-worker", type=int, default=1, help="environments per actor (default: %(default)s)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes in all (default: %(default)s)")
    parser.add_argument("--seeds", default=None, help="task seeds, e.g. 0,1,2 (default: the spec's)")
    parser.add_argument(
        "--policy-on", choices=["driver", "workers"], default="driver",
        help="run the policy here, one round of steps at a time, or inside the actors (default: %(default)s)",
    )
    args = parser.parse_args()

    t0 = time.perf_counter()
    # Without --address, always a new local cluster (never one found through RAY_ADDRESS or the
    # last `ray start` on this machine); it stops with ray.shutdown().
    ray.init(address=args.address or "local")
    started = time.perf_counter() - t0
    nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    print(f"ray {ray.__version__}: {len(nodes)} node(s) {', '.join(nodes)}, {ray.cluster_resources().get('CPU', 0):g} CPUs "
          f"(init {started:.1f} s)")

    seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    episodes = etpo.ray.rollouts(
        args.spec, binary_search, n_workers=args.workers, envs_per_worker=args.envs_per_worker,
        episodes=args.episodes, seeds=seeds, policy_on=args.policy_on,
    )
    took = time.perf_counter() - t0

    for e in episodes:
        guesses = " ".join(t.action for t in e.transitions)
        print(f"episode {e.index:3d}  seed {e.seed}  worker {e.worker} env {e.env}  "
              f"steps {len(e.transitions):2d}  reward {e.total_reward:.3f}  guesses: {guesses}")
    mean = sum(e.total_reward for e in episodes) / max(1, len(episodes))
    print(f"{len(episodes)} episodes from {args.workers} actors in {took:.2f} s (actors' start included); "
          f"mean reward {mean:.3f}")
    ray.shutdown()


if __name__ == "__main__":
    main()

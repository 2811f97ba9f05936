"""`etpo.remote`: a Gymnasium environment over a live `etpo serve` on loopback."""

from __future__ import annotations

import re
import subprocess

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import etpo
from conftest import ENVS, etpo_bin


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen(
        [str(etpo_bin()), "serve", str(ENVS / "games" / "guess.yaml"), str(ENVS / "balance_scale.yaml"),
         "--listen", "127.0.0.1:0", "--workers", "1"],
        stderr=subprocess.PIPE, text=True,
    )
    url = None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        pytest.fail("etpo serve did not start:\n" + "".join(lines))
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_a_remote_game_episode_matches_the_local_one(server):
    remote = etpo.remote.make(server, "guess", seed=0)
    local = etpo.make(str(ENVS / "games" / "guess.yaml"), seed=0)
    assert remote.reset()[0] == local.reset()[0]
    for guess in ["50", "25", "37"]:
        r, l = remote.step(guess), local.step(guess)
        assert r[0] == l[0] and r[1:4] == l[1:4], (r, l)
        if r[2] or r[3]:
            break
    remote.close()
    local.close()


def test_check_env_passes_against_the_server(server):
    env = etpo.remote.make(server, "guess")
    check_env(env, skip_render_check=True)
    env.close()


def test_a_data_task_steps_in_the_servers_sandbox(server):
    env = etpo.remote.make(server, "balance_scale", seed=0)
    env.reset()
    obs, reward, terminated, truncated, info = env.step(" NotAClassifier()")
    assert reward == -1.0 and not terminated and "NameError" in info["error"]
    obs, reward, terminated, truncated, info = env.step(" LogisticRegression(max_iter=500)")
    assert terminated and 0.5 < reward <= 1.0 and info["ran"]
    with pytest.raises(gymnasium.error.ResetNeeded):
        env.step("x")
    env.close()


def test_the_held_out_score_is_the_local_one(server):
    remote = etpo.remote.make(server, "balance_scale", seed=1)
    local = etpo.make(str(ENVS / "balance_scale.yaml"), seed=1)
    scores = {}
    for action in [" LogisticRegression(max_iter=500)", " NotAClassifier()"]:
        r, l = remote.score_test(action), local.score_test(action)
        assert (r["test_score"], r["error"], r["ran"]) == (l["test_score"], l["error"], l["ran"]), (r, l)
        scores[action] = r
    good, bad = scores[" LogisticRegression(max_iter=500)"], scores[" NotAClassifier()"]
    assert good["ran"] and 0.5 < good["test_score"] <= 1.0, good
    assert not bad["ran"] and bad["test_score"] is None and "NameError" in bad["error"], bad
    with pytest.raises(etpo.remote.RemoteError, match="holds out no test part"):
        etpo.remote.make(server, "guess").score_test("50")
    with pytest.raises(ValueError, match="holds out no test part"):
        etpo.make(str(ENVS / "games" / "guess.yaml")).score_test("50")
    remote.close()
    local.close()


def test_errors_name_the_server_and_what_it_serves(server):
    with pytest.raises(etpo.remote.RemoteError, match="does not serve 'nope'; it serves: balance_scale, guess"):
        etpo.remote.make(server, "nope")
    with pytest.raises(etpo.remote.RemoteError, match="127.0.0.1:9"):
        etpo.remote.make("http://127.0.0.1:9", "guess", timeout=5)

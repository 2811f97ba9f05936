"""The Gymnasium API: check_env on every shipped spec, registration, seeds, the episode's edges."""

from __future__ import annotations

import subprocess
import warnings

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import etpo
from conftest import BALANCE_SCALE, ENVS, cli_exec, spec_variant

SHIPPED = sorted(ENVS.glob("*.yaml"))
# The text games (kind: wasm) go through the same bindings unchanged.
GAMES = sorted((ENVS / "games").glob("*.yaml"))


def test_the_shipped_specs_are_found():
    assert [p.name for p in SHIPPED] == ["balance_scale.yaml", "breast_w.yaml", "diabetes.yaml", "tic_tac_toe.yaml"]


@pytest.mark.parametrize("spec", SHIPPED + GAMES, ids=lambda p: p.relative_to(ENVS).with_suffix("").as_posix())
def test_check_env_passes_on_every_shipped_spec(spec):
    env = etpo.make(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    # The checker reports what it dislikes as warnings: there must be none.
    assert [str(w.message) for w in caught] == []
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and obs.strip()
    assert info["step"] == 0 and info["split_seed"] == 0
    if spec in SHIPPED:
        assert obs.rstrip().endswith("model =") and info == {"step": 0, "split_seed": 0}
    env.close()


def test_registered_specs_are_made_by_gymnasium():
    ids = etpo.register(ENVS)
    assert ids == [f"etpo/{p.stem}-v0" for p in SHIPPED]
    assert etpo.register(ENVS) == ids, "registering the same specs again is a no-op"
    env = gymnasium.make("etpo/balance_scale-v0", seed=1)
    assert isinstance(env.unwrapped, etpo.EtpoEnv)
    assert env.unwrapped.split_seed == 1
    assert env.spec.id == "etpo/balance_scale-v0"
    check_env(env.unwrapped)
    env.reset()
    _, reward, terminated, truncated, info = env.step("GaussianNB()")
    assert terminated and not truncated and info["ran"] and 0.5 < reward <= 1.0
    env.close()


def test_a_taken_id_is_refused_and_a_broken_folder_raises(tmp_path):
    other = spec_variant(tmp_path, "other", {"description": "description: the same name, another spec"})
    with pytest.raises(ValueError, match="already registered"):
        etpo.register(BALANCE_SCALE, other)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.yaml").write_text("name: x\n")
    with pytest.raises(etpo.SpecError):
        etpo.register(broken)


def test_reset_seed_picks_the_split_as_the_cli_seed_does(tmp_path):
    action = "KNeighborsClassifier(n_neighbors=3)"
    want = {seed: cli_exec(BALANCE_SCALE, action, seed, tmp_path)["reward"] for seed in (0, 1, 2)}
    assert len(set(want.values())) > 1, "the splits differ, or this test proves nothing"
    env = etpo.make(BALANCE_SCALE)  # the spec's first seed, 0
    got = {}
    for seed in (None, 1, None, 2):
        obs, info = env.reset(seed=seed)
        _, reward, *_ = env.step(action)
        got.setdefault(info["split_seed"], []).append(reward)
    assert got == {0: [want[0]], 1: [want[1], want[1]], 2: [want[2]]}
    assert etpo.make(BALANCE_SCALE, seed=2).split_seed == 2


def test_episode_edges_raise_gymnasium_errors():
    env = etpo.make(BALANCE_SCALE)
    with pytest.raises(gymnasium.error.ResetNeeded):
        env.step("GaussianNB()")
    env.reset()
    with pytest.raises(TypeError, match="must be str"):
        env.step(b"GaussianNB()")
    _, _, terminated, _, _ = env.step("GaussianNB()")
    assert terminated
    with pytest.raises(gymnasium.error.ResetNeeded):
        env.step("GaussianNB()")
    for bad in (-1, 1 << 64, 1.5):
        with pytest.raises((ValueError, TypeError)):
            env.reset(seed=bad)
    env.close()
    env.close()
    with pytest.raises(gymnasium.error.ClosedEnvironmentError):
        env.reset()


def test_truncation_at_max_steps(tmp_path):
    spec = spec_variant(tmp_path, "two_steps", {"max_steps": "max_steps: 2"})
    env = etpo.make(spec)
    obs, _ = env.reset()
    obs1, r1, term1, trunc1, info1 = env.step("NoSuchClassifier()")
    assert (r1, term1, trunc1, info1["ran"], info1["step"]) == (-1.0, False, False, False, 1)
    assert "NameError" in info1["error"] and "NoSuchClassifier" in obs1
    _, r2, term2, trunc2, info2 = env.step("1 +")
    assert (r2, term2, trunc2) == (-1.0, False, True)
    assert "SyntaxError" in info2["error"]


def test_chat_specs_give_text_and_messages(tmp_path):
    chat = (
        "prompt:\n  format: chat\n  system: You write scikit-learn code.\n"
        '  user: "{{ description }}; x_train has shape {{ shape }}. Answer with one estimator."\n'
        '  reflection: "It failed: {{ error }}. Fix it."\n'
    )
    spec = spec_variant(tmp_path, "chat", {"prompt": chat})
    env = etpo.make(spec)
    obs, info = env.reset()
    roles = [m["role"] for m in info["messages"]]
    assert roles == ["system", "user"]
    assert obs.startswith("<|im_start|>system\nYou write scikit-learn code.<|im_end|>\n<|im_start|>user\n")
    assert obs.endswith("<|im_end|>\n<|im_start|>assistant\n")
    obs, reward, _, _, info = env.step("Nope()")
    assert reward == -1.0 and [m["role"] for m in info["messages"]] == ["system", "user", "assistant", "user"]
    assert "Nope()" in info["messages"][2]["content"] and "It failed" in info["messages"][3]["content"]
    check_env(env)

    plain = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{{ eos_token }}"
    env = etpo.make(spec, chat_template=plain, eos_token="</s>")
    obs, _ = env.reset()
    assert obs.startswith("[system] You write scikit-learn code.\n[user] ") and obs.endswith("</s>")
    with pytest.raises(ValueError, match="chat template"):
        etpo.make(spec, chat_template="{% for %}")


def test_configure_is_fixed_once_the_pool_runs():
    etpo.make(BALANCE_SCALE).close()
    state = etpo.sandbox()
    assert state["in_use"] and state["workers"] == 2
    etpo.configure(workers=2)  # the settings in force are accepted
    with pytest.raises(RuntimeError, match="already runs"):
        etpo.configure(workers=3)
    with pytest.raises(RuntimeError, match="already runs"):
        etpo.configure(python="/usr/bin/python3-other")


def test_a_pool_that_cannot_start_is_an_error_that_can_be_corrected(tmp_path, venv_python):
    # In a fresh process: this one's pool is already running.
    script = f"""
import etpo
etpo.configure(python="/nonexistent/python3")
try:
    etpo.make({str(BALANCE_SCALE)!r})
except etpo.EnvError as e:
    print("EnvError:", e)
assert not etpo.sandbox()["in_use"]
etpo.configure(python={str(venv_python)!r}, workers=1)
env = etpo.make({str(BALANCE_SCALE)!r})
env.reset()
print("reward", env.step("GaussianNB()")[1])
assert etpo.sandbox() == {{"python": {str(venv_python)!r}, "workers": 1, "in_use": True}}
"""
    out = subprocess.run([str(venv_python), "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("EnvError: ") and "/nonexistent/python3" in first, first
    assert second.startswith("reward 0.")

"""The same actions give the same episode through Python as through the `etpo` command line."""

from __future__ import annotations

import hashlib
import json

import pytest

import etpo
from conftest import BALANCE_SCALE, run_cli


def test_scripted_episode_matches_etpo_run(tmp_path):
    # A failure, then a success (the episode ends), then a new episode: raw generations, cut by
    # the spec's extraction (first line) as during training.
    actions = [
        "UndefinedClassifier()\n",
        "LogisticRegression(max_iter=1000)\nprint('ignored')",
        "GaussianNB()",
    ]
    folder = tmp_path / "actions"
    folder.mkdir()
    for i, action in enumerate(actions):
        (folder / f"{i:02}.txt").write_text(action)
    run_cli(
        "run", BALANCE_SCALE, "--policy", "scripted", "--actions", folder, "--steps", len(actions),
        "--seeds", "1", "--workers", "1", "--out", "run", "--no-progress",
        cwd=tmp_path,
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(records) == len(actions)

    env = etpo.make(BALANCE_SCALE, seed=1)
    obs, _ = env.reset()
    got = []
    for action in actions:
        prompt_sha256 = hashlib.sha256(obs.encode()).hexdigest()
        obs, reward, terminated, truncated, info = env.step(action)
        got.append((prompt_sha256, info["action"], reward, terminated, truncated, info["ran"], info["error"]))
        if terminated or truncated:
            obs, _ = env.reset()
    want = [
        (r["prompt_sha256"], r["action"], r["reward"], r["terminated"], r["truncated"], r["ran"], r["error"] or "")
        for r in records
    ]
    assert got == want
    # What the episode looked like, so that the comparison is not between two empty runs.
    assert [g[2] == -1.0 for g in got] == [True, False, False]
    assert "NameError" in got[0][6] and 0.5 < got[1][2] <= 1.0
    assert got[2][0] == got[0][0], "the new episode starts from the first state again"


def test_check_raises_the_clis_located_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    text = BALANCE_SCALE.read_text().replace("max_steps: 5", "max_step: 5").replace("failure_reward: -1.0", "failure_reward: lots")
    broken.write_text(text)
    cli = run_cli("check", broken, check=False)
    assert cli.returncode == 1
    # The CLI prints the report, then a count of the errors.
    report = cli.stderr.rstrip("\n").rsplit("\n", 1)[0]
    with pytest.raises(etpo.SpecError) as caught:
        etpo.check(broken)
    e = caught.value
    assert isinstance(e, ValueError)
    assert str(e) == report
    assert report.startswith(f"{broken}:") and ": error: " in report
    lines = {n for n, line in enumerate(text.splitlines(), 1) if line.startswith(("max_step:", "  failure_reward:"))}
    assert {d[0] for d in e.diagnostics} == lines
    assert all(isinstance(col, int) and message for _, col, message, _ in e.diagnostics)
    assert e.file == str(broken)
    # The same error from make() and register().
    with pytest.raises(etpo.SpecError) as again:
        etpo.make(broken)
    assert str(again.value) == report


def test_check_describes_a_good_spec():
    info = etpo.check(BALANCE_SCALE)
    assert info["name"] == "balance_scale" and info["kind"] == "sklearn" and info["format"] == "completion"
    assert (info["max_steps"], info["failure_reward"], info["seeds"], info["extract"]) == (5, -1.0, [0, 1, 2, 3, 4], "first_line")
    assert run_cli("check", BALANCE_SCALE).stdout.strip() == f"ok: {BALANCE_SCALE}"


def test_a_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(etpo.SpecError, match="missing.yaml"):
        etpo.check(tmp_path / "missing.yaml")

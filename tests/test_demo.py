"""`streamrec demo`: the closed loop on embedded defaults, as a user runs it, with a small budget."""

from __future__ import annotations

import math

from typer.testing import CliRunner

from streamrec.cli import app
from streamrec.closed_loop import WALL_CLOCK_KEYS, ClosedLoop, LoopConfig

runner = CliRunner()


def test_demo_closes_the_loop_hot_swaps_and_writes_the_report(tmp_path):
    # the mid-run RLlib policy and its promotion gate are covered by tests/test_policy_*.py; here the loop
    result = runner.invoke(app, ["demo", "--events", "1500", "--seed", "3", "--no-policy"],
                           env={"STREAMREC_DATA_DIR": str(tmp_path), "STREAMREC_REPLAY__PROGRESS": "false",
                                "STREAMREC_LOG_LEVEL": "WARNING"})
    assert result.exit_code == 0, result.output
    report = tmp_path / "demo" / "report.html"
    assert report.exists()
    html = report.read_text()
    assert html.count("<svg") >= 4  # AUC per task, served CTR, freshness
    for title in ("Click AUC", "Purchase AUC", "Served click-through rate", "Model freshness"):
        assert title in html
    swapped = int(next(line for line in result.output.splitlines() if "model versions hot-swapped" in line).split("│")[2].replace(",", ""))
    assert swapped >= 2
    assert "freshness p50" in result.output and "nan" not in result.output.split("freshness p50")[1].split("\n")[0]


def test_the_same_seed_gives_the_same_numbers(tmp_path):
    config = LoopConfig(events=800, seed=5, train_policy=False, publish_every=300)
    first = ClosedLoop(config, tmp_path / "a").run().summary
    second = ClosedLoop(config, tmp_path / "b").run().summary
    for key in WALL_CLOCK_KEYS:
        first.pop(key), second.pop(key)
    assert first["model versions hot-swapped"] >= 2 and first["examples learned"] >= 800
    assert first.keys() == second.keys()
    for key in first:
        a, b = first[key], second[key]
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), key


def test_a_bad_model_choice_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["demo", "--model", "gpt-17"], env={"STREAMREC_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2 and "--model must be one of" in result.output


def test_the_mid_run_policy_beats_random_and_serves_only_through_the_gate(tmp_path):
    # a few thousand impressions: below that, the learner has not yet overtaken popularity
    config = LoopConfig(events=6000, seed=0, policy_iterations=2, policy_gate_sessions=400, policy_eval_sessions=100)
    result = ClosedLoop(config, tmp_path).run()
    summary = result.summary
    assert summary["model click AUC (last window)"] > summary["popularity click AUC (last window)"]
    # the RLlib policy, trained mid-run on the learner's scores, earns more per session than random
    assert result.rewards["learned"] > result.rewards["random"]
    # and reaches serving only if its DR lower bound clears the uniformly exploring policy it replaces
    gate = summary["policy gate"]
    promoted = [version for kind, version in result.swaps if kind == "policy"]
    if summary["policy promoted"]:
        assert gate.startswith("published") and len(promoted) == 1 and promoted[0] in gate
    else:
        assert gate.startswith("refused: the 95% DR lower bound") and not promoted

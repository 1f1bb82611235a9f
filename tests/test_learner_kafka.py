"""`streamrec learn` on a real broker: SIGKILLed mid-stream and restarted, every example is learned exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from learner.checkpoint import CheckpointStore
from learner.config import LearnerSettings, tiny_model_config
from learner.model import load_model
from learner.registry import ModelRegistry, load_artifact_dir
from learner.trainer import IncrementalTrainer
from policies.synthetic_world import SyntheticWorld, WorldConfig
from streaming.events import ModelUpdate
from streaming.joiner import JoinerConfig
from streaming.kafka_io import EventConsumer, EventProducer, ensure_topics
from streaming.stream_processor import StreamProcessor

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.kafka


def learner_settings(tmp_path: Path) -> dict:
    return {
        "model": tiny_model_config().model_dump(mode="json"),
        "device": "cpu", "batch_size": 32, "history_lag_ms": 5 * 60_000,
        "checkpoint_dir": str(tmp_path / "checkpoints"), "checkpoint_every_examples": 150,
        "checkpoint_every_s": 0.5, "ledger": True, "registry": str(tmp_path / "registry"),
        "publish_every_s": 0.5, "publish_min_examples": 300, "quality_gate_margin": 1.0,
    }


def start_learner(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "streamrec", "--config", str(config), "learn"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def latest_meta(checkpoints: Path) -> tuple[int, dict]:
    """(sequence, meta) of the newest complete checkpoint on disk, (0, {}) before the first."""
    seqs = sorted(p.name for p in checkpoints.glob("ckpt-*")) if checkpoints.exists() else []
    for name in reversed(seqs):
        try:
            body = json.loads((checkpoints / name / "state.json").read_bytes())
            return body["seq"], body["meta"]
        except (OSError, ValueError):  # pruned while we looked
            continue
    return 0, {}


def wait_for(condition, process: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the learner exited ({process.returncode}) before {what}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            said = "\n".join(line for line in process.communicate()[0].splitlines() if "not publishing" not in line)
            pytest.fail(f"timed out waiting for {what}; the learner said:\n{said[-5000:]}")
        time.sleep(0.02)


def test_learner_survives_sigkill_learns_each_example_once_and_publishes(kafka, tmp_path):
    # the synthetic events are timestamped in January 2026: keep them, whatever the retention clock says
    kafka = kafka.model_copy(update={"topic_prefix": kafka.topic_prefix + "keep.", "retention_ms": -1})
    ensure_topics(kafka)
    world = SyntheticWorld(WorldConfig(seed=2, n_users=40, n_items=60))
    joiner = JoinerConfig(click_window_ms=60_000, purchase_window_ms=5 * 60_000, allowed_lateness_ms=60_000)
    examples = [e for out in StreamProcessor(joiner).run(world.generate_log(400)) for e in out.examples]
    items = world.item_events()
    config = tmp_path / "streamrec.yaml"
    group = kafka.group_id + "-learner"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path),
        "log_level": "INFO",
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic_prefix": kafka.topic_prefix, "partitions": 3,
                  "max_poll_records": 40, "bootstrap_timeout_ms": 15_000, "retention_ms": -1},
        "learner": {**learner_settings(tmp_path), "group_id": group, "instance_id": group + "-0"},
    }))
    checkpoints = tmp_path / "checkpoints"

    # the catalog first, as a shop has one before its traffic: every version published then carries it
    # (a backlog is read partition by partition, so items sent with the examples may come after them all)
    with EventProducer(kafka) as producer:
        for item in items:
            producer.send(item)
    first = start_learner(config)
    items_topic = kafka.topic("items") + ":"
    wait_for(lambda: sum(offset for source, offset in latest_meta(checkpoints)[1].get("offsets", {}).items()
                         if source.startswith(items_topic)) == len(items), first, 120, "the catalog checkpointed")
    catalog_seq = latest_meta(checkpoints)[0]
    with EventProducer(kafka) as producer:
        for example in examples:
            producer.send(example)
    wait_for(lambda: latest_meta(checkpoints)[0] >= catalog_seq + 2, first, 120, "two checkpoints of examples")
    first.send_signal(signal.SIGKILL)  # anywhere: mid-batch, mid-checkpoint, before or after a commit
    first.wait(30)
    seq_at_kill, meta = latest_meta(checkpoints)
    assert 0 < meta["examples_learned"] < len(examples), "the kill should land mid-stream"

    second = start_learner(config)
    wait_for(lambda: latest_meta(checkpoints)[1].get("examples_learned") == len(examples), second, 120,
             "every example learned")
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out
    assert f"resumed from checkpoint {seq_at_kill}" in out

    ledger = CheckpointStore(checkpoints, ledger=True).ledger_ids()
    assert len(ledger) == len(examples), "an example was lost or learned twice"
    assert set(ledger) == {e.event_id for e in examples}

    # the metric state survived the crash too: every example was scored exactly once
    resumed = IncrementalTrainer(LearnerSettings(**learner_settings(tmp_path)), checkpoint_dir=checkpoints)
    assert resumed.restore()
    final = resumed.report()
    assert final["examples"] == final["models"]["model"]["ctr_count"] == len(examples)
    assert final["models"]["popularity"]["ctr_count"] == len(examples)

    # versions were published and announced; the announced artifact loads
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.versions("model")
    announced: list[ModelUpdate] = []
    with EventConsumer(kafka, ["model-updates"], group_id=kafka.group_id + "-reader") as consumer:
        deadline = time.monotonic() + 30
        while not announced and time.monotonic() < deadline:
            announced += [r.event for r in consumer.poll(timeout_ms=500) if isinstance(r.event, ModelUpdate)]
    assert announced and announced[0].kind == "model" and announced[0].version in registry.versions("model")
    artifact = load_artifact_dir(announced[0].artifact_uri.removeprefix("file://"), expected_kind="model",
                                 expected_digest=announced[0].manifest_digest)
    model = load_model(artifact)
    assert model.version == announced[0].version
    # the catalog travels with the artifact
    assert all(model.known_item(item.item_id) for item in items)
    torch.testing.assert_close(model.cache.embeddings[1], model.encoder.encode_texts([model.cache.texts[1]])[0])

"""The `streamrec` command line, in-process and as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from streaming.event_log import read_events
from streaming.replay import read_kafka_range
from streamrec.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def kafka_env(kafka) -> dict[str, str]:
    return {
        "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "STREAMREC_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "STREAMREC_KAFKA__PARTITIONS": "2",
        "STREAMREC_REPLAY__PROGRESS": "false",
    }


def test_schema_command_publishes_every_contract(tmp_path):
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schemas = json.loads(result.stdout)
    assert schemas["click"]["properties"]["event_time"]["description"].startswith("UTC event time")
    result = runner.invoke(app, ["schema", "--out", str(tmp_path)])
    assert result.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "click.schema.json"
    assert len(list(tmp_path.iterdir())) == 7


def test_generate_then_replay_a_synthetic_log_in_process(tmp_path):
    log = tmp_path / "world.jsonl"
    result = runner.invoke(app, ["world", "generate", "--out", str(log), "--requests", "200", "--seed", "4"])
    assert result.exit_code == 0, result.output
    events = list(read_events(log))
    assert sum(e.type == "impression" for e in events) == 200 * 5
    result = runner.invoke(app, ["replay", str(log), "--out", str(tmp_path / "copy.parquet")])
    assert result.exit_code == 0, result.output
    assert f"replayed {len(events):,} events (in-process)" in result.output
    assert list(read_events(tmp_path / "copy.parquet")) == sorted(events, key=lambda e: e.event_time)


def test_replay_with_bad_rows_reports_them_or_stops_when_strict(tmp_path):
    log = tmp_path / "behaviour.csv"
    log.write_text("1,100,7,pv,1511658000\n1,100,7,zap,1511658001\n2,101,8,buy,1511658002\n")
    result = runner.invoke(app, ["replay", str(log)])
    assert result.exit_code == 0, result.output
    assert "rejected rows" in result.output and "behaviour.csv:2" in result.output
    result = runner.invoke(app, ["replay", str(log), "--strict"])
    assert result.exit_code == 1
    assert "behaviour.csv:2: behavior 'zap' is not one of pv, cart, fav, buy" in result.output


def test_topics_and_replay_through_kafka_then_back_by_time_range(kafka, tmp_path):
    env = kafka_env(kafka)
    env["STREAMREC_KAFKA__TOPIC_PREFIX"] = kafka.topic_prefix + "cli."
    cli_kafka = kafka.model_copy(update={"topic_prefix": env["STREAMREC_KAFKA__TOPIC_PREFIX"]})
    result = runner.invoke(app, ["topics", "create"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("created") == 7
    assert runner.invoke(app, ["topics", "create"], env=env).stdout.count("exists") == 7
    listing = runner.invoke(app, ["topics", "list"], env=env).stdout
    assert f"{cli_kafka.topic('clicks')}\t2" in listing

    log = tmp_path / "world.parquet"
    runner.invoke(app, ["world", "generate", "--out", str(log), "--requests", "100"])
    events = list(read_events(log))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(log.with_suffix(".jsonl").name + "\n")  # one line that is not an event
    result = runner.invoke(app, ["replay", str(log), "--to-kafka"], env=env)
    assert result.exit_code == 0, result.output
    back = read_kafka_range(cli_kafka, ["items", "impressions", "clicks", "purchases"], 0, 2**62)
    assert sorted(e.event_id for e in back) == sorted(e.event_id for e in events)

    result = runner.invoke(app, ["replay", str(bad), "--to-kafka"], env=env)
    assert result.exit_code == 0, result.output
    letters = read_kafka_range(cli_kafka, ["dlq"], 0, 2**62)
    assert len(letters) == 1 and letters[0].topic == f"file:{bad}" and letters[0].offset == 1

    first = min(e.event_time for e in events)
    out = tmp_path / "period.jsonl"
    result = runner.invoke(app, ["replay", "--from-kafka", "--start", str(first), "--end", str(first + 60_000),
                                 "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    expected = sorted(e.event_id for e in events if first <= e.event_time < first + 60_000)
    assert sorted(e.event_id for e in read_events(out)) == expected


def test_errors_a_user_can_act_on(tmp_path):
    env = {"STREAMREC_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9", "STREAMREC_KAFKA__BOOTSTRAP_TIMEOUT_MS": "1000"}
    result = runner.invoke(app, ["topics", "create"], env=env)
    assert result.exit_code == 1
    assert "no Kafka broker answered at 127.0.0.1:9" in result.output
    result = runner.invoke(app, ["replay", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = runner.invoke(app, ["--config", str(tmp_path / "missing.toml"), "schema"])
    assert result.exit_code == 2 and "settings file" in result.output


def test_demo_closes_the_loop_through_a_real_broker_with_every_part_a_process(kafka, tmp_path):
    env = {**kafka_env(kafka), "STREAMREC_DATA_DIR": str(tmp_path), "STREAMREC_REPLAY__PROGRESS": "false"}
    result = runner.invoke(app, ["demo", "--events", "400", "--rate", "10", "--kafka", kafka.bootstrap_servers], env=env)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in result.output.splitlines() if line.count("│") == 3}
    assert rows["requests served"] == "80" and rows["requests failed"] == "0"
    # the demo ends once serving answers with a version that learned the users' answers: the loop closed
    assert rows["model version serving at the end"] not in ("v000001", "None")
    assert rows["error lines in process logs"] == "0" and rows["processes that exited cleanly"] == "3"


def test_the_cli_runs_as_a_process():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "streamrec", "--help"], capture_output=True, text=True, env=env)
    assert result.returncode == 0
    for command in ("demo", "replay", "schema", "topics", "world", "dev"):
        assert command in result.stdout


def test_dev_kafka_runs_a_broker_with_the_topics_until_stopped(tmp_path):
    import signal

    from kafka import KafkaConsumer

    from streaming.config import KafkaSettings
    from streaming.local_broker import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    broker = subprocess.Popen([sys.executable, "-m", "streamrec", "dev", "kafka", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in broker.stdout:  # blocks until the command reports the broker up, or exits
            lines.append(line)
            if "Kafka is up" in line:
                break
        assert f"bootstrap 127.0.0.1:{port}" in "".join(lines), "".join(lines)
        consumer = KafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}")
        try:
            assert set(KafkaSettings().all_topics()) <= consumer.topics()
        finally:
            consumer.close()
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(timeout=60)
    assert broker.returncode == 0

"""The ``streamrec`` command line: one entry point for every part of the loop."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from streaming.event_log import LogFormatError, Rejected, read_events, write_jsonl, write_parquet
from streaming.events import DeadLetter, json_schemas, to_epoch_ms
from streaming.kafka_io import EventProducer, KafkaUnavailable, TopicMissing, ensure_topics
from streaming.replay import ReplayStats, read_kafka_range, replay_in_process, replay_to_kafka
from streamrec.settings import Settings, SettingsError, load_settings

app = typer.Typer(help="StreamRec: a streaming, online-learning recommender.", no_args_is_help=True)
topics_app = typer.Typer(help="Create and list StreamRec's Kafka topics.", no_args_is_help=True)
world_app = typer.Typer(help="The synthetic world: a catalog, users and their known click/purchase model.", no_args_is_help=True)
dev_app = typer.Typer(help="Local development services.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(world_app, name="world")
app.add_typer(dev_app, name="dev")
console = Console(stderr=True)


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj["settings"]


@app.callback()
def main(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML or TOML settings file (or STREAMREC_CONFIG)."),
) -> None:
    try:
        settings = load_settings(config)
    except SettingsError as exc:
        _fail(str(exc), code=2)
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # its reconnect chatter is not the user's concern
    ctx.obj = {"settings": settings}


def _fail(message: str, code: int = 1) -> None:
    console.print("[red]error:[/red] ", end="")
    console.print(message, soft_wrap=True, markup=False, highlight=False)
    raise typer.Exit(code)


@app.command()
def schema(out: Optional[Path] = typer.Option(None, help="Write one <type>.schema.json per event type here.")) -> None:
    """Print the JSON Schema of every event type (the contracts on StreamRec's topics)."""
    schemas = json_schemas()
    if out is None:
        typer.echo(json.dumps(schemas, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, body in schemas.items():
        (out / f"{name}.schema.json").write_text(json.dumps(body, indent=2) + "\n")
    console.print(f"wrote {len(schemas)} schemas to {out}")


@topics_app.command("create")
def topics_create(ctx: typer.Context) -> None:
    """Create any of StreamRec's topics that do not exist (partitions and replication from settings)."""
    kafka = _settings(ctx).kafka
    try:
        created = ensure_topics(kafka)
    except (KafkaUnavailable, TopicMissing) as exc:
        _fail(str(exc))
    for name in kafka.all_topics():
        typer.echo(f"{name}\t{'created' if name in created else 'exists'}")


@topics_app.command("list")
def topics_list(ctx: typer.Context) -> None:
    """Show StreamRec's topics on the cluster with their partition counts."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaTimeoutError

    kafka = _settings(ctx).kafka
    try:
        consumer = KafkaConsumer(**kafka.client_options())
    except KafkaTimeoutError as exc:
        _fail(f"no Kafka broker answered at {kafka.bootstrap_servers}: {exc}")
    try:
        for name in kafka.all_topics():
            partitions = consumer.partitions_for_topic(name)
            typer.echo(f"{name}\t{len(partitions) if partitions else 'missing'}")
    finally:
        consumer.close()


@app.command()
def replay(
    ctx: typer.Context,
    source: Optional[Path] = typer.Argument(None, help="Event log: .jsonl[.gz], .parquet, Open Bandit all.csv[.gz], or user-behavior .csv."),
    fmt: Optional[str] = typer.Option(None, "--format", help="jsonl | parquet | obd | user-behavior (default: from the file)."),
    to_kafka: bool = typer.Option(False, "--to-kafka", help="Publish to the Kafka topics instead of replaying in-process."),
    speed: Optional[float] = typer.Option(None, help="Event-time seconds per wall second; 0 = as fast as possible."),
    topic_prefix: Optional[str] = typer.Option(None, help="Publish under this prefix instead of the configured one."),
    strict: bool = typer.Option(False, help="Stop at the first invalid row instead of dead-lettering it."),
    from_kafka: bool = typer.Option(False, "--from-kafka", help="Replay a time range of the Kafka topics."),
    start: Optional[str] = typer.Option(None, help="With --from-kafka: range start, ISO-8601 or epoch ms."),
    end: Optional[str] = typer.Option(None, help="With --from-kafka: range end (exclusive)."),
    topics: str = typer.Option("items,impressions,clicks,purchases", help="With --from-kafka: topics to read."),
    out: Optional[Path] = typer.Option(None, help="Also write the replayed events to this .jsonl or .parquet log."),
) -> None:
    """Replay logged events in event-time order, into Kafka or in-process, at a chosen speed."""
    settings = _settings(ctx)
    speed = settings.replay.speed if speed is None else speed
    rejected: list[Rejected] = []

    def reject(row: Rejected) -> None:
        if strict:
            raise LogFormatError(f"{row.source}:{row.line}: {row.reason}")
        rejected.append(row)

    try:
        if from_kafka:
            if start is None or end is None:
                _fail("--from-kafka needs --start and --end")
            events = read_kafka_range(settings.kafka, topics.split(","), to_epoch_ms(start), to_epoch_ms(end))
        elif source is None:
            _fail("give an event log to replay, or --from-kafka with --start and --end")
        else:
            events = list(read_events(source, fmt, on_reject=reject))  # type: ignore[arg-type]
        if out is not None:
            (write_parquet if out.suffix == ".parquet" else write_jsonl)(out, events)
        if to_kafka:
            with EventProducer(settings.kafka) as producer:
                stats = replay_to_kafka(events, producer, speed, progress=settings.replay.progress, topic_prefix=topic_prefix)
                for row in rejected:
                    producer.send(DeadLetter(event_time=int(time.time() * 1000), topic=f"file:{row.source}", partition=-1,
                                             offset=row.line, original_value=row.raw, error=row.reason),
                                  topic=(topic_prefix or settings.kafka.topic_prefix) + "dlq")
        else:
            stats = ReplayStats()
            for _ in replay_in_process(events, speed, stats):
                pass
    except (LogFormatError, KafkaUnavailable, TopicMissing, ValueError) as exc:
        _fail(str(exc))
    _print_replay_summary(stats, rejected, "Kafka" if to_kafka else "in-process")


def _print_replay_summary(stats: ReplayStats, rejected: list[Rejected], sink: str) -> None:
    console.print(f"replayed {stats.events:,} events ({sink})", soft_wrap=True)
    table = Table()
    table.add_column("event type")
    table.add_column("count", justify="right")
    for name, count in sorted(stats.by_type.items()):
        table.add_row(name, f"{count:,}")
    if rejected:
        table.add_row("[red]rejected rows[/red]", f"{len(rejected):,}")
    console.print(table)
    console.print(
        f"event time {stats.event_span_seconds:,.1f}s replayed in {stats.wall_seconds:,.2f}s wall "
        f"({stats.events / max(stats.wall_seconds, 1e-9):,.0f} events/s)", soft_wrap=True,
    )
    for row in rejected[:5]:
        console.print(f"[yellow]rejected[/yellow] {row.source}:{row.line}: {row.reason}", soft_wrap=True, markup=False)


@world_app.command("generate")
def world_generate(
    out: Path = typer.Option(..., help="Write the log here (.jsonl or .parquet)."),
    requests: int = typer.Option(10_000, min=1, help="Recommendation requests (each a logged slate)."),
    seed: int = typer.Option(0),
    policy: str = typer.Option("random", help="Logging policy: random | popular."),
    users: int = typer.Option(500, min=1),
    items: int = typer.Option(300, min=1),
) -> None:
    """Generate a synthetic event log: catalog items, then impressions, clicks and purchases."""
    from policies.synthetic_world import SyntheticWorld, WorldConfig

    world = SyntheticWorld(WorldConfig(seed=seed, n_users=users, n_items=items))
    events = world.item_events() + world.generate_log(requests, policy=policy)  # type: ignore[arg-type]
    n = (write_parquet if out.suffix == ".parquet" else write_jsonl)(out, events)
    console.print(f"wrote {n:,} events to {out}")


@dev_app.command("kafka")
def dev_kafka(
    port: int = typer.Option(9092, help="Loopback port for the broker."),
    data_dir: Optional[Path] = typer.Option(None, help="Keep the broker's data here (default: a temporary directory)."),
    create_topics: bool = typer.Option(True, help="Create StreamRec's topics once the broker is up."),
) -> None:
    """Run a single-node Kafka (KRaft) broker on 127.0.0.1 from Apache Kafka's jars, until Ctrl-C."""
    from streaming.local_broker import BrokerError, LocalKafka

    try:
        console.print("fetching Kafka jars (once per machine) and starting the broker ...")
        broker = LocalKafka(workdir=data_dir, port=port).start()
    except BrokerError as exc:
        _fail(str(exc))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if create_topics:
            ensure_topics(Settings(kafka={"bootstrap_servers": broker.bootstrap}).kafka)
        typer.echo(f"Kafka is up: bootstrap {broker.bootstrap} (log: {broker.log_path}); Ctrl-C stops it")
        stop.wait()
    finally:
        broker.stop() if data_dir else broker.remove()


@app.command()
def demo(
    ctx: typer.Context,
    events: int = typer.Option(20_000, "--events", min=100, help="Approximate number of impressions to simulate."),
    seed: int = typer.Option(0),
    kafka: Optional[str] = typer.Option(None, "--kafka", help="Bootstrap servers: replay through this Kafka cluster."),
) -> None:
    """Generate a synthetic shop's traffic, replay it through StreamRec's event path, and summarise it.

    The closed loop (learner, policy, serving) joins this command as those parts land.
    """
    from streamrec.demo import run_demo

    settings = _settings(ctx)
    if kafka:
        settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": kafka})})
    try:
        run_demo(settings, n_events=events, seed=seed, use_kafka=bool(kafka), console=console)
    except (KafkaUnavailable, TopicMissing) as exc:
        _fail(str(exc))


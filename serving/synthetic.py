"""A complete serving setup on the synthetic world, with no services: a model that knows the world's
catalog and a baseline policy in a registry, and the world's logged traffic turned into Feast
features. The serving tests, ``benchmarks/serving.py`` and demos start from it.

Nothing here trains: the model is freshly initialised (the tiny test encoder by default) and
the policy ranks by pCTCVR, which is all serving needs to be exercised end to end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from learner.registry import ModelRegistry, PublishedArtifact
from policies.synthetic_world import SyntheticWorld
from streaming.events import Event, Item
from streaming.stream_processor import StreamProcessor

SOFTMAX_EXPLORATION = {"kind": "softmax", "temperature": 0.02}  # pCTCVR units: a few points apart matter


@dataclass(frozen=True)
class PublishedPair:
    model: PublishedArtifact
    policy: PublishedArtifact


def catalog_model(items: Iterable[Item], config=None, seed: int = 0):
    """A fresh ``RecommenderModel`` (tiny config by default) that knows ``items``."""
    import torch

    from learner.model import RecommenderModel, tiny_model_config

    torch.manual_seed(seed)
    model = RecommenderModel(config or tiny_model_config(seed=seed))
    model.add_items(items)
    return model


def publish_baseline(registry: ModelRegistry, world: SyntheticWorld, *, config=None, seed: int = 0,
                     exploration: dict | None = None) -> PublishedPair:
    """Publish a model that knows the world's catalog and the pCTCVR policy with softmax exploration."""
    from learner.model import publish_model
    from policies.export import greedy_policy, publish_policy

    model = catalog_model(world.item_events(), config, seed)
    model_artifact = publish_model(registry, model, metrics={"seed": float(seed)}, parent=None)
    policy = greedy_policy(exploration=exploration or SOFTMAX_EXPLORATION)
    policy_artifact = publish_policy(registry, policy, metrics={}, parent=None)
    return PublishedPair(model_artifact, policy_artifact)


def push_world_features(store, events: Iterable[Event], batch: int = 5_000) -> int:
    """Run the world's events through the stream processor's aggregates and push the features to Feast."""
    processor = StreamProcessor()
    pending, pushed = [], 0
    for event in events:
        pending += processor.process(event).features
        if len(pending) >= batch:
            store.push(pending)
            pushed, pending = pushed + len(pending), []
    if pending:
        store.push(pending)
        pushed += len(pending)
    return pushed


@dataclass(frozen=True)
class SyntheticServing:
    """Where a synthetic serving setup lives: its world, registry and feature store settings."""

    world: SyntheticWorld
    registry: ModelRegistry
    feature_store: object  # feature_store.config.FeatureStoreSettings
    published: PublishedPair
    events: list


def build_synthetic_serving(data_dir, world: SyntheticWorld, *, n_requests: int = 500, seed: int = 0,
                            model_config=None) -> SyntheticServing:
    """Registry (baseline model and policy) and Feast features (from ``n_requests`` logged slates) under ``data_dir``."""
    from pathlib import Path

    from feature_store.config import FeatureStoreSettings
    from feature_store.store import StreamingFeatureStore

    data_dir = Path(data_dir)
    registry = ModelRegistry(data_dir / "registry")
    published = publish_baseline(registry, world, config=model_config, seed=seed)
    settings = FeatureStoreSettings(data_dir=data_dir / "feature_store")
    events = world.item_events() + world.generate_log(n_requests, log_seed=seed)
    with StreamingFeatureStore(settings) as store:
        store.apply()
        push_world_features(store, events)
    return SyntheticServing(world, registry, settings, published, events)

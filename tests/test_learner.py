"""The learner's pure core: model shapes and ESMM, the text cache, fine-tuning, checkpoints, artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from learner.checkpoint import CheckpointStore
from learner.config import LearnerSettings, tiny_model_config
from learner.metrics import PrequentialMetrics, auc
from learner.model import RecommenderModel, load_model, publish_model
from learner.online import MultiTaskLearner, fake_negative_weights, task_targets
from learner.registry import CorruptArtifact, ModelRegistry
from learner.trainer import IncrementalTrainer
from policies.synthetic_world import SyntheticWorld, WorldConfig
from streaming.events import Example, Impression, Item
from streaming.joiner import JoinerConfig
from streaming.stream_processor import StreamProcessor

torch.set_num_threads(1)


def impression(user: str, item: str, position: int = 0, t: int = 0, **features: float) -> Impression:
    return Impression(event_time=t, request_id=f"r-{user}-{t}", user_id=user, item_id=item, position=position,
                      slate_size=max(position + 1, 1), propensity=0.5, model_version=None, policy_version=None,
                      features=features)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(WorldConfig(seed=5, n_users=40, n_items=50))


@pytest.fixture(scope="module")
def examples(world) -> list[Example]:
    joiner = JoinerConfig(click_window_ms=60_000, purchase_window_ms=30 * 60_000, allowed_lateness_ms=60_000)
    return [e for out in StreamProcessor(joiner).run(world.generate_log(600)) for e in out.examples]


def settings(**overrides) -> LearnerSettings:
    base = dict(model=tiny_model_config(), batch_size=64, device="cpu", history_lag_ms=30 * 60_000)
    base.update(overrides)
    return LearnerSettings(**base)


def test_predict_shapes_and_esmm_relation(world):
    model = RecommenderModel(tiny_model_config())
    model.add_items(world.item_events())
    imps = [impression(f"u{k % 7}", f"i{k % 50:04d}", position=k % 5, user_clicks_1h=k) for k in range(23)]
    scores = model.predict(imps, {"u1": ["i0003", "i0004"]})
    assert set(scores) == {"pctr", "pcvr", "pctcvr"}
    for value in scores.values():
        assert value.shape == (23,) and np.isfinite(value).all() and ((value > 0) & (value < 1)).all()
    np.testing.assert_allclose(scores["pctcvr"], scores["pctr"] * scores["pcvr"], rtol=1e-6)
    assert (scores["pctcvr"] <= scores["pctr"]).all()
    vectors = model.item_vectors(["i0001", "i0002", "never-seen"])
    user = model.user_vector("u1", ["i0003"], {"user_ctr_1h": 0.2})
    assert vectors.shape == (3, 16) and user.shape == (16,)


def test_a_new_item_is_scored_from_its_text(world):
    model = RecommenderModel(tiny_model_config())
    model.add_items(world.item_events())
    assert not model.known_item("brand-new")
    before = model.predict([impression("u1", "brand-new")])["pctr"][0]  # no text yet: id alone, still scored
    model.add_items([Item(event_time=1, item_id="brand-new", title="Summit espresso machine Pro",
                          description="Crema, burr and portafilter.", category="espresso", price=150.0)])
    assert model.known_item("brand-new")
    after = model.predict([impression("u1", "brand-new")])["pctr"][0]
    model.add_items([Item(event_time=2, item_id="brand-new", title="Atlas camping tent Max",
                          description="Waterproof rainfly and tent poles.", category="espresso", price=150.0)])
    retitled = model.predict([impression("u1", "brand-new")])["pctr"][0]
    assert len({float(before), float(after), float(retitled)}) == 3


def test_cache_reencodes_only_changed_texts(world):
    model = RecommenderModel(tiny_model_config())
    items = world.item_events()[:5]
    model.add_items(items)
    row = model.cache.index["i0002"]
    first = model.cache.embeddings[row].clone()
    assert model.cache.upsert([items[2].model_copy(update={"price": 1.0})]) == []  # price only: no re-encode
    changed = items[2].model_copy(update={"description": "A completely different text about jazz vinyl."})
    model.add_items([changed])
    fresh = model.encoder.encode_texts([model.cache.texts[row]])[0]
    assert not torch.equal(first, model.cache.embeddings[row])
    torch.testing.assert_close(model.cache.embeddings[row], fresh)


@pytest.mark.parametrize("mode", ["top_layers", "lora"])
def test_encoder_fine_tuning_changes_weights_and_refreshes_every_cached_item(world, examples, mode):
    model_config = tiny_model_config(encoder=tiny_model_config().encoder.model_copy(
        update={"fine_tune": mode, "learning_rate": 1e-2}))
    learner = MultiTaskLearner(settings(model=model_config, cache_refresh_every=1000))
    learner.observe_items(world.item_events())
    before = {k: v.clone() for k, v in learner.model.encoder.state_dict().items()}
    batch = examples[:64]
    learner.learn_many(batch, learner.predict_many(batch))
    learner.learn_many(batch, learner.predict_many(batch))
    after = learner.model.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after) or mode == "lora"
    if mode == "lora":
        assert any("lora" in k and v.abs().sum() > 0 for k, v in after.items() if "lora_B" in k)
    cache = learner.model.cache
    assert cache.stale_rows(learner.model.encoder)  # the encoder moved on: cached texts are stale
    learner.refresh_cache()
    rows = [r for r in range(1, len(cache.ids)) if cache.has_text[r]]
    fresh = learner.model.encoder.encode_texts([cache.texts[r] for r in rows])
    torch.testing.assert_close(cache.embeddings[rows], fresh)
    # a published fine-tuned model (LoRA merged) predicts like the training one
    registry = ModelRegistry(__import__("tempfile").mkdtemp())
    loaded = load_model(registry.load("model", publish_model(registry, learner.model, metrics={}, parent=None).version))
    imps = [e.impression for e in examples[:20]]
    np.testing.assert_allclose(loaded.predict(imps)["pctr"], learner.model.predict(imps)["pctr"], rtol=1e-4, atol=1e-6)


def test_fake_negative_targets_and_weights():
    imp = impression("u", "a")
    copies = [
        Example(event_id="x:impression", event_time=0, impression=imp, clicked=False, purchased=False,
                label_mode="streaming", emitted_on="impression"),
        Example(event_id="x:click", event_time=5, impression=imp, clicked=True, purchased=False, click_time=5,
                label_mode="streaming", emitted_on="click"),
        Example(event_id="x:purchase", event_time=9, impression=imp, clicked=True, purchased=True, click_time=5,
                purchase_time=9, label_mode="streaming", emitted_on="purchase"),
        Example(event_id="y", event_time=9, impression=imp, clicked=True, purchased=False, click_time=5),
    ]
    p = {"pctr": np.full(4, 0.2), "pctcvr": np.full(4, 0.1), "pcvr": np.full(4, 0.5)}
    t = task_targets(copies, p)
    assert t["click"].tolist() == [0, 1, 0, 1] and t["buy"].tolist() == [0, 0, 1, 0]
    np.testing.assert_allclose(t["click_weight"], [0.8 * 1.2, 1.2, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(t["buy_weight"], [0.9 * 1.1, 0.0, 1.1, 1.0], rtol=1e-6)
    # the weighted expected loss gradient is that of the true label: E over copies matches p*1 + (1-p)*0
    p_true = 0.3
    observed_pos, observed_neg = p_true / (1 + p_true), 1 / (1 + p_true)
    w = fake_negative_weights(np.array([p_true, p_true]), np.array([1.0, 0.0]))
    assert observed_pos * w[0] == pytest.approx(p_true) and observed_neg * w[1] == pytest.approx(1 - p_true)


def test_streaming_metrics_wait_for_labels():
    metrics = PrequentialMetrics(window=100, label_delay_ms=1000)
    imp = impression("u", "a", t=0)
    first = Example(event_id="a:impression", event_time=0, impression=imp, clicked=False, purchased=False,
                    label_mode="streaming", emitted_on="impression")
    metrics.record({"pctr": np.array([0.4]), "pcvr": np.array([0.5]), "pctcvr": np.array([0.2])}, [first])
    assert metrics.tasks["ctr"].count == 0  # not scored before its labels can have arrived
    click = Example(event_id="a:click", event_time=500, impression=imp, clicked=True, purchased=False, click_time=500,
                    label_mode="streaming", emitted_on="click")
    metrics.record({"pctr": np.array([0.9]), "pcvr": np.array([0.5]), "pctcvr": np.array([0.4])}, [click])
    metrics.flush()
    assert metrics.tasks["ctr"].count == 1 and metrics.tasks["ctr"].sum_labels == 1.0
    assert metrics.tasks["ctr"].sum_scores == pytest.approx(0.4)  # the prediction made at the impression


def test_auc_matches_a_reference():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = np.round(rng.random(500), 2)  # with ties
    labels = rng.random(500) < scores
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def _all_state(trainer: IncrementalTrainer) -> dict[str, torch.Tensor]:
    return trainer.state()[0]


def test_checkpoint_round_trip_is_bit_exact(tmp_path, world, examples):
    stream = world.item_events() + examples
    half = len(world.item_events()) + len(examples) // 2
    a = IncrementalTrainer(settings(), checkpoint_dir=tmp_path / "a")
    a.learn_stream(stream[:half])
    a.checkpoint()
    b = IncrementalTrainer(settings(), checkpoint_dir=tmp_path / "a")
    assert b.restore()
    state_a, state_b = _all_state(a), _all_state(b)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    a.learn_stream(stream[half:])
    b.learn_stream(stream[half:])
    state_a, state_b = _all_state(a), _all_state(b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), "resumed training diverged"
    assert json.dumps(a.report(), sort_keys=True) == json.dumps(b.report(), sort_keys=True)


def test_redelivered_records_and_reemitted_examples_are_learned_once(world, examples):
    trainer = IncrementalTrainer(settings(), baselines=())
    trainer.observe_items(world.item_events())
    records = [(f"examples:0:{k}", e) for k, e in enumerate(examples[:100])]
    assert trainer.learn_events(records[:60]) == 60
    assert trainer.learn_events(records[40:]) == 40  # offsets 40..59 again after a "crash": skipped
    reemitted = [(f"examples:1:{k}", e) for k, e in enumerate(examples[:10])]  # same event ids elsewhere
    assert trainer.learn_events(reemitted) == 0 and trainer.duplicates_skipped == 10
    assert trainer.offsets == {"examples:0": 100, "examples:1": 10}


def test_a_corrupt_checkpoint_falls_back_and_drops_its_ledger(tmp_path):
    store = CheckpointStore(tmp_path, keep=3, ledger=True)
    store.save({"w": torch.zeros(1)}, {"n": 1}, ["a"])
    store.save({"w": torch.ones(1)}, {"n": 2}, ["b"])
    (tmp_path / "ckpt-000002" / "state.safetensors").write_bytes(b"garbage")
    checkpoint = store.latest()
    assert checkpoint.seq == 1 and checkpoint.meta == {"n": 1}
    assert store.ledger_ids() == ["a"]


def test_published_model_loads_bit_identically(tmp_path, world, examples):
    trainer = IncrementalTrainer(settings(), baselines=(), registry=ModelRegistry(tmp_path))
    trainer.learn_stream(world.item_events() + examples[:300])
    artifact = trainer.publish(force=True)
    loaded = load_model(ModelRegistry(tmp_path).load("model", artifact.version))
    original = trainer.learner.model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(loaded.cache.embeddings, trainer.learner.model.cache.to_state()[1])
    imps = [e.impression for e in examples[300:340]]
    recent = {"u0001": ["i0001", "i0002"]}
    for key, value in trainer.learner.model.predict(imps, recent).items():
        assert np.array_equal(value, loaded.predict(imps, recent)[key])
    assert loaded.version == artifact.version and artifact.metrics["examples"] == 300


def test_tampered_artifacts_are_refused(tmp_path, world):
    registry = ModelRegistry(tmp_path)
    model = RecommenderModel(tiny_model_config())
    model.add_items(world.item_events()[:10])
    version = publish_model(registry, model, metrics={}, parent=None).version
    catalog = tmp_path / "model" / version / "catalog.json"
    good = catalog.read_bytes()
    catalog.write_bytes(good.replace(b"i0001", b"i9999"))
    with pytest.raises(CorruptArtifact, match="checksum mismatch for catalog.json"):
        load_model(registry.load("model", version))
    catalog.write_bytes(good)
    weights = tmp_path / "model" / version / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="weights.safetensors"):
        load_model(registry.load("model", version))
    # internally consistent but wrong: a cache that is not what the encoder makes of the texts
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    catalog_state, embeddings = model.cache.to_state()
    tensors["cache.embeddings"] = embeddings + 0.5
    from learner.model import model_schema

    bad = registry.publish("model", tensors, schema=model_schema(model),
                           extra_files={"catalog.json": json.dumps(catalog_state).encode()})
    with pytest.raises(CorruptArtifact, match="cached item embeddings do not match"):
        load_model(registry.load("model", bad.version))

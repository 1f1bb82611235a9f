"""The learner against the synthetic world's ground truth: ranking quality, cold start, calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.config import LearnerSettings, tiny_model_config
from learner.metrics import auc
from learner.trainer import IncrementalTrainer
from policies.synthetic_world import SyntheticWorld, WorldConfig
from streaming.events import Impression
from streaming.joiner import JoinerConfig
from streaming.stream_processor import StreamProcessor

torch.set_num_threads(1)


def joined(world: SyntheticWorld, events, label_mode: str, purchase_window_min: int, finish: bool = True):
    config = JoinerConfig(label_mode=label_mode, click_window_ms=60_000,
                          purchase_window_ms=purchase_window_min * 60_000, allowed_lateness_ms=60_000)
    return [e for out in StreamProcessor(config).run(events, finish=finish) for e in out.examples]


def test_prequential_auc_approaches_the_oracle_and_beats_the_baselines():
    world = SyntheticWorld(WorldConfig(seed=1, n_users=300, n_items=200))
    examples = joined(world, world.generate_log(10_000), "windowed", 30, finish=False)
    settings = LearnerSettings(model=tiny_model_config(), batch_size=256, device="cpu", history_lag_ms=30 * 60_000,
                               metrics_window=10_000)
    report = IncrementalTrainer(settings).learn_stream(world.item_events() + examples)
    window = examples[-10_000:]  # the metric window: the last 10k predictions, made before learning them
    truth_click = np.array([world.click_probability(e.impression.user_id, [e.impression.item_id],
                                                    [e.impression.position])[0] for e in window])
    truth_buy = truth_click * np.array([world.purchase_probability_given_click(e.impression.user_id,
                                                                                [e.impression.item_id])[0] for e in window])
    oracle_ctr = auc(truth_click, np.array([e.clicked for e in window]))
    oracle_ctcvr = auc(truth_buy, np.array([e.clicked and e.purchased for e in window]))
    model, popularity, logistic = (report["models"][name] for name in ("model", "popularity", "logistic"))
    print(f"click AUC: oracle {oracle_ctr:.3f} model {model['ctr_auc']:.3f} logistic {logistic['ctr_auc']:.3f} "
          f"popularity {popularity['ctr_auc']:.3f}; purchase AUC: oracle {oracle_ctcvr:.3f} "
          f"model {model['ctcvr_auc']:.3f} logistic {logistic['ctcvr_auc']:.3f} popularity {popularity['ctcvr_auc']:.3f}")
    assert model["ctr_auc"] >= 0.9 * oracle_ctr
    assert model["ctr_auc"] > logistic["ctr_auc"] and model["ctr_auc"] > popularity["ctr_auc"] + 0.05
    assert model["ctcvr_auc"] > logistic["ctcvr_auc"] and model["ctcvr_auc"] > popularity["ctcvr_auc"]
    assert report["examples"] == len(examples)


def test_items_first_seen_mid_stream_are_ranked_from_their_text():
    world = SyntheticWorld(WorldConfig(seed=3, n_users=200, n_items=200))
    new = {f"i{i:04d}" for i in range(0, 200, 5)}
    catalog = [i.model_copy(update={"category": ""}) for i in world.item_events()]  # text is the only content
    log = [e for e in world.generate_log(6_000) if getattr(e, "item_id", None) not in new]
    settings = LearnerSettings(model=tiny_model_config(), batch_size=256, device="cpu", history_lag_ms=5 * 60_000)
    trainer = IncrementalTrainer(settings, baselines=())
    trainer.learn_stream([i for i in catalog if i.item_id not in new] + joined(world, log, "windowed", 5))
    model = trainer.learner.model
    model.add_items([i.model_copy(update={"price": None}) for i in catalog if i.item_id in new])
    new_items = sorted(new)
    first, second = np.triu_indices(len(new_items), 1)
    agreement = []
    for user in world.user_ids[:100]:
        imps = [Impression(event_time=0, request_id="r", user_id=user, item_id=item, position=0, slate_size=1,
                           propensity=1.0, model_version=None, policy_version=None) for item in new_items]
        scores = model.predict(imps, {user: trainer.learner.history.before(user, 2**62)})["pctr"]
        truth = world.click_probability(user, new_items, np.zeros(len(new_items), dtype=int))
        clear = np.abs(truth[first] - truth[second]) > 0.02
        agreement.append(((scores[first] - scores[second]) * (truth[first] - truth[second]) > 0)[clear].mean())
    print(f"pairwise agreement with the true click probabilities on never-trained items: {np.mean(agreement):.3f}")
    assert np.mean(agreement) > 0.54  # random ranking: 0.5


@pytest.mark.parametrize("label_mode", ["windowed", "streaming"])
def test_mean_predicted_ctr_stays_calibrated(label_mode):
    world = SyntheticWorld(WorldConfig(seed=1, n_users=300, n_items=200))
    examples = joined(world, world.generate_log(8_000), label_mode, 5, finish=False)
    settings = LearnerSettings(model=tiny_model_config(), batch_size=256, device="cpu", history_lag_ms=5 * 60_000,
                               label_delay_ms=6 * 60_000)
    trainer = IncrementalTrainer(settings, baselines=())
    half = len(examples) // 2
    trainer.learn_stream(world.item_events() + examples[:half])
    ctr = trainer.metrics["model"].tasks["ctr"]
    predicted, observed = ctr.sum_scores, ctr.sum_labels
    trainer.learn_stream(examples[half:])  # calibration over the second half, after warm-up
    calibration = (ctr.sum_scores - predicted) / (ctr.sum_labels - observed)
    print(f"{label_mode}: mean predicted CTR / observed CTR = {calibration:.3f}")
    assert abs(calibration - 1.0) <= 0.10

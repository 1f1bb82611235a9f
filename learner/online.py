"""One protocol for every model: predict on a batch of examples, then learn on it.

Anything with ``predict_many``/``learn_many`` (plus ``observe_items`` for catalog events and
``state``/``load_state`` for checkpoints) can be trained, evaluated prequentially, checkpointed
and compared by :class:`~learner.trainer.IncrementalTrainer`: the multi-task network here and
the baselines in :mod:`learner.baselines` alike.

Labels. A ``windowed`` example has final labels: click target ``clicked``, purchase target
``clicked and purchased`` (pCTCVR over the impression space, ESMM). A ``streaming`` example is
one of three copies: the impression as a provisional negative of both tasks, the click copy as a
click positive, the purchase copy as a CTCVR positive. A click that arrives later means the
impression's negative was fake; fake-negative weighting (Ktena et al., 2019) re-weights the
observed stream so its expected gradient is that of the true labels: positives by ``1 + p``,
negatives by ``(1 - p)(1 + p)``, with ``p`` the model's own (not back-propagated) probability.

>>> fake_negative_weights(np.array([0.2, 0.2]), np.array([1.0, 0.0])).round(2).tolist()
[1.2, 0.96]
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from learner.config import LearnerSettings
from learner.model import RecommenderModel
from streaming.events import Example, Item, decode_event, encode_event

Scores = dict[str, np.ndarray]


@runtime_checkable
class OnlineModel(Protocol):
    name: str

    def observe_items(self, items: Sequence[Item]) -> None: ...

    def predict_many(self, examples: Sequence[Example]) -> Scores: ...

    def learn_many(self, examples: Sequence[Example], predictions: Scores) -> dict[str, float]: ...

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...


def fake_negative_weights(p: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Importance weights of the fake-negative stream: 1 + p for positives, (1 - p)(1 + p) for negatives."""
    p = np.clip(p, 0.0, 1.0)
    return np.where(label > 0.5, 1.0 + p, (1.0 - p) * (1.0 + p))


def task_targets(examples: Sequence[Example], predictions: Scores) -> dict[str, np.ndarray]:
    """Targets and weights of the click and CTCVR losses, fake-negative weighted for streaming copies."""
    n = len(examples)
    click, click_w = np.zeros(n, np.float32), np.ones(n, np.float32)
    buy, buy_w = np.zeros(n, np.float32), np.ones(n, np.float32)
    streaming = np.zeros(n, bool)
    for i, e in enumerate(examples):
        if e.label_mode == "windowed":
            click[i], buy[i] = e.clicked, e.clicked and e.purchased
            continue
        streaming[i] = True
        if e.emitted_on == "click":
            click[i], buy_w[i] = 1.0, 0.0
        elif e.emitted_on == "purchase":
            buy[i], click_w[i] = 1.0, 0.0
    if streaming.any():
        click_w[streaming] *= fake_negative_weights(predictions["pctr"][streaming], click[streaming])
        buy_w[streaming] *= fake_negative_weights(predictions["pctcvr"][streaming], buy[streaming])
    return {"click": click, "click_weight": click_w, "buy": buy, "buy_weight": buy_w}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def esmm_loss(click_logit: torch.Tensor, purchase_logit: torch.Tensor, targets: dict[str, torch.Tensor],
              click_weight: float = 1.0, purchase_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted log loss of pCTR and of pCTCVR = pCTR x pCVR, both over the impression space."""
    log_ctr, log_not_ctr = F.logsigmoid(click_logit), F.logsigmoid(-click_logit)
    log_ctcvr = log_ctr + F.logsigmoid(purchase_logit)
    y, w = targets["click"], targets["click_weight"]
    click_loss = -(w * (y * log_ctr + (1 - y) * log_not_ctr)).mean()
    y, w = targets["buy"], targets["buy_weight"]
    buy_loss = -(w * (y * log_ctcvr + (1 - y) * _log1mexp(log_ctcvr))).mean()
    loss = click_weight * click_loss + purchase_weight * buy_loss
    return loss, {"click_loss": float(click_loss.detach()), "ctcvr_loss": float(buy_loss.detach())}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ClickHistory:
    """Each user's recent clicked items with click times, bounded per user and in users (LRU)."""

    def __init__(self, per_user: int, max_users: int = 1_000_000) -> None:
        self.per_user, self.max_users = per_user, max_users
        self.users: OrderedDict[str, list[tuple[str, int]]] = OrderedDict()

    def before(self, user_id: str, time_ms: int) -> list[str]:
        """Items the user clicked strictly before ``time_ms``, most recent last (no label leakage)."""
        return [item for item, t in self.users.get(user_id, ()) if t < time_ms][-self.per_user:]

    def add(self, user_id: str, item_id: str, time_ms: int) -> None:
        clicks = self.users.setdefault(user_id, [])
        self.users.move_to_end(user_id)
        clicks.append((item_id, time_ms))
        clicks.sort(key=lambda c: c[1])
        del clicks[: -2 * self.per_user]  # keep some older ones: an out-of-order impression may need them
        if len(self.users) > self.max_users:
            self.users.popitem(last=False)

    def state(self) -> dict[str, list]:
        return {user: [list(c) for c in clicks] for user, clicks in self.users.items()}

    def load_state(self, state: dict[str, list]) -> None:
        self.users = OrderedDict((user, [(c[0], int(c[1])) for c in clicks]) for user, clicks in state.items())


class MultiTaskLearner:
    """The multi-task network behind the protocol: optimizers, click history, encoder fine-tuning."""

    name = "model"

    def __init__(self, settings: LearnerSettings, model: RecommenderModel | None = None,
                 device: torch.device | str | None = None) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device) if device is None else torch.device(device)
        self.model = (model or RecommenderModel(settings.model)).to(self.device)
        self.history = ClickHistory(settings.model.recent_items)
        self.fine_tune = self._enable_fine_tuning()
        sparse = [self.model.item_ids.table.weight, self.model.user_ids.table.weight, self.model.words.weight]
        sparse_ids = {id(p) for p in sparse}
        encoder_params = [p for p in self.model.encoder.parameters() if p.requires_grad]
        encoder_ids = {id(p) for p in encoder_params}
        dense = [p for p in self.model.parameters()
                 if p.requires_grad and id(p) not in sparse_ids and id(p) not in encoder_ids]
        groups = [{"params": dense, "lr": settings.learning_rate, "weight_decay": settings.weight_decay}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": settings.model.encoder.learning_rate, "weight_decay": 0.0})
        self.optimizers = {"dense": torch.optim.AdamW(groups), "sparse": torch.optim.SparseAdam(sparse, lr=settings.id_learning_rate)}
        self.steps = 0
        self.touched_rows: set[int] = set()
        self.replay: deque[bytes] = deque(maxlen=settings.replay_buffer or 1)
        self.rng = np.random.default_rng(settings.model.seed)
        self.use_amp = self.device.type == "cuda"
        self._predicted: tuple[Sequence[Example], Any] | None = None
        self.model.eval()  # no dropout or batch norm in the heads; the encoder's dropout stays off online

    def _enable_fine_tuning(self) -> str:
        mode = self.settings.model.encoder.fine_tune
        if mode == "auto":
            mode = "top_layers" if self.device.type == "cuda" else "off"
        encoder = self.model.encoder
        if mode == "top_layers":
            layers = _encoder_layers(encoder.transformer)
            for layer in layers[-self.settings.model.encoder.fine_tune_layers:]:
                layer.requires_grad_(True)
        elif mode == "lora":
            from peft import LoraConfig, get_peft_model

            rank = self.settings.model.encoder.lora_rank
            encoder.transformer = get_peft_model(
                encoder.transformer, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                target_modules=["query", "value"]))
        return mode

    # -- the protocol --------------------------------------------------------------------------------
    def observe_items(self, items: Sequence[Item]) -> None:
        self.model.add_items(items)

    def batch(self, examples: Sequence[Example]):
        imps = [e.impression for e in examples]
        lag = self.settings.history_lag_ms
        return self.model.make_batch(
            [i.user_id for i in imps], [i.item_id for i in imps], [i.position for i in imps], [i.features for i in imps],
            [self.history.before(e.impression.user_id, e.impression.event_time
                                 - (lag if e.label_mode == "windowed" else 0)) for e in examples])

    def predict_many(self, examples: Sequence[Example]) -> Scores:
        batch = self.batch(examples)
        self._predicted = (examples, batch)  # learn_many on the same examples reuses the inputs
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_amp):
            return self.model.scores(self._to_device(batch))

    def _to_device(self, batch):
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    def learn_many(self, examples: Sequence[Example], predictions: Scores) -> dict[str, float]:
        predicted, self._predicted = self._predicted, None
        if predicted is not None and predicted[0] is examples and not self.settings.replay_buffer:
            batch = predicted[1]
        else:
            if self.settings.replay_buffer:
                examples, predictions = self._mix_replay(list(examples), predictions)
            batch = self.batch(examples)
        targets = {k: torch.from_numpy(v).to(self.device) for k, v in task_targets(examples, predictions).items()}
        batch = self._to_device(batch)
        fresh = None
        if self.fine_tune != "off":
            fresh, rows = self._fresh_text(batch)
        id_keep = None
        if self.settings.item_id_dropout > 0:
            keep = self.rng.random(batch.item_rows.shape[0]) >= self.settings.item_id_dropout
            id_keep = torch.from_numpy(keep.astype(np.float32)).to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_amp):
            click_logit, purchase_logit = self.model(batch, fresh_text=fresh, id_keep=id_keep)
        loss, parts = esmm_loss(click_logit, purchase_logit, targets, self.settings.click_loss_weight,
                                self.settings.purchase_loss_weight)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers.values():
            optimizer.step()
        self.steps += 1
        if fresh is not None:
            self.model.encoder.version += 1
            self.touched_rows.update(rows)
            if self.steps % self.settings.cache_refresh_every == 0:
                self.refresh_cache(max_items=self.settings.model.encoder.refresh_batch)
        for e in examples:
            if e.clicked and (e.label_mode == "windowed" or e.emitted_on == "click"):
                self.history.add(e.impression.user_id, e.impression.item_id, e.click_time)  # type: ignore[arg-type]
        return {"loss": float(loss.detach()), **parts}

    def refresh_cache(self, max_items: int | None = None) -> int:
        """Re-encode stale cached texts, the items training just touched first."""
        done = self.model.cache.refresh(self.model.encoder, first=sorted(self.touched_rows), max_items=max_items,
                                        batch_size=self.settings.model.encoder.refresh_batch)
        self.touched_rows.difference_update(r for r in list(self.touched_rows)
                                            if self.model.cache.encoded_with[r] == self.model.encoder.version)
        return done

    def _fresh_text(self, batch) -> tuple[torch.Tensor, list[int]]:
        """The batch's text embeddings encoded with gradients, for the items that have text."""
        cache = self.model.cache
        rows = batch.item_rows.tolist()
        with_text = [i for i, r in enumerate(rows) if cache.has_text[r]]
        if not with_text:
            return batch.item_text, []
        vectors = self.model.encoder.encode_texts([cache.texts[rows[i]] for i in with_text], grad=True)
        index = torch.tensor(with_text, device=batch.item_text.device)
        fresh = batch.item_text.index_put((index,), vectors.to(batch.item_text.dtype))
        return fresh, [rows[i] for i in with_text]

    def _mix_replay(self, examples: list[Example], predictions: Scores) -> tuple[list[Example], Scores]:
        k = min(len(self.replay), int(len(examples) * self.settings.replay_fraction))
        stored = list(self.replay)
        for e in examples:
            self.replay.append(encode_event(e))
        if k == 0:
            return examples, predictions
        picked = [decode_event(stored[i]) for i in self.rng.choice(len(stored), size=k, replace=False)]
        replayed = self.predict_many(picked)  # type: ignore[arg-type]
        merged = {key: np.concatenate([predictions[key], replayed[key]]) for key in predictions}
        return examples + picked, merged  # type: ignore[operator]

    # -- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}
        catalog, embeddings = self.model.cache.to_state()
        tensors["cache.embeddings"] = embeddings
        optimizer_meta = {}
        for name, optimizer in self.optimizers.items():
            t, optimizer_meta[name] = optimizer_state(f"optim.{name}", optimizer)
            tensors.update(t)
        meta = {
            "steps": self.steps, "encoder_version": self.model.encoder.version, "fine_tune": self.fine_tune,
            "catalog": catalog, "history": self.history.state(), "touched_rows": sorted(self.touched_rows),
            "optimizers": optimizer_meta, "rng": self.rng.bit_generator.state,
            "replay": [r.decode() for r in self.replay] if self.settings.replay_buffer else [],
            "model_config": self.settings.model.model_dump(mode="json"),
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta["model_config"] != self.settings.model.model_dump(mode="json"):
            raise ValueError("the checkpoint was written for a different model configuration; "
                             "use a fresh checkpoint_dir or restore the old learner.model settings")
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(state, strict=True)
        from learner.text import ItemTextCache

        self.model.cache = ItemTextCache.from_state(meta["catalog"], tensors["cache.embeddings"])
        self.model.encoder.version = meta["encoder_version"]
        for name, optimizer in self.optimizers.items():
            load_optimizer_state(f"optim.{name}", optimizer, tensors, meta["optimizers"][name], self.device)
        self.steps = meta["steps"]
        self.history.load_state(meta["history"])
        self.touched_rows = set(meta["touched_rows"])
        self.rng.bit_generator.state = meta["rng"]
        self.replay.clear()
        for raw in meta["replay"]:
            self.replay.append(raw.encode())


def optimizer_state(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as named tensors (for safetensors) plus JSON-ready scalars and groups."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().to("cpu").clone()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any], device: torch.device | str = "cpu") -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, field = key[len(prefix) + 1:].split(".", 1)
            per_param.setdefault(int(index), {})[field] = value.to(device) if field != "step" else value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        per_param.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def _encoder_layers(transformer) -> list:
    for path in ("encoder.layer", "layers", "transformer.layer", "h"):
        module = transformer
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        return list(module)
    raise ValueError(f"cannot find the layers of a {type(transformer).__name__} to fine-tune; use fine_tune='lora'")


"""The multi-task recommender: a language-model item tower, a user tower, MMoE, ESMM heads.

One module that training and serving share:

* **Item tower**: the item's text (title, category, description) through a transformer encoder,
  mean-pooled and projected (served from :class:`~learner.text.ItemTextCache`), plus a hashed
  item-id embedding (double hashing, so ids never seen before need no table growth), a category
  embedding and price features. A brand-new item has an untrained id row, so it is scored from
  its text.
* **User tower**: hashed user-id embedding, attention pooling over the item vectors of the
  user's recent clicks, and the user's streaming (Feast) features.
* **Core**: MMoE (shared experts, one softmax gate per task) over user, item, their product,
  target attention over the history, position and the features; a click head (pCTR, plus the
  two-tower dot product and a position bias) and a purchase-given-click head (pCVR). ESMM:
  ``pctcvr = pctr * pcvr`` is what the purchase loss sees, so pCVR trains on every impression.

``item_vectors`` and ``user_vector`` live in the same space (their dot product is part of the
click logit), which is what retrieval needs.

>>> import torch; torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> from streaming.events import Impression, Item
>>> model = RecommenderModel(tiny_model_config())
>>> model.add_items([Item(event_time=0, item_id="i1", title="espresso machine", category="espresso", price=180.0)])
>>> model.known_item("i1"), model.known_item("i2")
(True, False)
>>> imp = Impression(event_time=0, request_id="r", user_id="u1", item_id="i1", position=0, slate_size=2,
...                  propensity=0.5, model_version=None, policy_version=None)
>>> scores = model.predict([imp, imp.model_copy(update={"item_id": "i2", "position": 1})])
>>> sorted(scores), scores["pctr"].shape
(['pctcvr', 'pctr', 'pcvr'], (2,))
>>> bool(abs(scores["pctcvr"] - scores["pctr"] * scores["pcvr"]).max() < 1e-6)
True
>>> model.item_vectors(["i1"]).shape == (1, model.config.embed_dim)
True
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learner.config import ModelConfig, tiny_model_config
from learner.registry import CorruptArtifact, LoadedArtifact, ModelRegistry, PublishedArtifact
from learner.text import ItemTextCache, TextEncoder, build_encoder, encoder_from_spec, stable_hash
from streaming.events import Impression, Item
from streaming.features import ITEM_STATS, USER_ACTIVITY

__all__ = ["RecommenderModel", "Batch", "FEATURE_NAMES", "publish_model", "load_model", "tiny_model_config",
           "feature_vector"]

# The Feast features the model reads from Impression.features (timestamps and lists excluded).
FEATURE_NAMES: tuple[str, ...] = tuple(
    name for name, kind in {**USER_ACTIVITY, **ITEM_STATS}.items() if kind in ("int", "float") and not name.endswith("_ms"))
USER_FEATURES: tuple[int, ...] = tuple(i for i, n in enumerate(FEATURE_NAMES) if n.startswith("user_"))
SCHEMA_FORMAT = 1
CATALOG_FILE = "catalog.json"
LINEAGE_FILE = "lineage.json"  # what a published version learned from (see publish_model)


def feature_vector(features: Mapping[str, float]) -> np.ndarray:
    """[2F]: signed log1p of each known feature, then 1/0 for present/missing."""
    out = np.zeros(2 * len(FEATURE_NAMES), dtype=np.float32)
    if features:
        for i, name in enumerate(FEATURE_NAMES):
            value = features.get(name)
            if value is not None and math.isfinite(value):
                out[i] = math.copysign(math.log1p(abs(value)), value)
                out[len(FEATURE_NAMES) + i] = 1.0
    return out


@dataclass
class Batch:
    """Model inputs for B scored (user, item) pairs over U distinct items."""

    item_rows: torch.Tensor      # [U] cache rows of the distinct items
    item_text: torch.Tensor      # [U, T] cached text embeddings
    item_hash: torch.Tensor      # [U, 2] hashed id buckets
    item_category: torch.Tensor  # [U]
    item_price: torch.Tensor     # [U, 2]
    item_words: torch.Tensor     # [W] hashed words of the U items' texts, concatenated
    item_word_offsets: torch.Tensor  # [U] where each item's words start in item_words
    target: torch.Tensor         # [B] index into the U items
    history: torch.Tensor        # [B, H] index into the U items
    history_mask: torch.Tensor   # [B, H] True where a history slot is real
    user_hash: torch.Tensor      # [B, 2]
    position: torch.Tensor       # [B]
    features: torch.Tensor       # [B, 2F]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


class HashedEmbedding(nn.Module):
    """An id table addressed by two independent hashes whose rows are summed (sparse gradients)."""

    def __init__(self, buckets: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(buckets, dim, sparse=True)
        nn.init.zeros_(self.table.weight)  # an id never trained adds nothing: new items score from text

    def forward(self, hashes: torch.Tensor) -> torch.Tensor:
        return self.table(hashes).sum(-2)


def _masked_attention(scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax pooling with an extra null slot (score 0, value 0), so an empty history pools to 0."""
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
    weights = torch.softmax(scores, dim=1)[:, :-1]
    return torch.einsum("bh,bhd->bd", weights, values)


class RecommenderModel(nn.Module):
    """The multi-task model; ``version`` is the registry version it was loaded from (None if fresh)."""

    def __init__(self, config: ModelConfig, encoder: TextEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.version: str | None = None
        self.encoder = encoder if encoder is not None else build_encoder(config.encoder)
        self.encoder.requires_grad_(False)
        self.cache = ItemTextCache(self.encoder.dim)
        d, n_features = config.embed_dim, len(FEATURE_NAMES)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        # item tower
        self.text_projection = nn.Linear(self.encoder.dim, d)
        # standardisation of the encoder's output, fixed from the first catalog (see add_items): mean-pooled
        # transformer vectors share a large common direction that would drown what tells items apart
        self.register_buffer("text_mean", torch.zeros(self.encoder.dim))
        self.register_buffer("text_scale", torch.ones(self.encoder.dim))
        self.register_buffer("text_stats_items", torch.zeros((), dtype=torch.long))
        self.item_ids = HashedEmbedding(config.id_buckets, d)
        self.categories = nn.Embedding(config.category_buckets, d)
        self.words = nn.EmbeddingBag(config.word_buckets, d, mode="mean", sparse=True)
        nn.init.normal_(self.words.weight, std=0.01)
        self.price = nn.Linear(2, d)
        self.item_norm = nn.LayerNorm(d)
        # user tower
        self.user_ids = HashedEmbedding(config.id_buckets, d)
        self.history_query = nn.Parameter(torch.randn(d) / math.sqrt(d))
        self.user_features = nn.Linear(len(USER_FEATURES) * 2, d)
        self.user_norm = nn.LayerNorm(d)
        # context and target attention
        self.attention_query = nn.Linear(d, d, bias=False)
        self.attention_key = nn.Linear(d, d, bias=False)
        self.context_features = nn.Linear(2 * n_features, d)
        self.positions = nn.Embedding(config.positions, 8)
        self.position_bias = nn.Embedding(config.positions, 1)
        nn.init.zeros_(self.position_bias.weight)
        # MMoE with click and purchase-given-click towers
        width = 5 * d + 8
        self.experts = nn.Linear(width, config.experts * config.expert_dim)
        self.gates = nn.Linear(width, 2 * config.experts)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(config.expert_dim, config.tower_dim), nn.ReLU(), nn.Linear(config.tower_dim, 1))
            for _ in range(2))
        nn.init.constant_(self.towers[0][-1].bias, -2.0)  # start near a typical CTR, not 50%
        self.dot_scale = nn.Parameter(torch.tensor(1.0 / math.sqrt(d)))
        torch.random.set_rng_state(generator_state)
        self._id_hashes: dict[str, tuple[int, int]] = {}

    # -- catalog -----------------------------------------------------------------------------------
    def add_items(self, items: Iterable[Item]) -> None:
        """Add or update catalog entries; new or changed texts are encoded now (cached afterwards)."""
        changed = self.cache.upsert(items)
        if changed:
            self.cache.refresh(self.encoder, first=changed)
            self._fix_text_statistics()

    def _fix_text_statistics(self, min_items: int = 32) -> None:
        if int(self.text_stats_items) or sum(self.cache.has_text) < min_items:
            return
        rows = [r for r, has in enumerate(self.cache.has_text) if has]
        texts = self.cache.embeddings[rows]
        self.text_mean.copy_(texts.mean(0))
        self.text_scale.copy_(1.0 / texts.std(0).clamp_min(1e-4))
        self.text_stats_items.fill_(len(rows))

    def known_item(self, item_id: str) -> bool:
        """Whether the catalog has this item's text (unknown ids are still scored, from their id only)."""
        return item_id in self.cache

    @property
    def device(self) -> torch.device:
        return self.text_projection.weight.device

    # -- inputs ------------------------------------------------------------------------------------
    def hash_id(self, kind: str, value: str) -> tuple[int, int]:
        key = kind + value
        cached = self._id_hashes.get(key)
        if cached is None:
            if len(self._id_hashes) > 2_000_000:
                self._id_hashes.clear()
            buckets = self.config.id_buckets
            cached = (stable_hash(key, 1) % buckets, stable_hash(key, 2) % buckets)
            self._id_hashes[key] = cached
        return cached

    def make_batch(self, user_ids: Sequence[str], item_ids: Sequence[str], positions: Sequence[int],
                   features: Sequence[Mapping[str, float]], histories: Sequence[Sequence[str]]) -> Batch:
        """Turn ids, positions, feature dicts and recent-click lists into tensors (on the CPU)."""
        cfg = self.config
        h = cfg.recent_items
        unique: dict[str, int] = {}  # distinct items, by id: unknown ids share row 0 but not their id rows
        for item_id in item_ids:
            unique.setdefault(item_id, len(unique))
        recent = [list(hist)[-h:] for hist in histories]
        for hist in recent:
            for item_id in hist:
                unique.setdefault(item_id, len(unique))
        ids = list(unique)
        rows = [self.cache.index.get(i, 0) for i in ids]
        history = torch.zeros(len(item_ids), h, dtype=torch.long)
        history_mask = torch.zeros(len(item_ids), h, dtype=torch.bool)
        for b, hist in enumerate(recent):
            if hist:
                history[b, : len(hist)] = torch.tensor([unique[i] for i in hist])
                history_mask[b, : len(hist)] = True
        rows_t = torch.tensor(rows, dtype=torch.long)
        words, word_offsets = self.word_inputs(rows)
        return Batch(
            item_rows=rows_t,
            item_text=self.cache.embeddings[rows_t],
            item_hash=torch.tensor([self.hash_id("i:", i) for i in ids], dtype=torch.long),
            item_category=torch.tensor(self.cache.category_buckets(rows, cfg.category_buckets), dtype=torch.long),
            item_price=torch.from_numpy(self.cache.price_features(rows)),
            item_words=words,
            item_word_offsets=word_offsets,
            target=torch.tensor([unique[i] for i in item_ids], dtype=torch.long),
            history=history,
            history_mask=history_mask,
            user_hash=torch.tensor([self.hash_id("u:", u) for u in user_ids], dtype=torch.long),
            position=torch.tensor([min(p, cfg.positions - 1) for p in positions], dtype=torch.long),
            features=torch.from_numpy(np.stack([feature_vector(f) for f in features])
                                      if len(features) else np.zeros((0, 2 * len(FEATURE_NAMES)), np.float32)),
        )

    # -- towers ------------------------------------------------------------------------------------
    def item_tower(self, text: torch.Tensor, hashes: torch.Tensor, category: torch.Tensor, price: torch.Tensor,
                   words: torch.Tensor, word_offsets: torch.Tensor, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.item_ids(hashes)
        if id_keep is not None:  # id dropout: the content path must score items on its own (cold start)
            ids = ids * id_keep.unsqueeze(-1)
        has_text = (text != 0).any(-1, keepdim=True).to(text.dtype)  # a text-less item stays at zero
        text = (text - self.text_mean) * self.text_scale * has_text
        return self.item_norm(self.text_projection(text) + self.words(words, word_offsets) + ids
                              + self.categories(category) + self.price(price))

    def word_inputs(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        buckets = self.config.word_buckets
        offsets, flat = [], []
        for r in rows:
            offsets.append(len(flat))
            flat.extend(w % buckets for w in self.cache.words[r])
        return torch.tensor(flat, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)

    def user_tower(self, user_hash: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor,
                   features: torch.Tensor) -> torch.Tensor:
        scores = history @ self.history_query / math.sqrt(history.shape[-1])
        pooled = _masked_attention(scores, history, history_mask)
        n = len(FEATURE_NAMES)
        user_index = list(USER_FEATURES) + [n + i for i in USER_FEATURES]
        return self.user_norm(self.user_ids(user_hash) + pooled + self.user_features(features[:, user_index]))

    def forward(self, batch: Batch, fresh_text: torch.Tensor | None = None,
                id_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Click and purchase-given-click logits, [B] each.

        ``fresh_text`` ([U, T]) replaces the cached text embeddings, e.g. encoded with gradients
        while the encoder fine-tunes; ``id_keep`` ([U] of 0/1) drops item-id embeddings in training.
        """
        text = batch.item_text if fresh_text is None else fresh_text
        items = self.item_tower(text, batch.item_hash, batch.item_category, batch.item_price, batch.item_words,
                                batch.item_word_offsets, id_keep)  # [U, d]
        v = items[batch.target]
        history = items[batch.history]  # [B, H, d]
        u = self.user_tower(batch.user_hash, history, batch.history_mask, batch.features)
        d = v.shape[-1]
        query = self.attention_query(v).unsqueeze(1)
        target_scores = (query * self.attention_key(history)).sum(-1) / math.sqrt(d)
        target_pooled = _masked_attention(target_scores, history, batch.history_mask)
        x = torch.cat([u, v, u * v, target_pooled, self.context_features(batch.features),
                       self.positions(batch.position)], dim=-1)
        cfg = self.config
        experts = F.relu(self.experts(x)).view(-1, cfg.experts, cfg.expert_dim)
        gates = torch.softmax(self.gates(x).view(-1, 2, cfg.experts), dim=-1)
        mixed = torch.einsum("bte,bed->btd", gates, experts)
        click_logit = (self.towers[0](mixed[:, 0]).squeeze(-1) + (u * v).sum(-1) * self.dot_scale
                       + self.position_bias(batch.position).squeeze(-1))
        purchase_logit = self.towers[1](mixed[:, 1]).squeeze(-1)
        return click_logit.float(), purchase_logit.float()

    # -- serving API -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, impressions: Sequence[Impression],
                recent_items: Mapping[str, Sequence[str]] | None = None) -> dict[str, np.ndarray]:
        """``pctr``, ``pcvr`` and ``pctcvr`` for each impression, in eval mode, without gradients."""
        recent_items = recent_items or {}
        batch = self.make_batch(
            [i.user_id for i in impressions], [i.item_id for i in impressions], [i.position for i in impressions],
            [i.features for i in impressions], [recent_items.get(i.user_id, ()) for i in impressions])
        return self.scores(batch)

    @torch.no_grad()
    def scores(self, batch: Batch) -> dict[str, np.ndarray]:
        was_training = self.training
        if was_training:
            self.eval()
        try:
            click_logit, purchase_logit = self(batch.to(self.device))
        finally:
            if was_training:
                self.train()
        pctr, pcvr = torch.sigmoid(click_logit), torch.sigmoid(purchase_logit)
        return {"pctr": pctr.cpu().numpy(), "pcvr": pcvr.cpu().numpy(), "pctcvr": (pctr * pcvr).cpu().numpy()}

    @torch.no_grad()
    def item_vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        """[n, embed_dim] item-tower vectors from the cached text embeddings (for retrieval)."""
        if not item_ids:
            return np.zeros((0, self.config.embed_dim), dtype=np.float32)
        rows = self.cache.rows(item_ids, add_missing=False)
        device = self.device
        rows_t = torch.tensor(rows, dtype=torch.long)
        hashes = torch.tensor([self.hash_id("i:", i) for i in item_ids], dtype=torch.long)
        category = torch.tensor(self.cache.category_buckets(rows, self.config.category_buckets), dtype=torch.long)
        price = torch.from_numpy(self.cache.price_features(rows))
        words, offsets = self.word_inputs(rows)
        vectors = self.item_tower(self.cache.embeddings[rows_t].to(device), hashes.to(device), category.to(device),
                                  price.to(device), words.to(device), offsets.to(device))
        return vectors.float().cpu().numpy()

    @torch.no_grad()
    def user_vector(self, user_id: str, recent_items: Sequence[str], features: Mapping[str, float]) -> np.ndarray:
        """[embed_dim] user-tower vector in the item vectors' space."""
        h = self.config.recent_items
        recent = [i for i in list(recent_items)[-h:] if i in self.cache.index]
        device = self.device
        d = self.config.embed_dim
        history = torch.zeros(1, h, d, device=device)
        mask = torch.zeros(1, h, dtype=torch.bool, device=device)
        if recent:
            history[0, : len(recent)] = torch.from_numpy(self.item_vectors(recent)).to(device)
            mask[0, : len(recent)] = True
        user_hash = torch.tensor([self.hash_id("u:", user_id)], dtype=torch.long, device=device)
        feats = torch.from_numpy(feature_vector(features)).unsqueeze(0).to(device)
        return self.user_tower(user_hash, history, mask, feats)[0].float().cpu().numpy()


# -- artifacts -------------------------------------------------------------------------------------
def _plain_encoder_state(model: RecommenderModel) -> dict[str, torch.Tensor]:
    """The model's weights with any LoRA adapters merged, under the plain (unwrapped) names."""
    transformer = model.encoder.transformer
    if hasattr(transformer, "merge_and_unload"):  # a peft model: merge a copy, leave training untouched
        merged = copy.deepcopy(transformer).merge_and_unload()
        encoder_state = {f"encoder.transformer.{k}": v for k, v in merged.state_dict().items()}
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
        return {**rest, **encoder_state}
    return dict(model.state_dict())


def model_schema(model: RecommenderModel) -> dict[str, Any]:
    return {
        "format": SCHEMA_FORMAT,
        "model": model.config.model_dump(mode="json"),
        "encoder": model.encoder.spec(),
        "encoder_version": model.encoder.version,
        "feature_names": list(FEATURE_NAMES),
        "items": len(model.cache),
    }


def publish_model(registry: ModelRegistry, model: RecommenderModel, *, metrics: dict[str, float],
                  parent: str | None, lineage: dict[str, Any] | None = None) -> PublishedArtifact:
    """Publish the model as a new ``model`` version: weights, cached item embeddings, catalog, tokenizer.

    Stale cache rows are re-encoded first, so the published cache matches the published encoder.
    ``lineage`` (JSON-ready: what the version learned from, e.g. the trainer's consumed offsets)
    goes into ``lineage.json`` beside the weights; read it with ``registry.read_file(..., LINEAGE_FILE)``.
    """
    model.cache.refresh(model.encoder)
    catalog, embeddings = model.cache.to_state()
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in _plain_encoder_state(model).items()}
    tensors["cache.embeddings"] = embeddings
    extra = {CATALOG_FILE: json.dumps(catalog, separators=(",", ":")).encode()}
    if lineage is not None:
        extra[LINEAGE_FILE] = json.dumps(lineage, sort_keys=True).encode()
    tokenizer = model.encoder.tokenizer
    if hasattr(tokenizer, "files"):
        extra.update(tokenizer.files())
    artifact = registry.publish("model", tensors, schema=model_schema(model), parent=parent, metrics=metrics,
                                extra_files=extra)
    model.version = artifact.version
    return artifact


def load_model(artifact: LoadedArtifact, device: str = "cpu") -> RecommenderModel:
    """Rebuild a published model (no pickle); raises CorruptArtifact if anything does not check out.

    Verifies the side files' checksums, that every tensor fits the declared architecture, that
    the cached item embeddings are what the encoder makes of the catalog texts (a sample), and
    that a smoke prediction is finite.
    """
    where = f"model {artifact.version}"
    schema = artifact.schema
    try:
        if not isinstance(schema, dict) or schema.get("format") != SCHEMA_FORMAT:
            found = schema.get("format") if isinstance(schema, dict) else schema
            raise CorruptArtifact(f"{where}: schema format {str(found)[:100]!r} is not {SCHEMA_FORMAT}")
        if list(schema["feature_names"]) != list(FEATURE_NAMES):
            raise CorruptArtifact(f"{where}: was trained on features {schema['feature_names']}, this code reads "
                                  f"{list(FEATURE_NAMES)}; publish a model from this version of StreamRec")
        config = ModelConfig.model_validate(schema["model"])
        files = {name: artifact.read_file(name) for name in artifact.manifest["files"] if name != "weights.safetensors"}
        catalog = json.loads(files[CATALOG_FILE])
        with tempfile.TemporaryDirectory(prefix="streamrec-tokenizer-") as workdir:
            encoder = encoder_from_spec(schema["encoder"], files, Path(workdir))
        encoder.version = int(schema["encoder_version"])
        model = RecommenderModel(config, encoder)
        state = {k[len("model."):]: v for k, v in artifact.tensors.items() if k.startswith("model.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CorruptArtifact(f"{where}: weights do not fit the declared model "
                                  f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        model.cache = ItemTextCache.from_state(catalog, artifact.tensors["cache.embeddings"])
    except CorruptArtifact:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged schema or side file breaks, it is a corrupt artifact
        raise CorruptArtifact(f"{where}: cannot be rebuilt: {exc.__class__.__name__}: {str(exc)[:500]}") from None
    model.version = artifact.version
    model.to(device).eval()
    try:
        _smoke_check(model, where)
    except CorruptArtifact:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that cannot score one impression is not servable
        raise CorruptArtifact(f"{where}: the smoke prediction fails: {exc.__class__.__name__}: {str(exc)[:500]}") from None
    return model


def _smoke_check(model: RecommenderModel, where: str) -> None:
    cache = model.cache
    sample = [r for r in range(1, len(cache.ids)) if cache.has_text[r]][:8]
    if sample:
        fresh = model.encoder.encode_texts([cache.texts[r] for r in sample]).cpu()
        if not torch.allclose(fresh, cache.embeddings[sample], atol=1e-4, rtol=1e-3):
            raise CorruptArtifact(f"{where}: cached item embeddings do not match the encoder's output for their texts")
    item = cache.ids[sample[0]] if sample else "smoke-item"
    probe = Impression(event_time=0, request_id="smoke", user_id="smoke-user", item_id=item, position=0,
                       slate_size=1, propensity=1.0, model_version=None, policy_version=None)
    scores = model.predict([probe])
    if not all(np.isfinite(v).all() for v in scores.values()):
        raise CorruptArtifact(f"{where}: the smoke prediction is not finite")

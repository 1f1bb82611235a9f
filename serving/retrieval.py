"""Candidate retrieval: which catalog items a request scores when it names none.

Two sources, both plain numpy:

* :class:`ExactIndex`: the top-N items by cosine similarity between the user's history embedding
  (``model.user_vector``) and the cached item-tower embeddings (``model.item_vectors``). Exact
  search is one matrix-vector product; at 1e5 items of 64 dimensions that is ~6.4 M multiply-adds,
  about a millisecond. Past that, this class is the one place an approximate index (FAISS HNSW or
  IVF-PQ, ScaNN) goes: same ``search(query, n)`` contract, built at the same moment (when a model
  version is loaded, from the same embeddings).
* :func:`popular_items`: cold start. Users with no history get the most popular items (Feast's
  ``item_popularity_24h``), narrowed to a category when the request's context names one.

>>> index = ExactIndex(["a", "b", "c"], np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]))
>>> index.search(np.array([1.0, 0.1]), 2)
['a', 'c']
>>> popular_items({"a": 3.0, "b": 9.0, "c": 5.0}, 2)
['b', 'c']
>>> popular_items({"a": 3.0, "b": 9.0, "c": 5.0}, 2, categories={"a": "tea", "b": "coffee", "c": "tea"}, category="tea")
['c', 'a']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class ExactIndex:
    """Exact top-N cosine-similarity search over a fixed set of item embeddings."""

    def __init__(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(item_ids):
            raise ValueError(f"need one embedding row per item: {len(item_ids)} items, vectors of shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("item embeddings contain NaN or infinity")
        self.item_ids = list(item_ids)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self._unit = vectors / np.maximum(norms, 1e-12)
        self.dim = vectors.shape[1]

    def __len__(self) -> int:
        return len(self.item_ids)

    def search(self, query: np.ndarray, n: int) -> list[str]:
        """The ``n`` items most similar to ``query``, most similar first (ties: catalog order)."""
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != self.dim:
            raise ValueError(f"the query has {query.shape[0]} dimensions, the index {self.dim}")
        n = min(int(n), len(self.item_ids))
        if n <= 0:
            return []
        similarity = self._unit @ (query / max(float(np.linalg.norm(query)), 1e-12))
        if not np.isfinite(similarity).all():
            raise ValueError("the user embedding is not finite")
        if n < len(similarity):
            top = np.argpartition(-similarity, n - 1)[:n]
            top = top[np.lexsort((top, -similarity[top]))]
        else:
            top = np.lexsort((np.arange(len(similarity)), -similarity))
        return [self.item_ids[i] for i in top]


def popular_items(popularity: Mapping[str, float], n: int, *, categories: Mapping[str, str] | None = None,
                  category: str | None = None, exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The ``n`` most popular items (ties: by id), those of ``category`` first when one is asked for.

    A category no item has is ignored (the slate is then plain popularity), so a context value the
    catalog does not know never empties a slate.
    """
    ranked = sorted((item for item in popularity if item not in exclude), key=lambda item: (-popularity[item], item))
    if category is not None and categories is not None:
        in_category = [item for item in ranked if categories.get(item) == category]
        if in_category:
            rest = [item for item in ranked if categories.get(item) != category]
            ranked = in_category + rest
    return ranked[: max(int(n), 0)]

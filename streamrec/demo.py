"""``streamrec demo``: the closed loop on embedded defaults, or over a real Kafka with every part a process.

Without ``--kafka`` it runs :mod:`streamrec.closed_loop` (serving, the synthetic world's users,
the joiner and aggregates in-process, Feast on SQLite, the incremental learner publishing versions
that serving hot-swaps, an RLlib policy promoted through off-policy evaluation), prints a summary
table and writes an HTML report with plots. With ``--kafka`` it runs the same loop over that
cluster with the stream worker, the learner and serving as processes (:mod:`streamrec.live_demo`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamrec.closed_loop import ClosedLoop, LoopConfig, LoopResult
from streamrec.report import bar_chart, line_chart, write_report
from streamrec.settings import Settings


def run_closed_loop_demo(settings: Settings, config: LoopConfig, console: Console, progress: bool = True) -> tuple[LoopResult, Path]:
    """The closed loop, its summary table and its HTML report (``<data_dir>/demo/report.html``)."""
    import logging
    import shutil

    # Feast logs each registry refresh at INFO: thousands of lines over a run, none of them news
    logging.getLogger("feast").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    out_dir = settings.data_dir / "demo"
    workdir = out_dir / "run"
    shutil.rmtree(workdir, ignore_errors=True)  # each run starts from an empty registry and feature store
    workdir.mkdir(parents=True)
    console.print(f"closed loop: {config.n_users} users, {config.n_items} items, {config.events:,} impressions, "
                  f"model {config.model!r} on {config.device}, seed {config.seed}")
    with Progress(TextColumn("[bold]serving and learning"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
                  TimeElapsedColumn(), console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("loop", total=None)
        loop = ClosedLoop(config, workdir, progress=lambda done, total: bar.update(task, completed=done, total=total))
        result = loop.run()
    _print_loop(result, console)
    report = write_loop_report(result, out_dir / "report.html")
    console.print(f"report: {report}")
    return result, report


def _print_loop(result: LoopResult, console: Console) -> None:
    table = Table(title="StreamRec demo: the closed loop")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.summary.items():
        if isinstance(value, float):
            text = f"{value:,.4f}" if abs(value) < 100 else f"{value:,.0f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:,}"
        else:
            text = str(value)
        table.add_row(key, text)
    console.print(table)


def write_loop_report(result: LoopResult, path: Path) -> Path:
    timeline = result.timeline
    xs = timeline["examples"]
    charts = [
        line_chart("Click AUC, prequential (test-then-train)", {
            "model": (xs, timeline["model_ctr_auc"]), "popularity": (xs, timeline["popularity_ctr_auc"]),
            "logistic regression": (xs, timeline["logistic_ctr_auc"]), "oracle": (xs, timeline["oracle_ctr_auc"])},
            x_label="examples learned", y_label="AUC, last window"),
        line_chart("Purchase AUC (pCTCVR), prequential", {
            "model": (xs, timeline["model_ctcvr_auc"]), "popularity": (xs, timeline["popularity_ctcvr_auc"]),
            "oracle": (xs, timeline["oracle_ctcvr_auc"])}, x_label="examples learned", y_label="AUC, last window"),
        line_chart("Served click-through rate", {"served CTR": (xs, timeline["served_ctr"])},
                   x_label="examples learned", y_label="clicks per impression (recent requests)"),
    ]
    if result.rewards:
        order = [k for k in ("random", "greedy_pctr", "greedy_pctcvr", "learned", "learned+exploration", "oracle")
                 if k in result.rewards]
        charts.append(bar_chart("Reward per session (ground-truth users)", {k: result.rewards[k] for k in order},
                                y_label="click + w * purchase per session",
                                errors={k: 1.96 * result.reward_stderr.get(k, 0.0) for k in order}))
    if result.freshness_s:
        fresh = np.sort(np.array(result.freshness_s))
        quantiles = np.linspace(0, 1, len(fresh))
        step = max(1, len(fresh) // 400)
        charts.append(line_chart("Model freshness: event time from an impression to the serving version that learned it",
                                 {"share of examples": (fresh[::step].tolist(), quantiles[::step].tolist())},
                                 x_label="seconds of event time", y_label="cumulative share", y_range=(0.0, 1.0)))
    summary = dict(result.summary)
    notes = ["Prequential metrics: every example is scored by the model before the model learns from it; "
             "the oracle is the synthetic world's true click and purchase probability on the same impressions.",
             f"Versions swapped into serving: {', '.join(f'{k} {v}' for k, v in result.swaps[-12:])}"
             + (" ..." if len(result.swaps) > 12 else "")]
    return write_report(path, "StreamRec demo report", summary, charts, notes)


def run_live_demo_cli(settings: Settings, *, events: int, seed: int, model: str, device: str, rate: float,
                      console: Console | None = None) -> dict:
    """``--kafka``: the closed loop over a real cluster with every part a process; prints the summary."""
    from streamrec.live_demo import LiveDemoConfig, run_live_demo

    console = console or Console()
    config = LiveDemoConfig(requests=max(1, events // 5), seed=seed, rate=rate, model=model,
                            device="cpu" if device == "auto" else device)
    workdir = settings.data_dir / "demo" / "live"
    with Progress(TextColumn("[bold]users asking serving"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
                  TimeElapsedColumn(), console=console, disable=not settings.replay.progress) as bar:
        task = bar.add_task("live", total=config.requests)
        summary = run_live_demo(settings.kafka, config, workdir,
                                progress=lambda done, total: bar.update(task, completed=done, total=total),
                                say=console.print)
    table = Table(title="StreamRec demo: the closed loop on Kafka")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:,.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    return summary

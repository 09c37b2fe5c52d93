"""Timing, medians and reports for the mcs benchmarks.

A workload is a set of variants (the mcs version first, then its baselines) that measure the same
thing, each returning a dict of metrics. The runner measures every variant once per run,
interleaving them (and rotating their order from run to run) so that machine noise falls on all
of them alike, each in a fresh event loop after a full collection, with the cyclic garbage
collector left on as users run. Reports give, per variant, the median over runs; ratios pair
variants within a run first (mcs / baseline in run *i*) and then take the median of those, so a
noisy run moves both sides of a ratio together.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Metric",
    "Outcome",
    "Params",
    "Results",
    "Target",
    "Variant",
    "Workload",
    "run_workloads",
    "text_report",
    "write_reports",
]

Results = dict[str, float]
"""What one measurement of one variant returns: metric key -> value."""


@dataclass(frozen=True)
class Params:
    """The sizes of the workloads; the defaults are the ones the targets are stated for."""

    requests: int = 20_000  # concurrent requests in W1 and W2
    latency_seconds: float = 2.0  # how long the demo (W5) offers load; shorter with --quick
    sweep_rates: tuple[float, ...] = (10e3, 20e3, 40e3, 60e3, 80e3, 100e3, 120e3, 150e3)  # W4
    sweep_seconds: float = 10.0  # W4: how long each rate is offered
    memory_callers: int = 100_000  # parked callers in W1-memory
    tree_layers: int = 4  # W3: layers below the root
    tree_fanout: int = 10  # W3: dependencies per inner node

    def for_warmup(self) -> Params:
        """Small sizes, to import and exercise every code path once before timing."""
        return replace(
            self,
            requests=500,
            latency_seconds=0.05,
            memory_callers=500,
            tree_layers=2,
            sweep_rates=(10e3,),
            sweep_seconds=0.05,
        )

    @property
    def size(self) -> Literal["warmup", "quick", "full"]:
        """Which sizes these are, for workloads with sizes of their own: the warm-up's
        (:meth:`for_warmup`), ``--quick``'s or the full ones."""
        default = Params()
        if self.requests < default.requests:
            return "warmup"
        if self.latency_seconds < default.latency_seconds:
            return "quick"
        return "full"


@dataclass(frozen=True)
class Metric:
    """One number a variant reports."""

    key: str  # the key in the variant's Results
    name: str  # how the report names it
    unit: Literal["req/s", "ms", "B", "objects"]
    higher_is_better: bool


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Variant:
    """One implementation of a workload.

    ``unavailable`` returns why the variant cannot run here (it is then reported as skipped),
    or None.
    """

    name: str
    measure: Callable[[Params], Results]
    unavailable: Callable[[], str | None] = _always_available


@dataclass(frozen=True)
class Target:
    """A stated goal: ``variant``'s metric (or its ratio to / excess over ``baseline``)."""

    variant: str
    metric: str
    op: Literal[">=", "<=", "<"]
    bound: float
    baseline: str | None = None
    relation: Literal["ratio", "excess"] = "ratio"

    def describe(self, unit: str) -> str:
        """The target as text, e.g. ``mcs / trio floor >= 0.8x`` or ``mcs < 2 ms``."""
        if self.baseline is None:
            return f"{self.variant} {self.op} {_number(self.bound)} {unit}"
        if self.relation == "ratio":
            return f"{self.variant} / {self.baseline} {self.op} {self.bound:g}x"
        return f"{self.variant} - {self.baseline} {self.op} {_number(self.bound)} {unit}"

    def holds(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.bound
        if self.op == "<=":
            return value <= self.bound
        return value < self.bound


@dataclass(frozen=True)
class Workload:
    """A family of variants measuring the same thing; the first variant is the subject (mcs)."""

    key: str
    title: str
    description: str
    metrics: tuple[Metric, ...]  # the first is the primary one (table column, chart)
    variants: tuple[Variant, ...]
    targets: tuple[Target, ...] = ()
    compare: Literal["ratio", "excess"] = "ratio"  # how baselines rows relate to the subject
    max_runs: int | None = None  # cap for measurements that repeat exactly (memory)

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    @property
    def subject(self) -> str:
        return self.variants[0].name

    def metric(self, key: str) -> Metric:
        return next(m for m in self.metrics if m.key == key)


@dataclass
class Outcome:
    """Everything measured for one workload."""

    workload: Workload
    runs: dict[str, list[Results]] = field(default_factory=dict)  # variant -> one per run
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> reason

    def values(self, variant: str, metric: str) -> list[float]:
        return [r[metric] for r in self.runs.get(variant, []) if metric in r]

    def median(self, variant: str, metric: str) -> float:
        return statistics.median(self.values(variant, metric))

    def paired(
        self, a: str, b: str, metric: str, relation: Literal["ratio", "excess"]
    ) -> float | None:
        """Median over runs of a/b (or a-b) on ``metric``, pairing the runs; None if absent."""
        xs, ys = self.values(a, metric), self.values(b, metric)
        if not xs or not ys:
            return None
        if relation == "ratio":
            pairs = [x / y if y else math.inf for x, y in zip(xs, ys, strict=False)]
        else:
            pairs = [x - y for x, y in zip(xs, ys, strict=False)]
        return statistics.median(pairs)

    def target_value(self, target: Target) -> float | None:
        if target.baseline is None:
            values = self.values(target.variant, target.metric)
            return statistics.median(values) if values else None
        return self.paired(target.variant, target.baseline, target.metric, target.relation)


# ---------------------------------------------------------------------------------- running


def _measure(variant: Variant, params: Params) -> Results:
    gc.collect()  # every measurement starts from the same heap state; the collector stays on
    return variant.measure(params)


def run_workloads(
    workloads: Sequence[Workload],
    params: Params,
    runs: int,
    log: Callable[[str], None],
) -> list[Outcome]:
    """Measure every available variant of every workload ``runs`` times, interleaved."""
    outcomes = [Outcome(w) for w in workloads]
    live: dict[str, list[Variant]] = {}
    for outcome in outcomes:
        wl = outcome.workload
        live[wl.key] = []
        for variant in wl.variants:
            reason = variant.unavailable()
            if reason is not None:
                outcome.skipped[variant.name] = reason
                log(f"{wl.key}: skipping {variant.name}: {reason}")
            else:
                live[wl.key].append(variant)
                outcome.runs[variant.name] = []

    def failed(outcome: Outcome, variant: Variant) -> None:
        reason = "".join(traceback.format_exception_only(*sys.exc_info()[:2])).strip()
        traceback.print_exc()
        log(f"{outcome.workload.key}: {variant.name} failed, dropped from the report: {reason}")
        outcome.skipped[variant.name] = f"failed: {reason}"
        outcome.runs.pop(variant.name, None)
        live[outcome.workload.key].remove(variant)

    log("warm-up (small sizes, not recorded)")
    for outcome in outcomes:
        for variant in list(live[outcome.workload.key]):
            try:
                _measure(variant, params.for_warmup())
            except Exception:
                failed(outcome, variant)

    for run in range(runs):
        started = time.perf_counter()
        for outcome in outcomes:
            wl = outcome.workload
            variants = live[wl.key]
            if not variants or (wl.max_runs is not None and run >= wl.max_runs):
                continue
            shift = run % len(variants)
            cells = []
            for variant in variants[shift:] + variants[:shift]:
                try:
                    results = _measure(variant, params)
                except Exception:
                    failed(outcome, variant)
                    continue
                outcome.runs[variant.name].append(results)
                value = results[wl.primary.key]
                cells.append(f"{variant.name} {_format(value, wl.primary.unit)}")
            log(f"run {run + 1}/{runs} {wl.key}: " + "; ".join(cells))
        log(
            f"run {run + 1}/{runs} took {time.perf_counter() - started:.1f} s "
            f"(load average {_load_average()})"
        )
    return outcomes


# ---------------------------------------------------------------------------------- formatting


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:g}"


def _format(value: float, unit: str) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if unit == "req/s":
        return f"{value / 1000:,.1f}k req/s"
    if unit == "ms":
        return f"{value:,.3g} ms" if value < 10 else f"{value:,.1f} ms"
    if unit == "objects":
        return f"{value:.1f} objects"
    return f"{value:,.0f} {unit}"


def _format_relation(value: float, relation: str, unit: str) -> str:
    if relation == "ratio":
        return f"{value:.2f}x"
    return f"{value:+,.0f} {unit}"


@dataclass(frozen=True)
class _Row:
    workload: str
    variant: str
    median: str
    spread: str
    others: str
    versus: str


def _rows(outcomes: Sequence[Outcome]) -> list[_Row]:
    rows = []
    for outcome in outcomes:
        wl = outcome.workload
        primary = wl.primary
        for variant in wl.variants:
            name = variant.name
            if name in outcome.skipped or not outcome.values(name, primary.key):
                reason = outcome.skipped.get(name, "not measured")
                status = "failed" if reason.startswith("failed") else "skipped"
                rows.append(_Row(wl.key, name, status, "", reason, ""))
                continue
            values = outcome.values(name, primary.key)
            low, high = _format(min(values), primary.unit), _format(max(values), primary.unit)
            spread = f"{low} .. {high} (n={len(values)})"
            others = ", ".join(
                f"{m.name} {_format(outcome.median(name, m.key), m.unit)}"
                for m in wl.metrics[1:]
                if outcome.values(name, m.key)  # a metric only some variants report
            )
            versus = ""
            if name != wl.subject:
                rel = outcome.paired(wl.subject, name, primary.key, wl.compare)
                if rel is not None:
                    sign = "/" if wl.compare == "ratio" else "-"
                    versus = (
                        f"{wl.subject} {sign} this = "
                        f"{_format_relation(rel, wl.compare, primary.unit)}"
                    )
            rows.append(
                _Row(
                    wl.key,
                    name,
                    f"{primary.name} {_format(outcome.median(name, primary.key), primary.unit)}",
                    spread,
                    others,
                    versus,
                )
            )
    return rows


@dataclass(frozen=True)
class _TargetRow:
    workload: str
    metric: str
    target: str
    measured: str
    verdict: str


def _target_rows(outcomes: Sequence[Outcome]) -> list[_TargetRow]:
    rows = []
    for outcome in outcomes:
        wl = outcome.workload
        for target in wl.targets:
            metric = wl.metric(target.metric)
            unit = metric.unit
            value = outcome.target_value(target)
            if value is None:
                measured, verdict = "-", "skipped"
            else:
                measured = (
                    _format(value, unit)
                    if target.baseline is None
                    else _format_relation(value, target.relation, unit)
                )
                verdict = "met" if target.holds(value) else "MISSED"
            rows.append(_TargetRow(wl.key, metric.name, target.describe(unit), measured, verdict))
    return rows


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


_RESULT_HEADER = ("workload", "variant", "median", "min .. max (runs)", "other medians", "ratio")
_TARGET_HEADER = ("workload", "metric", "target", "measured (median)", "")


def text_report(outcomes: Sequence[Outcome], runs: int) -> str:
    results = [
        (r.workload, r.variant, r.median, r.spread, r.others, r.versus) for r in _rows(outcomes)
    ]
    targets = [
        (t.workload, t.metric, t.target, t.measured, t.verdict) for t in _target_rows(outcomes)
    ]
    return (
        f"Medians over {runs} run(s); ratios are medians of per-run pairs (mcs / baseline).\n\n"
        + _text_table(_RESULT_HEADER, results)
        + "\n\nTargets\n\n"
        + _text_table(_TARGET_HEADER, targets)
    )


# ---------------------------------------------------------------------------------- files


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work competing for the cores."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import trio

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "trio": trio.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gc_enabled": gc.isenabled(),
        "load_average": _load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _json_report(
    outcomes: Sequence[Outcome], params: Params, runs: int, command: str
) -> dict[str, Any]:
    workloads = []
    for outcome in outcomes:
        wl = outcome.workload
        variants = []
        for variant in wl.variants:
            name = variant.name
            entry: dict[str, Any] = {"name": name}
            if name in outcome.skipped:
                entry["skipped"] = outcome.skipped[name]
            else:
                entry["metrics"] = {
                    m.key: {
                        "unit": m.unit,
                        "higher_is_better": m.higher_is_better,
                        "median": outcome.median(name, m.key),
                        "runs": outcome.values(name, m.key),
                    }
                    for m in wl.metrics
                    if outcome.values(name, m.key)
                }
                if name != wl.subject:
                    entry[f"{wl.compare}_of_{wl.subject}"] = outcome.paired(
                        wl.subject, name, wl.primary.key, wl.compare
                    )
            variants.append(entry)
        targets = []
        for target in wl.targets:
            value = outcome.target_value(target)
            targets.append(
                {
                    "metric": target.metric,
                    "target": target.describe(wl.metric(target.metric).unit),
                    "value": value,
                    "met": None if value is None else target.holds(value),
                }
            )
        workloads.append(
            {
                "key": wl.key,
                "title": wl.title,
                "description": wl.description,
                "primary_metric": wl.primary.key,
                "variants": variants,
                "targets": targets,
            }
        )
    return {
        "command": command,
        "runs": runs,
        "params": params.__dict__,
        "environment": environment(),
        "workloads": workloads,
    }


def _reduced_sizes(params: Params) -> list[str]:
    """A note for the report when the sizes differ from the ones the targets are stated for."""
    default = Params()
    changed = [
        f"{name}={value}"
        for name, value in params.__dict__.items()
        if value != getattr(default, name)
    ]
    if not changed:
        return []
    return [
        f"Sizes differ from the defaults above: {', '.join(changed)} (e.g. `--quick`).",
        "",
    ]


def _markdown(
    outcomes: Sequence[Outcome],
    params: Params,
    runs: int,
    command: str,
    reference: str,
    chart: str | None,
) -> str:
    env = environment()
    results = [
        (r.workload, r.variant, r.median, r.spread, r.others, r.versus) for r in _rows(outcomes)
    ]
    targets = [
        (t.workload, t.metric, t.target, t.measured, t.verdict) for t in _target_rows(outcomes)
    ]
    parts = [
        "# mcs benchmark report",
        "",
        f"Command: `{command}`",
        "",
        f"Measured {env['date']} on {env['cpu']} ({env['cpu_count']} CPUs), "
        f"{env['implementation']} {env['python']}, trio {env['trio']}, {env['platform']}; "
        f"cyclic GC {'on' if env['gc_enabled'] else 'off'}; load average at the end "
        f"{env['load_average']} (other processes competing for the cores make absolute numbers, "
        "latency above all, noisier; paired ratios less so).",
        "",
        f"Every variant ran {runs} times (or n, where the table says fewer), interleaved with "
        "its baselines within each run (order rotated between runs), each in a fresh "
        "`trio.run` / `asyncio.run`. The table shows medians; ratios are medians of the "
        "per-run ratios (mcs / baseline).",
        "",
        "## Workloads",
        "",
        *(
            f"- **{o.workload.key}** ({o.workload.title}): {o.workload.description}"
            for o in outcomes
        ),
        "",
        *_reduced_sizes(params),
        "## Results",
        "",
        _md_table(_RESULT_HEADER, results),
        "",
        "## Targets",
        "",
        _md_table(_TARGET_HEADER, targets),
        "",
    ]
    if chart is not None:
        parts += [f"![medians]({chart})", ""]
    parts += [reference.strip(), ""]
    parts += [
        "## Parameters",
        "",
        "```json",
        json.dumps(params.__dict__, indent=2),
        "```",
        "",
    ]
    return "\n".join(parts)


def _chart(outcomes: Sequence[Outcome], runs: int, path: Path) -> str | None:
    """Write the bar chart; return None, or why it was not written."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed; no chart written"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [
        o
        for o in outcomes
        if any(o.values(v.name, o.workload.primary.key) for v in o.workload.variants)
    ]
    if not shown:
        return "nothing measured; no chart written"
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax, outcome in zip(axes.flat, shown, strict=False):
        wl = outcome.workload
        metric = wl.primary
        names = [v.name for v in wl.variants if outcome.values(v.name, metric.key)]
        medians = [outcome.median(n, metric.key) for n in names]
        low = [m - min(outcome.values(n, metric.key)) for n, m in zip(names, medians, strict=True)]
        high = [max(outcome.values(n, metric.key)) - m for n, m in zip(names, medians, strict=True)]
        colors = ["tab:blue" if n == wl.subject else "tab:gray" for n in names]
        bars = ax.bar(range(len(names)), medians, yerr=[low, high], capsize=4, color=colors)
        ax.bar_label(bars, labels=[_format(m, metric.unit) for m in medians], fontsize=8)
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        better = "higher" if metric.higher_is_better else "lower"
        ax.set_title(f"{wl.key}: {metric.name} ({better} is better)", fontsize=10)
        ax.set_ylabel(metric.unit)
        if max(m + h for m, h in zip(medians, high, strict=True)) > 20 * max(medians):
            ax.set_yscale("log")  # one wild run would flatten every bar
        shown_targets = [t for t in wl.targets if t.metric == metric.key]
        for k, target in enumerate(shown_targets):
            if target.baseline is None:
                level = target.bound
            elif target.baseline in names:
                base = outcome.median(target.baseline, metric.key)
                level = base * target.bound if target.relation == "ratio" else base + target.bound
            else:
                continue
            ax.axhline(level, linestyle="--", linewidth=1, color="tab:red")
            ax.annotate(
                "target: " + target.describe(metric.unit),
                (0.99 if k % 2 else 0.01, level),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="tab:red",
                ha="right" if k % 2 else "left",
                va="bottom",
            )
    fig.suptitle(f"mcs benchmarks: medians of {runs} runs (bars: min..max)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_reports(
    outcomes: Sequence[Outcome],
    params: Params,
    runs: int,
    out: Path,
    command: str,
    reference: str,
    log: Callable[[str], None],
) -> list[Path]:
    """Write report.md, report.json and report.png under ``out``; return what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    png = out / "report.png"
    problem = _chart(outcomes, runs, png)
    if problem is None:
        written.append(png)
    else:
        log(problem)
    md = out / "report.md"
    md.write_text(
        _markdown(
            outcomes, params, runs, command, reference, png.name if problem is None else None
        ),
        encoding="utf-8",
    )
    written.append(md)
    js = out / "report.json"
    js.write_text(
        json.dumps(_json_report(outcomes, params, runs, command), indent=2) + "\n",
        encoding="utf-8",
    )
    written.append(js)
    return written

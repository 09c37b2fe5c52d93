"""``python -m bench.traced [bench options]``: the benchmarks with OpenTelemetry tracing on.

A tracer provider of the OpenTelemetry SDK is set before anything runs, with a batch span
processor and an exporter that drops what it is given: every batch then opens, links and ends
its ``mcs.batch`` span as in production, and the cost measured is mcs's and the SDK's, not a
collector's. Compare with ``python -m bench`` in the same session.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from .__main__ import main


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _trace_everything() -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Drop()))
    trace.set_tracer_provider(provider)
    return provider


if __name__ == "__main__":
    provider = _trace_everything()
    try:
        status = main()
    finally:
        provider.shutdown()
    raise SystemExit(status)

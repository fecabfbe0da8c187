"""Optional OpenTelemetry traces (the ``otel`` extra): one trace per inference request,
across the agent, its escalation and the fallback (W3C ``traceparent`` on the wire).

Off by default, and then free: no opentelemetry import, ``span`` hands back one shared
null context and ``inject`` / ``annotate`` return at once. ``setup`` (``fogline --trace``,
or ``OTEL_TRACES_EXPORTER`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` in the environment) turns
it on for the process with the SDK; tests call ``use`` with their own provider. Only
inference is traced: health and metrics probes would bury the traces that matter.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from common.errors import FoglineError
from common.inference import DEGRADED, ESCALATION_REASON, MODEL_VERSION, SERVED_BY

logger = logging.getLogger(__name__)

INSTALL_OTEL = "pip install 'fogline[otel]'"
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_propagator: Any = None  # the W3C trace-context propagator, likewise
# Response parameters recorded on the inference span, under the same names.
_RESPONSE_ATTRIBUTES = (MODEL_VERSION, SERVED_BY, ESCALATION_REASON, DEGRADED)
# Attribute values come from callers (a model name in the URL) and from the fallback's
# answer: each is cut here, since the SDK keeps every span until export at any size.
MAX_ATTRIBUTE_CHARS = 256


class MissingExtraError(FoglineError):
    """Tracing was asked for, but the otel extra is not installed."""


def enabled() -> bool:
    return _tracer is not None


def wanted(flag: bool, environ: Mapping[str, str]) -> bool:
    """``--trace``, or the standard OTEL variables that name an exporter or an endpoint."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return flag or (exporter not in ("", "none")) or bool(endpoint)


def setup(service_name: str, environ: Mapping[str, str]) -> None:
    """Trace this process through the SDK: OTLP when its exporter package is installed
    (``OTEL_EXPORTER_OTLP_*`` configure it), else spans as JSON lines on stderr
    (``OTEL_TRACES_EXPORTER=console`` asks for that). MissingExtraError without the SDK."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise MissingExtraError(
            f"tracing needs the otel extra ({exc.name} is missing): {INSTALL_OTEL}"
        ) from None
    name = environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    exporter: Any = None
    if environ.get("OTEL_TRACES_EXPORTER", "").lower() != "console":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        except ImportError:
            logger.warning(
                "no OTLP exporter installed (pip install opentelemetry-exporter-otlp-proto-http)"
                ": spans go to stderr"
            )
    provider.add_span_processor(BatchSpanProcessor(exporter or ConsoleSpanExporter(out=sys.stderr)))
    atexit.register(provider.shutdown)  # the last batch goes out on exit
    use(provider)


def use(provider: Any) -> None:
    """Trace through ``provider`` (an SDK TracerProvider); ``None`` turns tracing off."""
    global _tracer, _propagator
    if provider is None:
        _tracer = _propagator = None
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _tracer = provider.get_tracer("fogline")
    _propagator = TraceContextTextMapPropagator()


def span(
    name: str,
    *,
    kind: str = "internal",
    carrier: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[Any]:
    """A span, current while the block runs (``None`` when tracing is off).

    ``carrier``: incoming headers; their ``traceparent`` makes this span its child.
    """
    if _tracer is None:
        return _NO_SPAN
    return _start(name, kind, carrier, attributes)


@contextlib.contextmanager
def _start(
    name: str, kind: str, carrier: Mapping[str, str] | None, attributes: Mapping[str, Any] | None
) -> Iterator[Any]:
    from opentelemetry.trace import SpanKind

    context = _propagator.extract(carrier) if carrier is not None else None
    with _tracer.start_as_current_span(
        name, context=context, kind=SpanKind[kind.upper()], attributes=_clean(attributes or {})
    ) as current:
        yield current


def inject(headers: MutableMapping[str, str]) -> None:
    """Add ``traceparent`` (and ``tracestate``) of the current span to outgoing headers."""
    if _propagator is not None:
        _propagator.inject(headers)


def annotate(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (None values are left out)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(_clean(attributes))


def annotate_response(parameters: Mapping[str, Any]) -> None:
    """Record who served an inference, which version, and why it escalated."""
    if _tracer is not None:
        annotate({key: parameters.get(key) for key in _RESPONSE_ATTRIBUTES})


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, bool | int | float) else str(v)[:MAX_ATTRIBUTE_CHARS]
        for k, v in attributes.items()
        if v is not None
    }

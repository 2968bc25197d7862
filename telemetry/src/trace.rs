//! OpenTelemetry tracing: the exporter set up from the standard variables, W3C trace-context
//! propagation, and the trace of a run.
//!
//! **One trace per run.** A run's trace id *is* its run id (a UUID is 128 bits, like a trace
//! id), and its root span's id is derived from the run id ([`run_context`]). So every process
//! that touches the run — the coordinator that dispatches each attempt, decides and applies the
//! result, the workers that execute it, a coordinator that took over after a failover — puts
//! its spans into the same trace without asking anyone: one click in Jaeger or Tempo shows the
//! partition's whole story, retries included. (A trace per attempt linked to the run was the
//! alternative; it splits a retried step across traces and needs a search to put them back.)
//! The root `run` span itself is emitted when the run ends ([`emit_run_span`]), with the run's
//! start time; until then its children show under a parent still to come.
//!
//! The settings are the standard ones: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns tracing on; `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`http/protobuf`, the default, or `grpc`), `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`; `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn it off again.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracer, SdkTracerProvider,
    ShouldSample,
};
use uuid::Uuid;

pub use opentelemetry::trace::{Span as _, SpanKind, Status};
pub use opentelemetry::{Context, KeyValue};
pub use opentelemetry_sdk::trace::Span;

/// The logical destination names in span names (`publish steps`, `process results`): the same
/// in fleet and local mode and whatever the queue prefix, so a trace reads the same in both and
/// span names stay few. The real exchange, routing key and queue are attributes.
pub const STEPS: &str = "steps";
/// See [`STEPS`].
pub const RESULTS: &str = "results";

static ENABLED: AtomicBool = AtomicBool::new(false);
static STATE: OnceLock<State> = OnceLock::new();

struct State {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// The configured sampler, asked once per run (its root decides for the whole trace).
    sampler: Sampler,
}

/// Whether spans are exported. Every helper here checks it first, so code that makes spans
/// costs a relaxed load when tracing is off.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The tracer, when tracing is on.
pub fn tracer() -> Option<&'static SdkTracer> {
    if !enabled() {
        return None;
    }
    STATE.get().map(|s| &s.tracer)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Builds the exporter and the provider when the environment asks for traces; `None` when it
/// does not. Called by [`crate::init`].
pub(crate) fn setup(service: &'static str) -> anyhow::Result<Option<SdkTracer>> {
    let endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    if endpoint.is_none() || disabled {
        return Ok(None);
    }
    if let Some(exporter) = env("OTEL_TRACES_EXPORTER")
        && !exporter.eq_ignore_ascii_case("otlp")
    {
        bail!("`OTEL_TRACES_EXPORTER={exporter}` is not supported: use `otlp` or `none`");
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = env(var)
            && !matches!(p.as_str(), "http/protobuf" | "grpc")
        {
            bail!("`{var}={p}` is not supported: use `http/protobuf` (the default) or `grpc`");
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .context("check OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_EXPORTER_OTLP_PROTOCOL")?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let mut resource = opentelemetry_sdk::Resource::builder();
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name(service);
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler_from_env()?)
        .with_id_generator(RunIds)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("warpline");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let state = State {
        provider,
        tracer: tracer.clone(),
        sampler: sampler_from_env()?,
    };
    if STATE.set(state).is_err() {
        bail!("tracing was set up twice");
    }
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some(tracer))
}

/// `OTEL_TRACES_SAMPLER` (+ `_ARG`), as the specification names them; default
/// `parentbased_always_on`.
fn sampler_from_env() -> anyhow::Result<Sampler> {
    let arg = || -> anyhow::Result<f64> {
        match env("OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(1.0),
            Some(a) => a
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .with_context(|| {
                    format!("`OTEL_TRACES_SAMPLER_ARG={a}` must be a ratio between 0 and 1")
                }),
        }
    };
    let name = env("OTEL_TRACES_SAMPLER").unwrap_or_else(|| "parentbased_always_on".into());
    Ok(match name.as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(arg()?),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(arg()?)))
        }
        other => bail!(
            "`OTEL_TRACES_SAMPLER={other}` is not supported: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
        ),
    })
}

/// Exports what is buffered (at most 5 s) and stops the exporter.
pub(crate) async fn shutdown() {
    let Some(state) = STATE.get() else { return };
    ENABLED.store(false, Ordering::Relaxed);
    let provider = state.provider.clone();
    // The batch processor runs on this runtime; the provider's shutdown blocks until it has
    // exported, so it must not block a runtime thread.
    let done =
        tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5)))
            .await;
    if let Ok(Err(e)) = done {
        eprintln!("warning: not every span could be exported before exit: {e}");
    }
}

thread_local! {
    /// Ids the next span built on this thread must take (the run's root span).
    static NEXT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Random ids, except for a run's root span, whose ids are the run's ([`emit_run_span`]).
#[derive(Debug)]
struct RunIds;

impl IdGenerator for RunIds {
    fn new_trace_id(&self) -> TraceId {
        match NEXT_IDS.with(Cell::get) {
            Some((t, _)) => t,
            None => RandomIdGenerator::default().new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match NEXT_IDS.with(Cell::get) {
            Some((_, s)) => s,
            None => RandomIdGenerator::default().new_span_id(),
        }
    }
}

/// The trace id of a run: its id.
pub fn run_trace_id(run_id: Uuid) -> TraceId {
    TraceId::from_bytes(*run_id.as_bytes())
}

/// The span id of a run's root span: the run id's last 8 bytes (random in a v7 UUID).
pub fn run_span_id(run_id: Uuid) -> SpanId {
    let b = run_id.as_bytes();
    let mut id: [u8; 8] = b[8..16].try_into().expect("8 bytes");
    if id == [0; 8] {
        id[7] = 1;
    }
    SpanId::from_bytes(id)
}

/// The parent of every top-level span of a run: its root span, as a remote context, sampled
/// as the configured sampler decides for the run's trace id.
pub fn run_context(run_id: Uuid) -> Context {
    let Some(state) = STATE.get().filter(|_| enabled()) else {
        return Context::new();
    };
    let trace_id = run_trace_id(run_id);
    let sampled = state
        .sampler
        .should_sample(None, trace_id, "run", &SpanKind::Internal, &[], &[])
        .decision
        == SamplingDecision::RecordAndSample;
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let sc = SpanContext::new(
        trace_id,
        run_span_id(run_id),
        flags,
        true,
        TraceState::default(),
    );
    Context::new().with_remote_span_context(sc)
}

/// Starts a span of `kind` under `parent`; `None` when tracing is off.
pub fn start(
    name: impl Into<std::borrow::Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    attributes: Vec<KeyValue>,
) -> Option<Span> {
    let tracer = tracer()?;
    Some(
        tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(tracer, parent),
    )
}

/// A span that already happened (an agent's decision, known from its audit record).
pub fn record_past(
    name: impl Into<std::borrow::Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    status: Status,
) {
    record_past_in(name, kind, parent, start, end, attributes, status);
}

/// [`record_past`], returning the context that holds the (ended) span, to parent children.
pub fn record_past_in(
    name: impl Into<std::borrow::Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    status: Status,
) -> Option<Context> {
    let tracer = tracer()?;
    let mut span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    span.set_status(status);
    span.end_with_timestamp(end);
    Some(parent.with_span(span))
}

/// Emits a run's root span (`run`) when the run ends: trace id and span id are the run's, so
/// it becomes the parent every span of the run already named.
pub fn emit_run_span(
    run_id: Uuid,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    status: Status,
) {
    let Some(tracer) = tracer() else { return };
    // Sampled or not as the run's children were.
    if !run_context(run_id).span().span_context().is_sampled() {
        return;
    }
    NEXT_IDS.with(|c| c.set(Some((run_trace_id(run_id), run_span_id(run_id)))));
    let mut span = tracer
        .span_builder("run")
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, &Context::new());
    NEXT_IDS.with(|c| c.set(None));
    span.set_status(status);
    span.end_with_timestamp(end);
}

/// The span context of `cx` as W3C `traceparent` (and `tracestate` when not empty); empty when
/// tracing is off or `cx` holds no span.
pub fn inject(cx: &Context) -> BTreeMap<String, String> {
    let mut carrier = Carrier(BTreeMap::new());
    if enabled() && cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut carrier);
    }
    carrier.0
}

/// The remote context named by `traceparent`/`tracestate` in `carrier` (an empty context when
/// there is none or it does not parse).
pub fn extract(carrier: &BTreeMap<String, String>) -> Context {
    if !enabled() || carrier.is_empty() {
        return Context::new();
    }
    let carrier = Carrier(carrier.clone());
    TraceContextPropagator::new().extract(&carrier)
}

/// The hex trace id of `cx`'s span, for log lines.
pub fn trace_id_of(cx: &Context) -> Option<String> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

struct Carrier(BTreeMap<String, String>);

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The W3C header names this crate writes and reads.
pub const PROPAGATION_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Starts a span of `kind` under `parent` and returns the context holding it (the parent of
/// its children, and what [`inject`] propagates); `None` when tracing is off. End it with
/// [`end`].
pub fn start_in(
    name: impl Into<std::borrow::Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    attributes: Vec<KeyValue>,
) -> Option<Context> {
    start(name, kind, parent, attributes).map(|span| parent.with_span(span))
}

/// Ends the span `cx` holds, with `status` and extra attributes known only at the end.
pub fn end(cx: &Context, status: Status, attributes: Vec<KeyValue>) {
    let span = cx.span();
    span.set_attributes(attributes);
    span.set_status(status);
    span.end();
}

/// The attributes the messaging semantic conventions give a RabbitMQ operation: `operation` is
/// `messaging.operation.name` (`publish`, `process`), `op_type` `messaging.operation.type`
/// (`send`, `process`), `exchange` `messaging.destination.name` (empty for the default
/// exchange).
pub fn rabbitmq_attributes(
    operation: &'static str,
    op_type: &'static str,
    exchange: &str,
    routing_key: &str,
    message_id: &str,
    body_size: usize,
) -> Vec<KeyValue> {
    vec![
        KeyValue::new("messaging.system", "rabbitmq"),
        KeyValue::new("messaging.operation.name", operation),
        KeyValue::new("messaging.operation.type", op_type),
        KeyValue::new("messaging.destination.name", exchange.to_string()),
        KeyValue::new(
            "messaging.rabbitmq.destination.routing_key",
            routing_key.to_string(),
        ),
        KeyValue::new("messaging.message.id", message_id.to_string()),
        KeyValue::new(
            "messaging.message.body.size",
            i64::try_from(body_size).unwrap_or(i64::MAX),
        ),
    ]
}

/// The attributes naming an attempt (`warpline.run.id`, `warpline.step.id`, `warpline.attempt`,
/// `warpline.attempt.id`).
pub fn attempt_attributes(spec: &warpline_shared::contracts::StepSpec) -> Vec<KeyValue> {
    vec![
        KeyValue::new("warpline.run.id", spec.run_id.to_string()),
        KeyValue::new("warpline.step.id", spec.step_id.clone()),
        KeyValue::new("warpline.attempt", i64::from(spec.attempt)),
        KeyValue::new("warpline.attempt.id", spec.attempt_id.to_string()),
    ]
}

/// Where a StepSpec was taken from, for the worker's `process steps` span.
pub struct Delivery<'a> {
    /// `messaging.system`: `rabbitmq`, or `warpline.local` for local mode's channel.
    pub system: &'static str,
    /// The exchange it was published to.
    pub exchange: &'a str,
    /// Its routing key.
    pub routing_key: &'a str,
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// The broker's delivery tag (fleet mode).
    pub delivery_tag: Option<u64>,
    /// The body's size in bytes.
    pub body_size: usize,
    /// The worker (or local worker task).
    pub worker_id: &'a str,
}

/// Starts a worker's `process steps` span (CONSUMER) for `spec`, continuing `parent` (the
/// coordinator's `publish steps`, extracted from the message). `None` when tracing is off.
pub fn process_step(
    parent: &Context,
    spec: &warpline_shared::contracts::StepSpec,
    from: &Delivery<'_>,
) -> Option<Context> {
    if !enabled() {
        return None;
    }
    let mut attributes = rabbitmq_attributes(
        "process",
        "process",
        from.exchange,
        from.routing_key,
        &spec.attempt_id.to_string(),
        from.body_size,
    );
    attributes[0] = KeyValue::new("messaging.system", from.system);
    attributes.push(KeyValue::new(
        "messaging.destination.subscription.name",
        from.queue.to_string(),
    ));
    if let Some(tag) = from.delivery_tag {
        attributes.push(KeyValue::new(
            "messaging.rabbitmq.message.delivery_tag",
            i64::try_from(tag).unwrap_or(i64::MAX),
        ));
    }
    attributes.extend(attempt_attributes(spec));
    attributes.push(KeyValue::new(
        "warpline.worker.id",
        from.worker_id.to_string(),
    ));
    attributes.push(KeyValue::new("warpline.command", spec.command.clone()));
    start_in(
        format!("process {STEPS}"),
        SpanKind::Consumer,
        parent,
        attributes,
    )
}

/// Starts the worker's `publish results` span (PRODUCER) under its `process steps` span;
/// its context goes in the result message's headers.
pub fn publish_result(
    process: &Context,
    outcome: &warpline_shared::contracts::StepOutcome,
    system: &'static str,
    routing_key: &str,
    body_size: usize,
) -> Option<Context> {
    if !enabled() {
        return None;
    }
    let message_id = outcome
        .result
        .attempt_id
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut attributes =
        rabbitmq_attributes("publish", "send", "", routing_key, &message_id, body_size);
    attributes[0] = KeyValue::new("messaging.system", system);
    attributes.push(KeyValue::new(
        "warpline.outcome",
        crate::outcome_label(outcome),
    ));
    start_in(
        format!("publish {RESULTS}"),
        SpanKind::Producer,
        process,
        attributes,
    )
}

/// Ends the `process steps` span with the attempt's outcome.
pub fn end_process(process: &Context, outcome: &warpline_shared::contracts::StepOutcome) {
    end(
        process,
        Status::Ok,
        vec![
            KeyValue::new("warpline.outcome", crate::outcome_label(outcome)),
            KeyValue::new("process.exit.code", i64::from(outcome.result.exit_code)),
        ],
    );
}

/// Emits the two children of a worker's `process` span that the executor's own timestamps
/// bound: `run {step}` (the tool, from `started_at` to `finished_at` of the result) and
/// `validate {step}` (dynamic artefacts, `sql` measurements, the validators and the failure
/// classification: from the tool's end until `checked`, when the executor returned). An
/// attempt refused before its tool started has neither (its result has no `started_at`).
pub fn step_children(
    process: &Context,
    outcome: &warpline_shared::contracts::StepOutcome,
    checked: SystemTime,
) {
    if !enabled() {
        return;
    }
    let r = &outcome.result;
    let (Some(started), Some(finished)) = (r.started_at, r.finished_at) else {
        return;
    };
    let (started, finished) = (SystemTime::from(started), SystemTime::from(finished));
    let mut attributes = vec![
        KeyValue::new("process.exit.code", i64::from(r.exit_code)),
        KeyValue::new("warpline.step.timed_out", r.timed_out),
        KeyValue::new("warpline.outcome", crate::outcome_label(outcome)),
    ];
    if let Some(program) = &r.program {
        attributes.push(KeyValue::new("process.executable.path", program.clone()));
    }
    if let Some(signal) = r.signal {
        attributes.push(KeyValue::new("warpline.step.signal", i64::from(signal)));
    }
    let ran_ok = r.exit_code == 0 && !r.timed_out;
    record_past(
        format!("run {}", r.step_id),
        SpanKind::Internal,
        process,
        started,
        finished,
        attributes,
        if ran_ok {
            Status::Ok
        } else {
            Status::error(match &r.error {
                Some(e) => e.clone(),
                None if r.timed_out => "timed out".to_string(),
                None => format!("exit code {}", r.exit_code),
            })
        },
    );
    let checks = &outcome.report.checks;
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    let mut attributes = vec![
        KeyValue::new("warpline.checks.total", checks.len() as i64),
        KeyValue::new("warpline.checks.failed", failed.len() as i64),
        KeyValue::new(
            "warpline.report.status",
            format!("{:?}", outcome.report.status).to_lowercase(),
        ),
    ];
    if !failed.is_empty() {
        attributes.push(KeyValue::new(
            "warpline.checks.failed_names",
            failed.join(","),
        ));
    }
    let report_ok = outcome.report.status != warpline_shared::contracts::ReportStatus::Fail;
    record_past(
        format!("validate {}", r.step_id),
        SpanKind::Internal,
        process,
        finished,
        checked.max(finished),
        attributes,
        if report_ok {
            Status::Ok
        } else {
            Status::error("an error check failed")
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_has_one_trace_id_and_one_root_span_id() {
        let run = Uuid::now_v7();
        assert_eq!(run_trace_id(run).to_bytes(), *run.as_bytes());
        assert_eq!(run_span_id(run), run_span_id(run));
        assert_ne!(run_span_id(run), SpanId::INVALID);
    }

    #[test]
    fn nothing_is_propagated_when_tracing_is_off() {
        assert!(!enabled());
        assert!(inject(&run_context(Uuid::now_v7())).is_empty());
        let carrier = BTreeMap::from([(
            "traceparent".to_string(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string(),
        )]);
        assert!(!extract(&carrier).span().span_context().is_valid());
    }
}

//! The coordinator's spans of a run's trace (one trace per run: its id is the run id, see
//! `warpline_telemetry::trace`).
//!
//! - [`publish`]: the PRODUCER span of each StepSpec sent (`publish steps`), a child of the
//!   run's root; its W3C context is what the worker continues (AMQP headers in fleet mode,
//!   `StepSpec.trace` in local mode).
//! - [`process_result`]: the CONSUMER span of a result taken in (`process results`), a child of
//!   the worker's `publish results` span; it ends when the turn that applied the result has
//!   committed (the result's acknowledgement).
//! - [`TraceObserver`]: the spans known from *committed* audit records: each supervisor
//!   decision (`decide STEP`, and for an LLM its `chat MODEL` call with the GenAI attribute
//!   names) and the run's root span (`run`) when the run ends. Built from the audit log, they
//!   say only what the store holds, and a coordinator that took over after a failover emits them
//!   just the same.
//!
//! Every function returns at once when tracing is off, before building any attribute.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::contracts::{StepOutcome, StepSpec};
use warpline_shared::machine::RunStatus;
use warpline_telemetry::trace::{self, Context, KeyValue, SpanKind, Status};

use crate::engine::Observer;

/// Starts the `publish steps` span of `spec` (sent to `exchange` with `routing_key`), under
/// its run's root. `None` when tracing is off.
pub fn publish(
    spec: &StepSpec,
    system: &'static str,
    exchange: &str,
    routing_key: &str,
    body_size: usize,
) -> Option<Context> {
    if !trace::enabled() {
        return None;
    }
    let mut attributes = trace::rabbitmq_attributes(
        "publish",
        "send",
        exchange,
        routing_key,
        &spec.attempt_id.to_string(),
        body_size,
    );
    attributes[0] = KeyValue::new("messaging.system", system);
    attributes.extend(trace::attempt_attributes(spec));
    attributes.push(KeyValue::new("warpline.pool", spec.pool.clone()));
    trace::start_in(
        format!("publish {}", trace::STEPS),
        SpanKind::Producer,
        &trace::run_context(spec.run_id),
        attributes,
    )
}

/// Starts the `process results` span of a result that arrived with the W3C context `carrier`
/// (the worker's `publish results` span; the run's root when the message carries none).
pub fn process_result(
    carrier: &BTreeMap<String, String>,
    outcome: &StepOutcome,
    system: &'static str,
    queue: &str,
    body_size: usize,
) -> Option<Context> {
    if !trace::enabled() {
        return None;
    }
    let r = &outcome.result;
    let mut parent = trace::extract(carrier);
    if trace::trace_id_of(&parent).is_none()
        && let Some(run_id) = r.run_id
    {
        parent = trace::run_context(run_id);
    }
    let message_id = r.attempt_id.map(|a| a.to_string()).unwrap_or_default();
    let mut attributes =
        trace::rabbitmq_attributes("process", "process", "", queue, &message_id, body_size);
    attributes[0] = KeyValue::new("messaging.system", system);
    attributes.push(KeyValue::new(
        "messaging.destination.subscription.name",
        queue.to_string(),
    ));
    attributes.push(KeyValue::new("warpline.step.id", r.step_id.clone()));
    attributes.push(KeyValue::new("warpline.attempt", i64::from(r.attempt)));
    attributes.push(KeyValue::new(
        "warpline.outcome",
        warpline_telemetry::outcome_label(outcome),
    ));
    if let Some(run_id) = r.run_id {
        attributes.push(KeyValue::new("warpline.run.id", run_id.to_string()));
    }
    trace::start_in(
        format!("process {}", trace::RESULTS),
        SpanKind::Consumer,
        &parent,
        attributes,
    )
}

/// Wraps an acknowledgement so that it also ends `span` (the result's `process results`):
/// the engine runs it once the turn that applied the result has committed.
pub fn ending_on_ack(span: Option<Context>, ack: crate::engine::Ack) -> crate::engine::Ack {
    match span {
        None => ack,
        Some(cx) => Box::new(move || {
            ack();
            trace::end(&cx, Status::Ok, Vec::new());
        }),
    }
}

/// Emits the decision and run spans of committed audit records, then shows the records to the
/// observer it wraps.
pub struct TraceObserver {
    inner: Box<dyn Observer>,
}

impl TraceObserver {
    /// Wraps `inner`; when tracing is off, the wrapper is `inner` itself.
    pub fn wrap(inner: Box<dyn Observer>) -> Box<dyn Observer> {
        if trace::enabled() {
            Box::new(TraceObserver { inner })
        } else {
            inner
        }
    }
}

impl Observer for TraceObserver {
    fn on_record(&mut self, record: &AuditRecord) {
        if let Some(run_id) = record.run_id {
            emit(run_id, record);
        }
        self.inner.on_record(record);
    }

    fn finish(&mut self) {
        self.inner.finish();
    }

    fn forget(&mut self, backfill_id: Uuid, runs: &[Uuid]) {
        self.inner.forget(backfill_id, runs);
    }
}

fn emit(run_id: Uuid, record: &AuditRecord) {
    let at = SystemTime::from(record.ts);
    match &record.event {
        AuditEvent::Decision {
            step_id,
            attempt,
            agent,
            model,
            decision,
            latency_ms,
            tokens,
            fallback,
            requests,
            ..
        } => {
            let start = at
                .checked_sub(Duration::from_millis(*latency_ms))
                .unwrap_or(at);
            let action = decision.action.as_str();
            let mut attributes = vec![
                KeyValue::new("warpline.run.id", run_id.to_string()),
                KeyValue::new("warpline.step.id", step_id.clone()),
                KeyValue::new("warpline.attempt", i64::from(*attempt)),
                KeyValue::new("warpline.decision.agent", agent.clone()),
                KeyValue::new("warpline.decision.action", action),
                KeyValue::new("warpline.decision.latency_ms", *latency_ms as i64),
            ];
            if let Some(why) = fallback {
                attributes.push(KeyValue::new("warpline.decision.fallback", why.clone()));
            }
            let decide_cx = trace::record_past_in(
                format!("decide {step_id}"),
                SpanKind::Internal,
                &trace::run_context(run_id),
                start,
                at,
                attributes,
                Status::Ok,
            );
            if let Some(model) = model {
                let mut attributes = vec![
                    KeyValue::new("gen_ai.operation.name", "chat"),
                    KeyValue::new("gen_ai.request.model", model.clone()),
                    KeyValue::new("gen_ai.response.model", model.clone()),
                ];
                if let Some(t) = tokens {
                    attributes.push(KeyValue::new("gen_ai.usage.input_tokens", t.input as i64));
                    attributes.push(KeyValue::new("gen_ai.usage.output_tokens", t.output as i64));
                }
                if let Some(n) = requests {
                    attributes.push(KeyValue::new("warpline.llm.requests", i64::from(*n)));
                }
                let status = match fallback {
                    // The model's answer was not used: another agent stood in.
                    Some(why) => {
                        attributes.push(KeyValue::new("error.type", "fallback"));
                        Status::error(why.clone())
                    }
                    None => Status::Ok,
                };
                if let Some(cx) = decide_cx {
                    trace::record_past(
                        format!("chat {model}"),
                        SpanKind::Client,
                        &cx,
                        start,
                        at,
                        attributes,
                        status,
                    );
                }
            }
        }
        AuditEvent::RunFinished {
            state,
            step_id,
            reason,
        } => {
            let start = run_id
                .get_timestamp()
                .map(|t| {
                    let (s, n) = t.to_unix();
                    UNIX_EPOCH + Duration::new(s, n)
                })
                .filter(|s| *s <= at)
                .unwrap_or(at);
            let mut attributes = vec![
                KeyValue::new("warpline.run.id", run_id.to_string()),
                KeyValue::new("warpline.run.state", state.to_string()),
            ];
            if let Some(b) = record.backfill_id {
                attributes.push(KeyValue::new("warpline.backfill.id", b.to_string()));
            }
            if let Some(s) = step_id {
                attributes.push(KeyValue::new("warpline.step.id", s.clone()));
            }
            let status = match state {
                RunStatus::Complete => Status::Ok,
                _ => {
                    attributes.push(KeyValue::new("warpline.run.reason", reason.clone()));
                    if *state == RunStatus::Halted {
                        Status::error(reason.clone())
                    } else {
                        Status::Unset
                    }
                }
            };
            trace::emit_run_span(run_id, start, at, attributes, status);
        }
        _ => {}
    }
}

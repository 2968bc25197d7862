use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::StepSpec;
use warpline_shared::partition::Partition;

use super::*;
use crate::audit_log::AuditLog;
use crate::progress::Quiet;
use crate::supervisor::RulesAgent;

/// A transport that drops every spec: these tests never run a step.
struct Nowhere;

impl Transport for Nowhere {
    fn dispatch(&mut self, _: StepSpec) -> anyhow::Result<()> {
        Ok(())
    }
}

fn engine(dir: &std::path::Path) -> Engine {
    let (tx, _) = mpsc::unbounded_channel();
    Engine::new(
        EngineConfig {
            exit_when_idle: false,
        },
        Arc::new(RulesAgent),
        Box::new(AuditLog::open(dir.join("audit.jsonl")).unwrap()),
        Box::new(Nowhere),
        Box::new(Quiet),
        tx,
    )
}

fn backfill(dir: &std::path::Path) -> BackfillRequest {
    let config = r#"{"name": "p", "steps": [{"id": "A", "command": "true"}]}"#;
    let pipeline = Pipeline::from_json(&dir.join("p.json"), config).unwrap();
    BackfillRequest {
        id: Uuid::now_v7(),
        pipeline: Arc::new(pipeline),
        partitions: vec![Partition {
            month: None,
            dataset: Some("a".into()),
        }],
        max_parallel: 1,
        priority: 0,
    }
}

#[test]
fn requests_whose_client_gave_up_are_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = engine(dir.path());
    let (reply, gave_up) = oneshot::channel();
    drop(gave_up);
    engine.handle(Event::Submit(Box::new(backfill(dir.path())), Some(reply)));
    assert!(
        engine.backfills.is_empty(),
        "a submit answered 503 took effect"
    );

    let id = engine.submit(backfill(dir.path()));
    let (reply, gave_up) = oneshot::channel();
    drop(gave_up);
    let cancel = OperatorCommand::Cancel { backfill_id: id };
    engine.handle(Event::Operator(cancel, reply));
    assert!(
        !engine.backfills[&id].rec.cancelling,
        "a cancel answered 503 took effect"
    );

    let (reply, mut answer) = oneshot::channel();
    engine.handle(Event::Operator(
        OperatorCommand::Cancel { backfill_id: id },
        reply,
    ));
    assert!(engine.backfills[&id].rec.cancelling);
    assert!(matches!(engine.effects.last(), Some(Effect::Reply(..))));
    assert!(
        answer.try_recv().is_err(),
        "answered only after the turn commits"
    );
}

#[test]
fn bound_tail_keeps_the_end_on_a_char_boundary() {
    let mut s = "é".repeat(10);
    bound_tail(&mut s, 5);
    assert!(s.ends_with("éé"), "{s}");
    assert!(s.starts_with("[... "), "{s}");
    let mut short = "abc".to_string();
    bound_tail(&mut short, 5);
    assert_eq!(short, "abc");
}

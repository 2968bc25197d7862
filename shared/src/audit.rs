//! The audit log's format: append-only JSONL, one event per line, hash-chained.
//!
//! A line is the JSON of an [`AuditRecord`] with one extra first field, `hash`:
//! `{"hash":"<sha256 hex>","seq":7,"ts":…,"prev_hash":"<hash of line 6>",…}`. The hash covers
//! the rest of the line exactly as written (the body: the same JSON without the `hash` field),
//! and the body carries the previous line's hash, so editing, removing or reordering any line
//! breaks the chain at that line. [`verify`] names the first line that does not hold.
//!
//! This module only formats and checks; the coordinator owns the writer.

use std::io::BufRead;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::contracts::{Action, PipelineState, StepOutcome, SupervisorDecision};
use crate::machine::RunStatus;
use crate::partition::Partition;
use crate::stage::RunScope;

/// The `prev_hash` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit line, without its own hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditRecord {
    /// 1-based line number in the log.
    pub seq: u64,
    /// When the coordinator recorded it.
    pub ts: DateTime<Utc>,
    /// The hash of the previous line ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// The backfill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill_id: Option<Uuid>,
    /// The run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    /// What happened.
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// Token counts of one model call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub input: u64,
    /// Reply tokens.
    pub output: u64,
}

/// In shadow mode, the decision that was asked for but not applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShadowDecision {
    /// Which agent proposed it (`llm` or `rules`).
    pub agent: String,
    /// The model, for an LLM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Its proposal; absent when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<SupervisorDecision>,
    /// How long it took.
    #[serde(default)]
    pub latency_ms: u64,
    /// Tokens used, for an LLM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenUsage>,
    /// sha256 (hex) of the exact request body, for an LLM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_hash: Option<String>,
    /// The model's raw reply (bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_reply: Option<String>,
    /// Why the call failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether it proposed the same action as the applied decision (absent when it failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreed: Option<bool>,
}

/// Everything the audit log records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A backfill was accepted.
    BackfillCreated {
        /// The pipeline's name.
        pipeline: String,
        /// The config file.
        config: String,
        /// Number of runs.
        partitions: usize,
        /// The supervisor agent.
        agent: String,
    },
    /// A run was created.
    RunCreated {
        /// Its partition (for a backfill-level run: no month, the backfill's range in `vars`).
        partition: Partition,
        /// Which steps it runs: a partition's (omitted), or a group of backfill-level steps.
        #[serde(default, skip_serializing_if = "RunScope::is_partition_ref")]
        scope: RunScope,
    },
    /// A run changed state.
    Transition {
        /// State before.
        from: String,
        /// State after.
        to: String,
        /// The action that caused it, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        action: Option<Action>,
    },
    /// An attempt was sent to a worker.
    StepDispatched {
        /// The step.
        step_id: String,
        /// Attempt number.
        attempt: u32,
        /// Attempt id.
        attempt_id: Uuid,
        /// The program.
        command: String,
        /// Its argv.
        args: Vec<String>,
        /// Backoff waited before dispatch.
        #[serde(default)]
        delay_ms: u64,
    },
    /// A worker's result, with its report (log tail bounded).
    StepResult {
        /// The outcome as received.
        outcome: StepOutcome,
    },
    /// A result that did not answer the outstanding attempt.
    StaleResult {
        /// The step it named.
        step_id: String,
        /// The attempt it named.
        attempt_id: Option<Uuid>,
        /// Why it was ignored.
        reason: String,
    },
    /// An attempt got no result in time.
    AttemptLost {
        /// The step.
        step_id: String,
        /// Attempt number.
        attempt: u32,
        /// Attempt id.
        attempt_id: Uuid,
        /// Why it was declared lost.
        reason: String,
    },
    /// A worker refused an attempt it may not run (the command is not on its allowlist, or
    /// does not resolve on it) and handed it back: the coordinator withdraws the attempt
    /// without counting it and dispatches the step again for another worker, or, once the
    /// hand-backs are exhausted, escalates the run.
    StepHandedBack {
        /// The step.
        step_id: String,
        /// Attempt number (unchanged by the hand-back).
        attempt: u32,
        /// The attempt the worker refused.
        attempt_id: Uuid,
        /// The refusing worker.
        worker_id: String,
        /// Its reason, as the worker gave it.
        reason: String,
        /// Hand-backs of this step so far in this run (this one included).
        hand_backs: u32,
        /// What follows: `redispatch` (after `delay_ms`) or `escalate`.
        next: String,
        /// The wait before the step is dispatched again.
        #[serde(default)]
        delay_ms: u64,
    },
    /// The supervisor's decision, with its source.
    Decision {
        /// The step decided on.
        step_id: String,
        /// Its attempt number.
        attempt: u32,
        /// Which agent decided: `rules`, `always-proceed`, `llm`, `fast_path`, `operator`.
        agent: String,
        /// The model, for an LLM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        /// The decision as proposed.
        decision: SupervisorDecision,
        /// How long the agent took.
        latency_ms: u64,
        /// Tokens used, for an LLM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokens: Option<TokenUsage>,
        /// Why another agent stood in, if one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fallback: Option<String>,
        /// sha256 (hex) of the exact request body sent to the model, for an LLM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompt_hash: Option<String>,
        /// The model's raw reply as received (bounded), also when it could not be used.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        raw_reply: Option<String>,
        /// HTTP requests made for this decision (retries included), for an LLM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requests: Option<u32>,
        /// The run as the agent was shown it, so the decision can be replayed exactly.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<Box<PipelineState>>,
        /// In shadow mode, the other agent's proposal and whether the two agreed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shadow: Option<Box<ShadowDecision>>,
    },
    /// The guard replaced an illegal decision.
    GuardOverride {
        /// The step.
        step_id: String,
        /// What the agent proposed.
        proposed: Action,
        /// What was applied.
        applied: Action,
        /// Why.
        reason: String,
    },
    /// The run was parked for an operator.
    Escalated {
        /// The step.
        step_id: String,
        /// Why.
        reason: String,
    },
    /// An operator answered an escalation or acted on a run.
    OperatorResolution {
        /// Who.
        operator: String,
        /// What.
        action: Action,
        /// Why.
        reason: String,
    },
    /// Several runs halted the same way: the backfill starts no new run until an operator
    /// answers.
    BackfillEscalated {
        /// The shared failure signature.
        signature: String,
        /// The runs that halted with it.
        runs: Vec<Uuid>,
        /// Why.
        reason: String,
        /// True when after-steps wait for partitions that did not complete (an operator's
        /// `continue` then runs them on what completed); omitted when false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        after_blocked: bool,
    },
    /// An operator answered a backfill's escalation, or acted on a backfill.
    BackfillResolution {
        /// Who.
        operator: String,
        /// `continue` or `cancel` (an escalation's answer, or a cancel), or `retry-failed`.
        action: String,
        /// Why.
        reason: String,
    },
    /// A run reached a final state.
    RunFinished {
        /// COMPLETE, HALTED or CANCELLED.
        state: RunStatus,
        /// The step it stopped at, if not complete.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step_id: Option<String>,
        /// Why.
        reason: String,
    },
    /// The backfill ended (every run final, or the coordinator stopped).
    BackfillFinished {
        /// Runs completed.
        complete: usize,
        /// Runs halted.
        halted: usize,
        /// Runs cancelled.
        cancelled: usize,
        /// Runs still escalated.
        escalated: usize,
        /// Why it ended.
        reason: String,
    },
    /// A finished backfill was pruned past its retention (fleet mode, `--retention-days`): the
    /// coordinator forgot it and deleted its rows from the database. Its lines before this one
    /// stay in the audit file; this one stays in the database too.
    BackfillPruned {
        /// The pipeline's name.
        pipeline: String,
        /// Its runs.
        runs: usize,
        /// Runs completed.
        complete: usize,
        /// Runs halted.
        halted: usize,
        /// Runs cancelled.
        cancelled: usize,
        /// When its last run ended.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ended_at: Option<DateTime<Utc>>,
        /// The retention, in seconds.
        retention_s: u64,
    },
}

impl AuditEvent {
    /// The event's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            AuditEvent::BackfillCreated { .. } => "backfill_created",
            AuditEvent::RunCreated { .. } => "run_created",
            AuditEvent::Transition { .. } => "transition",
            AuditEvent::StepDispatched { .. } => "step_dispatched",
            AuditEvent::StepResult { .. } => "step_result",
            AuditEvent::StaleResult { .. } => "stale_result",
            AuditEvent::AttemptLost { .. } => "attempt_lost",
            AuditEvent::StepHandedBack { .. } => "step_handed_back",
            AuditEvent::Decision { .. } => "decision",
            AuditEvent::GuardOverride { .. } => "guard_override",
            AuditEvent::Escalated { .. } => "escalated",
            AuditEvent::OperatorResolution { .. } => "operator_resolution",
            AuditEvent::BackfillEscalated { .. } => "backfill_escalated",
            AuditEvent::BackfillResolution { .. } => "backfill_resolution",
            AuditEvent::RunFinished { .. } => "run_finished",
            AuditEvent::BackfillFinished { .. } => "backfill_finished",
            AuditEvent::BackfillPruned { .. } => "backfill_pruned",
        }
    }
}

/// The sha256 of a body, in hex.
pub fn hash_body(body: &str) -> String {
    hex::encode(Sha256::digest(body.as_bytes()))
}

/// Serialises a record into its line (without the newline) and returns the line and its hash.
pub fn seal(record: &AuditRecord) -> (String, String) {
    let body = serde_json::to_string(record).expect("audit records always serialise");
    let hash = hash_body(&body);
    let line = format!("{{\"hash\":\"{hash}\",{}", &body[1..]);
    (line, hash)
}

/// Splits a line into (stated hash, body); `None` when it does not start with a hash field.
pub fn unseal(line: &str) -> Option<(&str, String)> {
    let rest = line.strip_prefix("{\"hash\":\"")?;
    let hash = rest.get(..64)?;
    let tail = rest.get(64..)?.strip_prefix("\",")?;
    Some((hash, format!("{{{tail}")))
}

/// Why a log does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log broken at line {line}: {reason}")]
pub struct VerifyError {
    /// 1-based number of the first bad line.
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
    /// Set when the bad line is a torn last line (a write cut short by a crash or a full disk:
    /// no end of line, not even complete JSON): the bytes of the intact lines before it, which
    /// verify. A torn line is not an edit; truncating to these bytes repairs the log.
    pub torn: Option<u64>,
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Number of lines.
    pub lines: u64,
    /// The last line's hash ([`GENESIS`] for an empty log).
    pub head: String,
    /// The bytes of its lines: where the next line goes.
    pub bytes: u64,
}

impl Verified {
    /// What an empty (or missing) log holds.
    pub fn empty() -> Verified {
        Verified {
            lines: 0,
            head: GENESIS.to_string(),
            bytes: 0,
        }
    }
}

/// Parses one sealed line, checking its own hash.
pub fn parse_line(line: &str) -> Result<(AuditRecord, String), String> {
    let (stated, body) = unseal(line).ok_or("the line does not start with a `hash` field")?;
    let actual = hash_body(&body);
    if actual != stated {
        return Err(format!(
            "its content does not match its hash (stated {stated}, computed {actual}): the line was edited"
        ));
    }
    let record: AuditRecord =
        serde_json::from_str(&body).map_err(|e| format!("not an audit record: {e}"))?;
    Ok((record, actual))
}

/// Checks every line's hash, the chain and the sequence numbers. A last line that was never
/// finished (no end of line and not complete JSON) is reported as torn ([`VerifyError::torn`]),
/// not as edited.
pub fn verify(mut reader: impl BufRead) -> Result<Verified, VerifyError> {
    let mut prev = GENESIS.to_string();
    let mut n = 0u64;
    let mut intact = 0u64;
    let mut raw = Vec::new();
    loop {
        raw.clear();
        let read = reader
            .read_until(b'\n', &mut raw)
            .map_err(|e| VerifyError {
                line: n + 1,
                reason: format!("unreadable: {e}"),
                torn: None,
            })?;
        if read == 0 {
            break;
        }
        n += 1;
        let bad = |reason: String| VerifyError {
            line: n,
            reason,
            torn: None,
        };
        let ended = raw.last() == Some(&b'\n');
        let body = raw.strip_suffix(b"\n").unwrap_or(&raw);
        let line = String::from_utf8_lossy(body.strip_suffix(b"\r").unwrap_or(body));
        if !ended && serde_json::from_str::<serde_json::Value>(&line).is_err() {
            return Err(VerifyError {
                line: n,
                reason: format!(
                    "the last line is torn: it has no end of line and is not complete JSON (a write was cut short by a crash or a full disk); the {} lines before it verify (head {prev}); `warpline serve` repairs it from PostgreSQL, or truncate the file to {intact} bytes",
                    n - 1
                ),
                torn: Some(intact),
            });
        }
        let (record, hash) = parse_line(&line).map_err(bad)?;
        if record.prev_hash != prev {
            return Err(bad(format!(
                "its prev_hash {} is not the hash of the line before ({prev}): a line was removed, inserted or reordered",
                record.prev_hash
            )));
        }
        if record.seq != n {
            return Err(bad(format!("its seq is {}, expected {n}", record.seq)));
        }
        prev = hash;
        intact += read as u64;
    }
    Ok(Verified {
        lines: n,
        head: prev,
        bytes: intact,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: usize) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        let mut out = Vec::new();
        for i in 0..n {
            let rec = AuditRecord {
                seq: i as u64 + 1,
                ts: Utc::now(),
                prev_hash: prev.clone(),
                backfill_id: None,
                run_id: Some(Uuid::now_v7()),
                event: AuditEvent::Transition {
                    from: "INIT".into(),
                    to: format!("S{i}"),
                    action: Some(Action::Proceed),
                },
            };
            let (line, hash) = seal(&rec);
            prev = hash;
            out.push(line);
        }
        out
    }

    fn check(lines: &[String]) -> Result<Verified, VerifyError> {
        verify(lines.join("\n").as_bytes())
    }

    #[test]
    fn intact_log_verifies() {
        let lines = log(5);
        let v = check(&lines).unwrap();
        assert_eq!(v.lines, 5);
        let (rec, _) = parse_line(&lines[4]).unwrap();
        assert_eq!(rec.seq, 5);
        assert_eq!(check(&[]).unwrap().head, GENESIS);
    }

    #[test]
    fn any_edit_is_caught_at_its_line() {
        let lines = log(5);
        for i in 0..5 {
            let mut edited = lines.clone();
            edited[i] = edited[i].replacen(&format!("\"to\":\"S{i}\""), "\"to\":\"SX\"", 1);
            assert_ne!(edited[i], lines[i]);
            let err = check(&edited).unwrap_err();
            assert_eq!(err.line, i as u64 + 1, "{err}");
            assert!(err.reason.contains("edited"), "{err}");
        }
    }

    #[test]
    fn removal_and_reordering_are_caught() {
        let lines = log(5);
        let mut removed = lines.clone();
        removed.remove(2);
        assert_eq!(check(&removed).unwrap_err().line, 3);
        let mut swapped = lines.clone();
        swapped.swap(1, 3);
        assert_eq!(check(&swapped).unwrap_err().line, 2);
        let mut first_removed = lines;
        first_removed.remove(0);
        assert_eq!(check(&first_removed).unwrap_err().line, 1);
    }

    #[test]
    fn a_torn_last_line_is_torn_not_edited() {
        let lines = log(3);
        let whole = lines.join("\n") + "\n";
        let cut = &lines[2][..lines[2].len() / 2];
        let torn = format!("{}\n{}\n{cut}", lines[0], lines[1]);
        let err = verify(torn.as_bytes()).unwrap_err();
        assert_eq!(err.line, 3);
        let keep = (lines[0].len() + lines[1].len() + 2) as u64;
        assert_eq!(err.torn, Some(keep), "{err}");
        assert!(err.reason.contains("torn"), "{err}");
        assert!(!err.reason.contains("edited"), "{err}");
        let repaired = &torn.as_bytes()[..keep as usize];
        assert_eq!(verify(repaired).unwrap().lines, 2);
        assert_eq!(verify(whole.as_bytes()).unwrap().lines, 3);
        // An edit of a complete last line is still an edit, newline or not.
        let edited = lines[2].replacen("\"to\":\"S2\"", "\"to\":\"SX\"", 1);
        let err = verify(format!("{}\n{}\n{edited}", lines[0], lines[1]).as_bytes()).unwrap_err();
        assert_eq!((err.line, err.torn), (3, None));
        assert!(err.reason.contains("edited"), "{err}");
    }

    #[test]
    fn rehashing_an_edited_line_breaks_the_next_link() {
        let lines = log(3);
        let (mut rec, _) = parse_line(&lines[1]).unwrap();
        rec.event = AuditEvent::Transition {
            from: "INIT".into(),
            to: "FORGED".into(),
            action: None,
        };
        let mut forged = lines.clone();
        forged[1] = seal(&rec).0;
        let err = check(&forged).unwrap_err();
        assert_eq!(err.line, 3, "{err}");
    }
}

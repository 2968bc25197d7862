//! Fleet-mode wire facts shared by the coordinator and the workers: the RabbitMQ topology's
//! names, the heartbeat contract and message signatures.
//!
//! Every name carries an optional prefix (`WARPLINE_QUEUE_PREFIX`), so that several fleets, or
//! parallel tests, share one broker without seeing each other's messages.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::contracts::SCHEMA_VERSION;

/// The AMQP header carrying a message's HMAC-SHA256 signature (hex).
pub const SIGNATURE_HEADER: &str = "x-warpline-signature";
/// The AMQP header carrying why a message was dead-lettered.
pub const DEAD_REASON_HEADER: &str = "x-warpline-dead-reason";

/// The names of the fleet's exchanges and queues.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    /// Prepended to every name (empty in production).
    pub prefix: String,
}

impl Topology {
    /// A topology with this prefix.
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
        }
    }

    /// Direct exchange StepSpecs are published to, routed by pool.
    pub fn steps_exchange(&self) -> String {
        format!("{}warpline.steps", self.prefix)
    }

    /// The durable quorum queue of one pool.
    pub fn steps_queue(&self, pool: &str) -> String {
        format!("{}warpline.steps.{pool}", self.prefix)
    }

    /// The durable queue results go to.
    pub fn results_queue(&self) -> String {
        format!("{}warpline.results", self.prefix)
    }

    /// Fanout exchange for worker heartbeats.
    pub fn heartbeats_exchange(&self) -> String {
        format!("{}warpline.heartbeats", self.prefix)
    }

    /// Dead-letter exchange (fanout).
    pub fn dead_exchange(&self) -> String {
        format!("{}warpline.dead", self.prefix)
    }

    /// The durable queue holding dead letters for inspection.
    pub fn dead_queue(&self) -> String {
        format!("{}warpline.dead", self.prefix)
    }
}

/// One attempt a worker is running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunningAttempt {
    /// The run.
    pub run_id: Uuid,
    /// The attempt.
    pub attempt_id: Uuid,
    /// The step.
    pub step_id: String,
    /// When the worker started it.
    pub started_at: DateTime<Utc>,
}

/// A worker's periodic "I am alive, and this is what I run".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Heartbeat {
    /// Contract version.
    #[serde(default = "crate::contracts::schema_version_default")]
    pub schema_version: u32,
    /// The worker.
    pub worker_id: String,
    /// Its pool.
    pub pool: String,
    /// Its slots (concurrent steps).
    pub slots: u32,
    /// What it runs now.
    pub running: Vec<RunningAttempt>,
    /// When it was sent.
    pub sent_at: DateTime<Utc>,
    /// Seconds between heartbeats; a worker silent for three intervals is gone.
    pub interval_s: u64,
    /// Set on the last heartbeat of a worker shutting down.
    #[serde(default)]
    pub stopping: bool,
    /// What this worker may run: its allowlist entries as resolved on it. Absent from a
    /// worker that predates advertising (the coordinator then assumes it may run anything
    /// its pool is sent); a fleet worker always has an explicit allowlist, so there is no
    /// "allows everything" entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<AllowedCommand>>,
}

/// One allowlist entry as a worker advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AllowedCommand {
    /// The entry as the worker holds it (relative paths made absolute), e.g.
    /// `/opt/venv/bin/python /opt/tc/url_to_manifest.py`.
    pub entry: String,
    /// Its program: a bare name or an absolute path.
    pub program: String,
    /// The arguments every allowed invocation must start with.
    #[serde(default)]
    pub pinned: Vec<String>,
    /// The absolute path the program resolves to on this worker (its `--tools-dir` then
    /// `PATH`), or absent when it does not resolve there: the entry is allowed but unusable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
}

impl Heartbeat {
    /// A heartbeat with the current schema version, sent now.
    pub fn new(
        worker_id: String,
        pool: String,
        slots: u32,
        running: Vec<RunningAttempt>,
        interval_s: u64,
    ) -> Self {
        Heartbeat {
            schema_version: SCHEMA_VERSION,
            worker_id,
            pool,
            slots,
            running,
            sent_at: Utc::now(),
            interval_s,
            stopping: false,
            allow: None,
        }
    }
}

/// Signs a message body: hex HMAC-SHA256 with `key`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a signature in constant time.
pub fn verify_signature(key: &[u8], body: &[u8], signature: &str) -> bool {
    let Ok(sig) = hex::decode(signature) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let t = Topology::new("t1.");
        assert_eq!(t.steps_queue("gpu"), "t1.warpline.steps.gpu");
        assert_eq!(t.results_queue(), "t1.warpline.results");
        assert_eq!(Topology::default().steps_exchange(), "warpline.steps");
    }

    #[test]
    fn signatures_verify_and_forgeries_fail() {
        let sig = sign(b"key", b"body");
        assert!(verify_signature(b"key", b"body", &sig));
        assert!(!verify_signature(b"key", b"bodY", &sig));
        assert!(!verify_signature(b"other", b"body", &sig));
        assert!(!verify_signature(b"key", b"body", "zz"));
    }
}

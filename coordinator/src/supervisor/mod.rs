//! Supervisor agents: the brain that reads a step's JSON artefacts and proposes a
//! [`SupervisorDecision`]. Whatever an agent answers, the state machine's guard has the last
//! word, so an agent can make a run slower or more cautious but never make it skip a failed
//! check or exceed its attempts.
//!
//! An agent call returns a `'static` future so that the event loop can spawn it and go on:
//! many runs may await decisions at once, and a slow agent delays only the runs it decides for.
//! An agent that needs no I/O for a decision (the rules, the fast path after a clean pass)
//! answers [`Agent::decide_now`] instead, and the loop applies that decision in the same turn
//! as the result: one commit per step instead of two.
//!
//! - [`RulesAgent`]: the cautious operator's rules; [`AlwaysProceed`]: the seed's test decider.
//! - [`llm`]: a hosted model over HTTP (Gemini or OpenAI-compatible), strict about its answer.
//! - [`policy`]: the layer every agent is wrapped in: the fast path, the call budget, the
//!   fallback to the rules, shadow mode, and the cost counters.
//! - [`settings`]: config section, flags and environment resolved into an agent.

pub mod llm;
pub mod policy;
mod rules;
pub mod settings;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use warpline_shared::audit::{ShadowDecision, TokenUsage};
use warpline_shared::config::AgentKindConfig;
use warpline_shared::contracts::{
    Action, PipelineState, StepResult, SupervisorDecision, ValidationReport,
};

pub use policy::{AgentStats, AgentTotals, PolicyAgent};
pub use rules::{RulesAgent, decide as rules_decide};

/// Everything an agent may see: the three artefacts, nothing else.
#[derive(Debug, Clone)]
pub struct DecisionInput {
    /// The run as the supervisor sees it.
    pub state: PipelineState,
    /// What the attempt did.
    pub result: StepResult,
    /// What the checks found.
    pub report: ValidationReport,
}

/// An agent's answer with what the audit log records about it.
#[derive(Debug, Clone)]
pub struct AgentReply {
    /// The proposal.
    pub decision: SupervisorDecision,
    /// Which agent decided (`rules`, `always-proceed`, ...).
    pub agent: String,
    /// The model, for an LLM.
    pub model: Option<String>,
    /// How long it took.
    pub latency_ms: u64,
    /// Tokens used.
    pub tokens: Option<TokenUsage>,
    /// Why another agent stood in, if one did.
    pub fallback: Option<String>,
    /// sha256 of the exact request body, for an LLM.
    pub prompt_hash: Option<String>,
    /// The model's raw reply (bounded), for an LLM; kept when it could not be used.
    pub raw_reply: Option<String>,
    /// HTTP requests made (retries included), for an LLM.
    pub requests: Option<u32>,
    /// The run as the agent was shown it (set by the [`PolicyAgent`]), for exact replay.
    pub state: Option<PipelineState>,
    /// In shadow mode, the proposal that was not applied.
    pub shadow: Option<ShadowDecision>,
}

impl AgentReply {
    /// A reply with nothing but the decision and who made it.
    pub fn new(agent: impl Into<String>, decision: SupervisorDecision) -> AgentReply {
        AgentReply {
            decision,
            agent: agent.into(),
            model: None,
            latency_ms: 0,
            tokens: None,
            fallback: None,
            prompt_hash: None,
            raw_reply: None,
            requests: None,
            state: None,
            shadow: None,
        }
    }
}

/// A boxed agent future.
pub type DecisionFuture = Pin<Box<dyn Future<Output = AgentReply> + Send + 'static>>;

/// A supervisor agent.
pub trait Agent: Send + Sync + 'static {
    /// The agent's name as audited.
    fn name(&self) -> &'static str;
    /// Proposes a decision. Never fails: an agent that cannot answer falls back and says why.
    fn decide(&self, input: Arc<DecisionInput>) -> DecisionFuture;
    /// Proposes a decision at once when that needs no I/O (pure rules: microseconds), so the
    /// event loop may call it inline; `None` means "call [`Agent::decide`]". The default is
    /// `None`.
    fn decide_now(&self, _input: &DecisionInput) -> Option<AgentReply> {
        None
    }
}

/// The seed's test decider: always proposes `proceed`, still bounded by the guard.
#[derive(Debug, Default, Clone, Copy)]
pub struct AlwaysProceed;

impl Agent for AlwaysProceed {
    fn name(&self) -> &'static str {
        "always-proceed"
    }

    fn decide(&self, input: Arc<DecisionInput>) -> DecisionFuture {
        let reply = self.decide_now(&input);
        Box::pin(async move { reply.expect("always-proceed decides at once") })
    }

    fn decide_now(&self, _input: &DecisionInput) -> Option<AgentReply> {
        Some(AgentReply::new(
            "always-proceed",
            SupervisorDecision::new(Action::Proceed, "always-proceed agent"),
        ))
    }
}

/// The agent kinds the CLI offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentKind {
    /// The cautious operator's rules.
    Rules,
    /// Always proposes proceed (the guard still applies).
    AlwaysProceed,
    /// Google Gemini (`GEMINI_API_KEY`).
    Gemini,
    /// An OpenAI-compatible chat completions endpoint (`OPENAI_API_KEY` when set).
    Openai,
}

impl From<AgentKind> for AgentKindConfig {
    fn from(k: AgentKind) -> AgentKindConfig {
        match k {
            AgentKind::Rules => AgentKindConfig::Rules,
            AgentKind::AlwaysProceed => AgentKindConfig::AlwaysProceed,
            AgentKind::Gemini => AgentKindConfig::Gemini,
            AgentKind::Openai => AgentKindConfig::Openai,
        }
    }
}

/// Times a synchronous decision into an [`AgentReply`].
pub(crate) fn timed(agent: &'static str, f: impl FnOnce() -> SupervisorDecision) -> AgentReply {
    let start = Instant::now();
    let decision = f();
    AgentReply {
        latency_ms: start.elapsed().as_millis() as u64,
        ..AgentReply::new(agent, decision)
    }
}

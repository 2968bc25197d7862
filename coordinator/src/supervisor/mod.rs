//! Supervisor agents: the brain that reads a step's JSON artefacts and proposes a
//! [`SupervisorDecision`]. Whatever an agent answers, the state machine's guard has the last
//! word, so an agent can make a run slower or more cautious but never make it skip a failed
//! check or exceed its attempts.
//!
//! An agent call returns a `'static` future so that the event loop can spawn it and go on:
//! many runs may await decisions at once, and a slow agent delays only the runs it decides for.

mod rules;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use warpline_shared::audit::TokenUsage;
use warpline_shared::contracts::{
    Action, PipelineState, StepResult, SupervisorDecision, ValidationReport,
};

pub use rules::RulesAgent;

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
}

/// A boxed agent future.
pub type DecisionFuture = Pin<Box<dyn Future<Output = AgentReply> + Send + 'static>>;

/// A supervisor agent.
pub trait Agent: Send + Sync + 'static {
    /// The agent's name as audited.
    fn name(&self) -> &'static str;
    /// Proposes a decision. Never fails: an agent that cannot answer falls back and says why.
    fn decide(&self, input: Arc<DecisionInput>) -> DecisionFuture;
}

/// The seed's test decider: always proposes `proceed`, still bounded by the guard.
#[derive(Debug, Default, Clone, Copy)]
pub struct AlwaysProceed;

impl Agent for AlwaysProceed {
    fn name(&self) -> &'static str {
        "always-proceed"
    }

    fn decide(&self, _input: Arc<DecisionInput>) -> DecisionFuture {
        Box::pin(async {
            AgentReply {
                decision: SupervisorDecision::new(Action::Proceed, "always-proceed agent"),
                agent: "always-proceed".into(),
                model: None,
                latency_ms: 0,
                tokens: None,
                fallback: None,
            }
        })
    }
}

/// The agent kinds the CLI offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentKind {
    /// The cautious operator's rules.
    Rules,
    /// Always proposes proceed (the guard still applies).
    AlwaysProceed,
}

impl AgentKind {
    /// Builds the agent.
    pub fn build(self) -> Arc<dyn Agent> {
        match self {
            AgentKind::Rules => Arc::new(RulesAgent),
            AgentKind::AlwaysProceed => Arc::new(AlwaysProceed),
        }
    }
}

/// Times a synchronous decision into an [`AgentReply`].
pub(crate) fn timed(agent: &'static str, f: impl FnOnce() -> SupervisorDecision) -> AgentReply {
    let start = Instant::now();
    let decision = f();
    AgentReply {
        decision,
        agent: agent.into(),
        model: None,
        latency_ms: start.elapsed().as_millis() as u64,
        tokens: None,
        fallback: None,
    }
}

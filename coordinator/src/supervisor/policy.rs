//! The policy layer around every agent: when a model is asked at all, what happens when it
//! cannot answer, shadow mode, and what the calls cost.
//!
//! - Fast path (`call_on: unclean`): after a clean pass (`proceed` legal) the run proceeds
//!   without a call; the audit names the agent `fast_path`.
//! - Budget: at most `budget` model calls per backfill; afterwards the rules decide and the
//!   audit says "budget exhausted".
//! - Fallback: a call that fails for any named cause (after its retries) is answered by the
//!   rules, and the reply says why; the failed call's prompt hash and raw reply stay audited.
//! - Shadow: the model and the rules both decide; one is applied (`apply`, default rules), the
//!   other is audited beside it with whether they agreed.
//!
//! The layer also stamps every reply with the [`PipelineState`](warpline_shared::contracts::PipelineState)
//! the agent was shown, so `warpline agent replay` can ask again exactly. Nothing here can
//! widen what the guard allows: every proposal still goes through the state machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::Serialize;
use warpline_shared::audit::ShadowDecision;
use warpline_shared::config::{CallOn, ShadowApply};
use warpline_shared::contracts::Action;

use super::llm::{Exchange, LlmAgent};
use super::rules;
use super::{Agent, AgentReply, DecisionFuture, DecisionInput, timed};

/// Counters of one backfill's agent use. Atomics: decisions run concurrently.
#[derive(Debug, Default)]
pub struct AgentStats {
    decisions: AtomicU64,
    fast_path: AtomicU64,
    llm_calls: AtomicU64,
    llm_failures: AtomicU64,
    requests: AtomicU64,
    fallbacks: AtomicU64,
    budget_exhausted: AtomicU64,
    tokens_in: AtomicU64,
    tokens_out: AtomicU64,
    llm_latency_ms: AtomicU64,
    shadow_agreed: AtomicU64,
    shadow_disagreed: AtomicU64,
}

/// A snapshot of [`AgentStats`], printed with the run summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgentTotals {
    /// Decisions asked of the agent layer.
    pub decisions: u64,
    /// Clean passes proceeded without a model call.
    pub fast_path: u64,
    /// Decisions a model was asked for.
    pub llm_calls: u64,
    /// Of those, how many gave no usable decision.
    pub llm_failures: u64,
    /// HTTP requests (retries included).
    pub requests: u64,
    /// Decisions the rules made in the model's stead (failures and budget).
    pub fallbacks: u64,
    /// Decisions made by the rules because the budget was spent.
    pub budget_exhausted: u64,
    /// Prompt tokens reported by the provider.
    pub tokens_in: u64,
    /// Reply tokens reported by the provider.
    pub tokens_out: u64,
    /// Wall time spent in model calls, summed over calls (backoffs included).
    pub llm_latency_ms: u64,
    /// Mean wall time of one model call.
    pub llm_latency_mean_ms: u64,
    /// Shadow mode: the model and the rules proposed the same action.
    pub shadow_agreed: u64,
    /// Shadow mode: they did not.
    pub shadow_disagreed: u64,
}

impl AgentStats {
    /// The counters now.
    pub fn totals(&self) -> AgentTotals {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let calls = get(&self.llm_calls);
        let latency = get(&self.llm_latency_ms);
        AgentTotals {
            decisions: get(&self.decisions),
            fast_path: get(&self.fast_path),
            llm_calls: calls,
            llm_failures: get(&self.llm_failures),
            requests: get(&self.requests),
            fallbacks: get(&self.fallbacks),
            budget_exhausted: get(&self.budget_exhausted),
            tokens_in: get(&self.tokens_in),
            tokens_out: get(&self.tokens_out),
            llm_latency_ms: latency,
            llm_latency_mean_ms: latency.checked_div(calls).unwrap_or(0),
            shadow_agreed: get(&self.shadow_agreed),
            shadow_disagreed: get(&self.shadow_disagreed),
        }
    }

    fn bump(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }

    fn record(&self, ex: &Exchange) {
        Self::bump(&self.llm_calls);
        self.requests
            .fetch_add(u64::from(ex.requests), Ordering::Relaxed);
        self.llm_latency_ms
            .fetch_add(ex.latency_ms, Ordering::Relaxed);
        if let Some(t) = &ex.tokens {
            self.tokens_in.fetch_add(t.input, Ordering::Relaxed);
            self.tokens_out.fetch_add(t.output, Ordering::Relaxed);
        }
        if ex.outcome.is_err() {
            Self::bump(&self.llm_failures);
        }
    }
}

/// How the policy layer treats the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// When to call.
    pub call_on: CallOn,
    /// Most calls per backfill.
    pub budget: Option<u32>,
    /// Ask the model beside the rules.
    pub shadow: bool,
    /// In shadow mode, whose decision is applied.
    pub apply: ShadowApply,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            call_on: CallOn::Unclean,
            budget: None,
            shadow: false,
            apply: ShadowApply::Rules,
        }
    }
}

struct Inner {
    name: &'static str,
    /// The agent used when there is no model (rules or always-proceed).
    base: Arc<dyn Agent>,
    llm: Option<Arc<LlmAgent>>,
    policy: Policy,
    /// Model calls started so far (against the budget).
    calls: AtomicU32,
    stats: Arc<AgentStats>,
}

/// An agent wrapped in the policy layer. Cheap to clone.
#[derive(Clone)]
pub struct PolicyAgent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PolicyAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyAgent")
            .field("name", &self.inner.name)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl PolicyAgent {
    /// Wraps a model-free agent (it only gains the state stamp and the counters).
    pub fn plain(name: &'static str, base: Arc<dyn Agent>) -> PolicyAgent {
        PolicyAgent::build(name, base, None, Policy::default())
    }

    /// Wraps a model; the rules stand in whenever it is not asked or cannot answer.
    pub fn llm(name: &'static str, llm: Arc<LlmAgent>, policy: Policy) -> PolicyAgent {
        PolicyAgent::build(name, Arc::new(super::RulesAgent), Some(llm), policy)
    }

    fn build(
        name: &'static str,
        base: Arc<dyn Agent>,
        llm: Option<Arc<LlmAgent>>,
        policy: Policy,
    ) -> PolicyAgent {
        PolicyAgent {
            inner: Arc::new(Inner {
                name,
                base,
                llm,
                policy,
                calls: AtomicU32::new(0),
                stats: Arc::default(),
            }),
        }
    }

    /// The counters (shared: read them after the backfill).
    pub fn stats(&self) -> Arc<AgentStats> {
        self.inner.stats.clone()
    }

    /// The model, when there is one.
    pub fn llm_agent(&self) -> Option<&Arc<LlmAgent>> {
        self.inner.llm.as_ref()
    }
}

impl Agent for PolicyAgent {
    fn name(&self) -> &'static str {
        self.inner.name
    }

    fn decide(&self, input: Arc<DecisionInput>) -> DecisionFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            AgentStats::bump(&inner.stats.decisions);
            let state = input.state.clone();
            let mut reply = match &inner.llm {
                None => inner.base.decide(input).await,
                Some(llm) => inner.with_llm(llm, &input).await,
            };
            reply.state = Some(state);
            reply
        })
    }

    /// At once when no model is asked: a plain agent that decides at once, or the fast path
    /// after a clean pass. Counted like [`Agent::decide`], and only when it answers.
    fn decide_now(&self, input: &DecisionInput) -> Option<AgentReply> {
        let inner = &self.inner;
        let mut reply = match &inner.llm {
            None => inner.base.decide_now(input)?,
            Some(_) if inner.fast_path_applies(input) => {
                AgentStats::bump(&inner.stats.fast_path);
                timed("fast_path", || rules::decide(input))
            }
            Some(_) => return None,
        };
        AgentStats::bump(&inner.stats.decisions);
        reply.state = Some(input.state.clone());
        Some(reply)
    }
}

/// Turns an exchange into a reply: the model's decision, or the rules' with why.
pub fn reply_from_exchange(ex: Exchange, input: &DecisionInput, provider: &str) -> AgentReply {
    let Exchange {
        model,
        prompt_hash,
        raw_reply,
        requests,
        latency_ms,
        tokens,
        outcome,
    } = ex;
    let (agent, decision, fallback) = match outcome {
        Ok(d) => ("llm", d, None),
        Err(e) => (
            "rules",
            rules::decide(input),
            Some(format!("{provider} call failed ({}): {e}", e.kind())),
        ),
    };
    AgentReply {
        model: Some(model),
        latency_ms,
        tokens,
        fallback,
        prompt_hash: Some(prompt_hash),
        raw_reply,
        requests: Some(requests),
        ..AgentReply::new(agent, decision)
    }
}

impl Inner {
    fn take_budget(&self) -> bool {
        match self.policy.budget {
            None => true,
            Some(max) => self
                .calls
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    /// After a clean pass (`proceed` legal) with `call_on: unclean`, no model is asked.
    fn fast_path_applies(&self, input: &DecisionInput) -> bool {
        self.policy.call_on == CallOn::Unclean
            && input.state.legal_actions.contains(&Action::Proceed)
    }

    async fn with_llm(&self, llm: &LlmAgent, input: &DecisionInput) -> AgentReply {
        let stats = &self.stats;
        if self.fast_path_applies(input) {
            AgentStats::bump(&stats.fast_path);
            return timed("fast_path", || rules::decide(input));
        }
        if !self.take_budget() {
            AgentStats::bump(&stats.fallbacks);
            AgentStats::bump(&stats.budget_exhausted);
            let mut reply = timed("rules", || rules::decide(input));
            reply.fallback = Some(format!(
                "budget exhausted ({} model calls per backfill)",
                self.policy.budget.unwrap_or(0)
            ));
            return reply;
        }
        let provider = llm.settings().provider.name();
        let ex = llm.exchange(input).await;
        stats.record(&ex);
        if !self.policy.shadow {
            let reply = reply_from_exchange(ex, input, provider);
            if reply.fallback.is_some() {
                AgentStats::bump(&stats.fallbacks);
            }
            return reply;
        }
        // Shadow mode: both decide, one is applied, the other is audited beside it.
        let by_rules = timed("rules", || rules::decide(input));
        let model_action = ex.outcome.as_ref().ok().map(|d| d.action);
        let agreed = model_action.map(|a| a == by_rules.decision.action);
        match agreed {
            Some(true) => AgentStats::bump(&stats.shadow_agreed),
            Some(false) => AgentStats::bump(&stats.shadow_disagreed),
            None => {}
        }
        match self.policy.apply {
            ShadowApply::Rules => {
                let shadow = ShadowDecision {
                    agent: "llm".into(),
                    model: Some(ex.model.clone()),
                    decision: ex.outcome.as_ref().ok().cloned(),
                    latency_ms: ex.latency_ms,
                    tokens: ex.tokens.clone(),
                    prompt_hash: Some(ex.prompt_hash.clone()),
                    raw_reply: ex.raw_reply.clone(),
                    error: ex.outcome.as_ref().err().map(|e| e.to_string()),
                    agreed,
                };
                AgentReply {
                    shadow: Some(shadow),
                    ..by_rules
                }
            }
            ShadowApply::Llm => {
                let mut reply = reply_from_exchange(ex, input, provider);
                if reply.fallback.is_some() {
                    AgentStats::bump(&stats.fallbacks);
                }
                reply.shadow = Some(ShadowDecision {
                    agent: "rules".into(),
                    model: None,
                    decision: Some(by_rules.decision),
                    latency_ms: by_rules.latency_ms,
                    tokens: None,
                    prompt_hash: None,
                    raw_reply: None,
                    error: None,
                    agreed,
                });
                reply
            }
        }
    }
}

//! Resolves the agent from the pipeline's `agent` section, the `warpline run` flags and the
//! environment, in that order of increasing precedence for each field:
//! config file < `WARPLINE_LLM_MODEL` / `WARPLINE_LLM_BASE_URL` < `--llm-model` /
//! `--llm-base-url`. The API key comes only from the environment (`GEMINI_API_KEY`,
//! `OPENAI_API_KEY`) and is never logged or audited.
//!
//! A missing key is refused at startup, before any run starts, when the base URL is not a
//! loopback address (Gemini), or when it is OpenAI's public endpoint (OpenAI-compatible
//! servers elsewhere may not need one).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use warpline_shared::config::{AgentConfig, AgentKindConfig};

use super::llm::{LlmAgent, LlmSettings, Provider, Secret};
use super::policy::{Policy, PolicyAgent};
use super::{AlwaysProceed, RulesAgent};

/// The environment variable overriding the model.
pub const ENV_MODEL: &str = "WARPLINE_LLM_MODEL";
/// The environment variable overriding the base URL.
pub const ENV_BASE_URL: &str = "WARPLINE_LLM_BASE_URL";

/// What the command line says about the agent (all optional).
#[derive(Debug, Clone, Default)]
pub struct AgentOverrides {
    /// `--agent`.
    pub kind: Option<AgentKindConfig>,
    /// `--llm-model`.
    pub model: Option<String>,
    /// `--llm-base-url`.
    pub base_url: Option<String>,
    /// `--shadow`.
    pub shadow: bool,
}

/// The agent cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No API key for a remote endpoint.
    #[error(
        "`{var}` is not set: the {provider} agent needs an API key for `{base_url}`; export it, \
         or point --llm-base-url (or `{ENV_BASE_URL}`) at a local server"
    )]
    MissingKey {
        /// The variable.
        var: &'static str,
        /// `gemini` or `openai`.
        provider: &'static str,
        /// The endpoint.
        base_url: String,
    },
    /// The base URL is not an http(s) URL.
    #[error("invalid LLM base URL `{url}`: expected an http:// or https:// URL")]
    BadUrl {
        /// The URL.
        url: String,
    },
    /// Shadow mode without a model.
    #[error("shadow mode compares a model with the rules: give --agent gemini or --agent openai")]
    ShadowWithoutModel,
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client for the model: {0}")]
    Client(#[source] reqwest::Error),
}

/// True when a URL's host is a loopback address or `localhost`.
pub fn is_loopback(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = u.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The model settings for a provider, before the key check.
pub fn llm_settings(
    provider: Provider,
    cfg: &AgentConfig,
    over: &AgentOverrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<LlmSettings, SetupError> {
    let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let model = nonempty(over.model.clone())
        .or_else(|| nonempty(env(ENV_MODEL)))
        .or_else(|| cfg.model.clone())
        .unwrap_or_else(|| provider.default_model().to_string());
    let base_url = nonempty(over.base_url.clone())
        .or_else(|| nonempty(env(ENV_BASE_URL)))
        .or_else(|| cfg.base_url.clone())
        .unwrap_or_else(|| provider.default_base_url().to_string());
    if reqwest::Url::parse(&base_url)
        .map(|u| !matches!(u.scheme(), "http" | "https"))
        .unwrap_or(true)
    {
        return Err(SetupError::BadUrl { url: base_url });
    }
    let api_key = nonempty(env(provider.key_var())).map(Secret);
    let needs_key = match provider {
        Provider::Gemini => !is_loopback(&base_url),
        Provider::OpenAi => base_url.trim_end_matches('/') == provider.default_base_url(),
    };
    if api_key.is_none() && needs_key {
        return Err(SetupError::MissingKey {
            var: provider.key_var(),
            provider: provider.name(),
            base_url,
        });
    }
    Ok(LlmSettings {
        provider,
        model,
        base_url: base_url.trim_end_matches('/').to_string(),
        api_key,
        timeout: Duration::from_secs(cfg.timeout_s.max(1)),
        max_concurrent: cfg.max_concurrent.max(1) as usize,
        rate_per_s: cfg.rate_per_s,
        max_retries: cfg.max_retries,
        backoff: Duration::from_millis(cfg.backoff_ms),
        temperature: cfg.temperature,
    })
}

/// Builds the agent the config, flags and environment ask for, wrapped in the policy layer.
pub fn build_agent(
    cfg: &AgentConfig,
    over: &AgentOverrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PolicyAgent, SetupError> {
    let kind = over.kind.unwrap_or(cfg.kind);
    let shadow = over.shadow || cfg.shadow;
    let provider = match kind {
        AgentKindConfig::Rules | AgentKindConfig::AlwaysProceed if shadow => {
            return Err(SetupError::ShadowWithoutModel);
        }
        AgentKindConfig::Rules => return Ok(PolicyAgent::plain("rules", Arc::new(RulesAgent))),
        AgentKindConfig::AlwaysProceed => {
            return Ok(PolicyAgent::plain(
                "always-proceed",
                Arc::new(AlwaysProceed),
            ));
        }
        AgentKindConfig::Gemini => Provider::Gemini,
        AgentKindConfig::Openai => Provider::OpenAi,
    };
    let settings = llm_settings(provider, cfg, over, env)?;
    let llm = Arc::new(LlmAgent::new(settings).map_err(SetupError::Client)?);
    let policy = Policy {
        call_on: cfg.call_on,
        budget: cfg.budget,
        shadow,
        apply: cfg.apply,
    };
    let name = match (provider, shadow) {
        (Provider::Gemini, false) => "gemini",
        (Provider::Gemini, true) => "gemini-shadow",
        (Provider::OpenAi, false) => "openai",
        (Provider::OpenAi, true) => "openai-shadow",
    };
    Ok(PolicyAgent::llm(name, llm, policy))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn precedence_is_config_then_env_then_flags() {
        let cfg = AgentConfig {
            model: Some("from-config".into()),
            base_url: Some("http://127.0.0.1:1".into()),
            ..AgentConfig::default()
        };
        let none = AgentOverrides::default();
        let s = llm_settings(Provider::Gemini, &cfg, &none, &env(&[])).unwrap();
        assert_eq!(s.model, "from-config");
        let e = env(&[
            (ENV_MODEL, "from-env"),
            (ENV_BASE_URL, "http://localhost:2/"),
        ]);
        let s = llm_settings(Provider::Gemini, &cfg, &none, &e).unwrap();
        assert_eq!(
            (s.model.as_str(), s.base_url.as_str()),
            ("from-env", "http://localhost:2")
        );
        let flags = AgentOverrides {
            model: Some("from-flag".into()),
            ..AgentOverrides::default()
        };
        assert_eq!(
            llm_settings(Provider::Gemini, &cfg, &flags, &e)
                .unwrap()
                .model,
            "from-flag"
        );
        let d = llm_settings(
            Provider::OpenAi,
            &AgentConfig::default(),
            &none,
            &env(&[("OPENAI_API_KEY", "k")]),
        )
        .unwrap();
        assert_eq!(d.base_url, "https://api.openai.com");
        assert_eq!(d.model, Provider::OpenAi.default_model());
        assert!(
            !format!("{d:?}").contains("\"k\""),
            "the key must not show in Debug"
        );
    }

    #[test]
    fn a_missing_key_is_refused_for_remote_endpoints_only() {
        let cfg = AgentConfig::default();
        let none = AgentOverrides::default();
        let err = llm_settings(Provider::Gemini, &cfg, &none, &env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("`GEMINI_API_KEY` is not set"),
            "{err}"
        );
        let local = AgentOverrides {
            base_url: Some("http://127.0.0.1:9".into()),
            ..AgentOverrides::default()
        };
        assert!(llm_settings(Provider::Gemini, &cfg, &local, &env(&[])).is_ok());
        assert!(matches!(
            llm_settings(Provider::OpenAi, &cfg, &none, &env(&[])),
            Err(SetupError::MissingKey { .. })
        ));
        let compatible = AgentOverrides {
            base_url: Some("https://llm.internal.example".into()),
            ..AgentOverrides::default()
        };
        assert!(llm_settings(Provider::OpenAi, &cfg, &compatible, &env(&[])).is_ok());
        assert!(is_loopback("http://[::1]:8080"));
        assert!(!is_loopback("https://generativelanguage.googleapis.com"));
    }

    #[test]
    fn shadow_needs_a_model() {
        let over = AgentOverrides {
            shadow: true,
            ..AgentOverrides::default()
        };
        assert!(matches!(
            build_agent(&AgentConfig::default(), &over, &env(&[])),
            Err(SetupError::ShadowWithoutModel)
        ));
    }
}

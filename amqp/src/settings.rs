//! The fleet's connection settings, shared by `warpline serve` and `warpline-worker`: one clap
//! struct flattened into both command lines, so a flag, its environment variable and its
//! default mean the same thing to every binary of a fleet.

use clap::Args;
use warpline_shared::fleet::Topology;

/// Where the fleet's broker is and which names it uses on it.
#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// The RabbitMQ broker.
    #[arg(
        long,
        env = "WARPLINE_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// Prepended to every exchange and queue name, so fleets (or tests) can share a broker.
    #[arg(long, env = "WARPLINE_QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,
}

/// The environment variable holding the fleet's HMAC signing key. It is read from the
/// environment only, never from a flag (which `ps` would show).
pub const SIGNING_KEY_ENV: &str = "WARPLINE_SIGNING_KEY";

/// The fleet's signing key from [`SIGNING_KEY_ENV`], read the same way by every binary: set
/// means non-empty. An empty value is unset (nothing is signed or verified), and says so on
/// standard error, since it is almost always a mistake.
pub fn signing_key() -> Option<Vec<u8>> {
    let key = signing_key_from(std::env::var(SIGNING_KEY_ENV).ok());
    if key.is_none() && std::env::var_os(SIGNING_KEY_ENV).is_some() {
        tracing::warn!("{SIGNING_KEY_ENV} is set but empty: treated as unset");
        eprintln!(
            "warning: {SIGNING_KEY_ENV} is set but empty: messages are neither signed nor verified; set a key (the same for the coordinator and every worker) or unset it"
        );
    }
    key
}

/// [`signing_key`] for a given value: `None` when absent or empty.
pub fn signing_key_from(value: Option<String>) -> Option<Vec<u8>> {
    value.filter(|k| !k.is_empty()).map(String::into_bytes)
}

impl FleetArgs {
    /// The fleet's exchange and queue names.
    pub fn topology(&self) -> Topology {
        Topology::new(self.queue_prefix.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_signing_key_is_unset() {
        assert_eq!(signing_key_from(None), None);
        assert_eq!(signing_key_from(Some(String::new())), None);
        assert_eq!(signing_key_from(Some("k".into())), Some(b"k".to_vec()));
    }
}

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
    /// The AMQP heartbeat timeout to ask the broker for, in seconds: how soon the broker
    /// gives up on a connection whose process stopped answering (SIGSTOP, a hung host, a cut
    /// cable) and hands the messages it holds unacknowledged to other consumers. The broker's
    /// own setting wins when lower; `0` takes the broker's (RabbitMQ: 60 s). A `heartbeat`
    /// parameter in `--amqp-url` takes precedence.
    #[arg(
        long,
        env = "WARPLINE_AMQP_HEARTBEAT_S",
        default_value_t = DEFAULT_AMQP_HEARTBEAT_S
    )]
    pub amqp_heartbeat_s: u16,
}

/// The default of `--amqp-heartbeat-s`. Low enough that a stopped coordinator's unacked results
/// reach its successor within seconds instead of RabbitMQ's 60 s; high enough that a busy
/// process on a loaded host (its heartbeats are sent by the async runtime) is not cut off.
pub const DEFAULT_AMQP_HEARTBEAT_S: u16 = 10;

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

    /// The URL to connect with: `--amqp-url` asking for `--amqp-heartbeat-s`.
    pub fn connection_url(&self) -> String {
        with_heartbeat(&self.amqp_url, self.amqp_heartbeat_s)
    }
}

/// `url` with a `heartbeat` query parameter of `secs`, unless it has one already or `secs` is 0.
/// A URL that does not parse is returned as it is, for [`crate::connect`] to report.
pub fn with_heartbeat(url: &str, secs: u16) -> String {
    let Ok(uri) = url.parse::<lapin::uri::AMQPUri>() else {
        return url.to_string();
    };
    if secs == 0 || uri.query.heartbeat.is_some() {
        return url.to_string();
    }
    let (base, fragment) = url
        .split_once('#')
        .map_or((url, None), |(b, f)| (b, Some(f)));
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut out = format!("{base}{sep}heartbeat={secs}");
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_is_asked_for_unless_the_url_names_one() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        assert_eq!(with_heartbeat(url, 10), format!("{url}?heartbeat=10"));
        let parsed: lapin::uri::AMQPUri = with_heartbeat(url, 10).parse().unwrap();
        assert_eq!(parsed.query.heartbeat, Some(10));
        assert_eq!(parsed.vhost, "/");
        assert_eq!(
            with_heartbeat(&format!("{url}?frame_max=8192"), 5),
            format!("{url}?frame_max=8192&heartbeat=5")
        );
        assert_eq!(
            with_heartbeat(&format!("{url}?heartbeat=30"), 5),
            format!("{url}?heartbeat=30")
        );
        assert_eq!(with_heartbeat(url, 0), url);
        assert_eq!(with_heartbeat("not a url", 10), "not a url");
    }

    #[test]
    fn an_empty_signing_key_is_unset() {
        assert_eq!(signing_key_from(None), None);
        assert_eq!(signing_key_from(Some(String::new())), None);
        assert_eq!(signing_key_from(Some("k".into())), Some(b"k".to_vec()));
    }
}

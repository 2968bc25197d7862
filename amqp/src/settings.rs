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

impl FleetArgs {
    /// The fleet's exchange and queue names.
    pub fn topology(&self) -> Topology {
        Topology::new(self.queue_prefix.clone())
    }
}

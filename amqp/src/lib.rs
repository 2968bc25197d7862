//! The fleet's plumbing, shared by the worker and the coordinator: RabbitMQ (connecting with
//! backoff, declaring the topology of [`Topology`], publishing with publisher confirms,
//! signature headers), the shutdown tree ([`shutdown`]) and the connection settings both
//! command lines flatten ([`settings::FleetArgs`]).
//!
//! Everything here is transport: it knows queue names, arguments and message properties, but
//! nothing of steps or runs. The topology is declared idempotently (declare-if-missing with the
//! same arguments), so every process of a fleet declares it on connect and none depends on
//! another having started first. A publish is only "done" when the broker has confirmed it:
//! [`publish_confirmed`] waits for the confirm and turns a nack or an unroutable return into an
//! error, which is what lets a worker ack a StepSpec only after its outcome is safe.

pub mod settings;
pub mod shutdown;

pub use settings::{FleetArgs, signing_key};

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use warpline_shared::fleet::{SIGNATURE_HEADER, Topology};

/// How many times a StepSpec may be delivered before its quorum queue dead-letters it
/// (`x-delivery-limit`): a spec that keeps killing workers, or keeps being requeued, ends up in
/// the dead queue instead of cycling forever.
pub const DELIVERY_LIMIT: i64 = 5;

/// AMQP delivery mode 2: the broker writes the message to disk.
pub const PERSISTENT: u8 = 2;

/// The content type of every Warpline message.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Why an AMQP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The URL cannot be parsed; retrying will not help.
    #[error(
        "`{url}` is not a valid AMQP URL ({reason}); expected `amqp://user:pass@host:5672/%2f`"
    )]
    BadUrl {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The broker could not be reached within the allowed attempts.
    #[error(
        "cannot connect to RabbitMQ at `{url}` after {attempts} attempt(s): {source}; is the broker running (`rabbitmq-server -detached`)?"
    )]
    Connect {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// How many attempts were made.
        attempts: usize,
        /// The last attempt's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused the login or the virtual host; retrying will not help.
    #[error(
        "RabbitMQ at `{url}` refused the connection: {reason}; check the user, the password and the virtual host in the AMQP URL, and the user's permissions on that virtual host"
    )]
    Refused {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// The broker's words.
        reason: String,
    },
    /// Opening a channel, or switching it to confirm mode, failed.
    #[error("cannot open a channel: {source}")]
    Channel {
        /// The broker's or the connection's error.
        #[source]
        source: lapin::Error,
    },
    /// Declaring, binding or deleting part of the topology failed.
    #[error(
        "cannot {action} {what} `{name}`: {source}; if it exists with other arguments, delete it or use another --queue-prefix"
    )]
    Topology {
        /// `declare`, `bind` or `delete`.
        action: &'static str,
        /// `exchange` or `queue`.
        what: &'static str,
        /// Its name.
        name: String,
        /// The broker's error.
        #[source]
        source: lapin::Error,
    },
    /// The publish itself, or waiting for its confirm, failed (usually a lost connection).
    #[error("cannot publish to exchange `{exchange}` with routing key `{routing_key}`: {source}")]
    Publish {
        /// The exchange (empty: the default exchange).
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The connection's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker nacked the message: it did not take responsibility for it.
    #[error(
        "the broker refused (nacked) the message to exchange `{exchange}` with routing key `{routing_key}`"
    )]
    Nacked {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// The message reached no queue (published as mandatory and returned).
    #[error(
        "no queue took the message to exchange `{exchange}` with routing key `{routing_key}` ({reply}); is the topology declared?"
    )]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The broker's reply text (`NO_ROUTE`).
        reply: String,
    },
    /// The channel is not in confirm mode, so nothing can be confirmed.
    #[error("publisher confirms are not enabled on this channel; open it with `confirm_channel`")]
    NotConfirming,
}

impl AmqpError {
    /// True when trying again later (after a reconnect) may succeed; false when the request itself
    /// is wrong and must be fixed first.
    pub fn is_retryable(&self) -> bool {
        match self {
            AmqpError::BadUrl { .. } | AmqpError::Refused { .. } | AmqpError::NotConfirming => {
                false
            }
            // An entity that exists with other arguments (PRECONDITION_FAILED), or that this
            // user may not touch (ACCESS_REFUSED), stays so until an operator acts; a lost
            // connection during a declare heals by reconnecting.
            AmqpError::Topology { source, .. } => !matches!(
                source.kind(),
                lapin::ErrorKind::ProtocolError(e) if matches!(
                    e.kind(),
                    AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED)
                )
            ),
            AmqpError::Connect { .. }
            | AmqpError::Channel { .. }
            | AmqpError::Publish { .. }
            | AmqpError::Nacked { .. }
            | AmqpError::Unroutable { .. } => true,
        }
    }
}

/// Delays between connection attempts: exponential from `min` to `max`, each plus a random
/// jitter of up to itself (so at most `2 × max`), so a fleet restarted at once does not
/// reconnect in lockstep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub min: Duration,
    /// The largest delay.
    pub max: Duration,
    /// Give up after this many attempts; `None` retries until the caller drops the future.
    pub max_attempts: Option<usize>,
}

impl Default for Backoff {
    /// 200 ms doubling up to 10 s, forever.
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(200),
            max: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The delays to wait before each retry (the first attempt is not delayed).
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter();
        let builder = match self.max_attempts {
            Some(n) => builder.with_max_times(n.saturating_sub(1)),
            None => builder.without_max_times(),
        };
        builder.build()
    }
}

/// Connects to the broker at `url`, retrying with `backoff` while it is unreachable. `name` is
/// shown as the connection's name in the management UI and `rabbitmqctl list_connections`.
/// Each failed attempt is logged with the delay before the next.
pub async fn connect(url: &str, name: &str, backoff: &Backoff) -> Result<Connection, AmqpError> {
    let shown = redact(url);
    url.parse::<lapin::uri::AMQPUri>()
        .map_err(|reason| AmqpError::BadUrl {
            url: shown.clone(),
            reason,
        })?;
    let mut delays = backoff.delays();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match Connection::connect(url, props).await {
            Ok(conn) => {
                tracing::info!(url = %shown, attempts, "connected to RabbitMQ");
                return Ok(conn);
            }
            Err(source) if let Some(reason) = refusal(&source) => {
                // A wrong user, password or virtual host: retrying would only repeat it.
                return Err(AmqpError::Refused { url: shown, reason });
            }
            Err(source) => match delays.next() {
                Some(delay) => {
                    tracing::warn!(url = %shown, attempts, error = %source, retry_in_ms = delay.as_millis() as u64, "cannot connect to RabbitMQ; retrying");
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(AmqpError::Connect {
                        url: shown,
                        attempts,
                        source,
                    });
                }
            },
        }
    }
}

/// The broker's reason when `e` is a refusal that no retry can fix: a login refused
/// (`ACCESS_REFUSED`, a wrong user or password), a virtual host that does not exist or that
/// the user may not use (`NOT_ALLOWED`), or credentials the client could not offer.
pub fn refusal(e: &lapin::Error) -> Option<String> {
    use lapin::protocol::AMQPHardError;
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                Some(amqp.get_message().to_string())
            }
            _ => None,
        },
        lapin::ErrorKind::AuthProviderError(reason) => Some(reason.clone()),
        _ => None,
    }
}

/// Opens a channel in publisher-confirm mode, as [`publish_confirmed`] requires.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, AmqpError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|source| AmqpError::Channel { source })?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|source| AmqpError::Channel { source })?;
    Ok(channel)
}

/// The arguments of a steps queue: quorum, with a delivery limit and the dead-letter exchange.
pub fn steps_queue_arguments(topology: &Topology) -> FieldTable {
    let mut args = quorum_arguments(topology);
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    args
}

/// The arguments of the results queue: quorum, dead-lettering what the coordinator rejects.
pub fn results_queue_arguments(topology: &Topology) -> FieldTable {
    quorum_arguments(topology)
}

fn quorum_arguments(topology: &Topology) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args.insert(
        "x-dead-letter-exchange".into(),
        long_string(&topology.dead_exchange()),
    );
    args
}

/// Declares the fleet's exchanges and queues if they are missing, all durable: the direct steps
/// exchange with one quorum queue per pool (bound by the pool's name), the results queue, the
/// heartbeats fanout, and the dead-letter fanout with its queue. Declaring an existing entity
/// with the same arguments is a no-op, so every process calls this on every connect.
pub async fn declare_topology(
    channel: &Channel,
    topology: &Topology,
    pools: &[&str],
) -> Result<(), AmqpError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    // The dead-letter exchange first: the queues name it.
    let dead = topology.dead_exchange();
    declare_exchange(channel, &dead, ExchangeKind::Fanout, durable).await?;
    let dead_queue = topology.dead_queue();
    declare_queue(channel, &dead_queue, FieldTable::default()).await?;
    bind(channel, &dead_queue, &dead, "").await?;

    let steps = topology.steps_exchange();
    declare_exchange(channel, &steps, ExchangeKind::Direct, durable).await?;
    for pool in pools {
        let queue = topology.steps_queue(pool);
        declare_queue(channel, &queue, steps_queue_arguments(topology)).await?;
        bind(channel, &queue, &steps, pool).await?;
    }
    declare_queue(
        channel,
        &topology.results_queue(),
        results_queue_arguments(topology),
    )
    .await?;
    declare_exchange(
        channel,
        &topology.heartbeats_exchange(),
        ExchangeKind::Fanout,
        durable,
    )
    .await?;
    Ok(())
}

/// Deletes everything [`declare_topology`] declares, messages included. For tests and for
/// tearing down a prefixed fleet; never called by a running worker or coordinator.
pub async fn delete_topology(
    channel: &Channel,
    topology: &Topology,
    pools: &[&str],
) -> Result<(), AmqpError> {
    let mut queues: Vec<String> = pools.iter().map(|p| topology.steps_queue(p)).collect();
    queues.push(topology.results_queue());
    queues.push(topology.dead_queue());
    for queue in queues {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(|source| AmqpError::Topology {
                action: "delete",
                what: "queue",
                name: queue.clone(),
                source,
            })?;
    }
    for exchange in [
        topology.steps_exchange(),
        topology.heartbeats_exchange(),
        topology.dead_exchange(),
    ] {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .map_err(|source| AmqpError::Topology {
                action: "delete",
                what: "exchange",
                name: exchange.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Properties of a durable JSON message: persistent, `application/json`, with `message_id` and
/// `headers`.
pub fn json_properties(message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(JSON_CONTENT_TYPE.into())
        .with_message_id(message_id.into())
        .with_headers(headers)
}

/// Headers carrying the body's signature under [`SIGNATURE_HEADER`] when a key is given;
/// empty otherwise.
pub fn signature_headers(key: Option<&[u8]>, body: &[u8]) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(key) = key {
        headers.insert(
            SIGNATURE_HEADER.into(),
            long_string(&warpline_shared::fleet::sign(key, body)),
        );
    }
    headers
}

/// A string header of a message, if present and textual.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Adds a W3C trace context (`traceparent`, `tracestate`, as the telemetry crate injects it)
/// to a message's headers. Headers, not the body: the body's signature does not cover them, so
/// the trace context of a message never changes what was signed.
pub fn add_trace_headers(
    headers: &mut FieldTable,
    carrier: &std::collections::BTreeMap<String, String>,
) {
    for (k, v) in carrier {
        headers.insert(k.as_str().into(), long_string(v));
    }
}

/// The W3C trace context a message carries in its headers (empty when it carries none).
pub fn trace_headers(
    properties: &BasicProperties,
    names: &[&str],
) -> std::collections::BTreeMap<String, String> {
    names
        .iter()
        .filter_map(|n| header_str(properties, n).map(|v| ((*n).to_string(), v)))
        .collect()
}

/// A header value holding text.
pub fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Publishes `body` and waits for the broker's confirm. The message is mandatory, so one that
/// reaches no queue is an error ([`AmqpError::Unroutable`]) rather than silently dropped; a
/// nack is [`AmqpError::Nacked`]. The channel must be in confirm mode ([`confirm_channel`]).
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    publish(channel, exchange, routing_key, body, properties, true).await
}

/// Publishes to an exchange that may have no queue bound (a fanout nobody listens to yet, such
/// as heartbeats) and waits for the confirm: like [`publish_confirmed`], but a message that
/// reaches no queue is dropped by the broker without error.
pub async fn publish_confirmed_unrouted_ok(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    publish(channel, exchange, routing_key, body, properties, false).await
}

async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Result<(), AmqpError> {
    if !channel.status().confirm() {
        return Err(AmqpError::NotConfirming);
    }
    let publish_error = |source| AmqpError::Publish {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        source,
    };
    let confirmation = channel
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(routing_key),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .map_err(publish_error)?
        .await
        .map_err(publish_error)?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(AmqpError::Unroutable {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            reply: returned.reply_text.to_string(),
        }),
        Confirmation::Nack(_) => Err(AmqpError::Nacked {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
        }),
        Confirmation::NotRequested => Err(AmqpError::NotConfirming),
    }
}

/// `url` with its password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
    options: ExchangeDeclareOptions,
) -> Result<(), AmqpError> {
    channel
        .exchange_declare(name.into(), kind, options, FieldTable::default())
        .await
        .map_err(|source| AmqpError::Topology {
            action: "declare",
            what: "exchange",
            name: name.to_string(),
            source,
        })
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), AmqpError> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
        .map_err(|source| AmqpError::Topology {
            action: "declare",
            what: "queue",
            name: name.to_string(),
            source,
        })
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), AmqpError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Topology {
            action: "bind",
            what: "queue",
            name: queue.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    #[test]
    fn backoff_is_capped_and_bounded() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: Some(8),
        };
        let delays: Vec<_> = b.delays().collect();
        assert_eq!(delays.len(), 7, "{delays:?}");
        // Jitter adds up to the delay itself on top of it.
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(2)),
            "{delays:?}"
        );
        assert!(delays[0] >= Duration::from_millis(100), "{delays:?}");
        assert!(Backoff::default().delays().take(100).count() == 100);
    }

    #[test]
    fn steps_queues_are_quorum_with_a_limit_and_dead_letters() {
        let args = steps_queue_arguments(&Topology::new("p."));
        let map = args.inner();
        assert_eq!(map.get("x-queue-type"), Some(&long_string("quorum")));
        assert_eq!(
            map.get("x-dead-letter-exchange"),
            Some(&long_string("p.warpline.dead"))
        );
        assert_eq!(
            map.get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(DELIVERY_LIMIT))
        );
    }

    #[test]
    fn signature_headers_verify() {
        let headers = signature_headers(Some(b"k"), b"body");
        let props = BasicProperties::default().with_headers(headers);
        let sig = header_str(&props, SIGNATURE_HEADER).unwrap();
        assert!(warpline_shared::fleet::verify_signature(
            b"k", b"body", &sig
        ));
        assert!(signature_headers(None, b"body").inner().is_empty());
    }
}

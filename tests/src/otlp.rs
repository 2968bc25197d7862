//! An OTLP trace receiver on 127.0.0.1 for the tests: what an OpenTelemetry Collector would be
//! in production, reduced to decoding what arrives and keeping it.
//!
//! Both OTLP transports the exporter speaks are served: `http/protobuf` (`POST /v1/traces`
//! with an `application/x-protobuf` body, on axum) and `grpc` (the
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` call, on tonic). Either way the
//! body is the exporter's real `ExportTraceServiceRequest`, decoded with `opentelemetry-proto`'s
//! generated types; nothing is parsed by hand. [`Receiver::dropping`] accepts and discards
//! (what the throughput benchmark exports into).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use tokio::sync::oneshot;

/// An OTLP transport the receiver serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
    /// OTLP/gRPC.
    Grpc,
}

impl Protocol {
    /// The value of `OTEL_EXPORTER_OTLP_PROTOCOL` for it.
    pub fn env_value(self) -> &'static str {
        match self {
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::Grpc => "grpc",
        }
    }
}

/// One span as it arrived, with its resource's `service.name`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// The parent's span id (16 hex digits), `None` for a root span.
    pub parent: Option<String>,
    /// The span's name.
    pub name: String,
    /// `server`, `client`, `producer`, `consumer`, `internal` (or `unspecified`).
    pub kind: &'static str,
    /// Attributes, their values as text.
    pub attributes: BTreeMap<String, String>,
    /// Start and end, nanoseconds since the epoch.
    pub start_ns: u64,
    /// End, nanoseconds since the epoch.
    pub end_ns: u64,
    /// `ok`, `error` or `unset`.
    pub status: &'static str,
}

impl ReceivedSpan {
    /// An attribute's value, or "" when it is absent.
    pub fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map(String::as_str).unwrap_or("")
    }
}

/// What arrived so far.
#[derive(Default)]
struct Seen {
    spans: Mutex<Vec<ReceivedSpan>>,
    requests: AtomicUsize,
    keep: bool,
}

impl Seen {
    fn take(&self, request: ExportTraceServiceRequest) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !self.keep {
            return;
        }
        let mut out = Vec::new();
        for rs in request.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(ReceivedSpan {
                        service: service.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                        name: s.name.clone(),
                        kind: kind_name(s.kind),
                        attributes: attributes(&s.attributes),
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                        status: match s.status.as_ref().map(|st| st.code) {
                            Some(1) => "ok",
                            Some(2) => "error",
                            _ => "unset",
                        },
                    });
                }
            }
        }
        self.spans.lock().expect("spans lock").extend(out);
    }
}

/// A receiver serving one protocol on 127.0.0.1; stops when dropped.
pub struct Receiver {
    /// What to set `OTEL_EXPORTER_OTLP_ENDPOINT` to (`http://127.0.0.1:PORT`).
    pub endpoint: String,
    /// The protocol it speaks.
    pub protocol: Protocol,
    seen: Arc<Seen>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Starts a receiver that keeps every span.
    pub fn start(protocol: Protocol) -> Receiver {
        Receiver::with(protocol, true)
    }

    /// Starts a receiver that accepts every export and keeps only the count of requests.
    pub fn dropping(protocol: Protocol) -> Receiver {
        Receiver::with(protocol, false)
    }

    fn with(protocol: Protocol, keep: bool) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Seen {
            keep,
            ..Seen::default()
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let state = seen.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a runtime for the OTLP receiver");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                let stopped = async {
                    let _ = stopped.await;
                };
                match protocol {
                    Protocol::HttpProtobuf => {
                        let app = axum::Router::new()
                            .route("/v1/traces", axum::routing::post(http_export))
                            .with_state(state);
                        let _ = axum::serve(listener, app)
                            .with_graceful_shutdown(stopped)
                            .await;
                    }
                    Protocol::Grpc => {
                        let _ = tonic::transport::Server::builder()
                            .add_service(TraceServiceServer::new(Grpc(state)))
                            .serve_with_incoming_shutdown(
                                tonic::transport::server::TcpIncoming::from(listener),
                                stopped,
                            )
                            .await;
                    }
                }
            });
        });
        Receiver {
            endpoint: format!("http://{addr}"),
            protocol,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The environment that points an exporter here.
    pub fn env(&self, service: &str) -> Vec<(String, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), self.endpoint.clone()),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL".into(),
                self.protocol.env_value().into(),
            ),
            ("OTEL_SERVICE_NAME".into(), service.into()),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.seen.spans.lock().expect("spans lock").clone()
    }

    /// How many export requests arrived (kept or dropped).
    pub fn requests(&self) -> usize {
        self.seen.requests.load(Ordering::Relaxed)
    }

    /// Waits until `done` holds for the spans received, or `limit` passes; returns them.
    pub fn wait_for(
        &self,
        limit: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + limit;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn http_export(
    axum::extract::State(seen): axum::extract::State<Arc<Seen>>,
    body: Bytes,
) -> (StatusCode, Vec<u8>) {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            seen.take(request);
            (
                StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string().into_bytes()),
    }
}

struct Grpc(Arc<Seen>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn kind_name(kind: i32) -> &'static str {
    match SpanKind::try_from(kind) {
        Ok(SpanKind::Internal) => "internal",
        Ok(SpanKind::Server) => "server",
        Ok(SpanKind::Client) => "client",
        Ok(SpanKind::Producer) => "producer",
        Ok(SpanKind::Consumer) => "consumer",
        _ => "unspecified",
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

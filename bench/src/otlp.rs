//! The OTLP/HTTP sink of the `tracing` scenario: a server on 127.0.0.1 that accepts every
//! `POST /v1/traces`, counts the requests, the bytes and the spans in them (decoded, so the
//! count proves the spans arrived), and drops them. It runs on its own thread and runtime, so
//! its cost does not land in the processes under test, and is stopped on drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::sync::oneshot;

/// What the sink has received so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// Export requests.
    pub requests: u64,
    /// Request bodies' bytes (protobuf, uncompressed as the exporter sends them).
    pub bytes: u64,
    /// Spans in them.
    pub spans: u64,
}

impl Received {
    /// The growth since `earlier`.
    pub fn since(self, earlier: Received) -> Received {
        Received {
            requests: self.requests - earlier.requests,
            bytes: self.bytes - earlier.bytes,
            spans: self.spans - earlier.spans,
        }
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    spans: AtomicU64,
}

/// A running sink.
pub struct Sink {
    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Binds a free port and starts serving.
    pub fn start() -> anyhow::Result<Sink> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("cannot bind the OTLP sink's port")?;
        listener.set_nonblocking(true)?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let counters = Arc::new(Counters::default());
        let state = counters.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the OTLP sink");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                let app = axum::Router::new()
                    .route("/v1/traces", axum::routing::post(export))
                    .with_state(state);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Ok(Sink {
            endpoint,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The counts so far.
    pub fn received(&self) -> Received {
        Received {
            requests: self.counters.requests.load(Ordering::Relaxed),
            bytes: self.counters.bytes.load(Ordering::Relaxed),
            spans: self.counters.spans.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn export(
    State(c): State<Arc<Counters>>,
    body: Bytes,
) -> Result<(StatusCode, [(&'static str, &'static str); 1], Vec<u8>), StatusCode> {
    let req =
        ExportTraceServiceRequest::decode(body.as_ref()).map_err(|_| StatusCode::BAD_REQUEST)?;
    let spans: usize = req
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    c.requests.fetch_add(1, Ordering::Relaxed);
    c.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    c.spans.fetch_add(spans as u64, Ordering::Relaxed);
    Ok((
        StatusCode::OK,
        [("content-type", "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    ))
}

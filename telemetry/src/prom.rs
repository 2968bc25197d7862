//! The Prometheus text exposition format: encoding a registry, and the small HTTP server a
//! worker runs for `--metrics ADDR` (the coordinator serves `/metrics` beside its API).

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

/// The content type of the text format, version 0.0.4.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `registry` in the text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("the text encoder writes to memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// An HTTP response holding `body` in the text format.
pub fn response(body: String) -> Response {
    ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], body).into_response()
}

/// Serves `GET /metrics`, `GET /healthz` (200 while the process serves) and `GET /readyz` (200
/// while `ready()` holds, else 503) on `addr` until `stop` is cancelled. Returns the bound
/// address once listening (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on `{addr}` for `/metrics`"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { response(encode(&registry)) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    Ok((bound, task))
}

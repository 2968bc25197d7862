//! Turns SIGINT and SIGTERM into one [`CancellationToken`], the root of each binary's shutdown
//! tree: whatever runs below it (an attempt, later a consumer) stops when the token is cancelled.

use std::io;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGINT or SIGTERM. The listeners are installed before this
/// returns, so a signal that arrives afterwards is never missed.
pub fn cancel_on_signals(token: CancellationToken) -> io::Result<JoinHandle<()>> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
            () = token.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down");
        token.cancel();
    }))
}

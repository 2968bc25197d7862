//! Failure classification shared by every tool.
//!
//! The supervisor decides between retrying and halting by exit code and by the first word of the
//! error line, never by parsing prose. A [`ToolError::Transient`] failure (connection refused or
//! reset, timeout, HTTP 5xx, database unreachable) prints `ConnectionError: …` and exits 75
//! (`EX_TEMPFAIL`); a [`ToolError::Permanent`] one prints `CRITICAL: …` and exits 1.

use std::fmt::Display;
use std::process::ExitCode;

/// Exit code of a failure that may succeed when retried (`EX_TEMPFAIL` from `sysexits.h`).
pub const EXIT_TRANSIENT: u8 = 75;
/// Exit code of a failure that retrying will not fix.
pub const EXIT_PERMANENT: u8 = 1;

/// Why a tool failed, split by whether a retry can help.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The outside world was unavailable; the same command may succeed later.
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// The input, the configuration or the data is wrong; retrying will fail the same way.
    #[error("{0:#}")]
    Permanent(anyhow::Error),
}

/// The result type of every tool operation.
pub type Result<T, E = ToolError> = std::result::Result<T, E>;

impl ToolError {
    /// A transient failure with the given message.
    pub fn transient(message: impl Display) -> Self {
        Self::Transient(anyhow::anyhow!("{message}"))
    }

    /// A permanent failure with the given message.
    pub fn permanent(message: impl Display) -> Self {
        Self::Permanent(anyhow::anyhow!("{message}"))
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Transient(_) => EXIT_TRANSIENT,
            Self::Permanent(_) => EXIT_PERMANENT,
        }
    }

    /// The single stderr line reporting this failure, with its marker prefix.
    pub fn log_line(&self) -> String {
        let (prefix, error) = match self {
            Self::Transient(e) => ("ConnectionError", e),
            Self::Permanent(e) => ("CRITICAL", e),
        };
        // Log checks match line by line, so the whole cause chain stays on one line.
        let message = format!("{error:#}").replace(['\n', '\r'], " ");
        format!("{prefix}: {message}")
    }
}

/// Attaches context to a foreign error and classifies it in one step.
pub trait ResultExt<T> {
    /// Marks the error permanent, wrapped in the context `context()` returns.
    fn permanent<C: Display + Send + Sync + 'static>(
        self,
        context: impl FnOnce() -> C,
    ) -> Result<T>;
    /// Marks the error transient, wrapped in the context `context()` returns.
    fn transient<C: Display + Send + Sync + 'static>(
        self,
        context: impl FnOnce() -> C,
    ) -> Result<T>;
}

impl<T, E: Into<anyhow::Error>> ResultExt<T> for std::result::Result<T, E> {
    fn permanent<C: Display + Send + Sync + 'static>(
        self,
        context: impl FnOnce() -> C,
    ) -> Result<T> {
        self.map_err(|e| ToolError::Permanent(e.into().context(context())))
    }

    fn transient<C: Display + Send + Sync + 'static>(
        self,
        context: impl FnOnce() -> C,
    ) -> Result<T> {
        self.map_err(|e| ToolError::Transient(e.into().context(context())))
    }
}

/// Prints a `WARNING: ` line on stderr.
pub fn warn(message: impl Display) {
    eprintln!("WARNING: {message}");
}

/// Ends a tool: reports a failure on stderr and converts the outcome into the exit code.
pub fn finish(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", error.log_line());
            ExitCode::from(error.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_carry_the_marker_and_stay_on_one_line() {
        let transient: Result<()> =
            Err(std::io::Error::other("refused\nby peer")).transient(|| "cannot reach `db`");
        let error = transient.unwrap_err();
        assert_eq!(error.exit_code(), 75);
        assert_eq!(
            error.log_line(),
            "ConnectionError: cannot reach `db`: refused by peer"
        );
        let permanent = ToolError::permanent("bad month `2024-13`");
        assert_eq!(permanent.exit_code(), 1);
        assert_eq!(permanent.log_line(), "CRITICAL: bad month `2024-13`");
    }
}

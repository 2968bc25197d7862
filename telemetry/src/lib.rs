//! Warpline's telemetry, set up once per binary by [`init`]: logs (text or JSON lines, filtered
//! by `WARPLINE_LOG`), OpenTelemetry traces exported over OTLP when the standard `OTEL_*`
//! variables ask for it ([`trace`]), and the Prometheus text exposition served at
//! `GET /metrics` ([`prom`]); and [`dist`], the completions and man pages every binary offers.
//!
//! Traces are off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set: then no exporter is built, [`trace::enabled`] is false and every span helper returns
//! at once (one relaxed atomic load), so tracing costs nothing measurable when off. `docs/OBSERVABILITY.md`
//! has the span tree, the metrics and the variables.

pub mod dist;
pub mod prom;
pub mod trace;

use std::io::IsTerminal;

use anyhow::Context as _;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How log lines are written on standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`, and `spans` with the
    /// run, step and attempt ids (and, when tracing is on, the `trace_id`) of the spans the
    /// event happened in.
    Json,
}

/// The `--log-format` flag every binary flattens into its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log lines on standard error as `text` or `json` (filter them with `WARPLINE_LOG`, e.g.
    /// `WARPLINE_LOG=info,warpline_worker=debug`).
    #[arg(
        long,
        global = true,
        env = "WARPLINE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes the spans still buffered.
#[must_use = "call `shutdown` before the process exits, or buffered spans are lost"]
pub struct Telemetry {
    tracing_on: bool,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing_on(&self) -> bool {
        self.tracing_on
    }

    /// Exports every span still buffered (bounded: 5 s) and stops the exporter. Call it once,
    /// from async code, after the work is done and before `main` returns.
    pub async fn shutdown(self) {
        if self.tracing_on {
            trace::shutdown().await;
        }
    }
}

/// Installs logging and, when configured, OpenTelemetry tracing for the binary `service`
/// (the default `service.name`; `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` win).
///
/// The log filter comes from `WARPLINE_LOG` (`RUST_LOG` is read when it is unset), else
/// `default_filter`. Must be called inside the tokio runtime (the span exporter runs on it).
pub fn init(
    service: &'static str,
    format: LogFormat,
    default_filter: &str,
) -> anyhow::Result<Telemetry> {
    let filter = log_filter(default_filter)?;
    let ansi = std::io::stderr().is_terminal();
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours only on a terminal: logs collected from a file or a container stay
            // greppable.
            .with_ansi(ansi)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
    };
    // Spans are built with the OpenTelemetry API in `trace` (their parents come from message
    // headers and audit records, not from tracing's span stack), so no tracing layer bridges
    // log spans into the export: log spans stay logs, and only the run's spans leave.
    let tracing_on = trace::setup(service)
        .context("cannot set up OpenTelemetry tracing")?
        .is_some();
    tracing_subscriber::registry()
        .with(fmt)
        .try_init()
        .context("a logger is already installed")?;
    Ok(Telemetry { tracing_on })
}

/// `WARPLINE_LOG`, else `RUST_LOG`, else `default_filter`. A filter that does not parse is an
/// error, not a silent default.
fn log_filter(default_filter: &str) -> anyhow::Result<EnvFilter> {
    for var in ["WARPLINE_LOG", "RUST_LOG"] {
        if let Ok(v) = std::env::var(var)
            && !v.trim().is_empty()
        {
            return EnvFilter::try_new(&v).with_context(|| {
                format!("`{var}={v}` is not a log filter; use e.g. `info` or `warn,warpline_worker=debug`")
            });
        }
    }
    Ok(EnvFilter::new(default_filter))
}

/// The outcome label of a step result: `passed` (exit 0 and no error check failed),
/// `failed_checks` (exit 0, an error check failed), `timed_out`, `not_run` (refused or never
/// started: exit -1) or `failed` (any other exit code). The coordinator uses the same labels.
pub fn outcome_label(o: &warpline_shared::contracts::StepOutcome) -> &'static str {
    use warpline_shared::contracts::ReportStatus;
    let r = &o.result;
    if r.timed_out {
        "timed_out"
    } else if r.exit_code == -1 {
        "not_run"
    } else if r.exit_code != 0 {
        "failed"
    } else if o.report.status == ReportStatus::Fail {
        "failed_checks"
    } else {
        "passed"
    }
}

//! The `warpline` command line. Each subcommand lives in its own module: [`run`] (local mode),
//! [`serve`] (the fleet coordinator), [`ops`] and [`watch`] (operator commands over a
//! coordinator's HTTP API, both through [`client`] and [`report`], neither importing the
//! other), [`audit`] (verify, show) and [`agent`] (replay); this module holds the argument
//! types and the dispatch.

mod agent;
mod audit;
mod client;
mod ops;
pub(crate) mod preflight;
mod report;
mod run;
pub mod serve;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::api::PartitionOrder;
use crate::supervisor::AgentKind;

/// Warpline: supervised backfills of command-line pipelines.
#[derive(Debug, Parser)]
#[command(
    name = "warpline",
    version = env!("WARPLINE_LONG_VERSION"),
    about,
    long_about = None
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format (every subcommand).
    #[command(flatten)]
    pub log: warpline_telemetry::LogArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a backfill in this process: the coordinator and N workers, no services needed.
    Run(RunArgs),
    /// Run the fleet coordinator: state in PostgreSQL, workers over RabbitMQ, an HTTP API.
    Serve(serve::ServeArgs),
    /// Inspect audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Supervisor agents: replay an audit log's decisions against an agent.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Submit a backfill to a coordinator (`warpline serve`); prints its id.
    Submit(SubmitArgs),
    /// Show one backfill (counts per state and step, rate, ETA, failures, escalations) or all.
    Status(StatusArgs),
    /// Follow a backfill with live progress bars until it finishes.
    Watch(WatchArgs),
    /// List the runs waiting for an operator.
    Escalations(EscalationsArgs),
    /// Answer an escalated run: proceed, retry or halt, with a reason.
    Resolve(ResolveArgs),
    /// Cancel a backfill: nothing new starts, running steps finish, every run ends.
    Cancel(BackfillArgs),
    /// Resume every HALTED run of a backfill at the step that failed.
    RetryFailed(BackfillArgs),
    /// Run a backfill's partitions again in a new backfill of the same pipeline (by default
    /// those that did not complete).
    Reprocess(ReprocessArgs),
    /// Shell completions and man pages.
    #[command(flatten)]
    Dist(warpline_telemetry::dist::DistCommand),
    /// The reaper `warpline run` starts for itself (internal): kills the process groups it
    /// registers on its standard input once that reaches end of file, i.e. once `warpline run`
    /// is gone. See `warpline_executor::reaper`.
    #[command(hide = true)]
    Reap,
}

/// The hidden subcommand that runs the reaper ([`Command::Reap`]).
pub const REAP: &str = "reap";

/// Where the coordinator's HTTP API is, and the token to show it.
#[derive(Clone, Args)]
pub struct ApiArgs {
    /// The coordinator's HTTP API (`warpline serve --http`).
    #[arg(
        long = "api",
        value_name = "URL",
        env = "WARPLINE_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// The API token (a viewer's to read, an operator's to act), sent as a bearer token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "WARPLINE_API_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

impl std::fmt::Debug for ApiArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("ApiArgs")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `warpline submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The pipeline config (JSON). Its path is sent as an absolute path: the coordinator and
    /// the workers must see the same file system (inputs are resolved against its directory).
    pub pipeline: PathBuf,
    /// The partitions.
    #[command(flatten)]
    pub partitions: PartitionArgs,
    /// Set a pipeline variable: NAME=VALUE (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Use this workdir instead of the pipeline's (sent as an absolute path).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Most runs in progress at once (default 8).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel: Option<u32>,
    /// Higher goes first when the fleet is busy with several backfills.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Which partitions start first: `asc` (as given) or `desc` (newest month first).
    #[arg(long, value_enum, default_value_t = PartitionOrder::Asc)]
    pub order: PartitionOrder,
    /// Follow the backfill to its end; exit 0 only if every run completed.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON on standard output: the submit's answer, or with --wait the final summary.
    #[arg(long)]
    pub json: bool,
    /// This submit's id (default: a new UUID). Sending a submit again with the id of one that
    /// got no answer (a timeout, a 503) returns that one's backfill instead of a second one.
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    /// The partitions from a file instead of --months/--datasets (as for `run`): CSV with a
    /// header row, or a JSON array of objects (`.json`); a `month` and/or `dataset` column
    /// names each partition, every other column is a per-partition variable.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["months", "datasets"])]
    pub partitions_file: Option<PathBuf>,
    /// Which partitions run, against earlier backfills of this pipeline the coordinator holds:
    /// `missing` (never run), `failed` (never run, or run without completing), `all` (every
    /// partition given; the default). A partition a live backfill still runs never starts
    /// twice.
    #[arg(long, value_enum, default_value_t = crate::reprocess::Reprocess::All)]
    pub reprocess: crate::reprocess::Reprocess,
    /// Submit even when no live worker may run some step (the coordinator refuses such a
    /// backfill otherwise): for a fleet that scales from zero workers, or workers still
    /// starting. The problems are printed as warnings.
    #[arg(long)]
    pub allow_unrunnable: bool,
    /// Check and render the backfill here, print each step's argv, environment (secrets as
    /// references) artefacts and checks for the first partitions, and which live workers may
    /// run each step; submit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The coordinator.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `warpline status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A backfill id (default: every backfill, one line each).
    pub backfill: Option<String>,
    /// Print the summary (or every summary) as JSON.
    #[arg(long)]
    pub json: bool,
    /// The coordinator.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `warpline watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The backfill id.
    pub backfill: String,
    /// The coordinator.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `warpline escalations`.
#[derive(Debug, Args)]
pub struct EscalationsArgs {
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
    /// The coordinator.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// An operator's answer to an escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resolution {
    /// Accept the attempt and go to the next step.
    Proceed,
    /// Run the step again.
    Retry,
    /// Stop the run (it can be resumed with retry-failed).
    Halt,
    /// For an escalated backfill: start runs again.
    Continue,
    /// For an escalated backfill: cancel it.
    Cancel,
}

/// `warpline resolve`.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// The escalated run (an id, a unique id prefix or a partition key), or with continue or
    /// cancel an escalated backfill (an id or a unique id prefix).
    pub run: String,
    /// What to do.
    #[arg(long, value_enum)]
    pub action: Resolution,
    /// Why (required; it goes into the audit log).
    #[arg(long)]
    pub reason: String,
    /// Who decides, when the API has no tokens (default: $USER; with a token the coordinator
    /// audits the token's identity).
    #[arg(long)]
    pub operator: Option<String>,
    /// The coordinator.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `warpline cancel` and `warpline retry-failed`.
#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// The backfill: an id, a unique id prefix, or a run of it (run id, prefix or partition key).
    pub backfill: String,
    /// Print the coordinator's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// The coordinator.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `warpline reprocess`.
#[derive(Debug, Args)]
pub struct ReprocessArgs {
    /// The backfill: an id, a unique id prefix, or a run of it (run id, prefix or partition key).
    pub backfill: String,
    /// Which partitions run, against every backfill of the pipeline the coordinator holds:
    /// `failed` those that did not complete, `missing` those never run, `all` every one.
    #[arg(long, value_enum, default_value_t = crate::reprocess::Reprocess::Failed)]
    pub mode: crate::reprocess::Reprocess,
    /// Print the coordinator's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// The coordinator.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// How an LLM agent is reached (flags over `WARPLINE_LLM_*` over the pipeline's `agent`).
#[derive(Debug, Clone, Args)]
pub struct LlmArgs {
    /// The model (default: the config's `agent.model`, `WARPLINE_LLM_MODEL`, or the
    /// provider's current small model).
    #[arg(long)]
    pub llm_model: Option<String>,
    /// The API's base URL (default: the config's `agent.base_url`, `WARPLINE_LLM_BASE_URL`, or
    /// the provider's public endpoint).
    #[arg(long)]
    pub llm_base_url: Option<String>,
}

/// `warpline agent ...`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Re-ask an agent at every decision point of an audit log and show how often it agrees
    /// with what was recorded.
    Replay(ReplayArgs),
}

/// `warpline agent replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The audit log (JSONL) to replay.
    pub audit: PathBuf,
    /// The agent to ask.
    #[arg(long, value_enum)]
    pub agent: AgentKind,
    /// How the model is reached.
    #[command(flatten)]
    pub llm: LlmArgs,
    /// Take the `agent` section (timeouts, limits) from this pipeline config.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The partitions of a backfill.
#[derive(Debug, Clone, Args)]
pub struct PartitionArgs {
    /// Months to cover, inclusive: FROM..TO (YYYY-MM..YYYY-MM) or one YYYY-MM.
    #[arg(long)]
    pub months: Option<String>,
    /// Datasets to cover: a,b,c. With --months, every dataset × every month.
    #[arg(long)]
    pub datasets: Option<String>,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// Bars on a terminal, lines otherwise.
    Auto,
    /// Live progress bars.
    Bars,
    /// One line per event.
    Lines,
    /// Nothing.
    None,
}

/// `warpline run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline config (JSON).
    pub pipeline: PathBuf,
    /// The partitions.
    #[command(flatten)]
    pub partitions: PartitionArgs,
    /// In-process workers (concurrent tool runs).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
    /// Most runs in progress at once (default: twice --workers, so workers stay busy while
    /// some runs wait out a retry backoff).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel: Option<u32>,
    /// The supervisor agent (default: the config's `agent.kind`, else `rules`).
    #[arg(long, value_enum)]
    pub agent: Option<AgentKind>,
    /// How an LLM agent is reached.
    #[command(flatten)]
    pub llm: LlmArgs,
    /// Shadow mode: ask the model beside the rules, apply one (config `agent.apply`, default
    /// rules) and audit both.
    #[arg(long)]
    pub shadow: bool,
    /// The audit log to append to (default: `<workdir>/audit/<backfill id>.jsonl`).
    #[arg(long)]
    pub audit: Option<PathBuf>,
    /// Print a machine-readable summary on standard output.
    #[arg(long)]
    pub json: bool,
    /// Use this workdir instead of the pipeline's (outputs, run directories, default audit log).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Set a pipeline variable: NAME=VALUE (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// How to show progress on standard error.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// The partitions from a file instead of --months/--datasets: CSV with a header row, or a
    /// JSON array of objects (`.json`); a `month` and/or `dataset` column names each
    /// partition, every other column is a per-partition variable.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["months", "datasets"])]
    pub partitions_file: Option<PathBuf>,
    /// Directories searched for a bare command name before `PATH` (repeatable; the variable
    /// takes a `:`-separated list). Nothing is looked for beside `warpline` itself.
    #[arg(
        long = "tools-dir",
        env = "WARPLINE_TOOLS_DIR",
        value_delimiter = ':',
        value_name = "DIR"
    )]
    pub tools_dirs: Vec<PathBuf>,
    /// Where `{secret:NAME}` references are read from: the file `NAME` in this directory.
    #[arg(long, env = "WARPLINE_SECRETS_DIR", value_name = "DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// Which paths a step's arguments may name: anywhere unless `--confine-args` (the pipeline
    /// is your own file), then as fleet workers check them.
    #[command(flatten)]
    pub paths: warpline_executor::settings::PathArgs,
    /// What the steps may run, comma-separated (default: each step's own command): a program,
    /// optionally followed by the arguments it is pinned to, e.g. `python3 scripts/x.py`.
    #[arg(long, value_delimiter = ',', value_name = "ENTRY,...")]
    pub allow: Vec<String>,
    /// Check and render everything, print each step's argv, environment (secrets as
    /// references), artefacts and checks for the first partitions, and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Serve the web dashboard for this backfill on ADDR (e.g. 127.0.0.1:8081) while it runs.
    #[arg(long, value_name = "ADDR")]
    pub ui: Option<std::net::SocketAddr>,
    /// Keep the --ui dashboard up after the run has ended, showing its final state (read
    /// only), until Ctrl-C or SIGTERM; the exit code is still the run's.
    #[arg(long, requires = "ui")]
    pub ui_stay: bool,
    /// Exit 1 when any check of severity `warn` failed, even if every run completed.
    #[arg(long)]
    pub fail_on_warn: bool,
    /// Continue an earlier backfill of this pipeline from its audit log instead of starting
    /// one: the latest in the workdir's `audit/` directory (or in --audit FILE), or
    /// `--resume=ID` (an id or a unique prefix). Completed runs are skipped; runs in flight
    /// or interrupted go on where they stopped; HALTED runs resume at the step that failed
    /// (as retry-failed does); ESCALATED runs are retried unless --resolve answers them.
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "",
        value_name = "BACKFILL",
        conflicts_with = "reprocess"
    )]
    pub resume: Option<String>,
    /// With --resume, answer an escalated run: RUN=proceed|retry|halt, RUN being a run id, a
    /// unique id prefix or a partition key (repeatable). Needs --reason.
    #[arg(long, value_name = "RUN=ACTION", requires_all = ["resume", "reason"])]
    pub resolve: Vec<String>,
    /// Why (audited with the resume's answers).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Who answers, as audited (default: $USER, else `local`).
    #[arg(long, value_name = "NAME")]
    pub operator: Option<String>,
    /// Which partitions to run, against earlier backfills of this pipeline in the workdir's
    /// audit logs: `missing` (never run), `failed` (never run, or run without completing),
    /// `all` (every partition given; the default).
    #[arg(long, value_enum)]
    pub reprocess: Option<crate::reprocess::Reprocess>,
}

/// `warpline audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log's hash chain; names the first bad line.
    Verify {
        /// The JSONL file (or `--file FILE`, as `audit show` takes it).
        #[arg(value_name = "FILE")]
        path: Option<PathBuf>,
        /// The JSONL file.
        #[arg(long, env = "WARPLINE_AUDIT", value_name = "FILE")]
        file: Option<PathBuf>,
        /// Also require the last line's hash to be this (e.g. `audit_head` from `warpline
        /// status` or the database), so a log cut short after its last good line fails too.
        #[arg(long, value_name = "HASH")]
        expect_head: Option<String>,
    },
    /// Print one run's story in order.
    Show {
        /// A run id, a unique prefix of one, or a partition key (e.g. `sales_2024-01`).
        run: String,
        /// The JSONL file.
        #[arg(long, env = "WARPLINE_AUDIT")]
        file: PathBuf,
        /// Print the raw JSON records instead of one line each.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line; the future resolves to the process's exit code.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Run(_) | Command::Serve(_)) {
        quiet_on_a_closed_pipe();
    }
    match cli.command {
        Command::Run(args) => run::run_local(args, shutdown).await,
        Command::Serve(args) => serve::serve(args, shutdown).await,
        Command::Audit(AuditCommand::Verify {
            path,
            file,
            expect_head,
        }) => {
            // The positional file wins over `--file` (and over WARPLINE_AUDIT).
            let file = path.or(file).ok_or_else(|| {
                anyhow::anyhow!(
                    "no audit log given: `warpline audit verify FILE`, `--file FILE` or WARPLINE_AUDIT"
                )
            })?;
            audit::audit_verify(&file, expect_head.as_deref())
        }
        Command::Audit(AuditCommand::Show { run, file, json }) => {
            audit::audit_show(&run, &file, json)
        }
        Command::Agent(AgentCommand::Replay(args)) => agent::replay(args).await,
        Command::Submit(args) => {
            let json = args.json;
            match ops::submit(args).await? {
                Some(new) => watch::follow_to_end(&new.client, &new.id, json, shutdown).await,
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Status(args) => ops::status(args).await,
        Command::Watch(args) => watch::watch(args, shutdown).await,
        Command::Escalations(args) => ops::escalations(args).await,
        Command::Resolve(args) => ops::resolve(args).await,
        Command::Cancel(args) => ops::cancel(args).await,
        Command::RetryFailed(args) => ops::retry_failed(args).await,
        Command::Reprocess(args) => ops::reprocess(args).await,
        Command::Dist(dist) => {
            dist.run(
                <Cli as clap::CommandFactory>::command(),
                &mut std::io::stdout(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        // `main` runs it before any runtime starts.
        Command::Reap => {
            anyhow::bail!("`warpline {REAP}` runs only as the first thing `main` does")
        }
    }
}

/// Gives SIGPIPE its default action back, so that `warpline status | head` ends quietly, as
/// other command-line tools do, when `head` has read enough (Rust ignores SIGPIPE, and `println!`
/// then panics on the broken pipe). Only for the commands that print and exit: `serve` and `run`
/// keep ignoring it and see `EPIPE` on their own pipes.
fn quiet_on_a_closed_pipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: the default disposition runs no code of ours in a signal handler, so nothing can
    // break async-signal-safety; no other part of the program relies on SIGPIPE being ignored
    // in these commands (they write to standard output and to sockets, which use MSG_NOSIGNAL).
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

//! The path-confinement flags of every command that runs steps: one clap struct, flattened
//! into `warpline-worker`, its `exec` subcommand and `warpline run`, so a flag, its environment
//! variable and its meaning are the same everywhere. Only the default differs, and the caller
//! says which: confined for a worker (a pipeline arrives over the network), not for `warpline
//! run` (the pipeline is the operator's own file).

use std::path::PathBuf;

use clap::Args;

use crate::ExecConfig;
use crate::allow::{AllowError, path_roots};

/// Which paths a step's arguments may name ([`crate::check_args`]).
#[derive(Debug, Clone, Default, Args)]
pub struct PathArgs {
    /// More directories a step's arguments may name by path (repeatable; the variable takes a
    /// `:`-separated list). Literal paths in arguments (absolute, climbing with `..`, `file://`
    /// URLs, also as an option's value: `--out=/p`, `-o/p`, `if=/p`) must otherwise stay under
    /// the step's workdir, its pipeline's directory and the tools dirs, so a submitted pipeline
    /// cannot point an allowed tool elsewhere.
    #[arg(
        long = "path-root",
        env = "WARPLINE_PATH_ROOTS",
        value_delimiter = ':',
        value_name = "DIR"
    )]
    pub path_roots: Vec<PathBuf>,
    /// Refuse a step whose arguments name a path outside those directories: the default of
    /// fleet workers and `exec`; `warpline run` only checks with this flag.
    #[arg(long, env = "WARPLINE_CONFINE_ARGS")]
    pub confine_args: bool,
    /// Let a step's arguments name any path: the default of `warpline run`.
    #[arg(long, env = "WARPLINE_UNCONFINED_ARGS")]
    pub unconfined_args: bool,
}

/// Whether arguments are confined when neither flag is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confinement {
    /// Fleet workers and `exec`.
    ByDefault,
    /// `warpline run`.
    OnRequest,
}

impl PathArgs {
    /// Sets `cfg`'s argument confinement and path roots (made absolute, checked to exist).
    pub fn apply(self, cfg: &mut ExecConfig, default: Confinement) -> Result<(), AllowError> {
        if self.confine_args && self.unconfined_args {
            return Err(AllowError::ConfinementFlags);
        }
        cfg.confine_args = match default {
            Confinement::ByDefault => !self.unconfined_args,
            Confinement::OnRequest => self.confine_args,
        };
        if !cfg.confine_args && !self.path_roots.is_empty() {
            tracing::warn!("--path-root has no effect: arguments are not confined");
        }
        cfg.path_roots = path_roots(self.path_roots)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        paths: PathArgs,
    }

    fn confined(args: &[&str], default: Confinement) -> Result<bool, AllowError> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap();
        let mut cfg = ExecConfig::new("t", Vec::<String>::new());
        cli.paths.apply(&mut cfg, default)?;
        Ok(cfg.confine_args)
    }

    #[test]
    fn each_command_keeps_its_default_and_both_flags_mean_the_same_everywhere() {
        use Confinement::*;
        assert!(confined(&[], ByDefault).unwrap());
        assert!(!confined(&[], OnRequest).unwrap());
        assert!(!confined(&["--unconfined-args"], ByDefault).unwrap());
        assert!(confined(&["--confine-args"], OnRequest).unwrap());
        assert!(confined(&["--confine-args"], ByDefault).unwrap());
        assert!(!confined(&["--unconfined-args"], OnRequest).unwrap());
        let err = confined(&["--confine-args", "--unconfined-args"], ByDefault).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = confined(&["--path-root", "/no/such/dir/here"], ByDefault).unwrap_err();
        assert!(err.to_string().contains("--path-root"), "{err}");
    }
}

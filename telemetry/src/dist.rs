//! What a binary says about itself beyond `--help`: shell completions and man pages, generated
//! from the same clap definitions that parse its command line, so they cannot drift from it.
//! Both binaries flatten [`DistCommand`] into their subcommands (`completions`, `man`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap_complete::Shell;

/// The `completions` and `man` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DistCommand {
    /// Print a shell completion script on standard output, e.g.
    /// `warpline completions bash > /etc/bash_completion.d/warpline`.
    Completions {
        /// The shell the script is for.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write man pages (section 1) into a directory: one for the command and one per
    /// subcommand (`warpline-submit.1`, …), e.g. `warpline man /usr/local/share/man/man1`.
    Man {
        /// The directory (created when missing).
        dir: PathBuf,
    },
}

impl DistCommand {
    /// Carries the command out for `cmd` (the binary's `Cli::command()`), writing to `out`;
    /// `man` lists the pages it wrote.
    pub fn run(&self, cmd: clap::Command, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            DistCommand::Completions { shell } => {
                let mut cmd = cmd;
                let name = cmd.get_name().to_owned();
                clap_complete::generate(*shell, &mut cmd, name, out);
                Ok(())
            }
            DistCommand::Man { dir } => {
                for page in write_man_pages(cmd, dir)? {
                    writeln!(out, "{}", page.display())?;
                }
                Ok(())
            }
        }
    }
}

/// Writes `cmd`'s man page and one per visible subcommand (recursively) into `dir`, returning
/// their paths in order.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, dir, &mut written)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    Ok(written)
}

fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    written.push(clap_mangen::Man::new(cmd.clone()).generate_to(dir)?);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("tool")
            .version("1.2.3")
            .about("A sample tool")
            .subcommand(
                clap::Command::new("fetch")
                    .about("Fetch things")
                    .arg(clap::Arg::new("url").long("url")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn man_pages_cover_the_command_and_each_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!("warpline-man-{}", std::process::id()));
        let pages = write_man_pages(sample(), &dir).unwrap();
        let names: Vec<_> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool.1", "tool-fetch.1"]);
        let fetch = std::fs::read_to_string(&pages[1]).unwrap();
        assert!(fetch.starts_with(".ie"), "not roff: {fetch}");
        assert!(
            fetch.contains("Fetch things") && fetch.contains("url"),
            "{fetch}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn completions_name_the_subcommands() {
        let mut out = Vec::new();
        DistCommand::Completions { shell: Shell::Bash }
            .run(sample(), &mut out)
            .unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(
            script.contains("_tool()") && script.contains("fetch"),
            "{script}"
        );
    }
}

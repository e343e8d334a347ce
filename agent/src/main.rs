//! `agent`: parse the command line, then hand over to the command. Exit codes (POLICY.md):
//! 0 success, 1 runtime failure, 2 invalid policy or usage.
use std::process::ExitCode;

use agent::{
    cli::{Cli, Command, EXIT_INVALID},
    commands,
};
use clap::Parser;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not usage errors.
            return if e.use_stderr() {
                ExitCode::from(EXIT_INVALID)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Check { file } => commands::check(&file),
        Command::Run {
            config,
            detach_on_exit,
            reset,
        } => commands::run(
            &config,
            agent::run::Options {
                detach_on_exit,
                reset,
            },
        ),
        Command::Uninstall { config } => commands::uninstall(config.as_deref()),
        Command::Status { addr, output } => commands::status(addr, output),
    }
}

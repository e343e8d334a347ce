//! The commands behind the CLI, each returning the process exit code.

use std::{net::SocketAddr, path::Path, process::ExitCode, time::Duration};

use crate::{
    cli::{EXIT_INVALID, EXIT_RUNTIME, Output},
    config, run,
    telemetry::status::{self, StatusReport},
};

pub fn check(file: &Path) -> ExitCode {
    match config::load_file(file) {
        Ok(_) => {
            println!("{}: valid", file.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print!("{errors}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

pub fn run(file: &Path, options: run::Options) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: starting the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(run::run(file, options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Plain stderr, not tracing: the subscriber is not up for an invalid policy, and
            // policy errors must keep their `FILE:LINE:COLUMN: FIELD.PATH: message` form.
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

pub fn uninstall(file: Option<&Path>) -> ExitCode {
    match run::uninstall(file) {
        Ok(removed) if removed.is_empty() => {
            println!("nothing to remove");
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for r in removed {
                println!("removed {r}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agent uninstall: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

pub fn status(addr: SocketAddr, output: Output) -> ExitCode {
    let url = format!("http://{addr}/status");
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    let body = match agent
        .get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
    {
        Ok(body) => body,
        Err(e) => {
            eprintln!("agent status: no running agent answered at {url}: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let report: StatusReport = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agent status: {url} answered something that is not a status report: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match output {
        Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("agent status: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        },
        Output::Text => print!("{}", status::render_text(&report)),
    }
    ExitCode::SUCCESS
}

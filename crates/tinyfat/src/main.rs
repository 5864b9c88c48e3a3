//! The `tinyfat` binary: parses the command line, builds the platform from
//! configuration, and calls into `tinyfat-platform`. No logic lives here
//! beyond wiring and printing.
//!
//! Exit codes: 0 success, 1 a user error (bad input, unknown agent) or a
//! failure, 2 a usage error (clap's own).

mod admin;
mod chat;
mod cli;
mod events;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

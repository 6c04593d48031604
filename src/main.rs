//! The `comq-gpu` binary: parse flags, call the library, print, exit.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = <cli::Cli as clap::Parser>::parse();
    cli::init_logging(&args);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Every failure is reported as bad input or an unusable device: exit code 2.
            ExitCode::from(2)
        }
    }
}

//! The `comq-gpu` binary: parse flags, call the library, print, exit.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // A file-size limit (RLIMIT_FSIZE) must turn into a write error that names the file, not a
    // kill by SIGXFSZ that leaves a temporary file behind.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN before any thread is started.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
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

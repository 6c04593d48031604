//! The `comq-gpu` binary: parse flags, call the library, print, exit.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Mesa's Vulkan drivers print "XDG_RUNTIME_DIR is invalid or not set" twice at start-up when
    // the variable is unset (a headless session): point it at the temporary folder, where the
    // window-system probe fails quietly. Before any thread exists, so setting it is sound.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    // SIGINT/SIGTERM/SIGHUP remove unfinished files and keep the work directory; first, before
    // any thread exists, so every thread inherits the blocked signals.
    comq_gpu::interrupt::install();
    // A file-size limit (RLIMIT_FSIZE) must turn into a write error that names the file, not a
    // kill by SIGXFSZ that leaves a temporary file behind.
    comq_gpu::platform::ignore_file_size_signal();
    let args = match cli::parse_with_recipe(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    cli::init_logging(&args);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message, then each cause that adds something (an I/O error's text is already
            // in the message that names its file).
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("error: {msg}");
            // Every failure is reported as bad input or an unusable device: exit code 2.
            ExitCode::from(2)
        }
    }
}

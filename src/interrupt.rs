//! Interrupts (SIGINT, SIGTERM, SIGHUP) that leave nothing half-written.
//!
//! Files that exist only while they are being written — temporaries of the atomic writers and the
//! lock files of outputs — are registered here while they live. [`install`] has
//! `crate::platform` block the three signals in every thread and wait for them on a thread of
//! its own (so the clean-up is ordinary code, not a signal handler; on Windows, the console's
//! Ctrl-C, Ctrl-Break and close events): on one it removes the registered files, keeps the work
//! directories that hold saved layers (so `--resume` continues) and says so, and exits with
//! 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
//!
//! Inputs are memory-mapped, so an input truncated by another process while a run reads it
//! raises SIGBUS in the reading thread. Its handler only marks the fault, sends the process a
//! SIGTERM and waits: the signal thread then cleans up as above, says which failure it was and
//! exits with code 2, like any bad input.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::platform::Interrupt;

static LIVE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
static WORK_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Registers a file that must not outlive an interrupt (a temporary, a lock file).
pub fn track(path: &Path) {
    if let Ok(mut s) = LIVE.lock() {
        s.insert(path.to_path_buf());
    }
}

/// Forgets a file registered with [`track`] (it was renamed into place or removed).
pub fn untrack(path: &Path) {
    if let Ok(mut s) = LIVE.lock() {
        s.remove(path);
    }
}

/// Registers a work directory, to be kept and named on an interrupt.
pub fn track_work_dir(dir: &Path) {
    if let Ok(mut s) = WORK_DIRS.lock() {
        s.insert(dir.to_path_buf());
    }
}

/// Forgets a work directory (the run finished and cleaned it).
pub fn untrack_work_dir(dir: &Path) {
    if let Ok(mut s) = WORK_DIRS.lock() {
        s.remove(dir);
    }
}

/// Removes every registered file and returns what to tell the user.
pub fn clean_up() -> String {
    let files: Vec<PathBuf> = LIVE
        .lock()
        .map(|mut s| std::mem::take(&mut *s).into_iter().collect())
        .unwrap_or_default();
    let mut removed = 0;
    for f in &files {
        if std::fs::remove_file(f).is_ok() {
            removed += 1;
        }
    }
    let mut msg = format!("removed {removed} unfinished file(s)");
    let dirs: Vec<PathBuf> = WORK_DIRS
        .lock()
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default();
    for d in dirs {
        let saved = std::fs::read_dir(&d)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with("layer-") && n.ends_with(".safetensors")
                    })
                    .count()
            })
            .unwrap_or(0);
        if saved > 0 {
            msg.push_str(&format!(
                "; {saved} finished layer(s) kept in {}: run the same command with --resume to \
                 continue",
                d.display()
            ));
        } else {
            msg.push_str(&format!("; no layer was finished ({})", d.display()));
        }
    }
    msg
}

/// Routes SIGINT, SIGTERM and SIGHUP (Ctrl-C, Ctrl-Break and closing the console on Windows)
/// and SIGBUS on a truncated input to `stop`. Call first thing in `main`, before any other
/// thread exists.
pub fn install() {
    crate::platform::on_interrupt(stop);
}

/// Cleans up after an interrupt, says what it kept, and ends the process.
fn stop(why: Interrupt) -> ! {
    match why {
        Interrupt::TruncatedInput => {
            eprintln!(
                "error: an input file (model, calibration or image pack) was truncated or \
                 replaced while it was being read (SIGBUS on its memory map); no output was \
                 written; {}",
                clean_up()
            );
            std::process::exit(2);
        }
        Interrupt::Stop { name, code } => {
            eprintln!("\ninterrupted ({name}): {}", clean_up());
            std::process::exit(code);
        }
    }
}

//! Interrupts (SIGINT, SIGTERM, SIGHUP) that leave nothing half-written.
//!
//! Files that exist only while they are being written — temporaries of the atomic writers and the
//! lock files of outputs — are registered here while they live. [`install`] blocks the three
//! signals in every thread and waits for them on a thread of its own (so the clean-up is ordinary
//! code, not a signal handler): on one it removes the registered files, keeps the work
//! directories that hold saved layers (so `--resume` continues) and says so, and exits with
//! 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
//!
//! Inputs are memory-mapped, so an input truncated by another process while a run reads it
//! raises SIGBUS in the reading thread. Its handler only marks the fault, sends the process a
//! SIGTERM and waits: the signal thread then cleans up as above, says which failure it was and
//! exits with code 2, like any bad input.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Set when a memory-mapped input faulted (SIGBUS: the file shrank while mapped).
static BUS_ERROR: AtomicBool = AtomicBool::new(false);

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

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and every thread started after, and handles
/// them on a thread of its own. Call first thing in `main`, before any other thread exists.
#[cfg(unix)]
pub fn install() {
    // SAFETY: plain libc calls on a zeroed, then filled sigset_t owned by this frame.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        set
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` holds the blocked signals; sigwait writes the one received.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if BUS_ERROR.load(Ordering::SeqCst) {
                eprintln!(
                    "error: an input file (model, calibration or image pack) was truncated or \
                     replaced while it was being read (SIGBUS on its memory map); no output was \
                     written; {}",
                    clean_up()
                );
                std::process::exit(2);
            }
            let name = match sig {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                _ => "SIGHUP",
            };
            eprintln!("\ninterrupted ({name}): {}", clean_up());
            std::process::exit(128 + sig);
        });
    if spawned.is_ok() {
        // SAFETY: installs an async-signal-safe handler (an atomic store, kill, pause).
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
        }
    }
    if spawned.is_err() {
        // Without the waiting thread the signals would stay blocked: restore them.
        // SAFETY: as above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

/// SIGBUS in a thread that touched a truncated memory map: hand the clean-up to the signal
/// thread and wait for it to end the process (returning would fault again at once).
#[cfg(unix)]
extern "C" fn on_sigbus(_sig: libc::c_int) {
    BUS_ERROR.store(true, Ordering::SeqCst);
    // SAFETY: kill, getpid and pause are async-signal-safe.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGTERM);
        loop {
            libc::pause();
        }
    }
}

/// Signals are handled by the platform's default elsewhere.
#[cfg(not(unix))]
pub fn install() {}

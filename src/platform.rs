//! What the operating systems do differently, in one place.
//!
//! The rest of the crate is portable Rust; everything that needs `std::os::unix`,
//! `std::os::windows`, `libc` or `windows-sys` lives here, behind one function per need, so a
//! Windows (DX12) or macOS (Metal) build cannot break because some module grew a unix-only call.
//! `tests/layers.rs` holds the rule. `.ci/run` checks both targets.
//!
//! - positioned writes: `FileExt::write_all_at` on unix, a `seek_write` loop on Windows;
//! - a file's identity: device and inode on unix, volume serial and file index on Windows;
//! - dropping the pages of a memory map a pass is done with (unix only: elsewhere a no-op);
//! - interrupts: SIGINT/SIGTERM/SIGHUP waited for on a thread of their own and SIGBUS on a
//!   truncated map on unix, the console's Ctrl-C / Ctrl-Break / close events on Windows; both
//!   call the same handler (`crate::interrupt` decides what to clean up and say);
//! - a file-size limit (unix's SIGXFSZ) turned into an ordinary write error;
//! - asking for transparent huge pages on a large buffer before it is first touched (Linux
//!   only: elsewhere a no-op).

use std::fs::File;
use std::io;
use std::path::Path;

/// What stopped the process from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// A termination request: the signal's (or console event's) name and the exit code the
    /// shell expects for it (128 + the signal number).
    Stop {
        /// `SIGINT`, `SIGTERM`, `SIGHUP`, `Ctrl-C`, `Ctrl-Break` or `console closed`.
        name: &'static str,
        /// The process's exit code.
        code: i32,
    },
    /// A memory-mapped input was truncated or replaced while it was read (SIGBUS).
    TruncatedInput,
}

/// Writes all of `buf` at byte `offset` of `file` without using (or, on unix, moving) the file's
/// cursor.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    imp::write_all_at(file, buf, offset)
}

/// The identity of an existing file or directory (two paths with equal identities name the same
/// file), or `None` where it does not exist or cannot be opened.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    imp::file_id(path)
}

/// The identity of an open file, comparable with [`file_id`].
pub fn open_file_id(file: &File) -> Option<(u64, u64)> {
    imp::open_file_id(file)
}

/// Drops this process's mapping of `len` bytes from `start` (page-aligned) of a private,
/// read-only map; the pages stay in the page cache and fault back in on the next access.
pub fn release_pages(map: &memmap2::Mmap, start: usize, len: usize) {
    imp::release_pages(map, start, len)
}

/// Asks the kernel to back `buf` with huge pages where it can (Linux's `MADV_HUGEPAGE`; a no-op
/// elsewhere and for buffers under 4 MiB). Call right after allocating, before the first write:
/// a fresh 128 MiB Gram sum then costs 64 page faults instead of 32,768, which on a virtual
/// machine was 0.3 s of a 1 s Gram. The contents are unchanged; failure is ignored.
pub fn advise_huge_pages<T>(buf: &mut [T]) {
    let bytes = std::mem::size_of_val(buf);
    if bytes >= 4 << 20 {
        imp::advise_huge_pages(buf.as_mut_ptr() as *mut u8, bytes)
    }
}

/// Makes a file-size limit a write error naming the file rather than a kill that leaves a
/// temporary file behind. Call before any thread is started.
pub fn ignore_file_size_signal() {
    imp::ignore_file_size_signal()
}

/// Routes interrupts to `handler`, which must end the process. Call first thing in `main`, before
/// any other thread exists (on unix the signals are blocked in every thread and waited for on one
/// of their own, so the handler is ordinary code, not a signal handler).
pub fn on_interrupt(handler: fn(Interrupt) -> !) {
    imp::on_interrupt(handler)
}

#[cfg(unix)]
mod imp {
    use super::Interrupt;
    use std::fs::File;
    use std::io;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set when a memory-mapped input faulted (SIGBUS: the file shrank while mapped).
    static BUS_ERROR: AtomicBool = AtomicBool::new(false);

    pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(buf, offset)
    }

    pub fn file_id(path: &Path) -> Option<(u64, u64)> {
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    pub fn open_file_id(file: &File) -> Option<(u64, u64)> {
        file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    pub fn release_pages(map: &memmap2::Mmap, start: usize, len: usize) {
        // SAFETY: the map is private and read-only; MADV_DONTNEED on it only discards this
        // process's page-table entries, and a later access faults the identical file contents
        // back in. The callers hold no reference into these pages past this call.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }

    pub fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
        #[cfg(target_os = "linux")]
        {
            // The whole 2 MiB pages inside the buffer.
            const HUGE: usize = 2 << 20;
            let start = (ptr as usize).next_multiple_of(HUGE);
            let end = (ptr as usize + bytes) / HUGE * HUGE;
            if end > start {
                // SAFETY: [start, end) lies inside the caller's live, writable buffer;
                // MADV_HUGEPAGE only changes how its pages are backed, never their contents.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (ptr, bytes);
    }

    pub fn ignore_file_size_signal() {
        // SAFETY: setting a signal's disposition to SIG_IGN before any thread is started.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
    }

    pub fn on_interrupt(handler: fn(Interrupt) -> !) {
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
                    handler(Interrupt::TruncatedInput);
                }
                let name = match sig {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
                handler(Interrupt::Stop {
                    name,
                    code: 128 + sig,
                });
            });
        if spawned.is_ok() {
            // SAFETY: installs an async-signal-safe handler (an atomic store, kill, pause).
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_sigbus as *const () as usize;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
            }
        } else {
            // Without the waiting thread the signals would stay blocked: restore them.
            // SAFETY: as above.
            unsafe {
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
        }
    }

    /// SIGBUS in a thread that touched a truncated memory map: hand the clean-up to the signal
    /// thread and wait for it to end the process (returning would fault again at once).
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
}

#[cfg(windows)]
mod imp {
    use super::Interrupt;
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::windows::fs::{FileExt, OpenOptionsExt};
    use std::os::windows::io::AsRawHandle;
    use std::path::Path;
    use std::sync::OnceLock;
    use windows_sys::Win32::Foundation::{FALSE, TRUE};
    use windows_sys::Win32::Storage::FileSystem::{
        GetFileInformationByHandle, BY_HANDLE_FILE_INFORMATION, FILE_FLAG_BACKUP_SEMANTICS,
        FILE_READ_ATTRIBUTES,
    };
    use windows_sys::Win32::System::Console::{
        SetConsoleCtrlHandler, CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT, CTRL_C_EVENT,
    };

    static HANDLER: OnceLock<fn(Interrupt) -> !> = OnceLock::new();

    pub fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match file.seek_write(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn file_id(path: &Path) -> Option<(u64, u64)> {
        // Only the right to read attributes is asked for, and the backup flag lets a directory
        // be opened too.
        let file = OpenOptions::new()
            .access_mode(FILE_READ_ATTRIBUTES)
            .custom_flags(FILE_FLAG_BACKUP_SEMANTICS)
            .open(path)
            .ok()?;
        open_file_id(&file)
    }

    pub fn open_file_id(file: &File) -> Option<(u64, u64)> {
        // SAFETY: the handle is the open file's own; the struct is plain data the call fills.
        unsafe {
            let mut info: BY_HANDLE_FILE_INFORMATION = std::mem::zeroed();
            if GetFileInformationByHandle(file.as_raw_handle() as _, &mut info) == FALSE {
                return None;
            }
            let index = (u64::from(info.nFileIndexHigh) << 32) | u64::from(info.nFileIndexLow);
            Some((u64::from(info.dwVolumeSerialNumber), index))
        }
    }

    pub fn release_pages(_map: &memmap2::Mmap, _start: usize, _len: usize) {}

    pub fn advise_huge_pages(_ptr: *mut u8, _bytes: usize) {}

    pub fn ignore_file_size_signal() {}

    pub fn on_interrupt(handler: fn(Interrupt) -> !) {
        if HANDLER.set(handler).is_ok() {
            // SAFETY: registers a handler routine; Windows calls it on a thread of its own.
            unsafe {
                SetConsoleCtrlHandler(Some(on_console_event), TRUE);
            }
        }
    }

    /// Runs on a thread Windows starts for the event, so ordinary code is allowed.
    unsafe extern "system" fn on_console_event(event: u32) -> i32 {
        let (name, code) = match event {
            CTRL_C_EVENT => ("Ctrl-C", 130),
            CTRL_BREAK_EVENT => ("Ctrl-Break", 149),
            CTRL_CLOSE_EVENT => ("console closed", 129),
            _ => return FALSE,
        };
        match HANDLER.get() {
            Some(handler) => handler(Interrupt::Stop { name, code }),
            None => FALSE,
        }
    }
}

#[cfg(not(any(unix, windows)))]
mod imp {
    use super::Interrupt;
    use std::fs::File;
    use std::io::{self, Seek, SeekFrom, Write};
    use std::path::Path;

    pub fn write_all_at(mut file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(buf)
    }

    pub fn file_id(_path: &Path) -> Option<(u64, u64)> {
        None
    }

    pub fn open_file_id(_file: &File) -> Option<(u64, u64)> {
        None
    }

    pub fn release_pages(_map: &memmap2::Mmap, _start: usize, _len: usize) {}

    pub fn advise_huge_pages(_ptr: *mut u8, _bytes: usize) {}

    pub fn ignore_file_size_signal() {}

    pub fn on_interrupt(_handler: fn(Interrupt) -> !) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positioned_writes_land_where_asked_and_leave_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let f = File::create(&p).unwrap();
        f.set_len(8).unwrap();
        write_all_at(&f, b"cd", 2).unwrap();
        write_all_at(&f, b"ab", 0).unwrap();
        write_all_at(&f, b"xyz", 7).unwrap();
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"abcd\0\0\0xyz");
    }

    #[test]
    fn identities_tell_files_apart_and_links_together() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::write(&a, b"1").unwrap();
        std::fs::write(&b, b"1").unwrap();
        let ia = file_id(&a).expect("an existing file has an identity");
        assert_ne!(Some(ia), file_id(&b));
        assert_eq!(file_id(&d.path().join("missing")), None);
        assert_eq!(open_file_id(&File::open(&a).unwrap()), Some(ia));
        std::fs::hard_link(&a, d.path().join("c")).unwrap();
        assert_eq!(file_id(&d.path().join("c")), Some(ia));
        assert!(
            file_id(d.path()).is_some(),
            "a directory has an identity too"
        );
    }
}

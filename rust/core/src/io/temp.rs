//! Temp-file names that say whose they are, and cleanup of the ones a killed save left.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const MARK: &str = ".fastckpt-";
const SUFFIX: &str = ".tmp";

/// `<dir>/.<name>.fastckpt-<host>-<pid>-<n>.tmp`: hidden, in the target's folder (so the
/// rename is atomic), and marked with our host and process id so a later save can tell a
/// dead writer's file. The processes of a multi-host training write side by side into one
/// shared folder, and a process id means something only on its own host: `<host>` (8 hex
/// digits of the host name's CRC-32C) keeps one host from taking another's live writer for
/// a dead one.
pub fn temp_path_for(target: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = target.parent().unwrap_or(Path::new(""));
    dir.join(format!(
        ".{name}{MARK}{:08x}-{}-{n}{SUFFIX}",
        this_host(),
        std::process::id()
    ))
}

/// Who wrote a temp file: its host (None in names written before hosts were marked, which
/// were all this host's) and process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Writer {
    host: Option<u32>,
    pid: i32,
}

impl Writer {
    fn on_this_host(self) -> bool {
        self.host.is_none_or(|h| h == this_host())
    }

    /// Whether this process wrote it.
    pub(crate) fn is_us(self) -> bool {
        self.on_this_host() && self.pid == std::process::id() as i32
    }
}

/// The writer of a name made by [`temp_path_for`], if it is one.
pub(crate) fn writer(name: &OsStr) -> Option<Writer> {
    let name = name.to_str()?;
    let rest = name.strip_prefix('.')?.strip_suffix(SUFFIX)?;
    let (_, tail) = rest.rsplit_once(MARK)?;
    let fields: Vec<&str> = tail.split('-').collect();
    let (host, pid, n) = match fields[..] {
        [host, pid, n] if host.len() == 8 => (Some(u32::from_str_radix(host, 16).ok()?), pid, n),
        [pid, n] => (None, pid, n),
        _ => return None,
    };
    n.parse::<u64>().ok()?;
    Some(Writer {
        host,
        pid: pid.parse().ok()?,
    })
}

/// Whether a file name is one of our temp files.
pub fn is_temp_name(name: &OsStr) -> bool {
    writer(name).is_some()
}

/// This host's mark: the CRC-32C of its name (0 if it has none).
fn this_host() -> u32 {
    static HOST: OnceLock<u32> = OnceLock::new();
    *HOST.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; the name is NUL-terminated within
        // it on success (truncated names are still a stable mark).
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 {
            return 0;
        }
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        crc32c::crc32c(&buf[..len])
    })
}

fn process_is_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes temp files in `dir` whose writer process is gone; returns how many. Files of live
/// writers (another process saving right now) and of other hosts' writers (whose liveness
/// cannot be told from here) are left alone. Errors are ignored: this is housekeeping,
/// never a reason to fail a save.
pub fn sweep_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        match writer(&name) {
            Some(w)
                if w.on_this_host()
                    && !process_is_alive(w.pid)
                    && std::fs::remove_file(entry.path()).is_ok() =>
            {
                removed += 1;
            }
            _ => {}
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_recognised() {
        let p = temp_path_for(Path::new("/x/ckpt.weights.h5"));
        let name = p.file_name().unwrap();
        assert!(name
            .to_str()
            .unwrap()
            .starts_with(".ckpt.weights.h5.fastckpt-"));
        assert!(writer(name).unwrap().is_us());
        assert!(!is_temp_name(OsStr::new("ckpt.weights.h5")));
        assert!(!is_temp_name(OsStr::new(".a.fastckpt-12-x.tmp")));
        assert!(!is_temp_name(OsStr::new(".a.fastckpt-xyz-12-0.tmp")));
        // Names from before hosts were marked: this host's.
        let legacy = writer(OsStr::new(".a.fastckpt-12-0.tmp")).unwrap();
        assert_eq!(
            legacy,
            Writer {
                host: None,
                pid: 12
            }
        );
        assert!(legacy.on_this_host());
    }

    #[test]
    fn sweeps_only_dead_writers() {
        let dir = tempfile::tempdir().unwrap();
        // pid 0x7ffffff0 is far above pid_max, so no such process exists.
        let dead = dir.path().join(".a.fastckpt-2147483632-0.tmp");
        let live = temp_path_for(&dir.path().join("a"));
        let other = dir.path().join("a");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(sweep_stale_temps(dir.path()), 1);
        assert!(!dead.exists() && live.exists() && other.exists());
    }

    #[test]
    fn leaves_other_hosts_writers_alone() {
        // A writer on another host sharing the folder: its process id cannot be checked
        // here, so its file stays, dead-looking id or not; this host's dead writer goes.
        let dir = tempfile::tempdir().unwrap();
        let host = this_host();
        let elsewhere = dir
            .path()
            .join(format!(".a.fastckpt-{:08x}-2147483632-0.tmp", host ^ 1));
        let here = dir
            .path()
            .join(format!(".a.fastckpt-{host:08x}-2147483632-0.tmp"));
        for p in [&elsewhere, &here] {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(sweep_stale_temps(dir.path()), 1);
        assert!(elsewhere.exists() && !here.exists());
        assert!(!writer(elsewhere.file_name().unwrap()).unwrap().is_us());
    }
}

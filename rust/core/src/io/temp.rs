//! Temp-file names that say whose they are, and cleanup of the ones a killed save left.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const MARK: &str = ".fastckpt-";
const SUFFIX: &str = ".tmp";

/// `<dir>/.<name>.fastckpt-<pid>-<n>.tmp`: hidden, in the target's folder (so the rename is
/// atomic), and marked with our process id so a later save can tell a dead writer's file.
pub fn temp_path_for(target: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = target.parent().unwrap_or(Path::new(""));
    dir.join(format!(".{name}{MARK}{}-{n}{SUFFIX}", std::process::id()))
}

/// The process id in a name made by [`temp_path_for`], if it is one.
pub(crate) fn writer_pid(name: &OsStr) -> Option<i32> {
    let name = name.to_str()?;
    let rest = name.strip_prefix('.')?.strip_suffix(SUFFIX)?;
    let (_, tail) = rest.rsplit_once(MARK)?;
    let (pid, n) = tail.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether a file name is one of our temp files.
pub fn is_temp_name(name: &OsStr) -> bool {
    writer_pid(name).is_some()
}

fn process_is_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes temp files in `dir` whose writer process is gone; returns how many. Files of live
/// writers (another process saving right now) are left alone. Errors are ignored: this is
/// housekeeping, never a reason to fail a save.
pub fn sweep_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        match writer_pid(&name) {
            Some(pid) if !process_is_alive(pid) && std::fs::remove_file(entry.path()).is_ok() => {
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
        assert_eq!(writer_pid(name), Some(std::process::id() as i32));
        assert!(!is_temp_name(OsStr::new("ckpt.weights.h5")));
        assert!(!is_temp_name(OsStr::new(".a.fastckpt-12-x.tmp")));
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
}

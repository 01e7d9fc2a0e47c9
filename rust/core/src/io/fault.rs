//! Fault injection for tests: with the `fault-injection` feature, a test can make one stage
//! of the next saves fail with an OS error, or slow every payload write (and every piece of a
//! spare file's reservation) down so that it can act while a save is surely in progress
//! (remove the folder, interrupt, exit, race).
//! Without the feature every check compiles to nothing.

/// The stages a fault can be injected at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Write = 1,
    Fsync = 2,
    Rename = 3,
    DirFsync = 4,
}

impl Stage {
    pub fn parse(name: &str) -> Option<Stage> {
        match name {
            "write" => Some(Stage::Write),
            "fsync" => Some(Stage::Fsync),
            "rename" => Some(Stage::Rename),
            "dir_fsync" => Some(Stage::DirFsync),
            _ => None,
        }
    }
}

#[cfg(feature = "fault-injection")]
mod imp {
    use super::Stage;
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

    static ARMED: AtomicU8 = AtomicU8::new(0);
    static DELAY_MS: AtomicU64 = AtomicU64::new(0);

    pub fn arm(stage: Option<Stage>) {
        ARMED.store(stage.map_or(0, |s| s as u8), Ordering::SeqCst);
    }

    pub fn set_delay(ms: u64) {
        DELAY_MS.store(ms, Ordering::SeqCst);
    }

    pub fn delay() {
        let ms = DELAY_MS.load(Ordering::SeqCst);
        if ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }

    pub fn check(stage: Stage) -> std::io::Result<()> {
        if ARMED.load(Ordering::SeqCst) == stage as u8 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

#[cfg(not(feature = "fault-injection"))]
mod imp {
    use super::Stage;

    pub fn arm(_stage: Option<Stage>) {}

    pub fn set_delay(_ms: u64) {}

    #[inline(always)]
    pub fn delay() {}

    #[inline(always)]
    pub fn check(_stage: Stage) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether this build can inject faults at all.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

pub use imp::{arm, check, delay, set_delay};

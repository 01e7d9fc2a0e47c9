//! Fault injection for tests: with the `fault-injection` feature, a test can make one stage
//! of the next saves fail with an OS error. Without the feature every check compiles to
//! nothing.

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
    use std::sync::atomic::{AtomicU8, Ordering};

    static ARMED: AtomicU8 = AtomicU8::new(0);

    pub fn arm(stage: Option<Stage>) {
        ARMED.store(stage.map_or(0, |s| s as u8), Ordering::SeqCst);
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

    #[inline(always)]
    pub fn check(_stage: Stage) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether this build can inject faults at all.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

pub use imp::{arm, check};

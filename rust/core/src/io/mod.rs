//! Files: temp file beside the target, parallel positioned writes, fdatasync, atomic rename,
//! folder fsync; and the parallel positioned reads that loading uses.

mod commit;
mod direct;
pub mod fault;
mod parallel;
mod read;
mod temp;

pub use commit::{write_file, WriteOptions};
pub use parallel::combine;
pub(crate) use parallel::idle_priority;
pub use read::{read_into, ReadItem};
pub use temp::{is_temp_name, sweep_stale_temps, temp_path_for};

/// Writer threads when the caller does not say: one per core, at most 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

/// Payloads are split into pieces of at most this many bytes so that a few large tensors
/// still spread over every thread.
pub const PIECE_BYTES: usize = 8 << 20;

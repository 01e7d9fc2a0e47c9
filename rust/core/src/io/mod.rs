//! Files: temp file beside the target, parallel positioned writes, fdatasync, atomic rename,
//! folder fsync (`commit.rs`; several files committed together: `set.rs`); and the parallel
//! positioned reads that loading uses.

mod commit;
mod direct;
pub mod fault;
mod mapped;
mod parallel;
mod read;
mod set;
mod temp;

pub use commit::{
    reserve_spare, reserve_spare_at, write_body, write_file, write_file_keeping, Body, Progress,
    WriteOptions, Written,
};
pub use mapped::{kept_mappings, lend, map_kept, needs_mapping, release_mappings, LentRegion};
pub use parallel::combine;
pub use parallel::BACKGROUND_NICE;
pub(crate) use parallel::{coordinate, note_caller_priority};
pub(crate) use parallel::{plan_pieces, run_pieces_with, Extent, Piece};
pub use parallel::{Effort, Width};
pub use read::{crc32_of_range, digests_of_ranges, read_into, ReadItem};
pub use set::{write_set, SetFile, SetWritten};
pub use temp::{is_temp_name, sweep_stale_temps, temp_path_for};

/// Writer threads when the caller does not say: one per core, at most 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

/// Writer threads for a background save when the caller does not say: a quarter of the
/// cores (at least 1, at most 8), leaving the rest to training; every core joins once the
/// write is waited for (see [`Effort`]).
pub fn default_background_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 4)
        .unwrap_or(1)
        .clamp(1, 8)
}

/// Payloads are split into pieces of at most this many bytes so that a few large tensors
/// still spread over every thread.
pub const PIECE_BYTES: usize = 8 << 20;

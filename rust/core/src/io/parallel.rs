//! Splitting payloads into pieces and running pieces on N threads.
//!
//! Large payloads are cut into [`PIECE_BYTES`] parts so a few big tensors still use every
//! thread; runs of small payloads that sit close together in the file are gathered into one
//! batch, written with one syscall, so 10,000 tiny variables cost 10,000 memcpys, not
//! 10,000 `pwrite`s.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::PIECE_BYTES;
use crate::layout::Digest;

/// Payloads below this size are gathered into batches.
const SMALL: usize = 256 << 10;
/// A batch stops growing at this span.
const BATCH_SPAN: u64 = 4 << 20;
/// Gaps wider than this (metadata, alignment) end a batch.
const BATCH_GAP: u64 = 4 << 10;

/// One contiguous payload to move: `len` bytes between file offset `offset` and byte `start`
/// of item `item`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub item: usize,
    pub offset: u64,
    pub start: usize,
    pub len: usize,
}

/// A unit of work for one thread: one part of a large payload, or a batch of small ones
/// spanning `[offset, offset + span)` of the file.
#[derive(Debug)]
pub(crate) struct Piece {
    pub offset: u64,
    pub span: u64,
    pub extents: Vec<Extent>,
}

/// Plans the pieces for items given as `(file offset, length)`, in file order.
pub(crate) fn plan_pieces(items: &[(u64, usize)], batch_small: bool) -> Vec<Piece> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| items[i].0);
    let mut pieces: Vec<Piece> = Vec::new();
    let mut batch: Option<Piece> = None;
    for i in order {
        let (offset, len) = items[i];
        if len == 0 {
            continue;
        }
        if batch_small && len < SMALL {
            if let Some(b) = batch.as_mut() {
                let end = b.offset + b.span;
                if offset >= end
                    && offset - end <= BATCH_GAP
                    && offset + len as u64 - b.offset <= BATCH_SPAN
                {
                    b.span = offset + len as u64 - b.offset;
                    b.extents.push(Extent {
                        item: i,
                        offset,
                        start: 0,
                        len,
                    });
                    continue;
                }
            }
            pieces.extend(batch.take());
            batch = Some(Piece {
                offset,
                span: len as u64,
                extents: vec![Extent {
                    item: i,
                    offset,
                    start: 0,
                    len,
                }],
            });
            continue;
        }
        let mut start = 0;
        while start < len {
            let part = (len - start).min(PIECE_BYTES);
            let at = offset + start as u64;
            pieces.push(Piece {
                offset: at,
                span: part as u64,
                extents: vec![Extent {
                    item: i,
                    offset: at,
                    start,
                    len: part,
                }],
            });
            start += part;
        }
    }
    pieces.extend(batch);
    pieces.sort_by_key(|p| p.offset);
    pieces
}

/// How hard a write works: it starts with `threads` threads and grows to `hurried_threads`
/// once someone is waiting for it (see [`Effort`]).
#[derive(Clone, Debug)]
pub struct Width {
    pub threads: usize,
    pub hurried_threads: usize,
    pub effort: Effort,
}

impl Width {
    /// Exactly `threads` threads, from start to end.
    pub fn fixed(threads: usize) -> Width {
        Width {
            threads,
            hurried_threads: threads,
            effort: Effort::default(),
        }
    }
}

/// Whether anyone waits for a write: a background write uses few threads at low priority so
/// that training keeps the cores; once training (or anyone) waits for it, nothing else wants
/// the cores and the write takes them all. Clones share one flag.
#[derive(Clone, Debug, Default)]
pub struct Effort {
    shared: Arc<(Mutex<bool>, Condvar)>,
}

impl Effort {
    /// Asks every write that shares this effort to use all its threads from now on.
    pub fn hurry(&self) {
        let (hurried, changed) = &*self.shared;
        *hurried.lock().unwrap() = true;
        changed.notify_all();
    }

    pub fn is_hurried(&self) -> bool {
        *self.shared.0.lock().unwrap()
    }

    /// Blocks until hurried (true) or until `finished` is set and announced (false).
    fn wait_for_hurry(&self, finished: &AtomicBool) -> bool {
        let (hurried, changed) = &*self.shared;
        let guard = changed
            .wait_while(hurried.lock().unwrap(), |h| {
                !*h && !finished.load(Ordering::Acquire)
            })
            .unwrap();
        *guard
    }

    /// Wakes threads blocked in [`Effort::wait_for_hurry`] so they can see `finished`.
    fn announce(&self) {
        let (hurried, changed) = &*self.shared;
        drop(hurried.lock().unwrap());
        changed.notify_all();
    }
}

/// Runs `work` over every piece on up to `threads` threads, in file order as far as threads
/// allow. Stops handing out pieces after the first error, which it returns.
pub(crate) fn run_pieces<F>(pieces: &[Piece], threads: usize, work: F) -> io::Result<()>
where
    F: Fn(&Piece) -> io::Result<()> + Sync,
{
    run_pieces_with(pieces, &Width::fixed(threads), work)
}

/// [`run_pieces`] with a width that can grow while it runs: `width.threads` take pieces
/// from the start, the other `hurried_threads - threads` join once the effort is hurried.
/// Every thread runs at the priority of the calling thread (it inherits it).
pub(crate) fn run_pieces_with<F>(pieces: &[Piece], width: &Width, work: F) -> io::Result<()>
where
    F: Fn(&Piece) -> io::Result<()> + Sync,
{
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
    let worker = || loop {
        if failed.load(Ordering::Relaxed) {
            return;
        }
        if width.effort.is_hurried() {
            waited_priority();
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(piece) = pieces.get(i) else { return };
        if let Err(e) = work(piece) {
            failed.store(true, Ordering::Relaxed);
            first_error.lock().unwrap().get_or_insert(e);
            return;
        }
    };
    let most = pieces.len().max(1);
    let threads = width.threads.clamp(1, most);
    let extra = width.hurried_threads.min(most).saturating_sub(threads);
    if threads == 1 && extra == 0 {
        worker();
    } else {
        let finished = AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..extra {
                s.spawn(|| {
                    if width.effort.wait_for_hurry(&finished) {
                        worker();
                    }
                });
            }
            let base: Vec<_> = (1..threads).map(|_| s.spawn(worker)).collect();
            worker();
            for handle in base {
                // A panic in a worker resurfaces when the scope ends.
                let _ = handle.join();
            }
            // Every piece is taken: extras still waiting for a hurry go home.
            finished.store(true, Ordering::Release);
            width.effort.announce();
        });
    }
    match first_error.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Puts the calling thread, a background job's own, at the lowest priority of the normal
/// scheduler (nice 19); the threads it starts inherit it. Against a busy core it gets a
/// small share (CFS weight 15 against 1024), so training keeps its cores but a write still
/// ends while training runs. `SCHED_IDLE`, the earlier choice, starves such a writer
/// completely when training keeps every core busy, so the write was left for the next
/// checkpoint to wait for; and a starved thread holding a kernel lock (the memory map
/// while faulting pages in, a file's pages while writing) makes normal threads wait with
/// it (README, "Training while a checkpoint is written"). An unprivileged thread cannot
/// raise its priority again, so nothing waits on a writer's priority: when someone waits
/// for a write, more threads join it (see [`Effort`]). Best effort.
pub(crate) fn background_priority() {
    // SAFETY: plain syscall; on Linux `who = 0` with PRIO_PROCESS names the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE);
    }
}

/// The nice value of the threads that start background jobs (training's), to which a
/// background writer returns once somebody waits for it (see [`waited_priority`]).
static CALLER_NICE: AtomicI32 = AtomicI32::new(0);

/// Records the calling thread's nice value as the one waited-for writers return to; called
/// by whoever starts a background job (a background thread itself records nothing).
pub(crate) fn note_caller_priority() {
    // SAFETY: plain syscall reading the calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice != BACKGROUND_NICE {
        CALLER_NICE.store(nice, Ordering::Relaxed);
    }
}

thread_local! {
    static RAISED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Once somebody waits for a write, its threads (at nice 19) return to the priority of
/// the threads that started it: training is blocked then, and a waited write at nice 19
/// would get almost nothing of a core that another process keeps busy (an end-of-fit wait
/// took seconds so). Lowering a nice value needs `CAP_SYS_NICE` or a `RLIMIT_NICE` that
/// allows it (root outside most containers); without, the thread stays where it is and
/// only the extra threads of a hurried write help. Best effort, once per thread.
pub(crate) fn waited_priority() {
    if RAISED.with(|r| r.replace(true)) {
        return;
    }
    // SAFETY: plain syscalls on the calling thread's own nice value.
    unsafe {
        if libc::getpriority(libc::PRIO_PROCESS, 0) == BACKGROUND_NICE {
            libc::setpriority(libc::PRIO_PROCESS, 0, CALLER_NICE.load(Ordering::Relaxed));
        }
    }
}

/// The nice value of background writers.
pub const BACKGROUND_NICE: i32 = 19;

/// Per-item digests, assembled from the digests of their parts in any arrival order.
pub(crate) struct Digests {
    kind: Digest,
    parts: Mutex<Vec<Vec<(usize, u32, usize)>>>,
}

impl Digests {
    pub fn new(kind: Digest, items: usize) -> Digests {
        let n = if kind == Digest::None { 0 } else { items };
        Digests {
            kind,
            parts: Mutex::new(vec![Vec::new(); n]),
        }
    }

    pub fn wanted(&self) -> bool {
        self.kind != Digest::None
    }

    /// Records the digest of `bytes`, which start at byte `start` of item `item`.
    pub fn record(&self, item: usize, start: usize, bytes: &[u8]) {
        let d = match self.kind {
            Digest::None => return,
            Digest::Crc32 => crc32fast::hash(bytes),
            Digest::Crc32c => crc32c::crc32c(bytes),
        };
        self.parts.lock().unwrap()[item].push((start, d, bytes.len()));
    }

    /// One digest per item, parts combined in byte order (an empty item has digest 0).
    pub fn finish(self) -> Vec<u32> {
        let kind = self.kind;
        self.parts
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|mut parts| {
                parts.sort_by_key(|p| p.0);
                parts
                    .into_iter()
                    .fold(0u32, |acc, (_, d, len)| combine(kind, acc, d, len))
            })
            .collect()
    }
}

/// The digest of `a || b` from the digests of `a` and `b` and the length of `b`.
pub fn combine(kind: Digest, a: u32, b: u32, len_b: usize) -> u32 {
    match kind {
        Digest::None => 0,
        Digest::Crc32 => {
            let mut h = crc32fast::Hasher::new_with_initial(a);
            h.combine(&crc32fast::Hasher::new_with_initial_len(b, len_b as u64));
            h.finalize()
        }
        Digest::Crc32c => crc32c::crc32c_combine(a, b, len_b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_items_are_split_and_small_ones_batched() {
        let big = PIECE_BYTES * 2 + 5;
        let items = [
            (0u64, 10usize),
            (16, 10),
            (64, big),
            (64 + big as u64, 0),
            (1 << 40, 3),
        ];
        let pieces = plan_pieces(&items, true);
        let spans: Vec<_> = pieces
            .iter()
            .map(|p| (p.offset, p.span, p.extents.len()))
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, 26, 2),
                (64, PIECE_BYTES as u64, 1),
                (64 + PIECE_BYTES as u64, PIECE_BYTES as u64, 1),
                (64 + 2 * PIECE_BYTES as u64, 5, 1),
                (1 << 40, 3, 1),
            ]
        );
    }

    #[test]
    fn digests_combine_across_parts() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        for kind in [Digest::Crc32, Digest::Crc32c] {
            let d = Digests::new(kind, 1);
            d.record(0, 6000, &data[6000..]);
            d.record(0, 0, &data[..6000]);
            let whole = match kind {
                Digest::Crc32 => crc32fast::hash(&data),
                _ => crc32c::crc32c(&data),
            };
            assert_eq!(d.finish(), vec![whole]);
        }
    }

    #[test]
    fn first_error_stops_the_run() {
        let pieces = plan_pieces(
            &[(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20)],
            false,
        );
        let err = run_pieces(&pieces, 2, |p| {
            if p.offset == 1 << 20 {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn a_hurried_run_grows_to_its_hurried_width() {
        use std::time::{Duration, Instant};
        let pieces = plan_pieces(
            &(0..40u64).map(|i| (i << 20, 1 << 20)).collect::<Vec<_>>(),
            false,
        );
        let width = Width {
            threads: 1,
            hurried_threads: 3,
            effort: Effort::default(),
        };
        let active = AtomicUsize::new(0);
        let most_before = AtomicUsize::new(0);
        let most_after = AtomicUsize::new(0);
        let started = Instant::now();
        std::thread::scope(|s| {
            let effort = width.effort.clone();
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(60));
                effort.hurry();
            });
            run_pieces_with(&pieces, &width, |_| {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                let most = if width.effort.is_hurried() {
                    &most_after
                } else {
                    &most_before
                };
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                active.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        });
        assert_eq!(
            most_before.load(Ordering::SeqCst),
            1,
            "one thread until hurried"
        );
        assert_eq!(most_after.load(Ordering::SeqCst), 3, "three once hurried");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn threads_waiting_for_a_hurry_that_never_comes_go_home() {
        let pieces = plan_pieces(&[(0, 10), (1 << 20, 10)], false);
        let width = Width {
            threads: 1,
            hurried_threads: 4,
            effort: Effort::default(),
        };
        let count = AtomicUsize::new(0);
        run_pieces_with(&pieces, &width, |_| {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}

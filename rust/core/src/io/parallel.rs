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
    shared: Arc<EffortState>,
}

#[derive(Debug, Default)]
struct EffortState {
    hurried: Mutex<bool>,
    changed: Condvar,
    /// Threads at the caller's priority taking pieces of a hurried write (see
    /// [`coordinate`]): writers stuck at nice 19 leave the pieces to them.
    helpers: AtomicUsize,
}

impl Effort {
    /// Asks every write that shares this effort to use all its threads from now on.
    pub fn hurry(&self) {
        *self.shared.hurried.lock().unwrap() = true;
        self.shared.changed.notify_all();
    }

    pub fn is_hurried(&self) -> bool {
        *self.shared.hurried.lock().unwrap()
    }

    /// Runs `work` counted as a helper (see [`EffortState::helpers`]).
    fn helping(&self, work: impl FnOnce()) {
        /// Counts the helper out, also when `work` panics.
        struct Out<'a>(&'a Effort);
        impl Drop for Out<'_> {
            fn drop(&mut self) {
                self.0.shared.helpers.fetch_sub(1, Ordering::AcqRel);
                self.0.announce();
            }
        }
        self.shared.helpers.fetch_add(1, Ordering::AcqRel);
        let _out = Out(self);
        work();
    }

    /// Blocks while helpers take the pieces, until `finished()` (no piece is left).
    fn defer_to_helpers(&self, finished: impl Fn() -> bool) {
        let mut guard = self.shared.hurried.lock().unwrap();
        while self.shared.helpers.load(Ordering::Acquire) > 0 && !finished() {
            // Woken when a helper leaves; the timeout lets it see `finished` meanwhile.
            guard = self
                .shared
                .changed
                .wait_timeout(guard, std::time::Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    /// Blocks until hurried (true) or until `finished` is set and announced (false).
    fn wait_for_hurry(&self, finished: &AtomicBool) -> bool {
        let guard = self
            .shared
            .changed
            .wait_while(self.shared.hurried.lock().unwrap(), |h| {
                !*h && !finished.load(Ordering::Acquire)
            })
            .unwrap();
        *guard
    }

    /// Wakes threads blocked in [`Effort::wait_for_hurry`] so they can see `finished`.
    fn announce(&self) {
        drop(self.shared.hurried.lock().unwrap());
        self.shared.changed.notify_all();
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
/// Every thread runs at the priority of the calling thread (it inherits it), except on a
/// background job's own thread (see [`coordinate`]).
pub(crate) fn run_pieces_with<F>(pieces: &[Piece], width: &Width, work: F) -> io::Result<()>
where
    F: Fn(&Piece) -> io::Result<()> + Sync,
{
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
    // Takes the next piece and does it; false once none is left or one failed.
    let step = || {
        if failed.load(Ordering::Relaxed) {
            return false;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(piece) = pieces.get(i) else {
            return false;
        };
        if let Err(e) = work(piece) {
            failed.store(true, Ordering::Relaxed);
            first_error.lock().unwrap().get_or_insert(e);
            return false;
        }
        true
    };
    let worker = || loop {
        if width.effort.is_hurried() && !waited_priority() {
            // Stuck at nice 19 (no privilege to return): while threads at the caller's
            // priority take the pieces, leave them the rest. A piece taken at nice 19
            // against a busy process can hold the end of the write back by seconds.
            width.effort.defer_to_helpers(|| {
                failed.load(Ordering::Relaxed) || next.load(Ordering::Relaxed) >= pieces.len()
            });
        }
        if !step() {
            return;
        }
    };
    let most = pieces.len().max(1);
    let threads = width.threads.clamp(1, most);
    let hurried = width.hurried_threads.min(most).max(threads);
    let finished = AtomicBool::new(false);
    // The threads that join once the write is hurried, at the priority of the thread that
    // runs this, counted as helpers: writers stuck at nice 19 leave the pieces to them.
    let when_hurried = || {
        if width.effort.wait_for_hurry(&finished) {
            width.effort.helping(worker);
        }
    };
    if COORDINATING.get() {
        // A background job's own thread, at the caller's priority: `threads` writers at
        // nice 19 take the pieces from the start. Once somebody waits for the write, this
        // thread joins them, with the rest of the hurried width started here (so at this
        // thread's priority: none of them needs a privilege to get there).
        let writing = AtomicUsize::new(threads);
        std::thread::scope(|s| {
            /// Counts a writer out when it ends, also by a panic (which resurfaces when
            /// the scope ends): the last one sends the threads waiting for a hurry home.
            struct Out<'a>(&'a AtomicUsize, &'a AtomicBool, &'a Effort);
            impl Drop for Out<'_> {
                fn drop(&mut self) {
                    if self.0.fetch_sub(1, Ordering::AcqRel) == 1 {
                        self.1.store(true, Ordering::Release);
                        self.2.announce();
                    }
                }
            }
            for _ in 0..threads {
                s.spawn(|| {
                    let _out = Out(&writing, &finished, &width.effort);
                    background_priority();
                    worker();
                });
            }
            for _ in threads + 1..hurried {
                s.spawn(when_hurried);
            }
            when_hurried();
        });
    } else if threads == 1 && hurried == 1 {
        worker();
    } else {
        std::thread::scope(|s| {
            for _ in threads..hurried {
                s.spawn(when_hurried);
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

/// Puts the calling thread, a background job's writer, at the lowest priority of the normal
/// scheduler (nice 19). Against a busy core it gets a small share (CFS weight 15 against
/// 1024), so training keeps its cores but a write still ends while training runs.
/// `SCHED_IDLE`, the earlier choice, starves such a writer completely when training keeps
/// every core busy, so the write was left for the next checkpoint to wait for; and a
/// starved thread holding a kernel lock (the memory map while faulting pages in, a file's
/// pages while writing) makes normal threads wait with it (README, "Training while a
/// checkpoint is written"). An unprivileged thread cannot raise its priority again, so
/// nothing waits on a writer's priority: when someone waits for a write, threads at the
/// caller's priority join it and take the pieces left (see [`coordinate`]). Best effort.
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
/// by whoever starts a background job (training's threads: a job's own thread keeps that
/// value, and its writers start none).
pub(crate) fn note_caller_priority() {
    // SAFETY: plain syscall reading the calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    CALLER_NICE.store(nice, Ordering::Relaxed);
}

thread_local! {
    static RAISED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The calling thread is a background job's own (see [`coordinate`]).
    static COORDINATING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the calling thread, a background job's own, the coordinator of its writes: it
/// keeps the priority it was started with (the caller's), and its runs of pieces start
/// their writers at nice 19 ([`background_priority`]) and join them once hurried. What it
/// does besides (opening, metadata, fsync, rename) is little CPU, and once the write is
/// waited for it must not wait for a core behind another busy process.
pub(crate) fn coordinate() {
    COORDINATING.set(true);
}

/// Once somebody waits for a write, its threads (at nice 19) return to the priority of
/// the threads that started it: training is blocked then, and a waited write at nice 19
/// would get almost nothing of a core that another process keeps busy (an end-of-fit wait
/// took seconds so). Lowering a nice value needs `CAP_SYS_NICE` or a `RLIMIT_NICE` that
/// allows it (root outside most containers); without, the thread stays where it is, and
/// threads at the caller's priority do the write instead (see [`coordinate`]). Returns
/// whether the calling thread runs at a priority other than a background writer's. Best
/// effort, tried once per thread.
pub(crate) fn waited_priority() -> bool {
    // SAFETY: plain syscalls on the calling thread's own nice value.
    let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if !RAISED.with(|r| r.replace(true)) && nice() == BACKGROUND_NICE {
        // SAFETY: as above.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, CALLER_NICE.load(Ordering::Relaxed));
        }
    }
    nice() != BACKGROUND_NICE
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
    use std::time::Duration;

    #[test]
    fn a_jobs_own_thread_writes_nothing_until_hurried_then_joins_at_its_priority() {
        // SAFETY: plain syscall reading the calling thread's nice value.
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let effort = Effort::default();
        let width = Width {
            threads: 1,
            hurried_threads: 2,
            effort: effort.clone(),
        };
        let hurried = AtomicBool::new(false);
        // (hurried when it began, the job's own thread, its nice value) of each piece.
        let seen = Mutex::new(Vec::new());
        let pieces = plan_pieces(&(0..40).map(|i| (i * 10, 1)).collect::<Vec<_>>(), false);
        std::thread::scope(|s| {
            let job = s.spawn(|| {
                coordinate();
                let me = std::thread::current().id();
                run_pieces_with(&pieces, &width, |_| {
                    let when = hurried.load(Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                    let mine = std::thread::current().id() == me;
                    seen.lock().unwrap().push((when, mine, nice()));
                    Ok(())
                })
                .unwrap();
                nice()
            });
            std::thread::sleep(Duration::from_millis(100));
            hurried.store(true, Ordering::SeqCst);
            effort.hurry();
            assert_eq!(
                job.join().unwrap(),
                nice(),
                "the job's own thread kept its priority"
            );
        });
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 40, "every piece done once");
        let early: Vec<_> = seen.iter().filter(|p| !p.0).collect();
        assert!(!early.is_empty());
        assert!(
            early.iter().all(|p| !p.1 && p.2 == BACKGROUND_NICE),
            "{early:?}"
        );
        let joined = seen.iter().filter(|p| p.0 && p.1).count();
        assert!(
            joined > 0,
            "the job's own thread took no piece once hurried: {seen:?}"
        );
        assert!(
            seen.iter().filter(|p| p.1).all(|p| p.2 == nice()),
            "{seen:?}"
        );
    }

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

//! A write running on its own thread: owns everything it needs (tensors keep their bytes
//! alive), reports done / error / bytes / seconds, and can be waited on with a timeout.
//!
//! Jobs can be chained: a job started `after` others begins only when they have all ended
//! (so two saves to one path commit in the order they were asked for), and until it begins
//! it can be cancelled (a newer save to the same path makes it pointless). Waiting for a job
//! hurries it: a background write uses few threads so that training keeps the cores, and
//! takes them all once somebody waits for it (see [`Effort`]).

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::io::Effort;

/// What a job's work wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Every file written, the main one first.
    pub paths: Vec<PathBuf>,
    pub bytes: u64,
    /// A replaced file kept for the next write to reuse (`WriteOptions::keep_replaced`).
    pub kept: Option<PathBuf>,
}

impl Output {
    pub fn new(paths: Vec<PathBuf>, bytes: u64) -> Output {
        Output {
            paths,
            bytes,
            kept: None,
        }
    }
}

/// What a finished write produced.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteReport {
    pub output: Output,
    /// From the moment the write began (not counting time queued behind another job).
    pub seconds: f64,
}

type Outcome = std::result::Result<WriteReport, Arc<Error>>;

enum State {
    /// Not begun: waiting for every job in `after` to end (empty: about to begin).
    Queued {
        after: Vec<Job>,
    },
    Running,
    Finished(Outcome),
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    effort: Effort,
}

/// A handle on a background write. Dropping it does not cancel the write.
#[derive(Clone)]
pub struct Job {
    shared: Arc<Shared>,
}

/// The work of a job: returns what it wrote.
pub trait Work: FnOnce() -> Result<Output> + Send + 'static {}
impl<F: FnOnce() -> Result<Output> + Send + 'static> Work for F {}

fn run(work: impl FnOnce() -> Result<Output>) -> Outcome {
    let started = Instant::now();
    work()
        .map(|output| WriteReport {
            output,
            seconds: started.elapsed().as_secs_f64(),
        })
        .map_err(Arc::new)
}

impl Job {
    fn with_state(state: State, effort: Effort) -> Job {
        Job {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                changed: Condvar::new(),
                effort,
            }),
        }
    }

    /// Starts `work` on a new thread named `name` once every job in `after` has ended.
    /// The thread keeps the caller's priority and coordinates: its writes are done by
    /// threads at the lowest priority (nice 19) until somebody waits, then by it and
    /// threads at its priority too (see `io::coordinate`). Work that runs outside the runs
    /// of pieces must be light. `effort` is the one the work's writes consult: hurrying
    /// the job hurries them.
    pub fn spawn(name: &str, after: &[Job], effort: Effort, work: impl Work) -> Job {
        let job = Job::with_state(
            State::Queued {
                after: after.to_vec(),
            },
            effort,
        );
        let me = job.clone();
        crate::io::note_caller_priority();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                crate::io::coordinate();
                me.run_when_due(work)
            });
        if let Err(e) = spawned {
            job.finish(Err(Arc::new(Error::io(
                "start writer thread for",
                PathBuf::new(),
                e,
            ))));
        }
        job
    }

    fn run_when_due(&self, work: impl Work) {
        // `after` stays in the state until the work begins, so that hurrying this job can
        // still reach the one it waits for.
        let after = match &*self.shared.state.lock().unwrap() {
            State::Queued { after } => after.clone(),
            _ => return, // cancelled before the thread got going
        };
        for previous in after {
            previous.wait(None);
        }
        {
            let mut state = self.shared.state.lock().unwrap();
            if !matches!(*state, State::Queued { .. }) {
                return; // cancelled while waiting
            }
            *state = State::Running;
        }
        let outcome = run(work);
        self.finish(outcome);
    }

    fn finish(&self, outcome: Outcome) {
        *self.shared.state.lock().unwrap() = State::Finished(outcome);
        self.shared.changed.notify_all();
    }

    /// Runs `work` on the calling thread and returns a finished job.
    pub fn run_here(work: impl FnOnce() -> Result<Output>) -> Job {
        Job::with_state(State::Finished(run(work)), Effort::default())
    }

    /// Drops the job if it has not begun: it then ends with [`Error::Cancelled`] and never
    /// touches its files. Returns whether it was cancelled.
    pub fn cancel(&self) -> bool {
        let mut state = self.shared.state.lock().unwrap();
        if !matches!(*state, State::Queued { .. }) {
            return false;
        }
        *state = State::Finished(Err(Arc::new(Error::Cancelled)));
        drop(state);
        self.shared.changed.notify_all();
        true
    }

    /// Asks the job (and the jobs it is queued behind) to use every thread it may.
    pub fn hurry(&self) {
        self.shared.effort.hurry();
        let after = match &*self.shared.state.lock().unwrap() {
            State::Queued { after } => after.clone(),
            _ => Vec::new(),
        };
        for previous in after {
            previous.hurry();
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(*self.shared.state.lock().unwrap(), State::Finished(_))
    }

    /// Whether the work has begun (it may have ended since).
    pub fn has_begun(&self) -> bool {
        match &*self.shared.state.lock().unwrap() {
            State::Queued { .. } => false,
            State::Running => true,
            State::Finished(outcome) => {
                !matches!(outcome.as_ref().map_err(|e| &**e), Err(Error::Cancelled))
            }
        }
    }

    /// Blocks until the job ends or `timeout` passes; true when it has ended.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let guard = self.shared.state.lock().unwrap();
        let unfinished = |s: &mut State| !matches!(s, State::Finished(_));
        match timeout {
            None => {
                let _done = self.shared.changed.wait_while(guard, unfinished).unwrap();
                true
            }
            Some(t) => {
                let (_guard, result) = self
                    .shared
                    .changed
                    .wait_timeout_while(guard, t, unfinished)
                    .unwrap();
                !result.timed_out()
            }
        }
    }

    /// The outcome, once done.
    pub fn outcome(&self) -> Option<Outcome> {
        match &*self.shared.state.lock().unwrap() {
            State::Finished(outcome) => Some(outcome.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn spawn(after: Option<&Job>, work: impl Work) -> Job {
        let after: Vec<Job> = after.into_iter().cloned().collect();
        Job::spawn("fastckpt-writer", &after, Effort::default(), work)
    }

    #[test]
    fn reports_success_and_failure() {
        let ok = spawn(None, || Ok(Output::new(vec![PathBuf::from("a")], 3)));
        assert!(ok.wait(None));
        let report = ok.outcome().unwrap().unwrap().output;
        assert_eq!((report.paths, report.bytes), (vec![PathBuf::from("a")], 3));

        let failed = spawn(None, || Err(Error::invalid("boom")));
        failed.wait(None);
        assert_eq!(failed.outcome().unwrap().unwrap_err().to_string(), "boom");
    }

    #[test]
    fn the_job_thread_keeps_the_callers_priority_and_its_writers_run_at_the_lowest() {
        // SAFETY: plain syscalls reading the calling thread's nice value.
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let caller = nice();
        let job = spawn(None, move || {
            let own = nice();
            let pieces = crate::io::plan_pieces(&[(0, 1), (10, 1), (20, 1)], false);
            let writers = Mutex::new(Vec::new());
            crate::io::run_pieces_with(&pieces, &crate::io::Width::fixed(1), |_| {
                writers.lock().unwrap().push(nice());
                Ok(())
            })
            .unwrap();
            let writers = writers.into_inner().unwrap();
            assert_eq!(own, caller, "the job's own thread");
            assert_eq!(writers, vec![crate::io::BACKGROUND_NICE; 3], "its writers");
            Ok(Output::new(vec![], 0))
        });
        job.wait(None);
        job.outcome().unwrap().unwrap();
        assert_eq!(nice(), caller);
    }

    #[test]
    fn wait_times_out_while_running() {
        let (tx, rx) = mpsc::channel::<()>();
        let job = spawn(None, move || {
            rx.recv().ok();
            Ok(Output::new(vec![], 0))
        });
        assert!(!job.wait(Some(Duration::from_millis(20))));
        assert!(!job.is_done());
        tx.send(()).unwrap();
        assert!(job.wait(Some(Duration::from_secs(10))));
    }

    #[test]
    fn a_chained_job_begins_after_the_previous_one_ends() {
        let (tx, rx) = mpsc::channel::<()>();
        let order = Arc::new(Mutex::new(Vec::new()));
        let o1 = order.clone();
        let first = spawn(None, move || {
            rx.recv().ok();
            o1.lock().unwrap().push(1);
            Err(Error::invalid("the first one fails"))
        });
        let o2 = order.clone();
        let second = spawn(Some(&first), move || {
            o2.lock().unwrap().push(2);
            Ok(Output::new(vec![], 2))
        });
        assert!(!second.wait(Some(Duration::from_millis(50))));
        assert!(!second.has_begun());
        tx.send(()).unwrap();
        assert!(second.wait(Some(Duration::from_secs(10))));
        assert_eq!(*order.lock().unwrap(), vec![1, 2]);
        assert!(
            first.outcome().unwrap().is_err(),
            "its failure stays its own"
        );
        assert_eq!(second.outcome().unwrap().unwrap().output.bytes, 2);
    }

    #[test]
    fn a_job_after_several_begins_once_they_all_ended() {
        let (tx1, rx1) = mpsc::channel::<()>();
        let (tx2, rx2) = mpsc::channel::<()>();
        let a = spawn(None, move || {
            rx1.recv().ok();
            Ok(Output::new(vec![], 1))
        });
        let b = spawn(None, move || {
            rx2.recv().ok();
            Ok(Output::new(vec![], 2))
        });
        let last = Job::spawn("last", &[a.clone(), b.clone()], Effort::default(), || {
            Ok(Output::new(vec![], 3))
        });
        tx1.send(()).unwrap();
        a.wait(None);
        assert!(
            !last.wait(Some(Duration::from_millis(50))),
            "b has not ended"
        );
        tx2.send(()).unwrap();
        assert!(last.wait(Some(Duration::from_secs(10))));
    }

    #[test]
    fn only_a_job_that_has_not_begun_can_be_cancelled() {
        let (tx, rx) = mpsc::channel::<()>();
        let (began_tx, began_rx) = mpsc::channel::<()>();
        let first = spawn(None, move || {
            began_tx.send(()).ok();
            rx.recv().ok();
            Ok(Output::new(vec![], 1))
        });
        let ran = Arc::new(Mutex::new(false));
        let r = ran.clone();
        let second = spawn(Some(&first), move || {
            *r.lock().unwrap() = true;
            Ok(Output::new(vec![], 2))
        });
        began_rx.recv().unwrap();
        assert!(!first.cancel(), "the first one is running");
        assert!(second.cancel());
        assert!(!second.cancel(), "once");
        assert!(second.is_done() && !second.has_begun());
        tx.send(()).unwrap();
        first.wait(None);
        // Give the second job's thread every chance to run its work, wrongly.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!*ran.lock().unwrap());
        let err = second.outcome().unwrap().unwrap_err();
        assert!(matches!(*err, Error::Cancelled), "{err}");
        assert_eq!(first.outcome().unwrap().unwrap().output.bytes, 1);
    }

    #[test]
    fn hurrying_a_queued_job_hurries_the_one_it_waits_for() {
        let (tx, rx) = mpsc::channel::<()>();
        let first_effort = Effort::default();
        let first = Job::spawn("first", &[], first_effort.clone(), move || {
            rx.recv().ok();
            Ok(Output::new(vec![], 1))
        });
        let second_effort = Effort::default();
        let second = Job::spawn(
            "second",
            std::slice::from_ref(&first),
            second_effort.clone(),
            || Ok(Output::new(vec![], 2)),
        );
        assert!(!first_effort.is_hurried() && !second_effort.is_hurried());
        second.hurry();
        assert!(first_effort.is_hurried() && second_effort.is_hurried());
        tx.send(()).unwrap();
        assert!(second.wait(Some(Duration::from_secs(10))));
    }
}

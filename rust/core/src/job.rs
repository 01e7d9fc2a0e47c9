//! A write running on its own thread: owns everything it needs (tensors keep their bytes
//! alive), reports done / error / bytes / seconds, and can be waited on with a timeout.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// What a finished write produced.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteReport {
    /// Every file written, the main one first.
    pub paths: Vec<PathBuf>,
    pub bytes: u64,
    pub seconds: f64,
}

type Outcome = std::result::Result<WriteReport, Arc<Error>>;

struct Shared {
    outcome: Mutex<Option<Outcome>>,
    finished: Condvar,
}

/// A handle on a background write. Dropping it does not cancel the write.
#[derive(Clone)]
pub struct Job {
    shared: Arc<Shared>,
}

impl Job {
    /// Starts `work` on a new thread; `work` returns the paths and bytes it wrote.
    pub fn spawn<F>(work: F) -> Job
    where
        F: FnOnce() -> Result<(Vec<PathBuf>, u64)> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            outcome: Mutex::new(None),
            finished: Condvar::new(),
        });
        let job = Job {
            shared: shared.clone(),
        };
        let started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name("fastckpt-writer".into())
            .spawn(move || {
                crate::io::idle_priority();
                let outcome = work()
                    .map(|(paths, bytes)| WriteReport {
                        paths,
                        bytes,
                        seconds: started.elapsed().as_secs_f64(),
                    })
                    .map_err(Arc::new);
                *shared.outcome.lock().unwrap() = Some(outcome);
                shared.finished.notify_all();
            });
        if let Err(e) = spawned {
            *job.shared.outcome.lock().unwrap() = Some(Err(Arc::new(Error::io(
                "start writer thread for",
                PathBuf::new(),
                e,
            ))));
        }
        job
    }

    /// Runs `work` on the calling thread and returns a finished job.
    pub fn run_here<F>(work: F) -> Job
    where
        F: FnOnce() -> Result<(Vec<PathBuf>, u64)>,
    {
        let started = Instant::now();
        let outcome = work()
            .map(|(paths, bytes)| WriteReport {
                paths,
                bytes,
                seconds: started.elapsed().as_secs_f64(),
            })
            .map_err(Arc::new);
        Job {
            shared: Arc::new(Shared {
                outcome: Mutex::new(Some(outcome)),
                finished: Condvar::new(),
            }),
        }
    }

    pub fn is_done(&self) -> bool {
        self.shared.outcome.lock().unwrap().is_some()
    }

    /// Blocks until the write ends or `timeout` passes; true when it has ended.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let guard = self.shared.outcome.lock().unwrap();
        match timeout {
            None => self
                .shared
                .finished
                .wait_while(guard, |o| o.is_none())
                .map(|g| g.is_some())
                .unwrap(),
            Some(t) => self
                .shared
                .finished
                .wait_timeout_while(guard, t, |o| o.is_none())
                .map(|(g, _)| g.is_some())
                .unwrap(),
        }
    }

    /// The outcome, once done.
    pub fn outcome(&self) -> Option<Outcome> {
        self.shared.outcome.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_success_and_failure() {
        let ok = Job::spawn(|| Ok((vec![PathBuf::from("a")], 3)));
        assert!(ok.wait(None));
        let report = ok.outcome().unwrap().unwrap();
        assert_eq!((report.paths, report.bytes), (vec![PathBuf::from("a")], 3));

        let failed = Job::spawn(|| Err(Error::invalid("boom")));
        failed.wait(None);
        assert_eq!(failed.outcome().unwrap().unwrap_err().to_string(), "boom");
    }

    #[test]
    fn the_writer_thread_runs_only_on_idle_cpu() {
        // SAFETY: plain syscalls reading the calling thread's scheduling policy.
        let caller = unsafe { libc::sched_getscheduler(0) };
        let job = Job::spawn(|| {
            let policy = unsafe { libc::sched_getscheduler(0) };
            let child = std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) });
            Ok((
                vec![],
                ((policy as u64) << 8) | child.join().unwrap() as u64,
            ))
        });
        job.wait(None);
        let policies = job.outcome().unwrap().unwrap().bytes;
        assert_eq!(
            (policies >> 8, policies & 0xff),
            (libc::SCHED_IDLE as u64, libc::SCHED_IDLE as u64),
            "the job's thread and the threads it starts"
        );
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, caller);
    }

    #[test]
    fn wait_times_out_while_running() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let job = Job::spawn(move || {
            rx.recv().ok();
            Ok((vec![], 0))
        });
        assert!(!job.wait(Some(Duration::from_millis(20))));
        assert!(!job.is_done());
        tx.send(()).unwrap();
        assert!(job.wait(Some(Duration::from_secs(10))));
    }
}

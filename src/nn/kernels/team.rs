//! A spinning thread team for the many small products of one decode step.
//!
//! A SmolLM2 decode step runs ~120 products of 0.1–30 µs each, separated by serial work
//! (norms, rope, attention, activation quantization). With rayon each product is a
//! fork/join: the idle worker has to notice the job (or be woken from sleep) every time,
//! which costs a visible share of a 4-bit token. llama.cpp keeps its threads spinning on
//! an atomic between the operations of a graph (`ggml_barrier` in ggml-cpu.c); this is the
//! same idea, scoped to one forward pass:
//!
//! * [`session`] (called by the decode forward pass, on a rayon worker) borrows the other
//!   rayon workers for the duration of `body`: each runs a helper loop that spins on the
//!   team's state word, claims task indices and runs them. The helpers are rayon's own
//!   threads, so nothing is oversubscribed; when `body` returns they go back to rayon (and
//!   its sleep), so an idle process never spins.
//! * [`for_each`] is what kernels call to split work: inside a session, on the leader's
//!   thread, the tasks are published to the team; anywhere else it is rayon's
//!   `into_par_iter().for_each`. The task partition is the caller's, so results do not
//!   depend on which thread ran which task.
//!
//! Liveness: the leader claims tasks itself exactly as a helper does, so a job completes
//! even if no helper ever arrives (one thread, helpers busy elsewhere, a helper descheduled
//! by the OS); the leader waits only for tasks a helper has already claimed. Helpers spin
//! only while a session is open, with `yield_now` after a bounded number of empty polls so a
//! loaded machine gets its core back between products.

use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// Largest task count a team job takes (16 bits of the state word); more go to rayon.
const MAX_TASKS: usize = (1 << 16) - 1;

/// Empty polls a helper spins (`spin_loop` hint) before it starts yielding its core
/// between polls (~ tens of µs: longer than the serial gaps of a decode step).
const SPIN_POLLS: u32 = 1 << 14;

/// Environment switch: `QUANTLAB_TEAM=on` (or `1`) runs CPU decode steps on a team.
pub const TEAM_ENV: &str = "QUANTLAB_TEAM";

/// Whether decode steps open sessions (`QUANTLAB_TEAM=on`). Off by default: idle on a
/// 2-core EPYC (AVX-512 VNNI) the team made SmolLM2 q4_0 decode 6–14% slower than rayon's
/// fork/join in three alternating runs and w:i4 a:q8 level (−3% to +11%); under load it
/// loses whenever a helper is preempted.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| matches!(std::env::var(TEAM_ENV).as_deref(), Ok("on" | "1" | "true")))
}

/// The job a helper runs after claiming one of its tasks.
type Task<'a> = &'a (dyn Fn(usize) + Sync);

/// State shared by the leader and its helpers for one session.
struct Team {
    /// `generation << 32 | tasks << 16 | next`: a helper claims task `next` of the job of
    /// `generation` by a compare-and-swap of the whole word, so a claim on a stale job
    /// fails (the generation moved) and a successful claim pins the job: the leader does
    /// not return from a job while a claimed task is unfinished.
    state: AtomicU64,
    /// The current job's closure (a pointer to a `Task` on the leader's stack), written
    /// before the state word publishes the job.
    job: AtomicPtr<Task<'static>>,
    /// Tasks of the current job finished (by anyone).
    done: AtomicUsize,
    /// A task panicked on a helper (the leader re-raises it).
    panicked: AtomicBool,
    /// The session is over: helpers return to rayon.
    closed: AtomicBool,
}

thread_local! {
    /// The team this thread leads, if it is inside [`session`]'s body.
    static LEADING: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

fn pack(generation: u64, tasks: usize, next: usize) -> u64 {
    (generation << 32) | ((tasks as u64) << 16) | next as u64
}

fn unpack(s: u64) -> (u64, usize, usize) {
    (
        s >> 32,
        ((s >> 16) & 0xFFFF) as usize,
        (s & 0xFFFF) as usize,
    )
}

impl Team {
    fn new() -> Self {
        Team {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// Claims the next task of the job published in `s`; `None` when it has none left or
    /// the word moved on (the caller reloads).
    fn claim(&self, s: u64) -> Option<usize> {
        let (_, tasks, next) = unpack(s);
        if next >= tasks {
            return None;
        }
        self.state
            .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| next)
    }

    /// A helper's loop: claim and run tasks until the session closes.
    fn help(&self) {
        let mut idle = 0u32;
        loop {
            let s = self.state.load(Ordering::Acquire);
            if let Some(i) = self.claim(s) {
                // SAFETY: the successful claim of task `i` of this generation keeps the
                // leader inside `run` for that job (it waits until `done` counts task `i`),
                // so the closure behind `job`, written before the state word that
                // published the job (Release/AcqRel), is alive and is this job's.
                let f: Task = unsafe { *self.job.load(Ordering::Acquire) };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_err() {
                    self.panicked.store(true, Ordering::Relaxed);
                }
                self.done.fetch_add(1, Ordering::Release);
                idle = 0;
                continue;
            }
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            idle = idle.saturating_add(1);
            if idle < SPIN_POLLS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// The leader's side of one job: publish, take tasks like a helper, wait for the rest.
    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let task: Task = f;
        let generation = unpack(self.state.load(Ordering::Relaxed)).0 + 1;
        // The erased lifetime never escapes: helpers dereference the pointer only after
        // claiming a task of this generation, and this function returns only after every
        // claimed task is done.
        let ptr = (&task as *const Task).cast_mut().cast::<Task<'static>>();
        self.job.store(ptr, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.state
            .store(pack(generation, tasks, 0), Ordering::Release);
        let mut own_panic = None;
        loop {
            let s = self.state.load(Ordering::Acquire);
            if unpack(s).2 >= tasks {
                break;
            }
            if let Some(i) = self.claim(s) {
                if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))) {
                    own_panic.get_or_insert(e);
                }
                self.done.fetch_add(1, Ordering::Release);
            }
        }
        // Tasks claimed by helpers: spin, then yield (a helper preempted on a loaded
        // machine needs a core to finish its task).
        let mut polls = 0u32;
        while self.done.load(Ordering::Acquire) < tasks {
            polls = polls.saturating_add(1);
            if polls < SPIN_POLLS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Some(e) = own_panic {
            std::panic::resume_unwind(e);
        }
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a team task panicked on a helper thread");
        }
    }
}

/// Closes the team and clears the leader mark, also when the body unwinds (else the helpers
/// would spin forever and the enclosing rayon scope would never end).
struct Close<'a>(&'a Team);

impl Drop for Close<'_> {
    fn drop(&mut self) {
        LEADING.with(|l| l.set(std::ptr::null()));
        self.0.closed.store(true, Ordering::Release);
    }
}

/// Runs `body` with the other rayon workers spinning as its team when sessions are on
/// (`QUANTLAB_TEAM=on`, see [`enabled`]); otherwise `body` just runs.
pub fn session<R: Send>(body: impl FnOnce() -> R + Send) -> R {
    if !enabled() {
        return body();
    }
    session_forced(body)
}

/// Runs `body` with the other rayon workers spinning as its team, whatever
/// `QUANTLAB_TEAM` says (tests and A/B runs): [`for_each`] calls made by `body` on this
/// thread go to the team. Without a second thread, or inside another session, `body` just
/// runs. Called from outside rayon's pool, it first moves onto a worker (the helpers are
/// the pool's other workers).
pub fn session_forced<R: Send>(body: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 || leading() {
        return body();
    }
    if rayon::current_thread_index().is_none() {
        return rayon::scope(|_| session_forced(body));
    }
    let team = Team::new();
    rayon::scope(|s| {
        for _ in 1..threads {
            // A helper that starts after the session closed returns at once; one that
            // never starts costs nothing (the leader takes every task itself).
            s.spawn(|_| team.help());
        }
        LEADING.with(|l| l.set(&team));
        let _close = Close(&team);
        body()
    })
}

/// Whether this thread is inside a [`session`] body.
pub fn leading() -> bool {
    LEADING.with(|l| !l.get().is_null())
}

/// `f(i)` for every `i < tasks`, split over the threads: over the session's team when this
/// thread leads one, over rayon's pool otherwise. `f` must be safe to run concurrently on
/// different `i`.
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync + Send) {
    match tasks {
        0 => return,
        1 => return f(0),
        _ => {}
    }
    if tasks > MAX_TASKS {
        (0..tasks).into_par_iter().for_each(f);
        return;
    }
    // Taken for the job: a split inside one of its tasks on this thread must not publish
    // a new job over the running one (it goes to rayon, as on the helpers).
    let team = LEADING.with(|l| l.replace(std::ptr::null()));
    if team.is_null() {
        (0..tasks).into_par_iter().for_each(f);
        return;
    }
    let _back = Restore(team);
    // SAFETY: LEADING pointed at the `Team` of the enclosing `session` frame on this
    // thread, set inside that frame and cleared (by `Close`) before the frame ends; `_back`
    // puts it back before this call returns or unwinds.
    let team = unsafe { &*team };
    team.run(tasks, &f);
}

/// Puts the leader mark back after a job (also when a task's panic unwinds through).
struct Restore(*const Team);

impl Drop for Restore {
    fn drop(&mut self) {
        LEADING.with(|l| l.set(self.0));
    }
}

/// [`for_each`] only inside a session (spinning helpers make even µs-sized splits pay);
/// elsewhere the tasks run in order on this thread.
pub fn for_each_in_session(tasks: usize, f: impl Fn(usize) + Sync + Send) {
    if leading() {
        for_each(tasks, f);
    } else {
        (0..tasks).for_each(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool")
    }

    /// Every task runs exactly once, in and out of a session, on 1 to 4 threads, over many
    /// consecutive jobs (the generation protocol) of ragged sizes.
    #[test]
    fn every_task_runs_once() {
        for threads in [1, 2, 3, 4] {
            pool(threads).install(|| {
                for in_session in [false, true] {
                    let run = || {
                        for job in 0..300usize {
                            let tasks = job % 37;
                            let hits: Vec<AtomicU32> =
                                (0..tasks).map(|_| AtomicU32::new(0)).collect();
                            for_each(tasks, |i| {
                                hits[i].fetch_add(1, Ordering::Relaxed);
                            });
                            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                        }
                    };
                    if in_session {
                        session_forced(|| {
                            assert!(leading() || threads < 2);
                            run()
                        });
                    } else {
                        run();
                    }
                    assert!(!leading());
                }
            });
        }
    }

    /// A session opened from outside the pool moves onto a worker; nested sessions and
    /// rayon splits inside a session body complete (no deadlock).
    #[test]
    fn nested_and_outside_calls_complete() {
        let p = pool(2);
        p.install(|| {
            let total = session_forced(|| {
                let inner = session_forced(|| {
                    let v: Vec<u64> = (0..1000u64).into_par_iter().map(|x| x * 2).collect();
                    v.iter().sum::<u64>()
                });
                let sum = AtomicU64::new(0);
                for_each(64, |i| {
                    // A split inside a task (on a helper or the leader) falls back to rayon.
                    for_each(3, |j| {
                        sum.fetch_add((i * 3 + j) as u64, Ordering::Relaxed);
                    });
                });
                inner + sum.load(Ordering::Relaxed)
            });
            assert_eq!(total, 999_000 + (0..192u64).sum::<u64>());
        });
        // From a thread outside any pool (the global pool is used).
        let n = session_forced(|| {
            let c = AtomicUsize::new(0);
            for_each(10, |_| {
                c.fetch_add(1, Ordering::Relaxed);
            });
            c.into_inner()
        });
        assert_eq!(n, 10);
    }

    /// A panicking task reaches the caller, and the team still closes (the test returns).
    #[test]
    fn task_panics_propagate() {
        let p = pool(2);
        for culprit in [0usize, 7] {
            let r = p.install(|| {
                std::panic::catch_unwind(|| {
                    session_forced(|| {
                        for_each(8, |i| {
                            if i == culprit {
                                panic!("task {i}");
                            }
                        })
                    })
                })
            });
            assert!(r.is_err());
        }
    }

    #[test]
    fn state_word_round_trips() {
        assert_eq!(unpack(pack(5, 300, 17)), (5, 300, 17));
        assert_eq!(
            unpack(pack(u32::MAX as u64, MAX_TASKS, MAX_TASKS)).1,
            MAX_TASKS
        );
    }
}

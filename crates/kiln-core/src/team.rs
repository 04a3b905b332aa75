//! A team of spinning helper threads for short splits that come back to back (one token of
//! decoding runs ~150 matrix-vector products, each a few tens of microseconds).
//!
//! Handing such a split to rayon from a thread outside its pool costs two or three thread
//! wake-ups (the job is injected, a sleeping worker is woken, the caller sleeps on a latch
//! until the last part is done). On a virtual machine each wake-up can cost tens of
//! microseconds, as much as the product itself. Here the caller takes parts of the job itself
//! and its helpers spin for a while after each job, so the next one starts without any
//! wake-up; helpers that stay idle longer than [`SPIN`] park, and the next job unparks them.
//!
//! One caller at a time owns the team (others fall back to rayon). A job is published as one
//! 64-bit ticket `epoch << 32 | parts << 16 | next`: claiming part `next` is a compare-and-swap
//! on the ticket, so a helper that sees a stale epoch can never claim a part of a finished job,
//! and the caller returns only when every claimed part has finished.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_micros(300);
/// Most parts one job may have (the ticket's 16-bit fields).
pub(crate) const MAX_PARTS: usize = u16::MAX as usize;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    ticket: AtomicU64,
    /// Parts of the current job that have finished.
    done: AtomicUsize,
    /// The current job's body, written before its ticket is published.
    job: UnsafeCell<Option<Job>>,
    /// Per helper: parked (or about to park) and waiting for an unpark.
    sleeping: Vec<AtomicBool>,
    /// The first panic of a part of the current job, re-raised by the owner.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `job` is written only by the team's single owner before it publishes the ticket
// (release) and read only by a thread that claimed a part of that ticket (acquire); the
// owner waits until every claimed part is done before it writes `job` again.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A caller plus `helpers` spinning threads.
pub(crate) struct Team {
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    owner: Mutex<()>,
}

fn unpack(t: u64) -> (u64, usize, usize) {
    (
        t >> 32,
        ((t >> 16) & 0xffff) as usize,
        (t & 0xffff) as usize,
    )
}

impl Shared {
    /// Claims the next part of the published job, if one is left.
    fn claim(&self) -> Option<usize> {
        let mut t = self.ticket.load(Ordering::Acquire);
        loop {
            let (_, parts, next) = unpack(t);
            if next >= parts {
                return None;
            }
            match self
                .ticket
                .compare_exchange_weak(t, t + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(next),
                Err(now) => t = now,
            }
        }
    }

    /// Runs claimed part `i` of the current job; a panic is kept for the owner, so that the
    /// part still counts as done and the owner never waits forever or returns early.
    fn run(&self, i: usize) {
        // SAFETY: see `unsafe impl Sync for Shared`: the job outlives every claimed part.
        let job = unsafe { (*self.job.get()).expect("a published job") };
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(i) }));
        if let Err(payload) = result {
            self.panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(payload);
        }
        self.done.fetch_add(1, Ordering::Release);
    }
}

fn helper_loop(shared: Arc<Shared>, index: usize) {
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(i) = shared.claim() {
                shared.run(i);
                idle_since = Instant::now();
                continue;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && idle_since.elapsed() > SPIN {
                break;
            }
        }
        // Park, unless a job was published after the last look (the owner reads `sleeping`
        // after publishing; both sides use SeqCst so one of them sees the other).
        shared.sleeping[index].store(true, Ordering::SeqCst);
        let (_, parts, next) = unpack(shared.ticket.load(Ordering::SeqCst));
        if next < parts {
            shared.sleeping[index].store(false, Ordering::SeqCst);
            continue;
        }
        while shared.sleeping[index].load(Ordering::SeqCst) {
            std::thread::park();
        }
    }
}

impl Team {
    fn new(helpers: usize) -> Team {
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            sleeping: (0..helpers).map(|_| AtomicBool::new(false)).collect(),
            panic: Mutex::new(None),
        });
        let threads = (0..helpers)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("kiln-team-{i}"))
                    .spawn(move || helper_loop(s, i))
                    .expect("kiln: cannot start a helper thread")
                    .thread()
                    .clone()
            })
            .collect();
        Team {
            shared,
            threads,
            owner: Mutex::new(()),
        }
    }

    /// Runs `f(0..parts)` across the caller and the helpers; `false` (nothing run) when another
    /// thread owns the team.
    pub(crate) fn try_run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        assert!(parts <= MAX_PARTS, "team: {parts} parts");
        // A part's panic unwinds through here with the lock held: poisoning is harmless.
        let _owner = match self.owner.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        let s = &*self.shared;
        // SAFETY: the previous job's parts have all finished (checked before its `try_run`
        // returned), so no helper reads `job` now. The lifetime is erased for the helpers;
        // this call does not return before every claimed part is done.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f));
        }
        s.done.store(0, Ordering::Relaxed);
        let epoch = (s.ticket.load(Ordering::Relaxed) >> 32).wrapping_add(1) & 0xffff_ffff;
        s.ticket
            .store(epoch << 32 | (parts as u64) << 16, Ordering::SeqCst);
        for (flag, t) in s.sleeping.iter().zip(&self.threads) {
            if flag.swap(false, Ordering::SeqCst) {
                t.unpark();
            }
        }
        while let Some(i) = s.claim() {
            s.run(i);
        }
        while s.done.load(Ordering::Acquire) < parts {
            std::hint::spin_loop();
        }
        // Taken out first: unwinding with the guard alive would poison the lock.
        let payload = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = payload {
            std::panic::resume_unwind(payload);
        }
        true
    }
}

/// Whether splits use the team: yes unless `KILN_SPIN_TEAM=0` (for machines where idle
/// spinning is unwelcome; splits then go to rayon).
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("KILN_SPIN_TEAM").map_or(true, |v| v.trim() != "0"))
}

/// The team of `threads - 1` helpers (`threads` ≥ 2), started on first use and kept.
pub(crate) fn team(threads: usize) -> &'static Team {
    static TEAMS: OnceLock<Mutex<Vec<(usize, &'static Team)>>> = OnceLock::new();
    let mut teams = TEAMS.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap();
    if let Some(&(_, t)) = teams.iter().find(|(n, _)| *n == threads) {
        return t;
    }
    let t: &'static Team = Box::leak(Box::new(Team::new(threads - 1)));
    teams.push((threads, t));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_and_a_panic_reaches_the_owner() {
        let t = team(3);
        for parts in [1, 2, 7, 64] {
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..200 {
                assert!(t.try_run(parts, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }));
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 200));
        }
        // Parked helpers wake up for the next job.
        std::thread::sleep(SPIN * 4);
        let sum = AtomicUsize::new(0);
        assert!(t.try_run(8, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        }));
        assert_eq!(sum.load(Ordering::Relaxed), 28);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            t.try_run(4, &|i| {
                if i == 3 {
                    panic!("part 3 failed")
                }
            })
        }));
        let payload = r.expect_err("the part's panic reaches the owner");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"part 3 failed"));
        assert!(t.try_run(2, &|_| {}), "the team is usable after a panic");
    }

    #[test]
    fn a_job_inside_a_job_is_refused_not_deadlocked() {
        let t = team(2);
        let nested = AtomicUsize::new(0);
        assert!(t.try_run(2, &|_| {
            if t.try_run(1, &|_| {}) {
                nested.fetch_add(1, Ordering::Relaxed);
            }
        }));
        assert_eq!(nested.load(Ordering::Relaxed), 0);
    }
}

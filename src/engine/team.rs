//! A team of threads for one forward pass: the caller plus `threads - 1`
//! scoped workers that stay awake between products.
//!
//! A decode token is a chain of some two hundred short products (a 2560 ×
//! 2560 I2_S projection streams 1.6 MB, well under a millisecond). A pool
//! whose workers go to sleep between them pays a wake-up per product and
//! per worker; bitnet.cpp's threads spin instead. The workers here spin on
//! an epoch counter for up to [`SPIN`] after their last task, then sleep on
//! a condition variable (so a forward pass waiting on the reference does not
//! hold a core). Before a trace sink takes over the caller (a judge that
//! recomputes the stage on every core), [`Team::rest`] sends them to sleep
//! at once: a spinning worker would take a core from the sink's own
//! threads. Every element of a product is computed by the same code
//! whatever member (and thread count) computes it.
//!
//! Tasks own what they read (or borrow it for the whole pass, `'env`) and
//! hand results back by value: no `unsafe`, and per product only one small
//! allocation per member.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

type Task<'env> = Arc<dyn Fn(usize) + Send + Sync + 'env>;

/// What the caller and the workers share.
struct Board<'env> {
    /// Bumped once per published task.
    epoch: AtomicUsize,
    /// Workers finished with the current task.
    done: AtomicUsize,
    task: Mutex<Option<Task<'env>>>,
    quit: AtomicBool,
    /// Set by [`Team::rest`], cleared by the next task: idle workers sleep
    /// instead of spinning.
    rest: AtomicBool,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

/// The members of one forward pass (see the module doc).
pub(crate) struct Team<'b, 'env> {
    board: Option<&'b Board<'env>>,
    threads: usize,
}

/// Run `body` with a team of `threads` members (the calling thread is
/// member 0). One thread means no workers at all.
pub(crate) fn with_team<'env, R>(threads: usize, body: impl FnOnce(&Team<'_, 'env>) -> R) -> R {
    if threads <= 1 {
        return body(&Team {
            board: None,
            threads: 1,
        });
    }
    let board = Board {
        epoch: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        task: Mutex::new(None),
        quit: AtomicBool::new(false),
        rest: AtomicBool::new(false),
        panicked: AtomicBool::new(false),
        sleepers: AtomicUsize::new(0),
        sleep: Mutex::new(()),
        wake: Condvar::new(),
    };
    std::thread::scope(|s| {
        for member in 1..threads {
            let board = &board;
            std::thread::Builder::new()
                .name(format!("engine-{member}"))
                .spawn_scoped(s, move || board.serve(member))
                .expect("spawning an engine worker");
        }
        // Stop the workers however `body` ends (a panic included).
        struct Quit<'a, 'env>(&'a Board<'env>);
        impl Drop for Quit<'_, '_> {
            fn drop(&mut self) {
                self.0.quit.store(true, SeqCst);
                self.0.ring();
            }
        }
        let _quit = Quit(&board);
        body(&Team {
            board: Some(&board),
            threads,
        })
    })
}

impl Board<'_> {
    fn ring(&self) {
        if self.sleepers.load(SeqCst) > 0 {
            let _g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
    }

    fn serve(&self, member: usize) {
        let mut seen = 0;
        loop {
            let idle = Instant::now();
            let mut spins = 0u32;
            while self.epoch.load(SeqCst) == seen && !self.quit.load(SeqCst) {
                spins = spins.wrapping_add(1);
                let resting = self.rest.load(SeqCst);
                if !resting && (spins & 255 != 0 || idle.elapsed() < SPIN) {
                    std::hint::spin_loop();
                    continue;
                }
                let mut g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
                self.sleepers.fetch_add(1, SeqCst);
                while self.epoch.load(SeqCst) == seen && !self.quit.load(SeqCst) {
                    g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                self.sleepers.fetch_sub(1, SeqCst);
            }
            if self.quit.load(SeqCst) {
                return;
            }
            seen = self.epoch.load(SeqCst);
            let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(task) = task {
                if catch_unwind(AssertUnwindSafe(|| task(member))).is_err() {
                    self.panicked.store(true, SeqCst);
                }
            }
            self.done.fetch_add(1, SeqCst);
        }
    }
}

impl<'env> Team<'_, 'env> {
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `task(member)` on every member and return when all are done.
    pub fn run(&self, task: impl Fn(usize) + Send + Sync + 'env) {
        let Some(board) = self.board else {
            return task(0);
        };
        let task: Task<'env> = Arc::new(task);
        board.done.store(0, SeqCst);
        *board.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.clone());
        board.rest.store(false, SeqCst);
        board.epoch.fetch_add(1, SeqCst);
        board.ring();
        task(0);
        let workers = self.threads - 1;
        let mut spins = 0u32;
        while board.done.load(SeqCst) < workers {
            spins = spins.wrapping_add(1);
            if spins & 1023 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *board.task.lock().unwrap_or_else(|e| e.into_inner()) = None;
        assert!(!board.panicked.load(SeqCst), "an engine worker panicked");
    }

    /// Idle workers go to sleep now rather than spin until the next task
    /// (which wakes them): the caller is about to hand its thread to work
    /// that has threads of its own.
    pub fn rest(&self) {
        if let Some(board) = self.board {
            board.rest.store(true, SeqCst);
        }
    }

    /// `f` over consecutive ranges of `0..n` (sizes a multiple of `align`
    /// except the last), the results concatenated in range order. Members
    /// claim ranges from a shared counter, [`CHUNKS_PER_MEMBER`] per member
    /// on average, so a member slowed down by the machine does not hold
    /// the others up; which member computes a range never changes its bits.
    pub fn map_ranges<T: Send + 'env>(
        &self,
        n: usize,
        align: usize,
        f: impl Fn(Range<usize>) -> Vec<T> + Send + Sync + 'env,
    ) -> Vec<T> {
        self.map_ranges_by(n, align, CHUNKS_PER_MEMBER, f)
    }

    /// [`Team::map_ranges`] with `per_member` ranges per member on average:
    /// few for weight streams (each new range restarts the prefetchers),
    /// more for short compute-bound tasks of uneven length.
    pub fn map_ranges_by<T: Send + 'env>(
        &self,
        n: usize,
        align: usize,
        per_member: usize,
        f: impl Fn(Range<usize>) -> Vec<T> + Send + Sync + 'env,
    ) -> Vec<T> {
        let mut parts = self.map_parts(n, align, per_member, f);
        if parts.len() == 1 {
            return parts.pop().map(|p| p.1).unwrap_or_default();
        }
        let mut all = Vec::with_capacity(parts.iter().map(|p| p.1.len()).sum());
        for (_, p) in &mut parts {
            all.append(p);
        }
        all
    }

    /// [`Team::map_ranges_by`] without the concatenation: each range with
    /// its results, in range order (a caller that rearranges the results
    /// anyway need not hold them twice).
    pub fn map_parts<T: Send + 'env>(
        &self,
        n: usize,
        align: usize,
        per_member: usize,
        f: impl Fn(Range<usize>) -> Vec<T> + Send + Sync + 'env,
    ) -> Vec<(Range<usize>, Vec<T>)> {
        if self.threads == 1 {
            return vec![(0..n, f(0..n))];
        }
        let units = n.div_ceil(align);
        let chunk = align * units.div_ceil(self.threads * per_member).max(1);
        let n_chunks = n.div_ceil(chunk);
        let range = move |c: usize| c * chunk..((c + 1) * chunk).min(n);
        let parts: Arc<Vec<Mutex<Vec<T>>>> =
            Arc::new((0..n_chunks).map(|_| Mutex::new(Vec::new())).collect());
        let next = Arc::new(AtomicUsize::new(0));
        let out = parts.clone();
        self.run(move |_| loop {
            let c = next.fetch_add(1, SeqCst);
            if c >= n_chunks {
                break;
            }
            let r = f(range(c));
            *out[c].lock().unwrap_or_else(|e| e.into_inner()) = r;
        });
        parts
            .iter()
            .enumerate()
            .map(|(c, p)| {
                let v = std::mem::take(&mut *p.lock().unwrap_or_else(|e| e.into_inner()));
                (range(c), v)
            })
            .collect()
    }
}

/// Ranges per member of a [`Team::map_ranges`]: few keep the weight streams
/// long (each new range restarts the prefetchers), more let a member
/// slowed down by the machine hand work over.
pub(crate) const CHUNKS_PER_MEMBER: usize = 2;

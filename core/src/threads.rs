//! libtorch's intra-op threads, said where the work runs. libtorch applies
//! `set_num_threads` to the calling thread (OpenMP keeps the setting per thread) and to
//! threads that first compute after it; threads of a pool that computed before keep
//! theirs. So each place that computes on a pool's thread sets its count there: a
//! worker's tasks (`defuse worker --threads`, [`enter`]) and the coordinator's central
//! steps ([`enter_central`]). An embedded run (`defuse run`) has both in one process:
//! its workers with one thread each and its central steps with all of them.
use std::sync::atomic::{AtomicUsize, Ordering};

/// Threads of the central steps (0: the process's default, left as it is).
static CENTRAL: AtomicUsize = AtomicUsize::new(0);

/// Sets the threads of this process's central steps.
pub fn set_central(n: usize) {
    CENTRAL.store(n, Ordering::Relaxed);
}

/// Gives this thread the central steps' thread count (when one was set).
pub fn enter_central() {
    enter(CENTRAL.load(Ordering::Relaxed));
}

/// The central steps' thread count: the one set, else libtorch's default.
pub fn central_count() -> usize {
    match CENTRAL.load(Ordering::Relaxed) {
        0 => default_count(),
        n => n,
    }
}

/// Gives this thread `n` intra-op threads (0: leaves it as it is).
pub fn enter(n: usize) {
    if n > 0 {
        tch::set_num_threads(n.min(i32::MAX as usize) as i32);
    }
}

/// libtorch's default for this process (`OMP_NUM_THREADS`, else the cores), read
/// before anything in the process set another.
pub fn default_count() -> usize {
    tch::get_num_threads().max(1) as usize
}

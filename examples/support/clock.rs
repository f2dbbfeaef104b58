//! The clocks the kernel-timing examples (`*_cpu_time`, `*_rate`) measure with: one copy,
//! included by each example through `#[path = "support/clock.rs"] mod clock;` (an example
//! cannot import another, and these are not library API).

/// Process CPU time in ns (`CLOCK_PROCESS_CPUTIME_ID`): time the process spends descheduled
/// on a loaded machine does not count.
#[allow(dead_code)]
pub fn cpu_ns() -> u64 {
    let mut ts = std::mem::MaybeUninit::<[i64; 2]>::uninit();
    extern "C" {
        fn clock_gettime(clk: i32, ts: *mut [i64; 2]) -> i32;
    }
    // SAFETY: CLOCK_PROCESS_CPUTIME_ID (2) writes a timespec (two i64 on x86-64 Linux).
    unsafe {
        clock_gettime(2, ts.as_mut_ptr());
        let t = ts.assume_init();
        t[0] as u64 * 1_000_000_000 + t[1] as u64
    }
}

/// [`cpu_ns`], or with `WALL=1` wall-clock ns since the first call (for runs on several
/// threads, whose CPU time adds up over the threads).
#[allow(dead_code)]
pub fn cpu_or_wall_ns() -> u64 {
    if std::env::var("WALL").is_ok_and(|v| v == "1") {
        static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        return T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64;
    }
    cpu_ns()
}

/// Best and median µs per call of 7 batches of `calls` calls of `f`, read on `clock`
/// ([`cpu_ns`] or [`cpu_or_wall_ns`]): the one timing loop of the kernel examples.
#[allow(dead_code)]
pub fn best_and_median_us(clock: fn() -> u64, calls: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut v = Vec::new();
    for _ in 0..7 {
        let t0 = clock();
        for _ in 0..calls {
            f();
        }
        v.push((clock() - t0) as f64 / calls as f64 / 1e3);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[0], v[3])
}

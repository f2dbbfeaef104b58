//! Decode-shaped f32 GEMV (one activation row) over SmolLM2's per-token weight stream
//! (30 blocks of q|k|v 960×576, o 576×576, gate|up 3072×576, down 576×1536, then the
//! 49152×576 output layer: ~538 MB, far beyond the caches), in GB of weights per CPU-second
//! (one rayon thread unless `THREADS` says otherwise) and per wall-second, beside a plain
//! streaming read of the same bytes (the bandwidth ceiling a GEMV can reach).
//!
//! `cargo run --release --example gemv_f32_rate` (`REPS`, default 5).
use quantlab::nn::kernels::gemm_f32::{matmul_with, panel_width, PackedWeight};
use quantlab::nn::kernels::Isa;
use std::hint::black_box;
use std::time::Instant;

fn cpu_ns() -> u64 {
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

fn env(key: &str, default: usize) -> usize {
    std::env::var(key).map_or(default, |v| v.parse().unwrap())
}

/// Sum of every value (8 independent vector chains): a pure read of the stream.
fn stream_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let chunks = v.chunks_exact(64);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Own panel layout for the variants: panels of 64 columns, `[k][64]` each, 64-byte aligned.
struct Panels {
    buf: Vec<f32>,
    off: usize,
    n: usize,
    k: usize,
}

extern "C" {
    fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
}

impl Panels {
    fn new(w: &[f32], n: usize, k: usize) -> Self {
        let len = n.div_ceil(64) * 64 * k;
        let huge = std::env::var("HUGE").is_ok_and(|v| v == "1");
        let (buf, off) = if huge {
            const H: usize = 512 * 1024; // floats in 2 MiB
            let cap = len.div_ceil(H) * H + H;
            let mut buf: Vec<f32> = Vec::with_capacity(cap);
            let off = buf.as_ptr().align_offset(2 << 20);
            let r = unsafe {
                madvise(
                    buf.as_mut_ptr().add(off) as *mut _,
                    len.div_ceil(H) * H * 4,
                    14,
                )
            };
            assert_eq!(r, 0, "madvise");
            buf.resize(off + len + 16, 0.0);
            (buf, off)
        } else {
            let buf = vec![0f32; len + 16];
            let off = buf.as_ptr().align_offset(64).min(15);
            (buf, off)
        };
        let mut buf = buf;
        for j in 0..n {
            for p in 0..k {
                buf[off + (j / 64) * 64 * k + p * 64 + j % 64] = w[j * k + p];
            }
        }
        Panels { buf, off, n, k }
    }
    fn data(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.n.div_ceil(64) * 64 * self.k]
    }
}

/// One activation row through panels `p0..p1` with `D` floats of prefetch distance (0: none)
/// and the k loop unrolled by `U` (independent accumulator sets).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemv_panels<const D: usize, const U: usize>(
    x: &[f32],
    w: &Panels,
    y: *mut f32,
    p0: usize,
    p1: usize,
) {
    use std::arch::x86_64::*;
    let k = w.k;
    let data = w.data();
    for p in p0..p1 {
        let b = data.as_ptr().add(p * 64 * k);
        let mut acc = [[_mm512_setzero_ps(); 4]; U];
        let mut kk = 0;
        while kk + U <= k {
            for u in 0..U {
                let bp = b.add((kk + u) * 64);
                if D > 0 {
                    for l in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(bp.add(D + 16 * l) as *const i8);
                    }
                }
                let a = _mm512_set1_ps(*x.get_unchecked(kk + u));
                for v in 0..4 {
                    acc[u][v] = _mm512_fmadd_ps(a, _mm512_load_ps(bp.add(16 * v)), acc[u][v]);
                }
            }
            kk += U;
        }
        while kk < k {
            let bp = b.add(kk * 64);
            let a = _mm512_set1_ps(*x.get_unchecked(kk));
            for v in 0..4 {
                acc[0][v] = _mm512_fmadd_ps(a, _mm512_load_ps(bp.add(16 * v)), acc[0][v]);
            }
            kk += 1;
        }
        for u in 1..U {
            for v in 0..4 {
                acc[0][v] = _mm512_add_ps(acc[0][v], acc[u][v]);
            }
        }
        let cols = 64.min(w.n - p * 64);
        let mut tmp = [0f32; 64];
        for v in 0..4 {
            _mm512_storeu_ps(tmp.as_mut_ptr().add(16 * v), acc[0][v]);
        }
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), y.add(p * 64), cols);
    }
}

/// The same with 256-bit vectors (8 per k step), unrolled by 2.
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_panels_ymm<const U: usize>(
    x: &[f32],
    w: &Panels,
    y: *mut f32,
    p0: usize,
    p1: usize,
) {
    use std::arch::x86_64::*;
    let k = w.k;
    let data = w.data();
    for p in p0..p1 {
        let b = data.as_ptr().add(p * 64 * k);
        let mut acc = [[_mm256_setzero_ps(); 8]; U];
        let mut kk = 0;
        while kk + U <= k {
            for u in 0..U {
                let bp = b.add((kk + u) * 64);
                let a = _mm256_set1_ps(*x.get_unchecked(kk + u));
                for v in 0..8 {
                    acc[u][v] = _mm256_fmadd_ps(a, _mm256_load_ps(bp.add(8 * v)), acc[u][v]);
                }
            }
            kk += U;
        }
        while kk < k {
            let bp = b.add(kk * 64);
            let a = _mm256_set1_ps(*x.get_unchecked(kk));
            for v in 0..8 {
                acc[0][v] = _mm256_fmadd_ps(a, _mm256_load_ps(bp.add(8 * v)), acc[0][v]);
            }
            kk += 1;
        }
        let cols = 64.min(w.n - p * 64);
        let mut tmp = [0f32; 64];
        for v in 0..8 {
            let mut s = acc[0][v];
            for a in acc.iter().skip(1) {
                s = _mm256_add_ps(s, a[v]);
            }
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * v), s);
        }
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), y.add(p * 64), cols);
    }
}

struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}
impl Ptr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

fn gemv_variant<const D: usize, const U: usize>(x: &[f32], w: &Panels, threads: usize) -> Vec<f32> {
    let mut y = vec![0f32; w.n];
    let panels = w.n.div_ceil(64);
    let yp = Ptr(y.as_mut_ptr());
    if D == 2 {
        use rayon::prelude::*;
        let group = panels.div_ceil(64).max(1);
        let groups = panels.div_ceil(group);
        (0..groups).into_par_iter().for_each(|g| unsafe {
            gemv_panels_ymm::<1>(x, w, yp.get(), g * group, ((g + 1) * group).min(panels))
        });
    } else if D == 1 && threads == 1 {
        unsafe { gemv_panels_ymm::<U>(x, w, yp.get(), 0, panels) };
    } else if D == 1 {
        let half = panels.div_ceil(2);
        rayon::join(
            || unsafe { gemv_panels_ymm::<U>(x, w, yp.get(), 0, half) },
            || unsafe { gemv_panels_ymm::<U>(x, w, yp.get(), half, panels) },
        );
    } else if threads == 1 {
        unsafe { gemv_panels::<D, U>(x, w, yp.get(), 0, panels) };
    } else {
        let half = panels.div_ceil(2);
        rayon::join(
            || unsafe { gemv_panels::<D, U>(x, w, yp.get(), 0, half) },
            || unsafe { gemv_panels::<D, U>(x, w, yp.get(), half, panels) },
        );
    }
    y
}

fn main() {
    let threads = env("THREADS", 1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let reps = env("REPS", 5);
    let isa = Isa::selected();
    let mut shapes = Vec::new();
    for _ in 0..30 {
        shapes.extend([(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)]);
    }
    shapes.push((49152, 576));
    let weights: Vec<PackedWeight> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| {
            let w: Vec<f32> = (0..n * k)
                .map(|j| ((j * 5 + i) % 11) as f32 * 0.01 - 0.05)
                .collect();
            PackedWeight::new(&w, n, k, panel_width(isa))
        })
        .collect();
    let own: Vec<Panels> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| {
            Panels::new(
                &(0..n * k)
                    .map(|j| ((j * 5 + i) % 11) as f32 * 0.01 - 0.05)
                    .collect::<Vec<f32>>(),
                n,
                k,
            )
        })
        .collect();
    for l in std::fs::read_to_string("/proc/self/smaps_rollup")
        .unwrap()
        .lines()
    {
        if l.starts_with("AnonHuge") || l.starts_with("Rss") {
            println!("{l}");
        }
    }
    let weights2: Vec<PackedWeight> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| {
            let w: Vec<f32> = (0..n * k)
                .map(|j| ((j * 5 + i) % 11) as f32 * 0.01 - 0.05)
                .collect();
            PackedWeight::new(&w, n, k, panel_width(isa))
        })
        .collect();
    let raw: Vec<Vec<f32>> = shapes.iter().map(|&(n, k)| vec![0.5f32; n * k]).collect();
    let bytes: usize = shapes.iter().map(|&(n, k)| n * k * 4).sum();
    let xs: Vec<Vec<f32>> = [576usize, 1536]
        .iter()
        .map(|&k| (0..k).map(|i| (i % 7) as f32 * 0.1).collect())
        .collect();
    println!(
        "kernel path {isa:?}, {threads} thread(s), {:.1} MB per token",
        bytes as f64 / 1e6
    );
    let run = |name: &str, f: &(dyn Fn() + Sync)| {
        let mut cpu = Vec::new();
        let mut wall = Vec::new();
        f();
        for _ in 0..reps {
            let (c0, w0) = (cpu_ns(), Instant::now());
            rayon::scope(|_| f());
            cpu.push(bytes as f64 / ((cpu_ns() - c0) as f64));
            wall.push(bytes as f64 / w0.elapsed().as_nanos() as f64);
        }
        cpu.sort_by(|a, b| b.partial_cmp(a).unwrap());
        wall.sort_by(|a, b| b.partial_cmp(a).unwrap());
        println!(
            "{name:12} GB per CPU-s best {:5.1} median {:5.1} | per wall-s best {:5.1} median {:5.1} | {:5.2} ms/token wall (best)",
            cpu[0],
            cpu[reps / 2],
            wall[0],
            wall[reps / 2],
            bytes as f64 / wall[0] / 1e6
        );
    };
    run("gemv", &|| {
        for w in &weights {
            let x = if w.k() == 576 { &xs[0] } else { &xs[1] };
            black_box(matmul_with(isa, black_box(x), 1, w));
        }
    });
    macro_rules! variant {
        ($name:expr, $d:expr, $u:expr) => {
            run($name, &|| {
                for w in &own {
                    let x = if w.k == 576 { &xs[0] } else { &xs[1] };
                    black_box(gemv_variant::<$d, $u>(black_box(x), w, threads));
                }
            });
        };
    }
    variant!("own d0 u1", 0, 1);

    variant!("ymm u2", 1, 2);
    variant!("ymm u1", 1, 1);
    variant!("ymm u1 items", 2, 1);
    variant!("own d4096 u2", 4096, 2);
    run("gemv later", &|| {
        for w in &weights2 {
            let x = if w.k() == 576 { &xs[0] } else { &xs[1] };
            black_box(matmul_with(isa, black_box(x), 1, w));
        }
    });
    run("stream read", &|| {
        use rayon::prelude::*;
        for r in &raw {
            if threads > 1 {
                let s: f32 = r
                    .par_chunks(r.len().div_ceil(threads))
                    .map(stream_sum)
                    .sum();
                black_box(s);
            } else {
                black_box(stream_sum(r));
            }
        }
    });
}

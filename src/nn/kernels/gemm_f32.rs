//! f32 matrix multiplication `y = x · Wᵀ` for dense layers, with the weight packed once.
//!
//! candle's matmul packs both operands on every call and reaches about half the FMA peak
//! on these shapes; decoding (one activation row) goes through a generic GEMM as well.
//! Here the weight `[n, k]` is rearranged once into panels of `nr` output columns, each
//! panel `[k][nr]` contiguous (zero padded past `n`), so a register tile of `MR`
//! activation rows × `nr` columns runs over `k` with one broadcast per row and `nr / lanes`
//! vector loads per step — the same kernel for one row (decoding, bandwidth bound) and for
//! 512 rows (prefill, compute bound). Work is split over (panel group, row block) pairs on
//! rayon's pool; `k` is cut into blocks so a panel block and the activation rows it meets
//! stay in L2.
//!
//! Every output is the same sum of products as the textbook dot product, accumulated in
//! f32 in another order (per k-block partial sums, each summed in k order), so results
//! differ from candle's only by float summation order.

use super::{Isa, SendPtr, SERIAL_WORK};
use rayon::prelude::*;

/// Rows of activations per register tile.
pub const MR: usize = 6;

/// Steps of `k` per block: a `KC × nr` panel block (192 KiB at nr = 64) and the row
/// block's `MB × KC` activations (288 KiB) stay in L2 (1 MiB per core on Zen 4) while every
/// row tile of the row block passes over the panel block. SmolLM2's `k = 576` is then one
/// block, so each output is written once instead of read and written again per block: with
/// 256 the output layer's 50 MB of logits went through memory three times and the product
/// ran at 75 GFLOP per CPU-second against 89 with 768 (110 for the layers whose outputs stay
/// in cache; `examples/gemm_f32_rate`).
const KC: usize = 768;

/// Activation rows per work item (16 row tiles).
const MB: usize = 16 * MR;

/// Panel width (output columns per register tile) of each path.
pub fn panel_width(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 64,
        Isa::Avx2 | Isa::Portable => 16,
    }
}

/// Floats in a 2 MiB huge page.
const HUGE: usize = 512 * 1024;

/// Zeroed storage for `len` floats of panels: `(buf, off)` with the panels at
/// `buf[off..off + len]`, 64-byte aligned. Weights of 2 MiB or more start on a 2 MiB
/// boundary and their whole 2 MiB pages are marked for transparent huge pages (this
/// machine's THP mode is `madvise`) before they are first touched: a decode streams all
/// of them once per token, and in 4 KiB pages each one cost a TLB miss (a nested page walk
/// in a VM) every 4 KiB. Measured (`examples/gemv_f32_rate`, 1 thread): 26 → 32 and
/// 20 → 28 GB per CPU-second in two runs. The last partial huge page is included when
/// that wastes less than a quarter of the weight (gate|up, down, the output layer), left
/// in 4 KiB pages otherwise (q|k|v: 2.2 MB, o: 1.3 MB stay mostly small).
fn panel_storage(len: usize) -> (Vec<f32>, usize) {
    if len < HUGE {
        let buf = vec![0f32; len + 16];
        // Start the panels on a 64-byte boundary (the Vec itself is only 4-byte aligned).
        let off = buf.as_ptr().align_offset(64).min(15);
        return (buf, off);
    }
    let rounded = len.div_ceil(HUGE) * HUGE;
    let advised = if (rounded - len) * 4 < len {
        rounded
    } else {
        len / HUGE * HUGE
    };
    // Room to align the start, the panels, the advised tail, and 16 floats of slack.
    let mut buf: Vec<f32> = Vec::with_capacity(HUGE + advised.max(len) + 16);
    let off = buf.as_ptr().align_offset(HUGE * 4).min(HUGE);
    advise_huge(&mut buf, off, advised);
    buf.resize(off + len + 16, 0.0);
    (buf, off)
}

/// `madvise(MADV_HUGEPAGE)` on `floats` floats of `buf`'s capacity from `off` (not yet
/// touched). Advice only: an error leaves 4 KiB pages.
#[cfg(target_os = "linux")]
fn advise_huge(buf: &mut Vec<f32>, off: usize, floats: usize) {
    extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    const MADV_HUGEPAGE: i32 = 14;
    assert!(
        off + floats <= buf.capacity(),
        "advised range inside the allocation"
    );
    if floats == 0 || !super::huge_pages_on() {
        return;
    }
    // SAFETY: the range lies inside `buf`'s allocation (asserted), starts on a page
    // boundary (2 MiB aligned) and madvise only changes how its pages are backed.
    unsafe {
        madvise(buf.as_mut_ptr().add(off).cast(), floats * 4, MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_buf: &mut Vec<f32>, _off: usize, _floats: usize) {}

/// A `[n, k]` weight rearranged into `ceil(n / nr)` panels of `[k][nr]`, 64-byte aligned.
pub struct PackedWeight {
    n: usize,
    k: usize,
    nr: usize,
    /// Storage; the panels start at `off` (for alignment).
    buf: Vec<f32>,
    off: usize,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight[{}, {}; nr {}]", self.n, self.k, self.nr)
    }
}

impl PackedWeight {
    /// Packs row-major `w` (`n` rows of `k`) into panels of `nr` columns.
    pub fn new(w: &[f32], n: usize, k: usize, nr: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight buffer size");
        Self::pack(n, k, nr, |j| &w[j * k..(j + 1) * k])
    }

    /// Packs the rows of several row-major `[n_i, k]` weights stacked in order (`n = Σ n_i`)
    /// without building the stacked row-major matrix first.
    pub fn stacked(parts: &[&[f32]], k: usize, nr: usize) -> Self {
        assert!(k > 0, "stacked weights need k > 0");
        assert!(
            parts.iter().all(|p| p.len().is_multiple_of(k)),
            "weight buffer size"
        );
        // First global row of each part.
        let mut starts = Vec::with_capacity(parts.len());
        let mut n = 0;
        for p in parts {
            starts.push(n);
            n += p.len() / k;
        }
        Self::pack(n, k, nr, |j| {
            let i = starts.partition_point(|&s| s <= j) - 1;
            let r = j - starts[i];
            &parts[i][r * k..(r + 1) * k]
        })
    }

    /// Packs `n` rows of `k`, row `j` given by `row(j)`.
    fn pack<'a>(n: usize, k: usize, nr: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Self {
        assert!(nr > 0 && nr.is_multiple_of(16), "panel width {nr}");
        let panels = n.div_ceil(nr);
        let len = panels * k * nr;
        let (mut buf, off) = panel_storage(len);
        buf[off..off + len]
            .par_chunks_mut((k * nr).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                let cols = nr.min(n - p * nr);
                for c in 0..cols {
                    for (kk, &v) in row(p * nr + c).iter().enumerate() {
                        panel[kk * nr + c] = v;
                    }
                }
            });
        PackedWeight { n, k, nr, buf, off }
    }

    /// The row-major `[n, k]` weight back from the panels (for saving and reports of a
    /// weight held only packed).
    pub fn unpack(&self) -> Vec<f32> {
        let (n, k, nr) = (self.n, self.k, self.nr);
        let data = self.data();
        let mut w = vec![0f32; n * k];
        for (j, row) in w.chunks_exact_mut(k.max(1)).enumerate().take(n) {
            let panel = &data[(j / nr) * k * nr..];
            for (kk, v) in row.iter_mut().enumerate() {
                *v = panel[kk * nr + j % nr];
            }
        }
        w
    }

    /// Packs `W = vᵀ` for row-major `v` of `k` rows by `n` columns (attention's values:
    /// `P · V` is `P · Wᵀ` with `W = Vᵀ`).
    pub fn from_transposed(v: &[f32], k: usize, n: usize, nr: usize) -> Self {
        assert!(nr > 0 && nr.is_multiple_of(16), "panel width {nr}");
        assert_eq!(v.len(), n * k, "buffer size");
        let panels = n.div_ceil(nr);
        let len = panels * k * nr;
        let mut buf = vec![0f32; len + 16];
        let off = buf.as_ptr().align_offset(64).min(15);
        for (p, panel) in buf[off..off + len].chunks_mut((k * nr).max(1)).enumerate() {
            let cols = nr.min(n - p * nr);
            for (kk, row) in v.chunks_exact(n.max(1)).enumerate().take(k) {
                panel[kk * nr..kk * nr + cols].copy_from_slice(&row[p * nr..p * nr + cols]);
            }
        }
        PackedWeight { n, k, nr, buf, off }
    }

    /// Packs for the kernel path this process uses.
    pub fn for_selected(w: &[f32], n: usize, k: usize) -> Self {
        Self::new(w, n, k, panel_width(Isa::selected()))
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn nr(&self) -> usize {
        self.nr
    }

    fn data(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.n.div_ceil(self.nr) * self.k * self.nr]
    }

    /// Bytes held (the panels; not the untouched alignment room before them).
    pub fn bytes(&self) -> usize {
        (self.buf.len() - self.off) * 4
    }
}

/// `y [m, n] = x [m, k] · Wᵀ` on the selected path, in parallel; `x` row-major.
pub fn matmul(x: &[f32], m: usize, w: &PackedWeight) -> Vec<f32> {
    matmul_with(Isa::selected(), x, m, w)
}

/// [`matmul`] on a given path (tests and benchmarks compare every path).
///
/// Panics when `w` was packed for another path's panel width or `isa` is not in
/// [`Isa::available`].
pub fn matmul_with(isa: Isa, x: &[f32], m: usize, w: &PackedWeight) -> Vec<f32> {
    let mut y = vec![0f32; m * w.n];
    matmul_into(isa, x, m, w.k, w, &mut y, w.n);
    y
}

/// `y[i, 0..n] = x[i, 0..k] · Wᵀ` for `i < m`, with row strides `ldx` and `ldy` (so a
/// column slice of a wider matrix can be read or written in place).
pub fn matmul_into(
    isa: Isa,
    x: &[f32],
    m: usize,
    ldx: usize,
    w: &PackedWeight,
    y: &mut [f32],
    ldy: usize,
) {
    let region = Region {
        m,
        n: w.n,
        k: w.k,
        parallel: true,
    };
    region.run(isa, x, ldx, w, y, ldy);
}

/// `x [m, k] · Wᵀ` with the output columns cut into consecutive parts of `widths`, each
/// written straight into its own row-major `[m, width]` buffer (a stacked q|k|v product
/// gives q, k and v without copying the stacked output apart). Every output is
/// bit-identical to [`matmul_with`]'s. `None` when a part does not start on a panel
/// boundary or the widths do not add up to the weight's rows.
pub fn matmul_split(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    widths: &[usize],
) -> Option<Vec<Vec<f32>>> {
    let nr = w.nr;
    if widths.iter().sum::<usize>() != w.n {
        return None;
    }
    let mut starts = Vec::with_capacity(widths.len());
    let mut at = 0usize;
    for &wd in widths {
        if !at.is_multiple_of(nr) {
            return None;
        }
        starts.push(at / nr);
        at += wd;
    }
    assert!(x.len() >= m * w.k, "activation buffer size");
    assert_eq!(
        nr,
        panel_width(isa),
        "weight packed for another kernel path"
    );
    assert!(Isa::available().contains(&isa), "{isa:?} not available");
    let mut outs: Vec<Vec<f32>> = widths.iter().map(|&wd| vec![0f32; m * wd]).collect();
    if m == 0 || w.k == 0 {
        return Some(outs);
    }
    // One split over the threads for all parts (q, k and v as one product): the threads
    // meet once instead of once per part, and the small parts' items fill the gaps the
    // large ones leave at the end. Each part's items are [`Region::run_at`]'s.
    let data = w.data();
    let parts: Vec<(Region, Plan, SendPtr, usize)> = widths
        .iter()
        .zip(&starts)
        .zip(outs.iter_mut())
        .map(|((&wd, &first), y)| {
            let region = Region {
                m,
                n: wd,
                k: w.k,
                parallel: true,
            };
            let plan = region.plan(nr);
            (region, plan, SendPtr(y.as_mut_ptr()), first)
        })
        .collect();
    let items: usize = parts.iter().map(|p| p.1.items).sum();
    let run = |mut item: usize| {
        for (region, plan, yp, first) in &parts {
            if item < plan.items {
                // SAFETY: part `first..` of the weight holds `region.n` columns (the widths
                // add up to `w.n`), its output is `m × n` and `x` holds `m` rows of `w.k`
                // (asserted above); items partition each part's rows × panels.
                unsafe {
                    region.run_item(
                        isa,
                        x,
                        w.k,
                        w,
                        &data[first * w.k * nr..],
                        plan,
                        *yp,
                        region.n,
                        item,
                    )
                };
                return;
            }
            item -= plan.items;
        }
    };
    if items <= 1 || (m * w.n * w.k) < SERIAL_WORK {
        (0..items).for_each(run);
    } else {
        super::team::for_each(items, run);
    }
    Some(outs)
}

/// `y[i, j - p0·nr] = x[i, ..] · W[j, ..]` for `i < m` and the columns `j` of panels
/// `p0..p1` (below `n`), on the calling thread: a column slice of a product for callers
/// that consume each slice while it is in cache (the output layer's fused log-softmax)
/// instead of writing the whole `[m, n]` output. The same tiles and k blocks as
/// [`matmul_into`], so every output is bit-identical to it.
#[allow(clippy::too_many_arguments)]
pub fn matmul_panels(
    isa: Isa,
    x: &[f32],
    m: usize,
    ldx: usize,
    w: &PackedWeight,
    (p0, p1): (usize, usize),
    y: &mut [f32],
    ldy: usize,
) {
    let (k, nr) = (w.k, w.nr);
    assert_eq!(
        nr,
        panel_width(isa),
        "weight packed for another kernel path"
    );
    assert!(Isa::available().contains(&isa), "{isa:?} not available");
    let p1 = p1.min(w.n.div_ceil(nr));
    if m == 0 || p0 >= p1 {
        return;
    }
    let cols = (p1 * nr).min(w.n) - p0 * nr;
    assert!(ldx >= k && ldy >= cols, "row strides");
    assert!(x.len() >= (m - 1) * ldx + k, "activation buffer size");
    assert!(y.len() >= (m - 1) * ldy + cols, "output buffer size");
    if k == 0 {
        for r in 0..m {
            y[r * ldy..r * ldy + cols].fill(0.0);
        }
        return;
    }
    let kb = if m <= MR { k } else { KC };
    let data = w.data();
    let stride = k * nr;
    for r0 in (0..m).step_by(MB) {
        let r1 = (r0 + MB).min(m);
        for k0 in (0..k).step_by(kb) {
            let kc = kb.min(k - k0);
            for p in p0..p1 {
                let pc = nr.min(w.n - p * nr);
                let b = &data[p * stride + k0 * nr..p * stride + (k0 + kc) * nr];
                for t0 in (r0..r1).step_by(MR) {
                    let tile = Tile {
                        a: &x[t0 * ldx + k0..],
                        lda: ldx,
                        b,
                        kc,
                        // SAFETY: row t0 + mr - 1 < m and column (p - p0) * nr + pc <= cols,
                        // inside y by the asserts above; `y` is borrowed mutably here.
                        c: unsafe { y.as_mut_ptr().add(t0 * ldy + (p - p0) * nr) },
                        ldc: ldy,
                        mr: MR.min(r1 - t0),
                        cols: pc,
                        accumulate: k0 > 0,
                    };
                    tile.run(isa);
                }
            }
        }
    }
}

/// `c[i·ldc + j] (+)= Σ_{p < kc} x[i·ldx + p] · panel[p·nr + j]` for `i < m`, `j < cols`
/// (`+=` when `accumulate`), `nr = panel_width(isa)`: one `kc × nr` panel laid out as a
/// packed weight's, through this GEMM's register tiles, on the calling thread. For kernels
/// that build a panel themselves (the weight-only low-bit GEMM decodes its codes into one
/// per call) and then run the very micro-kernels of the f32 product.
///
/// # Safety
/// `c` must be valid for reads and writes at `i·ldc + j` for `i < m`, `j < cols`, with no
/// other thread touching those elements meanwhile (the slice bounds are asserted).
#[allow(clippy::too_many_arguments)]
pub unsafe fn panel_block(
    isa: Isa,
    x: &[f32],
    m: usize,
    ldx: usize,
    kc: usize,
    panel: &[f32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
    accumulate: bool,
) {
    let nr = panel_width(isa);
    // (`isa <= detected` is `Isa::available().contains`, without a vector per call.)
    assert!(isa <= Isa::detected(), "{isa:?} not available");
    assert!(cols <= nr && ldc >= cols && ldx >= kc, "panel block shape");
    assert!(panel.len() >= kc * nr, "panel size");
    if m == 0 || kc == 0 {
        return;
    }
    assert!(x.len() >= (m - 1) * ldx + kc, "activation buffer size");
    for t0 in (0..m).step_by(MR) {
        let tile = Tile {
            a: &x[t0 * ldx..],
            lda: ldx,
            b: panel,
            kc,
            // SAFETY: row t0 < m: inside the caller's bounds on `c`.
            c: unsafe { c.add(t0 * ldc) },
            ldc,
            mr: MR.min(m - t0),
            cols,
            accumulate,
        };
        tile.run(isa);
    }
}

/// A part of a product: the first `n` output columns and the first `k` inner steps of a
/// packed weight (attention multiplies by a causal prefix of its keys and values).
pub struct Region {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Split the work over rayon's pool (off inside work that is already split).
    pub parallel: bool,
}

impl Region {
    /// `y[i, j] = Σ_{p < k} x[i * ldx + p] · W[j, p]` for `i < m`, `j < n`.
    pub fn run(
        &self,
        isa: Isa,
        x: &[f32],
        ldx: usize,
        w: &PackedWeight,
        y: &mut [f32],
        ldy: usize,
    ) {
        self.run_at(isa, x, ldx, w, 0, y, ldy);
    }

    /// [`Self::run`] over the weight's columns from panel `first` on:
    /// `y[i, j] = Σ_{p < k} x[i * ldx + p] · W[first · nr + j, p]`.
    #[allow(clippy::too_many_arguments)]
    fn run_at(
        &self,
        isa: Isa,
        x: &[f32],
        ldx: usize,
        w: &PackedWeight,
        first: usize,
        y: &mut [f32],
        ldy: usize,
    ) {
        let (m, n, k, nr) = (self.m, self.n, self.k, w.nr);
        assert_eq!(
            nr,
            panel_width(isa),
            "weight packed for another kernel path"
        );
        assert!(Isa::available().contains(&isa), "{isa:?} not available");
        assert!(
            first * nr + n <= w.n && k <= w.k,
            "region outside the weight"
        );
        if m == 0 || n == 0 {
            return;
        }
        assert!(ldx >= k && ldy >= n, "row strides");
        assert!(x.len() >= (m - 1) * ldx + k, "activation buffer size");
        assert!(y.len() >= (m - 1) * ldy + n, "output buffer size");
        if k == 0 {
            for r in 0..m {
                y[r * ldy..r * ldy + n].fill(0.0);
            }
            return;
        }
        let plan = self.plan(nr);
        let data = &w.data()[first * w.k * nr..];
        let yp = SendPtr(y.as_mut_ptr());
        // SAFETY: items partition rows × panels of this region, each written by one item;
        // the asserts above keep the region inside `x`, `y` and the weight.
        let run =
            |item: usize| unsafe { self.run_item(isa, x, ldx, w, data, &plan, yp, ldy, item) };
        if !self.parallel || plan.items == 1 || (m * n * k) < SERIAL_WORK {
            (0..plan.items).for_each(run);
        } else {
            // Over the decode step's spinning team when there is one, rayon otherwise.
            super::team::for_each(plan.items, run);
        }
    }

    /// How [`Self::run_at`] cuts the region into work items of (panel group, row block).
    fn plan(&self, nr: usize) -> Plan {
        let (m, n, k) = (self.m, self.n, self.k);
        let panels = n.div_ceil(nr);
        let row_blocks = m.div_ceil(MB);
        // Few rows (decoding): bandwidth bound, the weight read once, split by columns into
        // up to 64 panel groups. Many rows (prefill): about 16 items per thread. With 4
        // (SmolLM2's q|k|v: 2 groups of 7–8 panels × 6 row blocks) a thread that runs out of
        // work may wait for up to one item of the other, a twelfth of the product: a
        // list-schedule model of SmolLM2's four products per layer gives 6% above the ideal
        // wall time on 2 threads, 1.2% with 16 per thread (0.4% with one panel per item,
        // which cost up to ~1% more CPU time in `examples/gemm_f32_rate` on one thread).
        // Each item still passes its row block's activations (in L2) over each of its
        // panels in turn, and the sums are the same whatever the split.
        let threads = rayon::current_num_threads().max(1);
        let want = if row_blocks == 1 {
            64
        } else {
            (threads * 16).div_ceil(row_blocks)
        };
        let group = panels.div_ceil(want).max(1);
        let groups = panels.div_ceil(group);
        Plan {
            panels,
            group,
            groups,
            items: groups * row_blocks,
            // A few rows stay in L1 whatever k is: block k only when many rows share the panel.
            kb: if m <= MR { k } else { KC },
        }
    }

    /// Work item `item` of `plan`: the rows of one row block times the panels of one panel
    /// group, `data` being the weight's panels from the region's first one on.
    ///
    /// # Safety
    /// The region must lie inside `x`, `y` (through `yp`, row stride `ldy`) and `data` (as
    /// `run_at` asserts), and no other thread may touch this item's outputs meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_item(
        &self,
        isa: Isa,
        x: &[f32],
        ldx: usize,
        w: &PackedWeight,
        data: &[f32],
        plan: &Plan,
        yp: SendPtr,
        ldy: usize,
        item: usize,
    ) {
        let (m, n, k, nr) = (self.m, self.n, self.k, w.nr);
        let stride = w.k * nr;
        let (g, rb) = (item % plan.groups, item / plan.groups);
        let (p0, p1) = (g * plan.group, ((g + 1) * plan.group).min(plan.panels));
        #[cfg(target_arch = "x86_64")]
        if m == 1 && isa == Isa::Avx512 {
            // SAFETY: columns p0*nr.. of row 0 are written by this item alone; the caller's
            // bounds keep n <= y.len(), k <= w.k and x.len() >= k, and the panels p0..p1
            // lie in `data`.
            unsafe { avx512::gemv(x, data, w.k, k, n, p0, p1, yp.get()) };
            return;
        }
        let (r0, r1) = (rb * MB, ((rb + 1) * MB).min(m));
        for k0 in (0..k).step_by(plan.kb) {
            let kc = plan.kb.min(k - k0);
            for p in p0..p1 {
                let cols = nr.min(n - p * nr);
                let b = &data[p * stride + k0 * nr..p * stride + (k0 + kc) * nr];
                for t0 in (r0..r1).step_by(MR) {
                    let mr = MR.min(r1 - t0);
                    let a = &x[t0 * ldx + k0..];
                    // SAFETY: rows t0..t0+mr and columns p*nr..p*nr+cols of y are written
                    // by this item alone (items partition rows × panels); the caller's
                    // bounds keep (t0+mr-1)*ldy + p*nr + cols <= y.len().
                    let c = unsafe { yp.get().add(t0 * ldy + p * nr) };
                    let tile = Tile {
                        a,
                        lda: ldx,
                        b,
                        kc,
                        c,
                        ldc: ldy,
                        mr,
                        cols,
                        accumulate: k0 > 0,
                    };
                    tile.run(isa);
                }
            }
        }
    }
}

/// A region's work items (see [`Region::plan`]).
struct Plan {
    panels: usize,
    /// Panels per item.
    group: usize,
    groups: usize,
    items: usize,
    /// Steps of `k` per block.
    kb: usize,
}

/// One register tile: `c[r, 0..cols] (+)= Σ_{p < kc} a[r * lda + p] · b[p * nr + 0..cols]`
/// for `r < mr`.
struct Tile<'a> {
    a: &'a [f32],
    lda: usize,
    b: &'a [f32],
    kc: usize,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    cols: usize,
    accumulate: bool,
}

impl Tile<'_> {
    fn run(&self, isa: Isa) {
        assert!(self.mr >= 1 && self.mr <= MR);
        assert!(self.a.len() >= (self.mr - 1) * self.lda + self.kc);
        let nr = panel_width(isa);
        assert!(self.b.len() >= self.kc * nr && self.cols <= nr);
        match isa {
            Isa::Portable => portable::tile(self),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `matmul_into` checked `isa` is available (AVX2 + FMA present).
            Isa::Avx2 => unsafe { avx2::tile(self) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, AVX-512 F/BW/VL present.
            Isa::Avx512 => unsafe { avx512::tile(self) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => portable::tile(self),
        }
    }
}

mod portable {
    use super::{Tile, MR};
    const NR: usize = 16;

    pub(super) fn tile(t: &Tile) {
        let mut acc = [[0f32; NR]; MR];
        for p in 0..t.kc {
            let b: &[f32; NR] = t.b[p * NR..p * NR + NR].try_into().unwrap();
            for (r, row) in acc.iter_mut().enumerate().take(t.mr) {
                let a = t.a[r * t.lda + p];
                for (o, &bv) in row.iter_mut().zip(b) {
                    *o += a * bv;
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(t.mr) {
            for (j, &v) in row.iter().enumerate().take(t.cols) {
                // SAFETY: the caller guarantees row r < mr and column j < cols lie in y.
                unsafe {
                    let c = t.c.add(r * t.ldc + j);
                    *c = if t.accumulate { *c + v } else { v };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Tile, MR};
    use std::arch::x86_64::*;
    const NR: usize = 16;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(t: &Tile) {
        match t.mr {
            1 => kernel::<1>(t),
            2 => kernel::<2>(t),
            3 => kernel::<3>(t),
            4 => kernel::<4>(t),
            5 => kernel::<5>(t),
            _ => kernel::<MR>(t),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn kernel<const R: usize>(t: &Tile) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let (a, b) = (t.a.as_ptr(), t.b.as_ptr());
        for p in 0..t.kc {
            // SAFETY: p < kc and b holds kc * NR values; a holds (R-1)*lda + kc (asserted
            // in Tile::run).
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r * t.lda + p));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let c = t.c.add(r * t.ldc);
            if t.cols == NR {
                for (v, &x) in acc.iter().enumerate() {
                    // SAFETY: a full panel: 16 columns of row r are in y.
                    let x = if t.accumulate {
                        _mm256_add_ps(_mm256_loadu_ps(c.add(8 * v)), x)
                    } else {
                        x
                    };
                    _mm256_storeu_ps(c.add(8 * v), x);
                }
            } else {
                let mut tmp = [0f32; NR];
                _mm256_storeu_ps(tmp.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[1]);
                for (j, &v) in tmp.iter().enumerate().take(t.cols) {
                    // SAFETY: j < cols, inside y.
                    *c.add(j) = if t.accumulate { *c.add(j) + v } else { v };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Tile, MR};
    use std::arch::x86_64::*;
    const NR: usize = 64;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile(t: &Tile) {
        match t.mr {
            1 => kernel::<1>(t),
            2 => kernel::<2>(t),
            3 => kernel::<3>(t),
            4 => kernel::<4>(t),
            5 => kernel::<5>(t),
            _ => kernel::<MR>(t),
        }
    }

    /// One activation row (decoding) through panels `p0..p1` of a 64-wide packed weight:
    /// `y[j] = Σ_{q < k} x[q] · W[j, q]` for the columns `j` of those panels below `n`.
    ///
    /// The same sums in the same order as [`kernel`]`::<1>` (one accumulator per column,
    /// k ascending), but in 256-bit halves: streaming a weight from memory, 512-bit loads
    /// reached ~0.8× the bytes per second of 256-bit ones on Zen 4 (`examples/gemv_f32_rate`:
    /// 25 against 31–34 GB per CPU-second, a plain read of the same bytes 33–35).
    ///
    /// # Safety
    /// AVX-512 F/VL present; `x.len() >= k`, `k <= wk`, `data` holds panels `0..p1` of
    /// `wk * 64` values, `p0 * 64 < n`, and `y` is valid for writes of columns
    /// `p0 * 64..min(p1 * 64, n)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemv(
        x: &[f32],
        data: &[f32],
        wk: usize,
        k: usize,
        n: usize,
        p0: usize,
        p1: usize,
        y: *mut f32,
    ) {
        assert!(x.len() >= k && k <= wk && data.len() >= p1 * wk * NR);
        for p in p0..p1 {
            let b = data.as_ptr().add(p * wk * NR);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (q, &xq) in x[..k].iter().enumerate() {
                // SAFETY: q < k <= wk, so the 64 values at q * 64 lie in panel p.
                let bp = b.add(q * NR);
                let a = _mm256_set1_ps(xq);
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(a, _mm256_loadu_ps(bp.add(8 * v)), *acc);
                }
            }
            let cols = NR.min(n - p * NR);
            let c = y.add(p * NR);
            if cols == NR {
                for (v, &acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(c.add(8 * v), acc);
                }
            } else {
                let mut tmp = [0f32; NR];
                for (v, &acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * v), acc);
                }
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), c, cols);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn kernel<const R: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let (a, b) = (t.a.as_ptr(), t.b.as_ptr());
        for p in 0..t.kc {
            // SAFETY: p < kc and b holds kc * NR values; a holds (R-1)*lda + kc (asserted
            // in Tile::run).
            let bp = b.add(p * NR);
            let bv = [
                _mm512_loadu_ps(bp),
                _mm512_loadu_ps(bp.add(16)),
                _mm512_loadu_ps(bp.add(32)),
                _mm512_loadu_ps(bp.add(48)),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * t.lda + p));
                for v in 0..4 {
                    acc[v] = _mm512_fmadd_ps(av, bv[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let c = t.c.add(r * t.ldc);
            for (v, &x) in acc.iter().enumerate() {
                let left = t.cols.saturating_sub(16 * v).min(16);
                if left == 0 {
                    break;
                }
                let mask: __mmask16 = if left == 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                // SAFETY: only the `left` columns of this vector inside y are touched.
                let p = c.add(16 * v);
                let x = if t.accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), x)
                } else {
                    x
                };
                _mm512_mask_storeu_ps(p, mask, x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// f64 reference with its error bound: each output's f32 result may differ from the
    /// exact sum by about k · 2⁻²⁴ · Σ|x·w| (a standard bound for any summation order).
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; m * n];
        let mut bound = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut a) = (0f64, 0f64);
                for p in 0..k {
                    let v = x[i * k + p] as f64 * w[j * k + p] as f64;
                    s += v;
                    a += v.abs();
                }
                y[i * n + j] = s;
                bound[i * n + j] = (k as f64 + 2.0) * f32::EPSILON as f64 * a + 1e-30;
            }
        }
        (y, bound)
    }

    #[test]
    fn every_path_matches_f64_on_ragged_shapes() {
        let shapes = [
            (1, 1, 1),
            (1, 37, 5),
            (1, 576, 192),
            (2, 300, 70),
            (5, 17, 129),
            (7, 513, 33),
            (13, 1000, 65),
            (97, 260, 100),
            (200, 31, 17),
        ];
        for (si, &(m, k, n)) in shapes.iter().enumerate() {
            let x = lcg(m * k, si as u64);
            let w = lcg(n * k, 100 + si as u64);
            let (r, bound) = reference(&x, m, k, &w, n);
            for isa in Isa::available() {
                let pw = PackedWeight::new(&w, n, k, panel_width(isa));
                let y = matmul_with(isa, &x, m, &pw);
                for (idx, ((&g, &e), &b)) in y.iter().zip(&r).zip(&bound).enumerate() {
                    assert!(
                        (g as f64 - e).abs() <= b,
                        "{isa:?} m{m} k{k} n{n} at {idx}: {g} vs {e} (bound {b})"
                    );
                }
            }
        }
    }

    /// The decode GEMV (one row; its own kernel on AVX-512) gives the same bits as the
    /// register tile for one row (`matmul_panels` runs the tile), and both agree with f64:
    /// ragged widths, many panels (the parallel split), and a region over a prefix of `k`
    /// and of the columns (attention's causal prefix).
    #[test]
    fn one_row_gemv_is_bit_identical_to_the_tile() {
        for (si, &(k, n)) in [
            (1usize, 1usize),
            (5, 63),
            (576, 960),
            (1536, 577),
            (300, 4097),
        ]
        .iter()
        .enumerate()
        {
            let x = lcg(k, 200 + si as u64);
            let w = lcg(n * k, 300 + si as u64);
            let (r, bound) = reference(&x, 1, k, &w, n);
            for isa in Isa::available() {
                let pw = PackedWeight::new(&w, n, k, panel_width(isa));
                let y = matmul_with(isa, &x, 1, &pw);
                let mut tile = vec![0f32; n];
                matmul_panels(isa, &x, 1, k, &pw, (0, n.div_ceil(pw.nr())), &mut tile, n);
                for j in 0..n {
                    assert_eq!(
                        y[j].to_bits(),
                        tile[j].to_bits(),
                        "{isa:?} k{k} n{n} col {j}"
                    );
                    assert!(
                        (y[j] as f64 - r[j]).abs() <= bound[j],
                        "{isa:?} k{k} n{n} col {j}"
                    );
                }
                // A region: the first k / 2 steps and n - 3 columns, into a strided row.
                let (kk, nn) = (k.div_ceil(2), n.saturating_sub(3).max(1));
                let mut out = vec![9f32; nn + 5];
                let region = Region {
                    m: 1,
                    n: nn,
                    k: kk,
                    parallel: true,
                };
                region.run(isa, &x, k, &pw, &mut out, nn + 5);
                for j in 0..nn {
                    let e: f64 = (0..kk).map(|p| x[p] as f64 * w[j * k + p] as f64).sum();
                    let b = (kk as f64 + 2.0)
                        * f32::EPSILON as f64
                        * (0..kk)
                            .map(|p| (x[p] as f64 * w[j * k + p] as f64).abs())
                            .sum::<f64>()
                        + 1e-30;
                    assert!((out[j] as f64 - e).abs() <= b, "{isa:?} region col {j}");
                }
                assert!(
                    out[nn..].iter().all(|&v| v == 9.0),
                    "{isa:?} wrote past the region"
                );
            }
        }
    }

    /// Column slices by panels are bit-identical to the whole product (several row blocks,
    /// k above one k block, ragged columns), and leave the rest of the buffer alone.
    #[test]
    fn panel_slices_equal_the_whole_product() {
        for &(m, k, n) in &[(1usize, 10usize, 70usize), (7, 800, 130), (200, 900, 150)] {
            let x = lcg(m * k, 5);
            let w = lcg(n * k, 6);
            for isa in Isa::available() {
                let pw = PackedWeight::new(&w, n, k, panel_width(isa));
                let whole = matmul_with(isa, &x, m, &pw);
                let nr = pw.nr();
                let panels = n.div_ceil(nr);
                let (p0, p1) = (panels / 2, panels + 3);
                let c0 = p0 * nr;
                let cols = n - c0;
                let ld = cols + 2;
                let mut part = vec![-1f32; m * ld];
                matmul_panels(isa, &x, m, k, &pw, (p0, p1), &mut part, ld);
                for i in 0..m {
                    for j in 0..cols {
                        assert_eq!(
                            part[i * ld + j].to_bits(),
                            whole[i * n + c0 + j].to_bits(),
                            "{isa:?} m{m} k{k} n{n} at {i},{j}"
                        );
                    }
                    assert_eq!(&part[i * ld + cols..i * ld + ld], &[-1.0, -1.0]);
                }
            }
        }
    }

    /// Each part (`m` rows of its width) equals its columns of `whole` bit for bit.
    fn assert_parts_are_columns(
        parts: &[Vec<f32>],
        whole: &[f32],
        m: usize,
        widths: &[usize],
        what: &str,
    ) {
        let n: usize = widths.iter().sum();
        let mut c0 = 0;
        for (part, &wd) in parts.iter().zip(widths) {
            assert_eq!(part.len(), m * wd);
            for i in 0..m {
                for j in 0..wd {
                    assert_eq!(
                        part[i * wd + j].to_bits(),
                        whole[i * n + c0 + j].to_bits(),
                        "{what} part at column {c0}: {i},{j}"
                    );
                }
            }
            c0 += wd;
        }
    }

    /// Split outputs equal the columns of the whole product bit for bit (parts on panel
    /// boundaries, a ragged last part, one row and many); a part off a panel boundary
    /// is refused.
    #[test]
    fn split_outputs_equal_the_whole_product() {
        for &m in &[1usize, 5, 130] {
            let k = 70;
            for isa in Isa::available() {
                let nr = panel_width(isa);
                let widths = [2 * nr, nr, 3 * nr + 5];
                let n: usize = widths.iter().sum();
                let x = lcg(m * k, 11);
                let w = lcg(n * k, 12);
                let pw = PackedWeight::new(&w, n, k, nr);
                let whole = matmul_with(isa, &x, m, &pw);
                let parts = matmul_split(isa, &x, m, &pw, &widths).unwrap();
                assert_parts_are_columns(&parts, &whole, m, &widths, &format!("{isa:?} m{m}"));
                assert!(matmul_split(isa, &x, m, &pw, &[nr + 1, n - nr - 1]).is_none());
                assert!(matmul_split(isa, &x, m, &pw, &[nr]).is_none());
            }
        }
    }

    /// The split's one pass over all parts equals the whole product with `k` cut into
    /// blocks (above `KC`), a last row block shorter than `MB`, and an empty part.
    #[test]
    fn split_outputs_equal_the_whole_product_across_k_blocks() {
        let (m, k) = (MB + 37, KC + 100);
        for isa in Isa::available() {
            let nr = panel_width(isa);
            let widths = [3 * nr, 0, nr, 2 * nr + 9];
            let n: usize = widths.iter().sum();
            let x = lcg(m * k, 41);
            let w = lcg(n * k, 42);
            let pw = PackedWeight::new(&w, n, k, nr);
            let whole = matmul_with(isa, &x, m, &pw);
            let parts = matmul_split(isa, &x, m, &pw, &widths).unwrap();
            assert_parts_are_columns(&parts, &whole, m, &widths, &format!("{isa:?}"));
        }
    }

    /// Packing parts stacked equals packing their concatenation, and unpacking gives the
    /// rows back (ragged part sizes; one above 2 MiB takes the huge-page storage).
    #[test]
    fn stacked_packing_equals_packing_the_concatenation_and_unpacks() {
        let k = 300;
        let sizes = [7usize, 64, 1800, 1];
        let parts: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| lcg(n * k, 40 + i as u64))
            .collect();
        let cat: Vec<f32> = parts.concat();
        let n: usize = sizes.iter().sum();
        for isa in Isa::available() {
            let nr = panel_width(isa);
            let slices: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
            let a = PackedWeight::stacked(&slices, k, nr);
            let b = PackedWeight::new(&cat, n, k, nr);
            assert_eq!((a.n(), a.k()), (n, k));
            assert_eq!(a.data(), b.data(), "{isa:?}");
            assert_eq!(a.data().as_ptr().align_offset(64), 0);
            assert_eq!(a.unpack(), cat, "{isa:?}");
        }
    }

    #[test]
    fn strided_rows_read_and_write_in_place() {
        let (m, k, n, ldx, ldy) = (9, 70, 20, 100, 50);
        let x = lcg(m * ldx, 1);
        let w = lcg(n * k, 2);
        for isa in Isa::available() {
            let pw = PackedWeight::new(&w, n, k, panel_width(isa));
            let mut y = vec![7f32; m * ldy];
            matmul_into(isa, &x, m, ldx, &pw, &mut y, ldy);
            for i in 0..m {
                for j in 0..ldy {
                    let got = y[i * ldy + j];
                    if j >= n {
                        assert_eq!(got, 7.0, "{isa:?} wrote outside the columns");
                        continue;
                    }
                    let e: f64 = (0..k)
                        .map(|p| x[i * ldx + p] as f64 * w[j * k + p] as f64)
                        .sum();
                    assert!((got as f64 - e).abs() < 1e-4, "{isa:?} {i},{j}");
                }
            }
        }
    }
}

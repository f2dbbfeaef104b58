//! Weight-only low-bit matrix products that never build an f32 weight matrix.
//!
//! [`LowBit`] is a kernel layout built once from a stored format (int-N codes with a scale
//! and zero point per group, or NF4/FP4 code-book indices with an absmax per block). Each
//! row is cut into chunks of [`CHUNK`] = 32 columns (the row padded with zero codes to a
//! whole chunk); a scale group is a whole number of chunks.
//!
//! * Codes of 1–4 bits are stored as nibbles, 16 bytes per chunk: byte `j` holds column
//!   `j` in its low nibble and column `j + 16` in its high nibble, so one 16-byte load
//!   widened to 32-bit lanes gives columns 0–15 after `& 15` and columns 16–31 after `>> 4`.
//!   2- and 3-bit codes are widened to nibbles in memory (they run through the same
//!   4-bit kernel; the stored checkpoint keeps its packed bits).
//! * Codes of 5–8 bits are stored as one byte per column, 32 bytes per chunk.
//! * Codes are kept unsigned: `n = q − qmin`, and the group's zero point becomes
//!   `z' = z − qmin`, so a weight is `(n − z')·s` (integers subtracted exactly), or
//!   `table[n]·s` for a code book.
//!
//! Decoding (one activation row, [`LowBit::gemv`]): codes are widened and turned into f32
//! in registers, multiplied with the activations by FMA per group, and the group's sum is
//! scaled once: `Σ x·(n − z')·s = s·Σ x·(n − z')`. Four output rows go together so that
//! eight independent FMA chains hide the FMA latency and every activation load serves four
//! rows. Symmetric schemes (one zero point for every group) build the table from a constant
//! `(n − z')` row and read no zero points: the int-N GEMV then streams what the NF4 one
//! does (codes and one scale per group). A few activation rows (from 2 to below [`panel_rows`], on
//! AVX-512) go through [`LowBit::gemm_multi`], which decodes each chunk of
//! two weight rows once in registers for up to ten activation rows, with no panel and no
//! transpose. Prefill (many rows, [`LowBit::gemm`], module
//! `gemm`) reads a second copy of the codes laid out in the dense f32 GEMM's panel order,
//! decodes each tile of 64 output rows (16 below AVX-512) once per call into a
//! cache-resident f32 panel holding exactly the dequantized weights, and runs the f32
//! GEMM's own register tiles over every activation row; tiles are spread over threads
//! (matrices of at most [`NARROW_ROWS`] output rows take 16-wide tiles on AVX-512 too).
//! Only float summation order differs from `x · Ŵᵀ` with `Ŵ` the exact dequantized
//! weights.

use super::ggml_blocks::{panels, BlockKind, PanelBlocks};
use super::Isa;
use rayon::prelude::*;
use std::sync::OnceLock;

mod gemm;

/// Columns per chunk (the unit of the code layout and of scale groups).
pub const CHUNK: usize = 32;
/// Fewest activation rows for which the panel GEMM ([`LowBit::gemm`]) beats the GEMVs
/// (one per row; several rows at once on AVX-512, [`LowBit::gemm_multi`]) on path `isa`.
/// Measured (MNIST's 256 × 784 and 256 × 256, one thread, CPU time, µs): AVX-512 at 6 rows
/// panels 26.8 / several-row GEMV 24.7, 8 rows 32.5 / 33.1, 12 rows 47.1 / 52.4; AVX2 at
/// 2 rows 31.3 / 35.4 (one GEMV per row, whose table lookups are slow there); portable at
/// 12 rows 1031 / 1007.
pub fn panel_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 8,
        Isa::Avx2 => 2,
        Isa::Portable => 13,
    }
}
/// Activation rows and output rows per call of the AVX-512 several-row GEMV
/// (`x86::g512m`): 10 × 2 accumulators, 4 decoded weight vectors and 2 activation vectors
/// fit the 32 registers. Measured (MNIST's 256 × 784 at m = 64, one thread): 10 × 2 259 µs,
/// 5 × 4 280 µs (twice the decoding per FMA), f32 panels 267 µs.
const MULTI_MR: usize = 10;
const MULTI_NR: usize = 2;
use super::SERIAL_WORK;

/// Matrices of at most this many output rows run the panel GEMM on 16-wide tiles (the AVX2
/// path's layout and register tiles) on AVX-512 too: a 64-wide panel would be mostly
/// padding (10 × 256 at m = 64, one thread: 18.7 µs through 64-wide panels, f32 GEMM 18.1).
/// Every tile kernel sums each output as one FMA chain in column order, so the bits do not
/// depend on the tile width: a stacked q|k|v weight gives what its parts give.
pub const NARROW_ROWS: usize = 32;

/// How codes are stored and turned into values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codes {
    /// Two codes per byte (see the module docs); value `(n − z')·s`.
    Nibble,
    /// One code per byte; value `(n − z')·s`.
    Byte,
    /// Two code-book indices per byte; value `table[n]·s`.
    Table,
    /// As `Table`, for rows whose chunks may straddle two absmax blocks (NF4/FP4 with rows
    /// not a whole number of blocks, e.g. 784 columns): one group per chunk with a second
    /// scale for the lanes from `split` on.
    SplitTable,
}

/// A `[rows, cols]` weight matrix in the kernel layout.
#[derive(Clone)]
pub struct LowBit {
    pub(super) rows: usize,
    pub(super) cols: usize,
    /// Chunks per row (`cols` rounded up to [`CHUNK`]).
    pub(super) nch: usize,
    /// Chunks per scale group.
    pub(super) cpg: usize,
    /// Groups per row.
    pub(super) gpr: usize,
    pub(super) kind: Codes,
    pub(super) codes: Vec<u8>,
    /// `[rows, gpr]`.
    pub(super) scale: Vec<f32>,
    /// `[rows, gpr]` unsigned zero points `z'` (integers as f32, or HQQ's real ones);
    /// empty for code books.
    pub(super) zero: Vec<f32>,
    pub(super) table: [f32; 16],
    /// The zero point `z'` shared by every group (symmetric schemes), so the GEMV builds
    /// its per-group table from one constant `(n − z')` row and never reads `zero`.
    uniform_zero: Option<f32>,
    /// `SplitTable` only, per chunk: the scale of lanes `split..32` and `split`.
    scale2: Vec<f32>,
    split: Vec<u8>,
    /// `SplitTable` with every split at 16 or 32 (rows a whole number of 16 columns, as
    /// MNIST's 784): lanes 0–15 of a chunk take `scale`, lanes 16–31 `scale2` (equal to
    /// `scale` where nothing splits), so each half has a table of weights of its own.
    split_halves: bool,
    /// The q8-activation panel copy (`kernels::prefill`, [`LowBit::a8_panels`]), built on
    /// first use; `None` inside where the codes do not fit it.
    a8: OnceLock<Option<PanelBlocks>>,
    /// The codes in panel order for [`Self::gemm`], 16 and 64 rows wide, built on first use.
    tiles: [OnceLock<gemm::TileCodes>; 2],
}

impl std::fmt::Debug for LowBit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LowBit {{ {}x{} {:?}, {} chunks per group }}",
            self.rows, self.cols, self.kind, self.cpg
        )
    }
}

impl LowBit {
    /// From integer codes (u8 bit patterns, two's complement when `signed`) of a `bits`-bit
    /// scheme, with one (scale, zero point) per `group` columns of a row (`group == 0`: one
    /// pair for the whole matrix; `group >= cols`: one per row). `None` when the layout
    /// does not fit this kernel (group not a multiple of 32, codes out of range, bad sizes).
    #[allow(clippy::too_many_arguments)]
    pub fn from_int(
        rows: usize,
        cols: usize,
        codes: &[u8],
        signed: bool,
        bits: u8,
        scale: &[f32],
        zero: &[i32],
        group: usize,
    ) -> Option<LowBit> {
        let qmin: i32 = if signed {
            -(1 << (bits.clamp(1, 8) - 1))
        } else {
            0
        };
        // Integers subtracted in i32, then exact in f32 (|z − qmin| < 2^9).
        Self::with_zero(
            rows,
            cols,
            codes,
            signed,
            bits,
            scale,
            zero.len(),
            group,
            |i| (zero[i] - qmin) as f32,
        )
    }

    /// As [`Self::from_int`] with real zero points (HQQ): a weight is `(q − z)·s`, the
    /// kernels run unchanged on `z' = z − qmin` (exact for unsigned codes, `qmin = 0`).
    #[allow(clippy::too_many_arguments)]
    pub fn from_int_real_zero(
        rows: usize,
        cols: usize,
        codes: &[u8],
        signed: bool,
        bits: u8,
        scale: &[f32],
        zero: &[f32],
        group: usize,
    ) -> Option<LowBit> {
        if zero.iter().any(|z| !z.is_finite()) {
            return None;
        }
        let qmin = if signed {
            -((1i32 << (bits.clamp(1, 8) - 1)) as f32)
        } else {
            0.0
        };
        Self::with_zero(
            rows,
            cols,
            codes,
            signed,
            bits,
            scale,
            zero.len(),
            group,
            |i| zero[i] - qmin,
        )
    }

    /// The shared constructor: `zero_of(i)` is parameter `i`'s unsigned zero point `z'`
    /// (called only for `i < zeros`).
    #[allow(clippy::too_many_arguments)]
    fn with_zero(
        rows: usize,
        cols: usize,
        codes: &[u8],
        signed: bool,
        bits: u8,
        scale: &[f32],
        zeros: usize,
        group: usize,
        zero_of: impl Fn(usize) -> f32,
    ) -> Option<LowBit> {
        if !(1..=8).contains(&bits) || codes.len() != rows * cols || cols == 0 {
            return None;
        }
        let nch = cols.div_ceil(CHUNK);
        // (chunks per group, groups per row, parameter index of (row, group)).
        let (cpg, gpr) = if group == 0 || group >= cols {
            (nch, 1)
        } else if group.is_multiple_of(CHUNK) {
            (group / CHUNK, cols.div_ceil(group))
        } else {
            return None;
        };
        let param = |o: usize, g: usize| if group == 0 { 0 } else { o * gpr + g };
        let needed = param(rows.max(1) - 1, gpr - 1) + 1;
        if rows == 0 || scale.len() < needed || zeros < needed {
            return None;
        }
        let qmin: i32 = if signed { -(1 << (bits - 1)) } else { 0 };
        let nmax: i32 = (1 << bits) - 1;
        let kind = if bits <= 4 {
            Codes::Nibble
        } else {
            Codes::Byte
        };
        let mut packed = vec![0u8; rows * nch * chunk_bytes(kind)];
        for o in 0..rows {
            for p in 0..cols {
                let c = codes[o * cols + p];
                let n = if signed { c as i8 as i32 } else { c as i32 } - qmin;
                if !(0..=nmax).contains(&n) {
                    return None;
                }
                put(&mut packed, kind, nch, o, p, n as u8);
            }
        }
        let mut s = Vec::with_capacity(rows * gpr);
        let mut z = Vec::with_capacity(rows * gpr);
        for o in 0..rows {
            for g in 0..gpr {
                let i = param(o, g);
                s.push(*scale.get(i)?);
                z.push(zero_of(i));
            }
        }
        Some(LowBit {
            rows,
            cols,
            nch,
            cpg,
            gpr,
            kind,
            codes: packed,
            scale: s,
            table: [0.0; 16],
            uniform_zero: match z.first() {
                Some(&z0) if z.iter().all(|&v| v.to_bits() == z0.to_bits()) => Some(z0),
                _ => None,
            },
            zero: z,
            scale2: Vec::new(),
            split: Vec::new(),
            split_halves: false,
            a8: OnceLock::new(),
            tiles: Default::default(),
        })
    }

    /// From 4-bit code-book indices packed two per byte (high nibble first) over the
    /// flattened matrix, with one absmax per `blocksize` consecutive elements. Rows that are
    /// whole chunks in whole-chunk blocks get one group per block (or per chunk); other
    /// shapes the `SplitTable` layout. `None` for blocks under 32 elements or sizes that
    /// disagree.
    pub fn from_table(
        rows: usize,
        cols: usize,
        packed: &[u8],
        table: &[f32; 16],
        absmax: &[f32],
        blocksize: usize,
    ) -> Option<LowBit> {
        let len = rows * cols;
        if cols == 0
            || blocksize < CHUNK
            || packed.len() < len.div_ceil(2)
            || absmax.len() < len.div_ceil(blocksize)
        {
            return None;
        }
        if !cols.is_multiple_of(CHUNK) || !blocksize.is_multiple_of(CHUNK) {
            return Some(Self::split_table(
                rows, cols, packed, table, absmax, blocksize,
            ));
        }
        let nch = cols / CHUNK;
        // Whole blocks per row: one group per block; otherwise a scale per chunk.
        let cpg = if cols.is_multiple_of(blocksize) {
            blocksize / CHUNK
        } else {
            1
        };
        let gpr = nch.div_ceil(cpg);
        let mut codes = vec![0u8; rows * nch * chunk_bytes(Codes::Table)];
        let mut scale = Vec::with_capacity(rows * gpr);
        for o in 0..rows {
            for p in 0..cols {
                let e = o * cols + p;
                let n = (packed[e / 2] >> (4 * (1 - (e & 1)))) & 0x0f;
                put(&mut codes, Codes::Table, nch, o, p, n);
            }
            for g in 0..gpr {
                scale.push(absmax[(o * cols + g * cpg * CHUNK) / blocksize]);
            }
        }
        Some(LowBit {
            rows,
            cols,
            nch,
            cpg,
            gpr,
            kind: Codes::Table,
            codes,
            scale,
            zero: Vec::new(),
            table: *table,
            uniform_zero: None,
            scale2: Vec::new(),
            split: Vec::new(),
            split_halves: false,
            a8: OnceLock::new(),
            tiles: Default::default(),
        })
    }

    /// The `SplitTable` layout (`blocksize >= 32`, so a chunk meets at most two blocks).
    fn split_table(
        rows: usize,
        cols: usize,
        packed: &[u8],
        table: &[f32; 16],
        absmax: &[f32],
        blocksize: usize,
    ) -> LowBit {
        let nch = cols.div_ceil(CHUNK);
        let mut codes = vec![0u8; rows * nch * chunk_bytes(Codes::SplitTable)];
        let (mut scale, mut scale2, mut split) = (Vec::new(), Vec::new(), Vec::new());
        for o in 0..rows {
            for p in 0..cols {
                let e = o * cols + p;
                let n = (packed[e / 2] >> (4 * (1 - (e & 1)))) & 0x0f;
                put(&mut codes, Codes::SplitTable, nch, o, p, n);
            }
            for c in 0..nch {
                let e0 = o * cols + c * CHUNK;
                let b = e0 / blocksize;
                let at = ((b + 1) * blocksize - e0).min(CHUNK);
                scale.push(absmax[b]);
                // Lanes past the row hold zero codes times zero activations: any finite
                // scale serves them.
                scale2.push(if at < CHUNK && b + 1 < absmax.len() {
                    absmax[b + 1]
                } else {
                    absmax[b]
                });
                split.push(at as u8);
            }
        }
        LowBit {
            rows,
            cols,
            nch,
            cpg: 1,
            gpr: nch,
            kind: Codes::SplitTable,
            codes,
            scale,
            zero: Vec::new(),
            table: *table,
            uniform_zero: None,
            scale2,
            split_halves: split.iter().all(|&at| at % 16 == 0),
            split,
            a8: OnceLock::new(),
            tiles: Default::default(),
        }
    }

    /// The scale of lane `j` of group (= chunk) `g` in the `SplitTable` layout.
    fn split_scale(&self, g: usize, j: usize) -> f32 {
        if j < self.split[g] as usize {
            self.scale[g]
        } else {
            self.scale2[g]
        }
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn kind(&self) -> Codes {
        self.kind
    }

    /// Bytes held by the kernel layout (codes and per-group parameters), with the
    /// panel-ordered copies built so far ([`Self::gemm`]).
    pub fn layout_bytes(&self) -> usize {
        let tiles: usize = self
            .tiles
            .iter()
            .filter_map(|t| t.get())
            .map(|t| t.bytes())
            .sum();
        self.codes.len() + 4 * (self.scale.len() + self.zero.len()) + tiles
    }

    /// The unsigned code of (row `o`, column `p`).
    fn code(&self, o: usize, p: usize) -> u8 {
        let (c, j) = (p / CHUNK, p % CHUNK);
        let base = (o * self.nch + c) * chunk_bytes(self.kind);
        match self.kind {
            Codes::Byte => self.codes[base + j],
            _ => (self.codes[base + j % 16] >> (4 * (j / 16))) & 0x0f,
        }
    }

    /// Weight (row `o`, column `p`) exactly as dequantized.
    pub fn weight(&self, o: usize, p: usize) -> f32 {
        let g = o * self.gpr + p / (self.cpg * CHUNK);
        let n = self.code(o, p);
        match self.kind {
            Codes::Table => self.table[n as usize] * self.scale[g],
            Codes::SplitTable => self.table[n as usize] * self.split_scale(g, p % CHUNK),
            _ => (n as f32 - self.zero[g]) * self.scale[g],
        }
    }

    /// The whole matrix as f32 (for `dequantize`; the products never call it).
    pub fn decode_all(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(o, row)| {
                for (p, d) in row.iter_mut().enumerate() {
                    *d = self.weight(o, p);
                }
            });
        out
    }

    /// `x [m, cols] · Wᵀ` → `[m, rows]` on the path [`Isa::selected`] picks.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(Isa::selected(), x, m)
    }

    /// `x [m, cols] · Wᵀ` on path `isa` (one that this CPU has: see [`Isa::available`]).
    /// With `--activations q8` (`kernels::prefill`) the activations are quantized to q8
    /// blocks first where a kernel for that exists ([`Self::matmul_a8`]).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation size");
        let isa = isa.min(Isa::detected());
        if super::prefill::q8_activations() {
            if let Some(y) = self.matmul_a8(isa, x, m) {
                return y;
            }
        }
        let panels = m >= panel_rows(isa);
        if m >= 2 && !panels {
            if let Some(y) = self.gemm_multi(isa, x, m) {
                return y;
            }
        }
        if !panels {
            let mut y = vec![0f32; m * self.rows];
            for r in 0..m {
                self.gemv(
                    isa,
                    &x[r * self.cols..(r + 1) * self.cols],
                    &mut y[r * self.rows..(r + 1) * self.rows],
                );
            }
            y
        } else if isa == Isa::Avx512 && self.rows <= NARROW_ROWS {
            self.gemm(Isa::Avx2, x, m)
        } else {
            self.gemm(isa, x, m)
        }
    }

    /// The q8-activation product on path `isa`, or `None` where this layout has none there:
    /// on AVX-512 VNNI and AVX2 the 16-row panel kernels for every row count (decode walks
    /// one panel at a time, as GGML's Q4_0/Q8_0 do) when [`Self::a8_panels`] fits; elsewhere
    /// one activation row through [`super::gemv_q8`] (nibble codes and code books).
    pub fn matmul_a8(&self, isa: Isa, x: &[f32], m: usize) -> Option<Vec<f32>> {
        assert_eq!(x.len(), m * self.cols, "activation size");
        let isa = isa.min(Isa::detected());
        if panels::panel_layout(isa) {
            if let Some(p) = self.a8_panels() {
                return Some(panels::matmul_f32(isa, p, x, m, self.cols));
            }
        }
        if m == 1 && super::gemv_q8::supports(self) {
            let mut y = vec![0f32; self.rows];
            super::gemv_q8::gemv(self, isa, x, &mut y);
            return Some(y);
        }
        None
    }

    /// The weight as GGML-style panels for the q8-activation products, built on first use
    /// (while q8 activations are on, the only copy the products read):
    /// - int-N codes with one integer zero point `z'` for every group (symmetric schemes):
    ///   Q4_0-like nibbles (≤ 4 bits) or Q8_0-like bytes with offset `z'`;
    /// - int-N codes with integer zero points per group (affine): the same codes, each
    ///   block's i32 sum started at `−z'·Σq` (exact in integers);
    /// - code books (NF4/FP4) whose rows are whole chunks: nibble indices looked up to the
    ///   code book rounded to signed 8 bits (`gemv_q8::code_book_i8`) plus 128, scale
    ///   `absmax·max|t|/127`.
    ///
    /// Each 32-column block takes its group's scale. `None` for real-valued zero points
    /// (HQQ) and code-book rows that straddle blocks (`SplitTable`).
    pub fn a8_panels(&self) -> Option<&PanelBlocks> {
        self.a8.get_or_init(|| self.build_a8_panels()).as_ref()
    }

    fn build_a8_panels(&self) -> Option<PanelBlocks> {
        let k = self.nch * CHUNK;
        let group = |o: usize, b: usize| o * self.gpr + b / self.cpg;
        // Padding columns get code 0 (their activations are 0).
        let row = |o: usize, row: &mut [u8]| {
            for (p, c) in row.iter_mut().enumerate() {
                *c = if p < self.cols { self.code(o, p) } else { 0 };
            }
        };
        let kind = match self.kind {
            Codes::Nibble => BlockKind::Q4_0,
            Codes::Byte => BlockKind::Q8_0,
            Codes::Table => {
                let (t8, factor) = super::gemv_q8::code_book_i8(&self.table);
                if factor == 0.0 {
                    return None;
                }
                let lut = t8.map(|t| (t as i32 + 128) as u8);
                return Some(PanelBlocks::from_table_codes(
                    self.rows,
                    k,
                    lut,
                    row,
                    |o, b| self.scale[group(o, b)] * factor,
                ));
            }
            Codes::SplitTable => return None,
        };
        let z = *self.zero.first()?;
        let integral = |v: f32| v.fract() == 0.0 && (0.0..=255.0).contains(&v);
        if !self.zero.iter().all(|&v| integral(v)) {
            return None;
        }
        let scale = |o: usize, b: usize| self.scale[group(o, b)];
        Some(if self.zero.iter().all(|&v| v == z) {
            PanelBlocks::from_codes(kind, self.rows, k, z as i32, row, scale)
        } else {
            PanelBlocks::from_codes_affine(kind, self.rows, k, row, scale, |o, b| {
                self.zero[group(o, b)] as u8
            })
        })
    }

    /// One activation row: `y[o] = Σ_p x[p]·W[o, p]`, rows split over threads when large.
    pub fn gemv(&self, isa: Isa, x: &[f32], y: &mut [f32]) {
        assert!(x.len() == self.cols && y.len() == self.rows);
        // Activations padded with zeros to whole chunks (padded codes are finite, so the
        // padding adds exact zeros).
        let mut xp = vec![0f32; self.nch * CHUNK];
        xp[..self.cols].copy_from_slice(x);
        super::for_row_blocks(y, self.rows * self.cols, 4, |o0, ys| {
            self.gemv_rows(isa, &xp, o0, ys);
        });
    }

    /// Rows `o0 .. o0 + ys.len()` of one activation row (`xp` padded to whole chunks).
    fn gemv_rows(&self, isa: Isa, xp: &[f32], o0: usize, ys: &mut [f32]) {
        assert!(xp.len() == self.nch * CHUNK && o0 + ys.len() <= self.rows);
        let mut o = 0;
        while o < ys.len() {
            let r = (ys.len() - o).min(4);
            let out = &mut ys[o..o + r];
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => {
                    // SAFETY: Avx512 is only reached when the CPU has it (`matmul_with` caps
                    // `isa` at the detected path); bounds asserted above and in the callee.
                    unsafe { x86::gemv_avx512(self, xp, o0 + o, out) }
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => {
                    // SAFETY: the binary requires AVX2+FMA (x86-64-v3) and the path is capped
                    // at the detected one; bounds asserted above and in the callee.
                    unsafe { x86::gemv_avx2(self, xp, o0 + o, out) }
                }
                _ => gemv_portable(self, xp, o0 + o, out),
            }
            o += r;
        }
    }

    /// Several activation rows on AVX-512 (nibble and code-book kinds): each chunk of four
    /// weight rows decoded once in registers and multiplied with up to [`MULTI_MR`]
    /// activation rows (`x86::g512m`), output rows split over threads. No f32 panel is
    /// written, so for a few dozen rows it beats [`Self::gemm`], whose panel decoding
    /// (a transpose per 16 × 16 weights) is repaid only over many rows. `None` on other
    /// paths and for byte codes.
    pub fn gemm_multi(&self, isa: Isa, x: &[f32], m: usize) -> Option<Vec<f32>> {
        assert_eq!(x.len(), m * self.cols, "activation size");
        if isa.min(Isa::detected()) != Isa::Avx512 || self.kind == Codes::Byte || m == 0 {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let ldx = self.nch * CHUNK;
            let padded;
            let xp: &[f32] = if ldx == self.cols {
                x
            } else {
                let mut v = vec![0f32; m * ldx];
                for (d, s) in v.chunks_exact_mut(ldx).zip(x.chunks_exact(self.cols)) {
                    d[..self.cols].copy_from_slice(s);
                }
                padded = v;
                &padded
            };
            let mut y = vec![0f32; m * self.rows];
            if self.rows * self.cols * m < SERIAL_WORK {
                // SAFETY: isa is AVX-512 and detected (checked above); `y` is m × rows and
                // written by this call alone; the kernel asserts the rest.
                unsafe {
                    x86::multi_rows(self, xp, ldx, m, (0, self.rows), y.as_mut_ptr(), self.rows)
                };
                return Some(y);
            }
            let tasks = rayon::current_num_threads().max(1) * 4;
            let block = self.rows.div_ceil(tasks).div_ceil(4).max(1) * 4;
            let yp = super::SendPtr(y.as_mut_ptr());
            (0..self.rows.div_ceil(block))
                .into_par_iter()
                .for_each(|b| {
                    let rows = (b * block, ((b + 1) * block).min(self.rows));
                    // SAFETY: isa is AVX-512 and detected (checked above); task b alone writes
                    // output columns rows.0..rows.1 of the m × rows `y`, which outlives the
                    // loop; the kernel asserts the rest.
                    unsafe { x86::multi_rows(self, xp, ldx, m, rows, yp.get(), self.rows) }
                });
            Some(y)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// Many activation rows: each tile of output rows decoded once per call from the
    /// panel-ordered copy of the codes into an f32 panel that the dense f32 GEMM's
    /// register tiles multiply with every activation row (see [`gemm`]).
    pub fn gemm(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        gemm::gemm(self, isa, x, m)
    }

    /// The panel-ordered codes for panels `nr` wide (16: AVX2 and portable, 64: AVX-512),
    /// built on first use.
    fn tile_codes(&self, nr: usize) -> &gemm::TileCodes {
        let slot = &self.tiles[usize::from(nr == 64)];
        let tc = slot.get_or_init(|| gemm::TileCodes::new(self, nr));
        assert_eq!(tc.nr(), nr, "tile codes of another panel width");
        tc
    }
}

fn chunk_bytes(kind: Codes) -> usize {
    match kind {
        Codes::Byte => CHUNK,
        _ => CHUNK / 2,
    }
}

/// Stores unsigned code `n` of (row `o`, column `p`) in the kernel layout.
fn put(buf: &mut [u8], kind: Codes, nch: usize, o: usize, p: usize, n: u8) {
    let (c, j) = (p / CHUNK, p % CHUNK);
    let base = (o * nch + c) * chunk_bytes(kind);
    match kind {
        Codes::Byte => buf[base + j] = n,
        _ => buf[base + j % 16] |= (n & 15) << (4 * (j / 16)),
    }
}

/// Portable GEMV over up to four rows starting at `o0` (same arithmetic as the SIMD
/// paths: per-group tables of weights for nibbles, a scaled group sum for bytes).
fn gemv_portable(lb: &LowBit, xp: &[f32], o0: usize, ys: &mut [f32]) {
    for (r, y) in ys.iter_mut().enumerate() {
        let o = o0 + r;
        let mut acc = [0f32; 8];
        for g in 0..lb.gpr {
            let (c0, c1) = (g * lb.cpg, ((g + 1) * lb.cpg).min(lb.nch));
            let i = o * lb.gpr + g;
            let s = lb.scale[i];
            match lb.kind {
                Codes::Byte => {
                    let z = lb.zero[i];
                    let mut d = [0f32; 8];
                    for c in c0..c1 {
                        let base = (o * lb.nch + c) * CHUNK;
                        let (w, xs) = (
                            &lb.codes[base..base + CHUNK],
                            &xp[c * CHUNK..(c + 1) * CHUNK],
                        );
                        for (wv, xv) in w.chunks_exact(8).zip(xs.chunks_exact(8)) {
                            for k in 0..8 {
                                d[k] += (wv[k] as f32 - z) * xv[k];
                            }
                        }
                    }
                    for k in 0..8 {
                        acc[k] += d[k] * s;
                    }
                }
                Codes::SplitTable => {
                    let base = (o * lb.nch + g) * 16;
                    let bytes = &lb.codes[base..base + 16];
                    let xs = &xp[g * CHUNK..(g + 1) * CHUNK];
                    for (j, &b) in bytes.iter().enumerate() {
                        acc[j % 8] += lb.table[(b & 15) as usize] * lb.split_scale(i, j) * xs[j];
                        acc[j % 8] +=
                            lb.table[(b >> 4) as usize] * lb.split_scale(i, j + 16) * xs[j + 16];
                    }
                }
                kind => {
                    let tab: [f32; 16] = if kind == Codes::Table {
                        std::array::from_fn(|n| lb.table[n] * s)
                    } else {
                        let z = lb.zero[i];
                        std::array::from_fn(|n| (n as f32 - z) * s)
                    };
                    for c in c0..c1 {
                        let base = (o * lb.nch + c) * 16;
                        let bytes = &lb.codes[base..base + 16];
                        let xs = &xp[c * CHUNK..(c + 1) * CHUNK];
                        for (j, &b) in bytes.iter().enumerate() {
                            acc[j % 8] += tab[(b & 15) as usize] * xs[j];
                            acc[j % 8] += tab[(b >> 4) as usize] * xs[j + 16];
                        }
                    }
                }
            }
        }
        *y = acc.iter().sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{chunk_bytes, Codes, LowBit, CHUNK, MULTI_MR, MULTI_NR};
    use std::arch::x86_64::*;

    /// AVX-512 GEMV for rows `o0 .. o0 + ys.len()` (at most 4).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL; `xp` holds `nch · 32` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn gemv_avx512(lb: &LowBit, xp: &[f32], o0: usize, ys: &mut [f32]) {
        assert!(xp.len() >= lb.nch * CHUNK && o0 + ys.len() <= lb.rows);
        assert!(lb.codes.len() >= lb.rows * lb.nch * chunk_bytes(lb.kind));
        let uniform = lb.uniform_zero.is_some();
        let halves = lb.split_halves;
        match (ys.len(), lb.kind) {
            (4, Codes::SplitTable) if halves => g512::<4, 5>(lb, xp, o0, ys),
            (4, Codes::Nibble) if uniform => g512::<4, 4>(lb, xp, o0, ys),
            (4, Codes::Nibble) => g512::<4, 0>(lb, xp, o0, ys),
            (4, Codes::Byte) => g512::<4, 1>(lb, xp, o0, ys),
            (4, Codes::Table) => g512::<4, 2>(lb, xp, o0, ys),
            (4, Codes::SplitTable) => g512::<4, 3>(lb, xp, o0, ys),
            (_, Codes::SplitTable) if halves => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g512::<1, 5>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
            (_, Codes::SplitTable) => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g512::<1, 3>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
            (_, Codes::Nibble) if uniform => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g512::<1, 4>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
            (_, Codes::Nibble) => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g512::<1, 0>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
            (_, Codes::Byte) => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g512::<1, 1>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
            (_, Codes::Table) => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g512::<1, 2>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
        }
    }

    /// `R` rows at once; `K`: 0 nibble ints, 1 byte ints, 2 nibble code book, 3 split code
    /// book, 4 nibble ints whose groups share one zero point (`uniform_zero`: the table
    /// is `(n − z')` built once, times each group's scale; no zero points are read), 5 split
    /// code book cut at 16 or 32 (`split_halves`: one table of weights per 16-lane half).
    ///
    /// Nibbles: per (row, group) the 16 possible weights — `(n − z')·s` or `table[n]·s`,
    /// the very products the dequantization computes — are built in one register, and each
    /// code is turned into its weight by one `vpermps` (which reads only the index's low 4
    /// bits, so the low nibble needs no mask): the sum is `Σ x·Ŵ` itself. Bytes: widened,
    /// converted, `z'` subtracted, and the group's sum scaled once.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn g512<const R: usize, const K: u8>(
        lb: &LowBit,
        xp: &[f32],
        o0: usize,
        ys: &mut [f32],
    ) {
        let cb = chunk_bytes(lb.kind);
        let row_bytes = lb.nch * cb;
        // SAFETY (whole body): rows o0..o0+R lie inside `codes` and groups inside
        // `scale`/`zero` (asserted by the caller); chunk c < nch reads `cb` bytes of its
        // row and 32 floats of `xp` (len ≥ nch·32).
        let codes = lb.codes.as_ptr().add(o0 * row_bytes);
        let x = xp.as_ptr();
        let base = base512::<K>(lb);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc2 = [_mm512_setzero_ps(); R];
        for g in 0..lb.gpr {
            let (c0, c1) = (g * lb.cpg, ((g + 1) * lb.cpg).min(lb.nch));
            let mut tab = [_mm512_setzero_ps(); R];
            let mut z = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let i = (o0 + r) * lb.gpr + g;
                let s = _mm512_set1_ps(*lb.scale.get_unchecked(i));
                if K < 2 {
                    z[r] = _mm512_set1_ps(*lb.zero.get_unchecked(i));
                }
                tab[r] = match K {
                    0 => _mm512_mul_ps(_mm512_sub_ps(base, z[r]), s),
                    2 | 4 => _mm512_mul_ps(base, s),
                    3 => {
                        // Per-lane scales: `s` below the split, the second scale from it.
                        let full: u32 = (!0u32)
                            .checked_shl(*lb.split.get_unchecked(i) as u32)
                            .unwrap_or(0);
                        let s2 = _mm512_set1_ps(*lb.scale2.get_unchecked(i));
                        z[r] = _mm512_mask_blend_ps(full as u16, s, s2);
                        _mm512_mask_blend_ps((full >> 16) as u16, s, s2)
                    }
                    5 => {
                        // Tables of lanes 0–15 in `z`, of lanes 16–31 in `tab`.
                        z[r] = _mm512_mul_ps(base, s);
                        _mm512_mul_ps(base, _mm512_set1_ps(*lb.scale2.get_unchecked(i)))
                    }
                    _ => s,
                };
            }
            if K == 1 {
                let mut dl = [_mm512_setzero_ps(); R];
                let mut dh = [_mm512_setzero_ps(); R];
                for c in c0..c1 {
                    let xl = _mm512_loadu_ps(x.add(c * CHUNK));
                    let xh = _mm512_loadu_ps(x.add(c * CHUNK + 16));
                    for r in 0..R {
                        let p = codes.add(r * row_bytes + c * cb);
                        let a = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                        let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
                        let wl = _mm512_sub_ps(_mm512_cvtepi32_ps(a), z[r]);
                        let wh = _mm512_sub_ps(_mm512_cvtepi32_ps(b), z[r]);
                        dl[r] = _mm512_fmadd_ps(wl, xl, dl[r]);
                        dh[r] = _mm512_fmadd_ps(wh, xh, dh[r]);
                    }
                }
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(_mm512_add_ps(dl[r], dh[r]), tab[r], acc[r]);
                }
            } else {
                for c in c0..c1 {
                    let xl = _mm512_loadu_ps(x.add(c * CHUNK));
                    let xh = _mm512_loadu_ps(x.add(c * CHUNK + 16));
                    for r in 0..R {
                        let p = codes.add(r * row_bytes + c * cb);
                        let e = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                        let (wl, wh) = if K == 5 {
                            (
                                _mm512_permutexvar_ps(e, z[r]),
                                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(e), tab[r]),
                            )
                        } else if K == 3 {
                            // Scales of lanes 0–15 in `z`, of lanes 16–31 in `tab`.
                            (
                                _mm512_mul_ps(_mm512_permutexvar_ps(e, base), z[r]),
                                _mm512_mul_ps(
                                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(e), base),
                                    tab[r],
                                ),
                            )
                        } else {
                            (
                                _mm512_permutexvar_ps(e, tab[r]),
                                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(e), tab[r]),
                            )
                        };
                        acc[r] = _mm512_fmadd_ps(wl, xl, acc[r]);
                        acc2[r] = _mm512_fmadd_ps(wh, xh, acc2[r]);
                    }
                }
            }
        }
        for r in 0..R {
            ys[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
        }
    }

    /// The 16 values a nibble turns into before its group's scale (see [`g512`]'s `K`):
    /// the code book, `n`, or `n − z'` for a shared zero point.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn base512<const K: u8>(lb: &LowBit) -> __m512 {
        if K == 2 || K == 3 || K == 5 {
            // SAFETY: `table` holds 16 floats.
            return unsafe { _mm512_loadu_ps(lb.table.as_ptr()) };
        }
        let iota = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        if K == 4 {
            // `n − z'`: small integers, exact.
            _mm512_sub_ps(iota, _mm512_set1_ps(lb.uniform_zero.unwrap_or(0.0)))
        } else {
            iota
        }
    }

    /// `R` output rows (`o0 .. o0 + R`) × `M` activation rows (`xp`, rows `ldx` apart,
    /// each padded to `nch · 32` values): `y[i·ldy + o0 + r] = Σ_p x[i][p]·Ŵ[o0 + r][p]`.
    ///
    /// Each chunk of the `R` weight rows is decoded once in registers, exactly as in
    /// [`g512`] (one `vpermps` from the group's table of weights per 16 codes; split code
    /// books with mixed halves scale the looked-up value per lane), and serves all `M`
    /// activation rows: the decoding is amortised over `M`, and no panel is written or
    /// transposed. One accumulator per (activation row, weight row); the sums are reduced
    /// four at a time ([`hsum4`]). Only nibble kinds (`K` 0, 2, 3, 4, 5).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL; `o0 + R <= rows`; `xp` holds `(M − 1)·ldx +
    /// nch·32` values; `y` is valid for writes at `i·ldy + o0 .. + R` for `i < M`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn g512m<const R: usize, const M: usize, const K: u8>(
        lb: &LowBit,
        xp: *const f32,
        ldx: usize,
        o0: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        debug_assert!(o0 + R <= lb.rows && K != 1 && lb.kind != Codes::Byte);
        let row_bytes = lb.nch * 16;
        // SAFETY (whole body): rows o0..o0+4 lie inside `codes`, groups inside `scale`,
        // `zero`, `scale2`, `split` (the caller's bounds); chunk c < nch reads 16 bytes of
        // each row and floats c·32 .. c·32 + 32 of each activation row.
        let codes = unsafe { lb.codes.as_ptr().add(o0 * row_bytes) };
        let base = unsafe { base512::<K>(lb) };
        let mut acc = [[_mm512_setzero_ps(); R]; M];
        for g in 0..lb.gpr {
            let (c0, c1) = (g * lb.cpg, ((g + 1) * lb.cpg).min(lb.nch));
            // K 0/2/4: tables of weights; K 3: scales of lanes 0–15 (`lo`) and 16–31 (`tab`).
            let mut tab = [_mm512_setzero_ps(); R];
            let mut lo = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let i = (o0 + r) * lb.gpr + g;
                let s = _mm512_set1_ps(unsafe { *lb.scale.get_unchecked(i) });
                tab[r] = match K {
                    0 => _mm512_mul_ps(
                        _mm512_sub_ps(base, _mm512_set1_ps(unsafe { *lb.zero.get_unchecked(i) })),
                        s,
                    ),
                    3 => {
                        let full: u32 = (!0u32)
                            .checked_shl(unsafe { *lb.split.get_unchecked(i) } as u32)
                            .unwrap_or(0);
                        let s2 = _mm512_set1_ps(unsafe { *lb.scale2.get_unchecked(i) });
                        lo[r] = _mm512_mask_blend_ps(full as u16, s, s2);
                        _mm512_mask_blend_ps((full >> 16) as u16, s, s2)
                    }
                    5 => {
                        // Tables of lanes 0–15 in `lo`, of lanes 16–31 in `tab`.
                        lo[r] = _mm512_mul_ps(base, s);
                        _mm512_mul_ps(base, _mm512_set1_ps(unsafe { *lb.scale2.get_unchecked(i) }))
                    }
                    _ => _mm512_mul_ps(base, s),
                };
            }
            for c in c0..c1 {
                let mut w = [[_mm512_setzero_ps(); 2]; R];
                for r in 0..R {
                    let e = _mm512_cvtepu8_epi32(unsafe {
                        _mm_loadu_si128(codes.add(r * row_bytes + c * 16) as *const __m128i)
                    });
                    let h = _mm512_srli_epi32::<4>(e);
                    w[r] = if K == 5 {
                        [
                            _mm512_permutexvar_ps(e, lo[r]),
                            _mm512_permutexvar_ps(h, tab[r]),
                        ]
                    } else if K == 3 {
                        [
                            _mm512_mul_ps(_mm512_permutexvar_ps(e, base), lo[r]),
                            _mm512_mul_ps(_mm512_permutexvar_ps(h, base), tab[r]),
                        ]
                    } else {
                        [
                            _mm512_permutexvar_ps(e, tab[r]),
                            _mm512_permutexvar_ps(h, tab[r]),
                        ]
                    };
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let xb = unsafe { xp.add(i * ldx + c * CHUNK) };
                    let (xl, xh) = unsafe { (_mm512_loadu_ps(xb), _mm512_loadu_ps(xb.add(16))) };
                    for r in 0..R {
                        a[r] = _mm512_fmadd_ps(w[r][0], xl, a[r]);
                        a[r] = _mm512_fmadd_ps(w[r][1], xh, a[r]);
                    }
                }
            }
        }
        // The M·R sums, four at a time.
        let n = M * R;
        let at = |k: usize| {
            if k < n {
                acc[k / R][k % R]
            } else {
                _mm512_setzero_ps()
            }
        };
        let mut k = 0;
        while k < n {
            let mut t = [0f32; 4];
            // SAFETY: `t` holds 4 floats.
            unsafe {
                _mm_storeu_ps(
                    t.as_mut_ptr(),
                    hsum4(at(k), at(k + 1), at(k + 2), at(k + 3)),
                )
            };
            for (j, v) in t.iter().enumerate().take(n - k) {
                let (i, r) = ((k + j) / R, (k + j) % R);
                // SAFETY: the caller's bound on `y` (i < M, r < R).
                unsafe { *y.add(i * ldy + o0 + r) = *v };
            }
            k += 4;
        }
    }

    /// The lane sums of four vectors, as lanes 0–3.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn hsum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        let half = |v: __m512| {
            _mm256_add_ps(
                _mm512_castps512_ps256(v),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
            )
        };
        let ab = _mm256_hadd_ps(half(a), half(b));
        let cd = _mm256_hadd_ps(half(c), half(d));
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }

    /// Output rows `a0 .. a1` of `m` activation rows (`xp`, rows `ldx = nch·32` apart, zero
    /// padded) into `y` (rows `ldy` apart): [`g512m`] over whole groups of [`MULTI_NR`]
    /// output rows and up to [`MULTI_MR`] activation rows, a last odd row on its own.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL; `y` valid for writes at `i·ldy + o` for `i < m`,
    /// `a0 <= o < a1`, and no other thread writes there meanwhile (the rest is asserted).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn multi_rows(
        lb: &LowBit,
        xp: &[f32],
        ldx: usize,
        m: usize,
        (a0, a1): (usize, usize),
        y: *mut f32,
        ldy: usize,
    ) {
        assert!(a0 <= a1 && a1 <= lb.rows && ldy >= lb.rows);
        assert!(ldx == lb.nch * CHUNK && xp.len() >= m * ldx);
        assert!(lb.codes.len() >= lb.rows * lb.nch * 16 && lb.scale.len() >= lb.rows * lb.gpr);
        let k = match lb.kind {
            Codes::Nibble if lb.uniform_zero.is_some() => 4,
            Codes::Nibble => {
                assert!(lb.zero.len() >= lb.rows * lb.gpr);
                0
            }
            Codes::Table => 2,
            Codes::SplitTable => {
                assert!(lb.scale2.len() >= lb.rows * lb.gpr && lb.split.len() >= lb.rows * lb.gpr);
                if lb.split_halves {
                    5
                } else {
                    3
                }
            }
            Codes::Byte => panic!("multi_rows: byte codes"),
        };
        let mut i = 0;
        while i < m {
            let mm = (m - i).min(MULTI_MR);
            // SAFETY: activation rows i..i+mm lie in `xp` (asserted); outputs per the caller.
            let (xb, yb) = unsafe { (xp.as_ptr().add(i * ldx), y.add(i * ldy)) };
            let mut o = a0;
            while o + MULTI_NR <= a1 {
                macro_rules! go {
                    ($m:literal) => {
                        // SAFETY: o + 4 <= a1 <= rows; `xb` holds mm rows of ldx; `yb`
                        // per the caller; the codes and parameters asserted above.
                        unsafe {
                            match k {
                                0 => g512m::<MULTI_NR, $m, 0>(lb, xb, ldx, o, yb, ldy),
                                2 => g512m::<MULTI_NR, $m, 2>(lb, xb, ldx, o, yb, ldy),
                                3 => g512m::<MULTI_NR, $m, 3>(lb, xb, ldx, o, yb, ldy),
                                5 => g512m::<MULTI_NR, $m, 5>(lb, xb, ldx, o, yb, ldy),
                                _ => g512m::<MULTI_NR, $m, 4>(lb, xb, ldx, o, yb, ldy),
                            }
                        }
                    };
                }
                match mm {
                    10 => go!(10),
                    9 => go!(9),
                    8 => go!(8),
                    7 => go!(7),
                    6 => go!(6),
                    5 => go!(5),
                    4 => go!(4),
                    3 => go!(3),
                    2 => go!(2),
                    _ => go!(1),
                }
                o += MULTI_NR;
            }
            for o in o..a1 {
                for ii in 0..mm {
                    let mut v = 0f32;
                    let xr = &xp[(i + ii) * ldx..(i + ii + 1) * ldx];
                    // SAFETY: o < rows, `xr` holds nch·32 values; AVX-512 per the caller.
                    unsafe {
                        gemv_avx512(lb, xr, o, std::slice::from_mut(&mut v));
                        *yb.add(ii * ldy + o) = v;
                    }
                }
            }
            i += mm;
        }
    }

    /// AVX2 GEMV for rows `o0 .. o0 + ys.len()` (at most 4).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `xp` holds `nch · 32` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemv_avx2(lb: &LowBit, xp: &[f32], o0: usize, ys: &mut [f32]) {
        assert!(xp.len() >= lb.nch * CHUNK && o0 + ys.len() <= lb.rows);
        assert!(lb.codes.len() >= lb.rows * lb.nch * chunk_bytes(lb.kind));
        let uniform = lb.uniform_zero.is_some();
        match (ys.len(), lb.kind) {
            (4, Codes::Nibble) if uniform => g256::<4, 4>(lb, xp, o0, ys),
            (4, Codes::Nibble) => g256::<4, 0>(lb, xp, o0, ys),
            (4, Codes::Byte) => g256::<4, 1>(lb, xp, o0, ys),
            (4, Codes::Table) => g256::<4, 2>(lb, xp, o0, ys),
            (4, Codes::SplitTable) => g256::<4, 3>(lb, xp, o0, ys),
            (_, Codes::SplitTable) => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g256::<1, 3>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
            (_, Codes::Nibble) if uniform => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g256::<1, 4>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
            (_, Codes::Nibble) => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g256::<1, 0>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
            (_, Codes::Byte) => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g256::<1, 1>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
            (_, Codes::Table) => {
                for (r, y) in ys.iter_mut().enumerate() {
                    g256::<1, 2>(lb, xp, o0 + r, std::slice::from_mut(y))
                }
            }
        }
    }

    /// 16-entry table lookup on 8 lanes (index in the low 4 bits; higher bits ignored):
    /// two lane-crossing permutes (which read bits 0–2) and a blend on bit 3.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn lookup16(idx: __m256i, t0: __m256, t1: __m256) -> __m256 {
        let a = _mm256_permutevar8x32_ps(t0, idx);
        let b = _mm256_permutevar8x32_ps(t1, idx);
        _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
    }

    /// As [`g512`] on 8 lanes; nibble tables are two registers (entries 0–7 and 8–15).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn g256<const R: usize, const K: u8>(
        lb: &LowBit,
        xp: &[f32],
        o0: usize,
        ys: &mut [f32],
    ) {
        let cb = chunk_bytes(lb.kind);
        let row_bytes = lb.nch * cb;
        // SAFETY (whole body): as in `g512`.
        let codes = lb.codes.as_ptr().add(o0 * row_bytes);
        let x = xp.as_ptr();
        let (b0, b1) = if K == 2 || K == 3 {
            (
                _mm256_loadu_ps(lb.table.as_ptr()),
                _mm256_loadu_ps(lb.table.as_ptr().add(8)),
            )
        } else {
            let (i0, i1) = (
                _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
                _mm256_setr_ps(8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0),
            );
            if K == 4 {
                // `n − z'`, exact (small integers).
                let z = _mm256_set1_ps(lb.uniform_zero.unwrap_or(0.0));
                (_mm256_sub_ps(i0, z), _mm256_sub_ps(i1, z))
            } else {
                (i0, i1)
            }
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for g in 0..lb.gpr {
            let (c0, c1) = (g * lb.cpg, ((g + 1) * lb.cpg).min(lb.nch));
            let mut t0 = [_mm256_setzero_ps(); R];
            let mut t1 = [_mm256_setzero_ps(); R];
            let mut z = [_mm256_setzero_ps(); R];
            for r in 0..R {
                let i = (o0 + r) * lb.gpr + g;
                let s = _mm256_set1_ps(*lb.scale.get_unchecked(i));
                if K < 2 {
                    z[r] = _mm256_set1_ps(*lb.zero.get_unchecked(i));
                }
                match K {
                    0 => {
                        t0[r] = _mm256_mul_ps(_mm256_sub_ps(b0, z[r]), s);
                        t1[r] = _mm256_mul_ps(_mm256_sub_ps(b1, z[r]), s);
                    }
                    2 | 4 => {
                        t0[r] = _mm256_mul_ps(b0, s);
                        t1[r] = _mm256_mul_ps(b1, s);
                    }
                    3 => {
                        // The split and both scales; lanes are scaled in the chunk loop.
                        t0[r] = s;
                        t1[r] = _mm256_set1_ps(*lb.scale2.get_unchecked(i));
                        z[r] = _mm256_castsi256_ps(_mm256_set1_epi32(
                            *lb.split.get_unchecked(i) as i32
                        ));
                    }
                    _ => t0[r] = s,
                }
            }
            if K == 1 {
                let mut d = [[_mm256_setzero_ps(); 2]; R];
                for c in c0..c1 {
                    let xb = x.add(c * CHUNK);
                    for r in 0..R {
                        let p = codes.add(r * row_bytes + c * cb);
                        for i in 0..4 {
                            let e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                p.add(8 * i) as *const __m128i
                            ));
                            let w = _mm256_sub_ps(_mm256_cvtepi32_ps(e), z[r]);
                            d[r][i & 1] =
                                _mm256_fmadd_ps(w, _mm256_loadu_ps(xb.add(8 * i)), d[r][i & 1]);
                        }
                    }
                }
                for r in 0..R {
                    acc[r][0] = _mm256_fmadd_ps(_mm256_add_ps(d[r][0], d[r][1]), t0[r], acc[r][0]);
                }
            } else {
                for c in c0..c1 {
                    let xb = x.add(c * CHUNK);
                    let xv = [
                        _mm256_loadu_ps(xb),
                        _mm256_loadu_ps(xb.add(8)),
                        _mm256_loadu_ps(xb.add(16)),
                        _mm256_loadu_ps(xb.add(24)),
                    ];
                    for r in 0..R {
                        let p = codes.add(r * row_bytes + c * cb);
                        let b = _mm_loadu_si128(p as *const __m128i);
                        let e0 = _mm256_cvtepu8_epi32(b);
                        let e1 = _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(b));
                        let w = if K == 3 {
                            let split = _mm256_castps_si256(z[r]);
                            let f = |v: __m256i, lane0: i32| {
                                let lanes = _mm256_add_epi32(
                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                    _mm256_set1_epi32(lane0),
                                );
                                // Lanes at or past the split take the second scale.
                                let second = _mm256_cmpgt_epi32(split, lanes);
                                let sc =
                                    _mm256_blendv_ps(t1[r], t0[r], _mm256_castsi256_ps(second));
                                _mm256_mul_ps(lookup16(v, b0, b1), sc)
                            };
                            [
                                f(e0, 0),
                                f(e1, 8),
                                f(_mm256_srli_epi32::<4>(e0), 16),
                                f(_mm256_srli_epi32::<4>(e1), 24),
                            ]
                        } else {
                            [
                                lookup16(e0, t0[r], t1[r]),
                                lookup16(e1, t0[r], t1[r]),
                                lookup16(_mm256_srli_epi32::<4>(e0), t0[r], t1[r]),
                                lookup16(_mm256_srli_epi32::<4>(e1), t0[r], t1[r]),
                            ]
                        };
                        acc[r][0] = _mm256_fmadd_ps(w[0], xv[0], acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(w[1], xv[1], acc[r][1]);
                        acc[r][0] = _mm256_fmadd_ps(w[2], xv[2], acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(w[3], xv[3], acc[r][1]);
                    }
                }
            }
        }
        for r in 0..R {
            ys[r] = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Reference decode sharing nothing with the kernel: `(q − z)·s` straight from the
    /// stored codes and parameters.
    fn ref_int(
        rows: usize,
        cols: usize,
        codes: &[u8],
        signed: bool,
        scale: &[f32],
        zero: &[i32],
        group: usize,
    ) -> Vec<f64> {
        let mut w = vec![0f64; rows * cols];
        for o in 0..rows {
            for p in 0..cols {
                let i = if group == 0 {
                    0
                } else if group >= cols {
                    o
                } else {
                    o * cols.div_ceil(group) + p / group
                };
                let c = codes[o * cols + p];
                let q = if signed { c as i8 as i64 } else { c as i64 };
                w[o * cols + p] = ((q - zero[i] as i64) as f32 * scale[i]) as f64;
            }
        }
        w
    }

    fn ref_table(
        len: usize,
        packed: &[u8],
        table: &[f32; 16],
        absmax: &[f32],
        bs: usize,
    ) -> Vec<f64> {
        (0..len)
            .map(|e| {
                let byte = packed[e / 2];
                let code = if e % 2 == 0 { byte >> 4 } else { byte & 15 };
                (table[code as usize] * absmax[e / bs]) as f64
            })
            .collect()
    }

    /// Checks every path against `x · Wᵀ` in f64; the tolerance is a few f32 roundings
    /// of the sum of absolute products (error bound of an f32 dot product: ~k·ε·Σ|x·w|,
    /// here with generous slack for the per-group scaling).
    fn check(lb: &LowBit, w: &[f64], m: usize, rng: &mut impl Rng) {
        let (rows, cols) = lb.shape();
        let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
        for isa in Isa::available() {
            // The panel GEMM called directly too, at every m (`matmul_with` takes it only
            // from `panel_rows` rows on, and not for matrices of few output rows on AVX-512).
            let mut ys = vec![
                ("matmul_with", lb.matmul_with(isa, &x, m)),
                ("gemm", lb.gemm(isa, &x, m)),
            ];
            // The several-row GEMV called directly, whatever `matmul_with` picks for m.
            if let Some(y) = lb.gemm_multi(isa, &x, m) {
                ys.push(("gemm_multi", y));
            }
            for (name, y) in ys {
                for r in 0..m {
                    for o in 0..rows {
                        let (mut e, mut mag) = (0f64, 0f64);
                        for p in 0..cols {
                            let t = x[r * cols + p] as f64 * w[o * cols + p];
                            e += t;
                            mag += t.abs();
                        }
                        // Worst-case bound of an f32 sum of `cols` products, `cols·ε·Σ|x·w|`,
                        // plus one rounding for the group scale applied after the sum.
                        let tol = (cols as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
                        let got = y[r * rows + o] as f64;
                        assert!(
                            (got - e).abs() <= tol,
                            "{name} {isa:?} m={m} row {r} out {o}: {got} vs {e} (tol {tol})"
                        );
                    }
                }
            }
        }
        // 16- and 64-wide tiles sum each output alike (one FMA chain in column order): the
        // narrow-matrix rule (`NARROW_ROWS`) and stacked weights rely on it.
        if Isa::available().contains(&Isa::Avx512) {
            let (a, b) = (lb.gemm(Isa::Avx2, &x, m), lb.gemm(Isa::Avx512, &x, m));
            assert!(
                a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                "m={m}"
            );
        }
        // The layout decodes to exactly the reference weights.
        let d = lb.decode_all();
        for (a, b) in d.iter().zip(w) {
            assert_eq!(*a as f64, *b);
        }
    }

    #[test]
    fn int_codes_every_path_matches_f64() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &bits in &[8u8, 4, 3, 2] {
            for &signed in &[true, false] {
                for &affine in &[false, true] {
                    for &(rows, cols, group) in &[
                        (37usize, 100usize, 32usize),
                        (9, 200, 64),
                        (13, 300, 128),
                        (11, 77, 77),
                        (5, 45, 0),
                    ] {
                        let qmin: i32 = if signed { -(1 << (bits - 1)) } else { 0 };
                        let qmax = qmin + (1 << bits) - 1;
                        let codes: Vec<u8> = (0..rows * cols)
                            .map(|_| rng.gen_range(qmin..=qmax) as u8)
                            .collect();
                        let np = if group == 0 {
                            1
                        } else if group >= cols {
                            rows
                        } else {
                            rows * cols.div_ceil(group)
                        };
                        let scale: Vec<f32> = (0..np).map(|_| rng.gen_range(0.001..0.1)).collect();
                        let zero: Vec<i32> = (0..np)
                            .map(|_| {
                                if affine {
                                    rng.gen_range(qmin..=qmax)
                                } else if signed {
                                    0
                                } else {
                                    (qmin + qmax + 1) / 2
                                }
                            })
                            .collect();
                        let lb = LowBit::from_int(
                            rows, cols, &codes, signed, bits, &scale, &zero, group,
                        )
                        .expect("layout");
                        assert_eq!(
                            lb.kind(),
                            if bits <= 4 {
                                Codes::Nibble
                            } else {
                                Codes::Byte
                            }
                        );
                        // Symmetric schemes take the shared-zero-point kernels.
                        if !affine {
                            assert!(lb.uniform_zero.is_some());
                        }
                        let w = ref_int(rows, cols, &codes, signed, &scale, &zero, group);
                        for m in [1, 2, 3, 5, 17, 64, 150] {
                            check(&lb, &w, m, &mut rng);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn real_zero_points_every_path_matches_f64() {
        // HQQ's layout: unsigned codes, real zero points (anywhere, even outside the code
        // range), ragged rows, every group shape the kernel takes.
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        for &bits in &[4u8, 3, 2, 8, 5] {
            for &(rows, cols, group) in &[
                (37usize, 100usize, 32usize),
                (9, 200, 64),
                (13, 256, 128),
                (11, 77, 77),
                (5, 45, 0),
            ] {
                let nmax = (1u32 << bits) - 1;
                let codes: Vec<u8> = (0..rows * cols)
                    .map(|_| rng.gen_range(0..=nmax) as u8)
                    .collect();
                let np = if group == 0 {
                    1
                } else if group >= cols {
                    rows
                } else {
                    rows * cols.div_ceil(group)
                };
                let scale: Vec<f32> = (0..np).map(|_| rng.gen_range(0.001..0.1)).collect();
                let zero: Vec<f32> = (0..np)
                    .map(|_| rng.gen_range(-2.0..nmax as f32 + 2.0))
                    .collect();
                let lb = LowBit::from_int_real_zero(
                    rows, cols, &codes, false, bits, &scale, &zero, group,
                )
                .expect("layout");
                let mut w = vec![0f64; rows * cols];
                for o in 0..rows {
                    for p in 0..cols {
                        let i = if group == 0 {
                            0
                        } else if group >= cols {
                            o
                        } else {
                            o * cols.div_ceil(group) + p / group
                        };
                        w[o * cols + p] =
                            ((codes[o * cols + p] as f32 - zero[i]) * scale[i]) as f64;
                    }
                }
                for m in [1, 2, 5, 17, 64, 150] {
                    check(&lb, &w, m, &mut rng);
                }
            }
        }
        assert!(
            LowBit::from_int_real_zero(1, 32, &[0; 32], false, 4, &[1.0], &[f32::NAN], 32)
                .is_none()
        );
    }

    #[test]
    fn many_rows_and_threads() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // 300 rows: 5 tiles of 64 (19 of 16), the rows split in two parts from m = 256 on;
        // 1100 columns: two depth blocks of the panel GEMM and a ragged last group.
        // 520 × 544 is above SERIAL_WORK at one row: the GEMVs split over threads (the
        // 300 × 320 ones run on the calling thread).
        const { assert!(520 * 544 >= SERIAL_WORK && 300 * 320 * 2 < SERIAL_WORK) };
        for (rows, cols, ms) in [
            (300usize, 320usize, &[1, 2, 7, 64, 200, 300][..]),
            (70, 1100, &[17, 130]),
            (520, 544, &[1, 3]),
        ] {
            let np = rows * cols.div_ceil(64);
            let codes: Vec<u8> = (0..rows * cols)
                .map(|_| rng.gen_range(-8i32..8) as i8 as u8)
                .collect();
            let scale: Vec<f32> = (0..np).map(|_| rng.gen_range(0.01..0.1)).collect();
            let zero = vec![0; np];
            let lb = LowBit::from_int(rows, cols, &codes, true, 4, &scale, &zero, 64).unwrap();
            let w = ref_int(rows, cols, &codes, true, &scale, &zero, 64);
            for &m in ms {
                check(&lb, &w, m, &mut rng);
            }
        }
    }

    #[test]
    fn code_book_every_path_matches_f64() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let table: [f32; 16] = std::array::from_fn(|i| (i as f32 - 7.5) / 7.5 + 0.01 * i as f32);
        for &(rows, cols, bs) in &[
            (7usize, 64usize, 64usize),
            (9, 96, 64),
            (5, 128, 128),
            (3, 160, 128),
            (70, 256, 64),
            // Rows that are not whole chunks: the split layout (MNIST's 784 columns).
            (13, 784, 64),
            (6, 100, 32),
        ] {
            let len = rows * cols;
            let packed: Vec<u8> = (0..len.div_ceil(2)).map(|_| rng.gen()).collect();
            let absmax: Vec<f32> = (0..len.div_ceil(bs))
                .map(|_| rng.gen_range(0.1..3.0))
                .collect();
            let lb = LowBit::from_table(rows, cols, &packed, &table, &absmax, bs).expect("layout");
            // Rows of whole 16-column halves take the per-half tables (`split_halves`).
            if lb.kind() == Codes::SplitTable {
                assert_eq!(lb.split_halves, cols % 16 == 0);
            }
            let w = ref_table(len, &packed, &table, &absmax, bs);
            for m in [1, 2, 5, 17, 64, 150] {
                check(&lb, &w, m, &mut rng);
            }
        }
        // Blocks under a chunk: no kernel layout (the caller keeps its own path).
        assert!(LowBit::from_table(3, 100, &[0; 150], &table, &[1.0; 19], 16).is_none());
    }

    #[test]
    fn layouts_that_do_not_fit_are_refused() {
        assert!(LowBit::from_int(2, 100, &[0; 200], true, 4, &[1.0; 8], &[0; 8], 16).is_none());
        assert!(LowBit::from_int(2, 10, &[0; 20], true, 9, &[1.0; 2], &[0; 2], 10).is_none());
        // A 4-bit signed code outside its range.
        assert!(LowBit::from_int(1, 32, &[100; 32], true, 4, &[1.0], &[0], 32).is_none());
    }
}

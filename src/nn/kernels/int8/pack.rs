//! The packed weight layout every int8 path reads.
//!
//! Output channels are grouped in panels of [`PANEL`] (16); inside a panel, for each group of
//! four consecutive k positions, the 16 channels' four bytes follow each other:
//! `panel[g · 64 + c · 4 + t] = W[16·p + c, 4·g + t]`. One 64-byte load is then exactly the
//! weight operand of one AVX-512 `vpdpbusd` (16 channels × 4 k, summed into 16 i32 lanes);
//! the AVX2 path widens the same 64 bytes to i16 in four 16-byte pieces. k is padded with
//! zero weights to a multiple of 4 and the last panel with zero channels, so the kernels
//! never test bounds inside their loops (zero weights add nothing to any sum).

/// Output channels per panel (one 512-bit register of i32 accumulators).
pub const PANEL: usize = 16;
/// k positions per packed group (the four u8 × i8 products `vpdpbusd` sums per lane).
pub const KGROUP: usize = 4;

/// An i8 `[n, k]` weight packed for the kernels, with its per-row code sums.
#[derive(Clone)]
pub struct PackedI8 {
    /// Output channels.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// k rounded up to a multiple of [`KGROUP`]: the row stride of packed activations.
    pub kp: usize,
    /// `n.div_ceil(PANEL)` panels of `PANEL · kp` bytes each.
    data: Vec<i8>,
    /// Σ_k W[j, k] per output channel, for the activation zero-point correction
    /// Σ (a − za)·w = Σ a·w − za·Σ w.
    pub row_sum: Vec<i32>,
}

impl std::fmt::Debug for PackedI8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedI8 {{ n: {}, k: {}, kp: {} }}",
            self.n, self.k, self.kp
        )
    }
}

impl PackedI8 {
    /// Packs row-major `[n, k]` codes (PyTorch's weight layout). Panics if `w.len() != n · k`
    /// (callers build `w` from the same shape).
    pub fn new(w: &[i8], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight buffer size");
        let kp = k.div_ceil(KGROUP) * KGROUP;
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0i8; panels * PANEL * kp];
        for (j, row) in w.chunks_exact(k.max(1)).take(n).enumerate() {
            let (p, c) = (j / PANEL, j % PANEL);
            let base = p * PANEL * kp + c * KGROUP;
            for (kk, &v) in row.iter().enumerate() {
                data[base + (kk / KGROUP) * PANEL * KGROUP + kk % KGROUP] = v;
            }
        }
        PackedI8 {
            n,
            k,
            kp,
            data,
            row_sum: row_sums_i8(w, n, k),
        }
    }

    /// Number of 16-channel panels.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// Bytes of one panel.
    pub fn panel_stride(&self) -> usize {
        PANEL * self.kp
    }

    /// The packed panels, `panels() · panel_stride()` bytes.
    pub fn data(&self) -> &[i8] {
        &self.data
    }
}

/// Per-output-row sums of `[n, k]` weight codes.
pub fn row_sums_i8(w: &[i8], n: usize, k: usize) -> Vec<i32> {
    (0..n)
        .map(|j| w[j * k..(j + 1) * k].iter().map(|&v| v as i32).sum())
        .collect()
}

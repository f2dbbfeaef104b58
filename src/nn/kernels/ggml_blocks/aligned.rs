//! Fixed-length buffers of plain values for packed weights: 64-byte aligned, and (from a
//! page up, on Linux) carved out of 2 MiB-aligned chunks marked for transparent huge pages.
//!
//! Why aligned: the panel kernels read codes and scales in 64-byte loads at multiples of 64
//! from a buffer's start; a heap `Vec` starts only 16-byte aligned, so each load could
//! straddle two cache lines.
//!
//! Why huge pages: a decode step streams every weight from memory once, and in 4 KiB pages
//! each page costs a TLB miss (a nested page walk in a VM); the hardware prefetchers also
//! stop at 4 KiB boundaries. Most 4-bit weights of a small model are well under 2 MiB (the
//! f32 panels' per-weight huge pages in `gemm_f32` would waste most of each page), so the
//! weights share chunks: a bump allocator over 32 MiB mappings, each freed when the last
//! buffer in it is dropped. Which pages the heap gave a weight otherwise depended on
//! allocation order: GGML Q4_0 (packed at load) ran the same panel kernel 10-15% slower per
//! token than weight-only int4 (packed lazily on the first decode step).
//! `QUANTLAB_HUGEPAGES=off` keeps every buffer on the heap (A/B).

use crate::nn::kernels::huge_pages_on;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// One cache line of storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Plain values that may be viewed as bytes.
///
/// # Safety
/// Implementors are `Copy`, have no padding, accept any bit pattern (all zeros included)
/// as a valid value, and have an alignment that divides 64.
pub unsafe trait Plain: Copy + 'static {}
// SAFETY: primitive integers and floats: no padding, any bit pattern valid, align ≤ 8.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for f32 {}

/// Buffers from this many bytes up come from the huge-page chunks.
const ARENA_MIN_BYTES: usize = 4096;

/// `len` values of `T`, the first at a 64-byte aligned address.
pub struct Aligned<T: Plain> {
    store: Store,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

enum Store {
    Heap(Vec<Line>),
    /// `bytes` at `at` inside a chunk that lives while this buffer does.
    Chunk {
        _chunk: Arc<huge::Chunk>,
        at: *mut u8,
    },
}

// SAFETY: `Store::Chunk` owns its byte range exclusively (the bump allocator hands each
// range out once); the chunk itself is `Sync` (see `huge::Chunk`). So a buffer may move
// between threads and be shared read-only like a `Vec`.
unsafe impl Send for Store {}
// SAFETY: as above; `&Aligned` only gives `&[T]`.
unsafe impl Sync for Store {}

impl<T: Plain> Aligned<T> {
    /// `len` zero values.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        let store = if bytes >= ARENA_MIN_BYTES {
            huge::take(bytes).map(|(chunk, at)| Store::Chunk { _chunk: chunk, at })
        } else {
            None
        };
        Aligned {
            store: store.unwrap_or_else(|| Store::Heap(vec![Line([0; 64]); bytes.div_ceil(64)])),
            len,
            _t: std::marker::PhantomData,
        }
    }

    /// No values (as an empty `Vec`).
    pub fn empty() -> Self {
        Self::zeroed(0)
    }

    /// Whether the buffer lives in a huge-page chunk (not on the heap).
    #[cfg(test)]
    fn in_chunk(&self) -> bool {
        matches!(self.store, Store::Chunk { .. })
    }

    fn ptr(&self) -> *const T {
        match &self.store {
            Store::Heap(v) => v.as_ptr() as *const T,
            Store::Chunk { at, .. } => *at as *const T,
        }
    }
}

impl<T: Plain> Clone for Aligned<T> {
    fn clone(&self) -> Self {
        let mut c = Self::zeroed(self.len);
        c.copy_from_slice(self);
        c
    }
}

impl<T: Plain> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the store holds at least len·size_of::<T>() initialised (zeroed, then
        // written through `deref_mut`) bytes, aligned to 64 (a multiple of T's alignment),
        // owned by this buffer; any bit pattern is a valid T (`Plain`).
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }
}

impl<T: Plain> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, with exclusive access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr() as *mut T, self.len) }
    }
}

#[cfg(target_os = "linux")]
mod huge {
    //! The chunks: anonymous mappings (fresh, untouched pages, so the huge-page advice
    //! applies from the first touch), 2 MiB aligned, handed out front to back.

    use super::*;
    use std::ffi::c_void;

    /// Bytes of a huge page.
    const HUGE: usize = 2 << 20;
    /// Bytes of an ordinary chunk (a bigger request gets a chunk of its own size).
    const CHUNK: usize = 32 << 20;

    extern "C" {
        fn mmap(
            addr: *mut c_void,
            len: usize,
            prot: i32,
            flags: i32,
            fd: i32,
            off: i64,
        ) -> *mut c_void;
        fn munmap(addr: *mut c_void, len: usize) -> i32;
        fn madvise(addr: *mut c_void, len: usize, advice: i32) -> i32;
    }
    const PROT_READ_WRITE: i32 = 0x1 | 0x2;
    const MAP_PRIVATE_ANONYMOUS: i32 = 0x02 | 0x20;
    const MADV_HUGEPAGE: i32 = 14;

    /// One mapping; unmapped when the last buffer in it (and the allocator) let go.
    pub struct Chunk {
        map: *mut u8,
        map_len: usize,
        /// 2 MiB-aligned start of the usable part, `len` bytes.
        base: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is plain memory; each byte range is owned by one buffer, and
    // the chunk itself is only read (its fields) after creation.
    unsafe impl Send for Chunk {}
    // SAFETY: as above.
    unsafe impl Sync for Chunk {}

    impl Chunk {
        fn new(len: usize) -> Option<Arc<Chunk>> {
            let map_len = len + HUGE;
            // SAFETY: an anonymous private mapping at an address of the kernel's choosing
            // touches no existing memory.
            let map = unsafe {
                mmap(
                    std::ptr::null_mut(),
                    map_len,
                    PROT_READ_WRITE,
                    MAP_PRIVATE_ANONYMOUS,
                    -1,
                    0,
                )
            } as *mut u8;
            if map as isize == -1 || map.is_null() {
                return None;
            }
            let base = map.wrapping_add(map.align_offset(HUGE));
            // SAFETY: [base, base + len) lies inside the mapping (at most HUGE − 1 bytes
            // are skipped to align); madvise only changes how its pages are backed.
            unsafe { madvise(base.cast(), len, MADV_HUGEPAGE) };
            Some(Arc::new(Chunk {
                map,
                map_len,
                base,
                len,
            }))
        }
    }

    impl Drop for Chunk {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, no longer referenced by any buffer.
            unsafe { munmap(self.map.cast(), self.map_len) };
        }
    }

    /// The chunk being filled and its first free byte.
    static CURRENT: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

    /// `bytes` zeroed bytes (fresh mapping memory is zero), 64-byte aligned, in a chunk;
    /// `None` when huge pages are off or the mapping fails (the caller uses the heap).
    pub fn take(bytes: usize) -> Option<(Arc<Chunk>, *mut u8)> {
        if !super::huge_pages_on() {
            return None;
        }
        let need = bytes.next_multiple_of(64);
        let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((chunk, used)) = cur.as_mut() {
            if chunk.len - *used >= need {
                let at = chunk.base.wrapping_add(*used);
                *used += need;
                return Some((chunk.clone(), at));
            }
        }
        let chunk = Chunk::new(need.max(CHUNK).next_multiple_of(HUGE))?;
        let at = chunk.base;
        *cur = Some((chunk.clone(), need));
        Some((chunk, at))
    }
}

#[cfg(not(target_os = "linux"))]
mod huge {
    use super::*;

    pub struct Chunk;

    pub fn take(_bytes: usize) -> Option<(Arc<Chunk>, *mut u8)> {
        let _ = super::huge_pages_on();
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_line_and_holds_its_length() {
        for len in [0usize, 1, 15, 16, 17, 1000, 1024, 5000, 300_000] {
            let mut a = Aligned::<f32>::zeroed(len);
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert!(a.iter().all(|&v| v == 0.0));
            for (i, v) in a.iter_mut().enumerate() {
                *v = i as f32;
            }
            let b = a.clone();
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert_eq!(&b[..], &a[..]);
            let bytes = Aligned::<u8>::zeroed(len);
            assert_eq!(bytes.as_ptr() as usize % 64, 0);
            assert_eq!(bytes.len(), len);
            assert!(bytes.iter().all(|&v| v == 0));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn large_buffers_share_chunks_without_overlap() {
        // With `QUANTLAB_HUGEPAGES=off` the same checks run on heap buffers.
        let chunks = huge_pages_on();
        // Several buffers, some bigger than a chunk: each keeps its own values.
        let sizes = [5000usize, 40 << 20, 123_457, 1 << 20, 4096];
        let mut bufs: Vec<Aligned<u8>> = sizes.iter().map(|&n| Aligned::zeroed(n)).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.in_chunk(), chunks);
            assert!(b.iter().all(|&v| v == 0));
            b.fill(i as u8 + 1);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(
                b.iter().all(|&v| v == i as u8 + 1),
                "buffer {i} overwritten"
            );
        }
        // Dropping some and allocating again never hands out a live range.
        bufs.remove(1);
        let fresh = Aligned::<u8>::zeroed(64 << 10);
        assert!(fresh.iter().all(|&v| v == 0));
        for b in &bufs {
            let first = b[0];
            assert!(b.iter().all(|&v| v == first));
        }
    }
}

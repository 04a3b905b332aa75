//! The caching allocator behind tensor storage.
//!
//! Every tensor buffer is carved from size classes (four per power of two, so at most 25 % is
//! wasted) and goes back to a free list of its class when dropped. The next op that needs a
//! buffer of that class reuses it instead of asking the OS for fresh pages, so a training step
//! that repeats the same shapes stops faulting in and clearing memory after its first iteration.
//! The cache holds at most `KILN_CACHE_MAX_BYTES` bytes (default 512 MiB); beyond that freed
//! buffers go back to the system. (A fixed-shape MiniLM training step caches less than that;
//! with dynamic padding every batch brings new sizes, and a 4 GiB cap let the cache fill with
//! stale classes: a fine-tune peaked at 3.4 GB instead of 1.6 GB.) `empty_cache()` releases everything that is cached.

use std::alloc::{alloc, dealloc, Layout as AllocLayout};
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Alignment of every buffer: one cache line, enough for AVX-512 loads.
pub const ALIGN: usize = 64;
const MIN_BYTES: usize = 64;
const NUM_CLASSES: usize = 64 * 4;

struct Pool {
    lists: Vec<Mutex<Vec<usize>>>,
    cached_bytes: AtomicUsize,
    max_bytes: usize,
    hits: AtomicUsize,
    misses: AtomicUsize,
    live_bytes: AtomicUsize,
    peak_live_bytes: AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        lists: (0..NUM_CLASSES).map(|_| Mutex::new(Vec::new())).collect(),
        cached_bytes: AtomicUsize::new(0),
        max_bytes: std::env::var("KILN_CACHE_MAX_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512 << 20),
        hits: AtomicUsize::new(0),
        misses: AtomicUsize::new(0),
        live_bytes: AtomicUsize::new(0),
        peak_live_bytes: AtomicUsize::new(0),
    })
}

/// Size class of a request: (class index, rounded size in bytes).
fn size_class(bytes: usize) -> (usize, usize) {
    let b = bytes.max(MIN_BYTES);
    // 2^p < b <= 2^(p+1), then round up to a quarter step of 2^p.
    let p = (usize::BITS - 1 - (b - 1).leading_zeros()) as usize;
    let step = 1usize << (p - 2);
    let k = (b - (1usize << p)).div_ceil(step);
    let k = k.max(1);
    (
        (p * 4 + k - 1).min(NUM_CLASSES - 1),
        (1usize << p) + k * step,
    )
}

fn raw_alloc(bytes: usize) -> (NonNull<u8>, usize) {
    let (class, rounded) = size_class(bytes);
    let p = pool();
    let live = p.live_bytes.fetch_add(rounded, Ordering::Relaxed) + rounded;
    p.peak_live_bytes.fetch_max(live, Ordering::Relaxed);
    if let Some(ptr) = p.lists[class].lock().unwrap().pop() {
        p.cached_bytes.fetch_sub(rounded, Ordering::Relaxed);
        p.hits.fetch_add(1, Ordering::Relaxed);
        // SAFETY: only non-null pointers from `alloc` are ever pushed.
        return (unsafe { NonNull::new_unchecked(ptr as *mut u8) }, rounded);
    }
    p.misses.fetch_add(1, Ordering::Relaxed);
    let layout = AllocLayout::from_size_align(rounded, ALIGN).expect("buffer size overflow");
    // SAFETY: layout has non-zero size.
    let ptr = unsafe { alloc(layout) };
    match NonNull::new(ptr) {
        Some(ptr) => (ptr, rounded),
        None => {
            // Give the cached memory back and try once more before failing.
            empty_cache();
            NonNull::new(unsafe { alloc(layout) })
                .map(|ptr| (ptr, rounded))
                .unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
        }
    }
}

fn raw_free(ptr: NonNull<u8>, rounded: usize) {
    let p = pool();
    p.live_bytes.fetch_sub(rounded, Ordering::Relaxed);
    let (class, _) = size_class(rounded);
    if p.cached_bytes.load(Ordering::Relaxed) + rounded <= p.max_bytes {
        p.cached_bytes.fetch_add(rounded, Ordering::Relaxed);
        p.lists[class].lock().unwrap().push(ptr.as_ptr() as usize);
    } else {
        // SAFETY: allocated in `raw_alloc` with exactly this layout.
        unsafe {
            dealloc(
                ptr.as_ptr(),
                AllocLayout::from_size_align_unchecked(rounded, ALIGN),
            )
        }
    }
}

/// Releases every cached buffer back to the system.
pub fn empty_cache() {
    let p = pool();
    for (class, list) in p.lists.iter().enumerate() {
        let ptrs = std::mem::take(&mut *list.lock().unwrap());
        for ptr in ptrs {
            let rounded = class_bytes(class);
            p.cached_bytes.fetch_sub(rounded, Ordering::Relaxed);
            // SAFETY: pointers in class `class` were allocated with that class's size.
            unsafe {
                dealloc(
                    ptr as *mut u8,
                    AllocLayout::from_size_align_unchecked(rounded, ALIGN),
                )
            }
        }
    }
}

fn class_bytes(class: usize) -> usize {
    let (p, k) = (class / 4, class % 4 + 1);
    (1usize << p) + k * (1usize << (p - 2))
}

/// Counters of the caching allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Allocations served from a free list.
    pub hits: usize,
    /// Allocations that went to the system allocator.
    pub misses: usize,
    /// Bytes currently held in free lists.
    pub cached_bytes: usize,
    /// Bytes in buffers that are in use (size classes, rounded up).
    pub live_bytes: usize,
    /// The most `live_bytes` has been since the start or the last [`reset_peak_live_bytes`].
    pub peak_live_bytes: usize,
}

/// Restarts the high-water mark of [`CacheStats::peak_live_bytes`] at the current live bytes.
pub fn reset_peak_live_bytes() {
    let p = pool();
    p.peak_live_bytes
        .store(p.live_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Current counters of the caching allocator.
pub fn cache_stats() -> CacheStats {
    let p = pool();
    CacheStats {
        hits: p.hits.load(Ordering::Relaxed),
        misses: p.misses.load(Ordering::Relaxed),
        cached_bytes: p.cached_bytes.load(Ordering::Relaxed),
        live_bytes: p.live_bytes.load(Ordering::Relaxed),
        peak_live_bytes: p.peak_live_bytes.load(Ordering::Relaxed),
    }
}

/// A fixed-length, 64-byte aligned array of plain-old-data elements from the caching allocator.
pub struct Buffer<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    rounded: usize,
    _marker: PhantomData<T>,
}

// SAFETY: a Buffer owns its elements exclusively, like a Vec.
unsafe impl<T: Copy + Send> Send for Buffer<T> {}
unsafe impl<T: Copy + Sync> Sync for Buffer<T> {}

impl<T: Copy> Buffer<T> {
    /// A buffer whose contents are unspecified (reused memory or fresh pages).
    ///
    /// Only for plain numeric types where every bit pattern is valid; callers must write every
    /// element before reading it for the values to mean anything.
    pub fn uninit(len: usize) -> Self {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("buffer size overflow");
        let (ptr, rounded) = raw_alloc(bytes);
        Buffer {
            ptr: ptr.cast(),
            len,
            rounded,
            _marker: PhantomData,
        }
    }

    /// A buffer with every element set to `value`.
    pub fn filled(len: usize, value: T) -> Self {
        let mut b = Self::uninit(len);
        b.fill(value);
        b
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[T]) -> Self {
        let mut b = Self::uninit(data.len());
        b.copy_from_slice(data);
        b
    }

    /// A buffer of `len` elements produced by `f(i)`.
    pub fn from_fn(len: usize, mut f: impl FnMut(usize) -> T) -> Self {
        let mut b = Self::uninit(len);
        for (i, v) in b.iter_mut().enumerate() {
            *v = f(i);
        }
        b
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Copy> Deref for Buffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr is valid for len elements for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> DerefMut for Buffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Drop for Buffer<T> {
    fn drop(&mut self) {
        raw_free(self.ptr.cast(), self.rounded);
    }
}

impl<T: Copy> Clone for Buffer<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T: Copy + std::fmt::Debug> std::fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_by_at_most_a_quarter() {
        for bytes in [
            1usize,
            63,
            64,
            65,
            100,
            1000,
            4096,
            4097,
            1 << 20,
            (1 << 20) + 1,
            123_456_789,
        ] {
            let (class, rounded) = size_class(bytes);
            assert!(rounded >= bytes, "{bytes} -> {rounded}");
            assert!(
                rounded <= (bytes.max(64) * 5).div_ceil(4) + 1,
                "{bytes} -> {rounded}"
            );
            assert_eq!(class_bytes(class), rounded);
            assert_eq!(size_class(rounded), (class, rounded));
        }
    }

    #[test]
    fn freed_buffers_are_reused() {
        let len = 777_777; // a class no other test uses
        let first = Buffer::<f32>::uninit(len);
        let addr = first.as_ptr() as usize;
        drop(first);
        let again = Buffer::<f32>::uninit(len);
        assert_eq!(again.as_ptr() as usize, addr);
        assert_eq!(again.as_ptr() as usize % ALIGN, 0);
    }
}

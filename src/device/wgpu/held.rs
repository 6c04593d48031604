//! Gram matrices kept on the device between the calibration that accumulated them and the
//! layers that quantize with them.
//!
//! The calibration's forward pass accumulates each Gram on the GPU and reads it back once (the
//! host needs it: the damping, the dead inputs, the orders and the factors it builds). Its
//! upper triangle, packed, also stays on the device here, under the digest of the host copy
//! ([`crate::numeric::gram::Gram::digest`]). A search that uploads a layer whose Gram is held
//! copies it on the device instead of sending it again, and likewise the held-out Gram.
//!
//! Found by content, as the factors built ahead are: a Gram changed on its way to the layer
//! (scales folded in, Grams summed on the host) digests differently and is uploaded as before,
//! so a hit is the very matrix the upload would send, bit for bit (the host copy holds the
//! device's f32 sums exactly, as f64). A collision of the 128-bit digest between two Grams of
//! the same width in one run would hand a layer the wrong matrix; the digest mixes every bit of
//! every entry, so it is not a practical concern. Beyond [`HELD_GRAM_BYTES`] entries already
//! copied by a layer go first (a block's layers come in order, so those are mostly done with),
//! then the oldest; a miss costs one upload, never a result.

use std::collections::VecDeque;
use std::sync::Mutex;

/// At most this many bytes of packed Gram triangles are held (a block of ViT-L with its
/// held-out Grams is about 80 MB; the 6B shape's 1,024-image calibration keeps 8 GB of device
/// memory with this much beside it); a Gram whose triangle alone is larger is not held.
pub const HELD_GRAM_BYTES: u64 = 96 << 20;

/// Bytes of the packed upper triangle of an `n × n` f32 matrix.
pub fn triangle_bytes(n: usize) -> u64 {
    (n * (n + 1) / 2 * 4) as u64
}

/// A buffer for the packed triangle of an `n`-wide Gram, where one can be held and bound under
/// `max_binding` (`None` otherwise: its layers upload it).
pub fn triangle_buffer(device: &wgpu::Device, n: usize, max_binding: u64) -> Option<wgpu::Buffer> {
    usable(n, max_binding).then(|| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("held-gram"),
            size: triangle_bytes(n),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    })
}

/// Whether an `n`-wide Gram's triangle can be held and bound under `max_binding`.
pub fn usable(n: usize, max_binding: u64) -> bool {
    HeldGrams::fits(n) && triangle_bytes(n) <= max_binding
}

#[derive(Debug)]
struct Entry<B> {
    key: [u64; 2],
    n: usize,
    buf: B,
    /// A layer has copied it.
    used: bool,
}

/// The held Grams of one device, shared by every handle on it (`B`: the device's buffer).
#[derive(Debug)]
pub struct HeldGrams<B = wgpu::Buffer> {
    entries: Mutex<VecDeque<Entry<B>>>,
}

impl<B> Default for HeldGrams<B> {
    fn default() -> Self {
        HeldGrams {
            entries: Mutex::new(VecDeque::new()),
        }
    }
}

impl HeldGrams {
    /// Whether an `n`-wide Gram can be held at all.
    pub fn fits(n: usize) -> bool {
        n >= 2 && triangle_bytes(n) <= HELD_GRAM_BYTES
    }
}

impl<B: Clone> HeldGrams<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry<B>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `buf` (the packed upper triangle of an `n`-wide Gram, row after row from the
    /// diagonal) under `key`, releasing entries beyond [`HELD_GRAM_BYTES`]: those a layer has
    /// copied first, then the oldest.
    pub fn insert(&self, key: [u64; 2], n: usize, buf: B) {
        if !HeldGrams::fits(n) {
            return;
        }
        let mut e = self.lock();
        e.retain(|x| x.key != key || x.n != n);
        let mut total: u64 = e.iter().map(|x| triangle_bytes(x.n)).sum();
        while total + triangle_bytes(n) > HELD_GRAM_BYTES {
            let victim = e.iter().position(|x| x.used).unwrap_or(0);
            match e.remove(victim) {
                Some(old) => total -= triangle_bytes(old.n),
                None => break,
            }
        }
        e.push_back(Entry {
            key,
            n,
            buf,
            used: false,
        });
    }

    /// The held triangle of the `n`-wide Gram with digest `key`.
    pub fn get(&self, key: [u64; 2], n: usize) -> Option<B> {
        self.lock()
            .iter_mut()
            .find(|x| x.key == key && x.n == n)
            .map(|x| {
                x.used = true;
                x.buf.clone()
            })
    }

    /// Whether anything is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(h: &HeldGrams<u32>) -> Vec<u32> {
        h.lock().iter().map(|e| e.buf).collect()
    }

    #[test]
    fn entries_a_layer_copied_go_first_then_the_oldest() {
        // Four Grams of a third of the cap each: the fourth pushes one out.
        let n = (1..8192)
            .rev()
            .find(|&n| triangle_bytes(n) * 3 <= HELD_GRAM_BYTES)
            .unwrap();
        let h = HeldGrams::<u32>::default();
        assert!(h.is_empty());
        for i in 0..3 {
            h.insert([i, 0], n, i as u32);
        }
        assert_eq!(h.get([1, 0], n), Some(1));
        // The same key at another width is another Gram.
        assert_eq!(h.get([1, 0], n - 1), None);
        h.insert([3, 0], n, 3);
        assert_eq!(held(&h), vec![0, 2, 3], "the copied entry goes first");
        h.insert([4, 0], n, 4);
        assert_eq!(held(&h), vec![2, 3, 4], "then the oldest");
        // Inserting a key again replaces it.
        h.insert([4, 0], n, 5);
        assert_eq!(held(&h), vec![2, 3, 5]);
        // Too wide to hold: not held, nothing evicted.
        let wide = (n..1 << 20).find(|&m| !HeldGrams::fits(m)).unwrap();
        h.insert([9, 0], wide, 9);
        assert_eq!(held(&h), vec![2, 3, 5]);
        assert!(!HeldGrams::fits(1));
    }
}

//! Bit packing of integer codes, in compressed-tensors' `pack-quantized` layout.
//!
//! Element `i` of a packed line occupies global bits `[i·b, (i+1)·b)` of the line's little-endian
//! 32-bit words, crossing word boundaries when needed (the dense layout of compressed-tensors
//! ≥ May 2026; for 2, 4 and 8 bits it equals the older `32/b` values per word). Weight codes are
//! packed along the input dimension (one line per output row); zero points along the output
//! dimension (one line per group column).

/// Words needed for `count` values of `bits` bits.
pub fn words_for(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(32)
}

/// Packs one line of unsigned `bits`-bit values into `out` (length [`words_for`]).
fn pack_line(values: impl Iterator<Item = u32>, bits: u32, out: &mut [u32]) {
    out.iter_mut().for_each(|w| *w = 0);
    let mask = if bits == 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    for (i, v) in values.enumerate() {
        let v = (v & mask) as u64;
        let bit = i * bits as usize;
        let (w, off) = (bit / 32, bit % 32);
        let wide = v << off;
        out[w] |= wide as u32;
        if off + bits as usize > 32 {
            out[w + 1] |= (wide >> 32) as u32;
        }
    }
}

fn unpack_line(words: &[u32], bits: u32, count: usize) -> impl Iterator<Item = u32> + '_ {
    let mask = (1u64 << bits) - 1;
    (0..count).map(move |i| {
        let bit = i * bits as usize;
        let (w, off) = (bit / 32, bit % 32);
        let lo = words[w] as u64;
        let hi = words.get(w + 1).copied().unwrap_or(0) as u64;
        (((hi << 32 | lo) >> off) & mask) as u32
    })
}

/// Packs a row-major `rows × cols` table of unsigned codes along `cols`:
/// result `[rows, words_for(cols, bits)]` as i32 (the format's dtype).
pub fn pack_rows(values: &[u32], rows: usize, cols: usize, bits: u32) -> Vec<i32> {
    let wpr = words_for(cols, bits);
    let mut out = vec![0u32; rows * wpr];
    for r in 0..rows {
        pack_line(
            values[r * cols..(r + 1) * cols].iter().copied(),
            bits,
            &mut out[r * wpr..(r + 1) * wpr],
        );
    }
    out.into_iter().map(|w| w as i32).collect()
}

/// Inverse of [`pack_rows`].
pub fn unpack_rows(packed: &[i32], rows: usize, cols: usize, bits: u32) -> Vec<u32> {
    let wpr = words_for(cols, bits);
    let words: Vec<u32> = packed.iter().map(|&w| w as u32).collect();
    (0..rows)
        .flat_map(|r| unpack_line(&words[r * wpr..(r + 1) * wpr], bits, cols).collect::<Vec<_>>())
        .collect()
}

/// Packs a row-major `rows × cols` table along `rows` (dimension 0):
/// result `[words_for(rows, bits), cols]`.
pub fn pack_columns(values: &[u32], rows: usize, cols: usize, bits: u32) -> Vec<i32> {
    let wpc = words_for(rows, bits);
    let mut out = vec![0i32; wpc * cols];
    let mut line = vec![0u32; wpc];
    for c in 0..cols {
        pack_line((0..rows).map(|r| values[r * cols + c]), bits, &mut line);
        for (w, &v) in line.iter().enumerate() {
            out[w * cols + c] = v as i32;
        }
    }
    out
}

/// Inverse of [`pack_columns`].
pub fn unpack_columns(packed: &[i32], rows: usize, cols: usize, bits: u32) -> Vec<u32> {
    let wpc = words_for(rows, bits);
    let mut out = vec![0u32; rows * cols];
    for c in 0..cols {
        let line: Vec<u32> = (0..wpc).map(|w| packed[w * cols + c] as u32).collect();
        for (r, v) in unpack_line(&line, bits, rows).enumerate() {
            out[r * cols + c] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn four_bit_codes_sit_eight_to_a_word_lowest_first() {
        let v: Vec<u32> = (0..8).collect();
        assert_eq!(pack_rows(&v, 1, 8, 4), vec![0x7654_3210]);
    }

    #[test]
    fn three_bit_codes_cross_word_boundaries() {
        // Element 10 occupies bits 30..33: two bits in word 0, one in word 1.
        let mut v = vec![0u32; 11];
        v[10] = 0b111;
        let p = pack_rows(&v, 1, 11, 3);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0] as u32, 0b11 << 30);
        assert_eq!(p[1], 1);
    }

    proptest! {
        #[test]
        fn packing_round_trips_for_every_bit_width(
            bits in 2u32..=8, rows in 1usize..6, cols in 1usize..70, seed in any::<u64>()
        ) {
            let mut s = seed | 1;
            let v: Vec<u32> = (0..rows * cols).map(|_| {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                (s as u32) & ((1 << bits) - 1)
            }).collect();
            let p = pack_rows(&v, rows, cols, bits);
            prop_assert_eq!(p.len(), rows * words_for(cols, bits));
            prop_assert_eq!(unpack_rows(&p, rows, cols, bits), v.clone());
            let c = pack_columns(&v, rows, cols, bits);
            prop_assert_eq!(c.len(), words_for(rows, bits) * cols);
            prop_assert_eq!(unpack_columns(&c, rows, cols, bits), v);
        }
    }
}

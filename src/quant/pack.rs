//! Dense bit packing of 1..=8-bit codes into bytes. Codes are laid out as one
//! little-endian bit stream: code i occupies bits [i·b, (i+1)·b), least significant
//! bit first, so 3-bit codes straddle byte boundaries and no bit is wasted.

use anyhow::{bail, Result};

/// Bytes needed to hold `count` codes of `bits` bits.
pub fn packed_len(count: usize, bits: u8) -> usize {
    (count * bits as usize).div_ceil(8)
}

/// Packs unsigned codes (each `< 2^bits`) into a bit stream.
pub fn pack(codes: &[u8], bits: u8) -> Result<Vec<u8>> {
    if !(1..=8).contains(&bits) {
        bail!("cannot pack {bits}-bit codes: use 1 to 8 bits");
    }
    let limit = 1u16 << bits;
    let mut out = vec![0u8; packed_len(codes.len(), bits)];
    let mut bitpos = 0usize;
    for (i, &c) in codes.iter().enumerate() {
        if c as u16 >= limit {
            bail!("code {c} at index {i} does not fit in {bits} bits");
        }
        let byte = bitpos / 8;
        let shift = bitpos % 8;
        let wide = (c as u16) << shift;
        out[byte] |= wide as u8;
        if shift + bits as usize > 8 {
            out[byte + 1] |= (wide >> 8) as u8;
        }
        bitpos += bits as usize;
    }
    Ok(out)
}

/// Unpacks `count` codes of `bits` bits from a bit stream made by [`pack`].
pub fn unpack(bytes: &[u8], bits: u8, count: usize) -> Result<Vec<u8>> {
    if !(1..=8).contains(&bits) {
        bail!("cannot unpack {bits}-bit codes: use 1 to 8 bits");
    }
    let need = packed_len(count, bits);
    if bytes.len() < need {
        bail!(
            "{count} codes of {bits} bits need {need} bytes, but only {} are present (truncated data?)",
            bytes.len()
        );
    }
    let mask = (1u16 << bits) - 1;
    let mut out = Vec::with_capacity(count);
    let mut bitpos = 0usize;
    for _ in 0..count {
        let byte = bitpos / 8;
        let shift = bitpos % 8;
        let lo = bytes[byte] as u16;
        let hi = if shift + bits as usize > 8 {
            bytes[byte + 1] as u16
        } else {
            0
        };
        out.push((((lo | (hi << 8)) >> shift) & mask) as u8);
        bitpos += bits as usize;
    }
    Ok(out)
}

/// Moves signed codes into `0..2^bits` by adding 2^(bits−1) (offset binary) so they can be packed.
pub fn to_offset_binary(codes: &[i32], bits: u8) -> Result<Vec<u8>> {
    let off = 1i32 << (bits - 1);
    codes
        .iter()
        .map(|&c| {
            let u = c + off;
            if !(0..(1 << bits)).contains(&u) {
                bail!("signed code {c} does not fit in {bits} bits");
            }
            Ok(u as u8)
        })
        .collect()
}

/// Inverse of [`to_offset_binary`].
pub fn from_offset_binary(codes: &[u8], bits: u8) -> Vec<i32> {
    let off = 1i32 << (bits - 1);
    codes.iter().map(|&u| u as i32 - off).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_packed_layouts() {
        // 4-bit: first code in the low nibble.
        assert_eq!(pack(&[0x1, 0x2, 0xf], 4).unwrap(), vec![0x21, 0x0f]);
        // 2-bit: 1,2,3,0 -> 0b00_11_10_01
        assert_eq!(pack(&[1, 2, 3, 0], 2).unwrap(), vec![0b0011_1001]);
        // 3-bit: 5 (101), 3 (011), 7 (111) -> bits 101 | 011<<3 | 111<<6
        // = 0b11_011_101 = 0xDD, then the high bit of 7 -> 0x01
        assert_eq!(pack(&[5, 3, 7], 3).unwrap(), vec![0xDD, 0x01]);
        assert_eq!(packed_len(3, 3), 2);
        assert_eq!(packed_len(8, 3), 3);
    }

    #[test]
    fn errors_are_clear() {
        assert!(pack(&[4], 2).is_err());
        assert!(pack(&[0], 0).is_err());
        assert!(unpack(&[0], 3, 8).is_err());
        assert!(to_offset_binary(&[4], 3).is_err());
    }

    #[test]
    fn offset_binary_round_trip() {
        let codes = [-4, -1, 0, 3];
        let u = to_offset_binary(&codes, 3).unwrap();
        assert_eq!(u, vec![0, 3, 4, 7]);
        assert_eq!(from_offset_binary(&u, 3), codes.to_vec());
    }
}

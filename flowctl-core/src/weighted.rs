//! How many bytes an item is charged against the watermarks.

use bytes::{Bytes, BytesMut};

/// The number of bytes an item is charged against [`Watermarks`](crate::Watermarks).
///
/// Every buffer in flowctl counts bytes, not items, so a stream of 64 KiB chunks
/// and a stream of 16-byte messages are bounded by the same memory figure.
/// Implement it for your own message types by summing their payloads; the weight
/// must not change while the item is buffered.
///
/// # The per-item floor
/// A stage charges an item [`charge_of`]`(item)` bytes, its weight **but at
/// least [`MIN_CHARGE`]** (64), and credits exactly that much when the next
/// stage has taken it. So an item of weight 0 (`()`, an empty `Bytes`, an
/// empty frame) still counts: a pipe with `high = 4096` holds at most 65 of
/// them, not a million. `FlowStats::buffered` and the watermarks see the
/// charges; `FlowStats::bytes` counts the weights (the payload).
pub trait Weighted {
    /// Bytes this item costs while it is buffered.
    fn weight(&self) -> usize;
}

/// The least number of bytes one item is charged against the watermarks,
/// whatever its [`weight`](Weighted::weight): the memory a queued item costs
/// beyond its payload (its handle in the queue and the queue slot; a `Bytes`
/// alone is 32 bytes), rounded up.
///
/// Without a floor an item of weight 0 (`()`, an empty `Bytes`, an empty
/// frame) would pass every watermark: a million of them would be queued
/// without a pause. Items of at least this many bytes are charged exactly
/// their weight.
pub const MIN_CHARGE: usize = 64;

/// The bytes `item` is charged against the watermarks while it is buffered:
/// its [`weight`](Weighted::weight), and at least [`MIN_CHARGE`].
///
/// Every stage charges and credits an item through this function, so a
/// charge and its credit always agree.
///
/// ```
/// use bytes::Bytes;
/// use flowctl_core::weighted::{MIN_CHARGE, charge_of};
/// use flowctl_core::prelude::*;
///
/// assert_eq!(charge_of(&Bytes::new()), MIN_CHARGE);
/// assert_eq!(charge_of(&Bytes::from(vec![0u8; 1000])), 1000);
/// ```
pub fn charge_of<T: Weighted + ?Sized>(item: &T) -> usize {
    item.weight().max(MIN_CHARGE)
}

impl Weighted for Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weighted for BytesMut {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weighted for String {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weighted for &'static [u8] {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weighted for &'static str {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// A `Vec<u8>` weighs its length; a multipart message the sum of its parts.
impl<T: Weighted> Weighted for Vec<T> {
    fn weight(&self) -> usize {
        self.iter().map(Weighted::weight).sum()
    }
}

impl<T: Weighted> Weighted for Box<T> {
    fn weight(&self) -> usize {
        (**self).weight()
    }
}

impl<A: Weighted, B: Weighted> Weighted for (A, B) {
    fn weight(&self) -> usize {
        self.0.weight() + self.1.weight()
    }
}

impl<T: Weighted, E> Weighted for Result<T, E> {
    /// An error weighs nothing; a value weighs what it weighs.
    fn weight(&self) -> usize {
        self.as_ref().map_or(0, Weighted::weight)
    }
}

macro_rules! fixed_weight {
    ($($t:ty),*) => {$(
        impl Weighted for $t {
            fn weight(&self) -> usize {
                std::mem::size_of::<$t>()
            }
        }
    )*};
}
fixed_weight!(
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    ()
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_payload_bytes() {
        assert_eq!(Bytes::from_static(b"abc").weight(), 3);
        assert_eq!(
            vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cde")].weight(),
            5
        );
        assert_eq!(String::from("hello").weight(), 5);
        assert_eq!(7u64.weight(), 8);
        assert_eq!((Bytes::from_static(b"k"), vec![1u8, 2]).weight(), 3);
    }
}

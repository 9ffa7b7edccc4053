//! [`Multipart`]: a ZeroMQ message, one [`Bytes`] per frame.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::{Deref, DerefMut};

use bytes::Bytes;
use flowctl_core::Weighted;

/// A ZeroMQ message: its frames in order, one [`Bytes`] each.
///
/// It reads as a slice of frames (`msg[0]`, `msg.len()`, `msg.iter()`) and
/// converts from and into a `Vec<Bytes>`. A message of a single frame, the
/// common case, holds it inline: building, sending, receiving and dropping
/// one costs no allocation of its own (a `Vec<Bytes>` costs a `malloc` and
/// a `free` per message, a third of the per-message work at 100 B).
///
/// Its [`weight`](Weighted::weight) is the sum of its frames' lengths.
///
/// ```
/// use bytes::Bytes;
/// use flowctl_zmq::Multipart;
///
/// let one = Multipart::from(Bytes::from_static(b"job 1"));
/// assert_eq!(one.len(), 1);
///
/// let mut envelope: Multipart = vec![Bytes::from_static(b"id"), Bytes::new()].into();
/// envelope.push(Bytes::from_static(b"body"));
/// assert_eq!(envelope[2], "body");
/// assert_eq!(envelope, vec![Bytes::from_static(b"id"), Bytes::new(), Bytes::from_static(b"body")]);
/// let frames: Vec<Bytes> = envelope.into_vec();
/// assert_eq!(frames.len(), 3);
/// ```
#[derive(Clone)]
pub struct Multipart(Frames);

#[derive(Clone)]
enum Frames {
    One(Bytes),
    /// Zero frames, or more than one (or one pushed onto an empty `Vec`).
    Many(Vec<Bytes>),
}

impl Multipart {
    /// A message with no frames yet (libzmq refuses to send one: push at
    /// least one frame).
    pub const fn new() -> Self {
        Multipart(Frames::Many(Vec::new()))
    }

    /// Appends a frame.
    pub fn push(&mut self, frame: impl Into<Bytes>) {
        let frame = frame.into();
        match &mut self.0 {
            Frames::Many(v) if v.is_empty() && v.capacity() == 0 => self.0 = Frames::One(frame),
            Frames::Many(v) => v.push(frame),
            Frames::One(first) => {
                let first = std::mem::take(first);
                self.0 = Frames::Many(vec![first, frame]);
            }
        }
    }

    /// The frames as a `Vec` (allocates for a single-frame message).
    pub fn into_vec(self) -> Vec<Bytes> {
        match self.0 {
            Frames::One(b) => vec![b],
            Frames::Many(v) => v,
        }
    }

    /// The frames.
    pub fn as_slice(&self) -> &[Bytes] {
        match &self.0 {
            Frames::One(b) => std::slice::from_ref(b),
            Frames::Many(v) => v,
        }
    }

    /// The frames, mutably (a frame may be replaced, not added).
    pub fn as_mut_slice(&mut self) -> &mut [Bytes] {
        match &mut self.0 {
            Frames::One(b) => std::slice::from_mut(b),
            Frames::Many(v) => v,
        }
    }
}

impl Default for Multipart {
    fn default() -> Self {
        Multipart::new()
    }
}

impl Deref for Multipart {
    type Target = [Bytes];

    fn deref(&self) -> &[Bytes] {
        self.as_slice()
    }
}

impl DerefMut for Multipart {
    fn deref_mut(&mut self) -> &mut [Bytes] {
        self.as_mut_slice()
    }
}

impl AsRef<[Bytes]> for Multipart {
    fn as_ref(&self) -> &[Bytes] {
        self.as_slice()
    }
}

impl fmt::Debug for Multipart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl PartialEq for Multipart {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Multipart {}

impl Hash for Multipart {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl PartialEq<[Bytes]> for Multipart {
    fn eq(&self, other: &[Bytes]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<Vec<Bytes>> for Multipart {
    fn eq(&self, other: &Vec<Bytes>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<const N: usize> PartialEq<[Bytes; N]> for Multipart {
    fn eq(&self, other: &[Bytes; N]) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl PartialEq<Multipart> for Vec<Bytes> {
    fn eq(&self, other: &Multipart) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl From<Bytes> for Multipart {
    /// A single-frame message (no allocation).
    fn from(frame: Bytes) -> Self {
        Multipart(Frames::One(frame))
    }
}

impl From<Vec<Bytes>> for Multipart {
    /// The frames in order (a one-frame `Vec` is unpacked, and freed).
    fn from(mut frames: Vec<Bytes>) -> Self {
        if frames.len() == 1
            && let Some(frame) = frames.pop()
        {
            return Multipart(Frames::One(frame));
        }
        Multipart(Frames::Many(frames))
    }
}

impl<const N: usize> From<[Bytes; N]> for Multipart {
    fn from(frames: [Bytes; N]) -> Self {
        frames.into_iter().collect()
    }
}

impl From<Multipart> for Vec<Bytes> {
    fn from(msg: Multipart) -> Self {
        msg.into_vec()
    }
}

impl FromIterator<Bytes> for Multipart {
    fn from_iter<I: IntoIterator<Item = Bytes>>(iter: I) -> Self {
        let mut msg = Multipart::new();
        msg.extend(iter);
        msg
    }
}

impl Extend<Bytes> for Multipart {
    fn extend<I: IntoIterator<Item = Bytes>>(&mut self, iter: I) {
        for frame in iter {
            self.push(frame);
        }
    }
}

impl Weighted for Multipart {
    /// The sum of the frames' lengths.
    fn weight(&self) -> usize {
        match &self.0 {
            Frames::One(b) => b.len(),
            Frames::Many(v) => v.iter().map(Bytes::len).sum(),
        }
    }
}

impl<'a> IntoIterator for &'a Multipart {
    type Item = &'a Bytes;
    type IntoIter = std::slice::Iter<'a, Bytes>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl IntoIterator for Multipart {
    type Item = Bytes;
    type IntoIter = IntoIter;

    fn into_iter(self) -> IntoIter {
        IntoIter(match self.0 {
            Frames::One(b) => Iter::One(Some(b)),
            Frames::Many(v) => Iter::Many(v.into_iter()),
        })
    }
}

/// The frames of a [`Multipart`], by value, in order.
#[derive(Debug)]
pub struct IntoIter(Iter);

#[derive(Debug)]
enum Iter {
    One(Option<Bytes>),
    Many(std::vec::IntoIter<Bytes>),
}

impl Iterator for IntoIter {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        match &mut self.0 {
            Iter::One(b) => b.take(),
            Iter::Many(it) => it.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.0 {
            Iter::One(b) => usize::from(b.is_some()),
            Iter::Many(it) => it.len(),
        };
        (n, Some(n))
    }
}

impl DoubleEndedIterator for IntoIter {
    fn next_back(&mut self) -> Option<Bytes> {
        match &mut self.0 {
            Iter::One(b) => b.take(),
            Iter::Many(it) => it.next_back(),
        }
    }
}

impl ExactSizeIterator for IntoIter {}

impl std::iter::FusedIterator for IntoIter {}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn one_frame_and_many_compare_by_frames() {
        let one = Multipart::from(b("a"));
        assert_eq!(one, Multipart::from(vec![b("a")]));
        assert_eq!(one, vec![b("a")]);
        assert_ne!(one, Multipart::from(vec![b("a"), b("")]));
        assert_ne!(Multipart::new(), one);
        assert_eq!(Multipart::new(), Multipart::from(Vec::new()));
    }

    #[test]
    fn push_keeps_order_across_the_inline_frame() {
        let mut m = Multipart::new();
        assert!(m.is_empty());
        for s in ["x", "y", "z"] {
            m.push(b(s));
        }
        assert_eq!(m, [b("x"), b("y"), b("z")]);
        assert_eq!(m.weight(), 3);
        assert_eq!(m.clone().into_vec(), vec![b("x"), b("y"), b("z")]);
        let back: Vec<Bytes> = m.into_iter().rev().collect();
        assert_eq!(back, vec![b("z"), b("y"), b("x")]);
    }

    #[test]
    fn iterates_a_single_frame_once() {
        let mut it = Multipart::from(b("only")).into_iter();
        assert_eq!(it.len(), 1);
        assert_eq!(it.next(), Some(b("only")));
        assert_eq!(it.next(), None);
        assert_eq!(it.next_back(), None);
    }

    #[test]
    fn weight_is_the_sum_of_frame_lengths() {
        let m: Multipart = [b("ab"), b(""), b("cde")].into();
        assert_eq!(m.weight(), 5);
        assert_eq!(Multipart::from(b("abcd")).weight(), 4);
        assert_eq!(Multipart::new().weight(), 0);
    }

    #[test]
    fn frames_can_be_replaced_in_place() {
        let mut m = Multipart::from(b("old"));
        m[0] = b("new");
        assert_eq!(m, [b("new")]);
        let mut m: Multipart = vec![b("id"), b("body")].into();
        m[1] = b("reply");
        assert_eq!(m, [b("id"), b("reply")]);
    }

    #[test]
    fn debug_lists_the_frames() {
        let m: Multipart = vec![b("a"), b("b")].into();
        assert_eq!(format!("{m:?}"), r#"[b"a", b"b"]"#);
    }
}

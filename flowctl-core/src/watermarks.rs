//! High and low watermarks in bytes.

use crate::FlowError;

/// Byte thresholds of a buffer: a producer pauses when the buffer holds more
/// than [`high`](Watermarks::high) bytes and resumes only once it is back at or
/// below [`low`](Watermarks::low).
///
/// The gap between the two is the hysteresis: it stops a producer and a
/// consumer from waking each other for every item. `low = 0` is allowed (resume
/// only when drained); `low == high` gives no hysteresis at all.
///
/// ```
/// use flowctl_core::Watermarks;
/// use flowctl_core::prelude::*;
/// let wm = Watermarks::new(64 * 1024, 256 * 1024)?;
/// assert_eq!((wm.low(), wm.high()), (65536, 262144));
/// assert!(Watermarks::new(10, 5).is_err());
/// # Ok::<(), flowctl_core::FlowError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Watermarks {
    low: usize,
    high: usize,
}

impl Watermarks {
    /// Creates watermarks; fails with [`FlowError::InvalidWatermarks`] unless
    /// `low <= high && high > 0`.
    pub fn new(low: usize, high: usize) -> Result<Self, FlowError> {
        if low <= high && high > 0 {
            Ok(Watermarks { low, high })
        } else {
            Err(FlowError::InvalidWatermarks { low, high })
        }
    }

    /// Resume threshold: a paused producer is woken when buffered bytes fall to this or below.
    pub fn low(&self) -> usize {
        self.low
    }

    /// Pause threshold: a producer is paused while buffered bytes exceed this.
    pub fn high(&self) -> usize {
        self.high
    }
}

impl Default for Watermarks {
    /// `low = 128 KiB`, `high = 512 KiB`.
    ///
    /// Chosen with the `watermarks` sweep of `cargo bench -p flowctl-bench`
    /// (a pipe of 64 KiB chunks, high from 64 KiB to 4 MiB, low = high / 4):
    /// throughput is flat from 64 KiB up to 512 KiB and falls above it on two
    /// worker threads (0.82x at 1 MiB, 0.68x at 4 MiB: the chunks stop fitting
    /// in cache). 512 KiB is the largest value that costs nothing, and it leaves
    /// the most headroom for a consumer that pauses now and then; a low of a
    /// quarter of it keeps wake-ups rare without letting the consumer run dry.
    fn default() -> Self {
        Watermarks {
            low: 128 * 1024,
            high: 512 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates() {
        assert!(Watermarks::new(0, 1).is_ok());
        assert!(Watermarks::new(5, 5).is_ok());
        assert!(matches!(
            Watermarks::new(0, 0),
            Err(FlowError::InvalidWatermarks { low: 0, high: 0 })
        ));
        let err = Watermarks::new(9, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid watermarks: low 9 must not exceed high 3, and high must be greater than 0"
        );
    }

    #[test]
    fn default_is_valid() {
        let wm = Watermarks::default();
        assert!(Watermarks::new(wm.low(), wm.high()).is_ok());
    }
}

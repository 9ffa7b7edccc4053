//! End-to-end checking: every message carries its producer, a sequence number,
//! the time it was sent and a checksum; the checker finds what was lost,
//! duplicated, reordered or corrupted.

use std::collections::{BTreeSet, HashMap};

use bytes::{BufMut, Bytes, BytesMut};

/// Producer id, sequence, send time in µs, payload length.
const HEADER: usize = 4 + 8 + 8 + 4;
const TRAILER: usize = 8;

/// The smallest message [`encode`] makes.
pub(crate) const MIN_MESSAGE: usize = HEADER + TRAILER;

fn fnv(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in data {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A message of `len` bytes in all (at least [`MIN_MESSAGE`]).
pub(crate) fn encode(producer: u32, seq: u64, sent_us: u64, len: usize) -> Bytes {
    let payload = len.saturating_sub(MIN_MESSAGE);
    let mut b = BytesMut::with_capacity(MIN_MESSAGE + payload);
    b.put_u32(producer);
    b.put_u64(seq);
    b.put_u64(sent_us);
    b.put_u32(payload as u32);
    // Payload bytes derived from the sequence so corruption is detectable.
    b.extend((0..payload).map(|i| (seq as usize).wrapping_add(i) as u8));
    let sum = fnv(&b);
    b.put_u64(sum);
    b.freeze()
}

/// What a message says about itself, if its checksum holds.
pub(crate) struct Decoded {
    pub(crate) producer: u32,
    pub(crate) seq: u64,
    pub(crate) sent_us: u64,
}

pub(crate) fn decode(msg: &[u8]) -> Option<Decoded> {
    if msg.len() < MIN_MESSAGE {
        return None;
    }
    let (body, sum) = msg.split_at(msg.len() - TRAILER);
    if fnv(body) != u64::from_be_bytes(sum.try_into().ok()?) {
        return None;
    }
    let payload = u32::from_be_bytes(body[20..24].try_into().ok()?) as usize;
    if payload != body.len() - HEADER {
        return None;
    }
    Some(Decoded {
        producer: u32::from_be_bytes(body[0..4].try_into().ok()?),
        seq: u64::from_be_bytes(body[4..12].try_into().ok()?),
        sent_us: u64::from_be_bytes(body[12..20].try_into().ok()?),
    })
}

#[derive(Debug, Default)]
struct Track {
    /// Next sequence number expected in order.
    next: u64,
    /// Sequence numbers skipped over, not seen yet.
    missing: BTreeSet<u64>,
}

/// Counts of everything that went wrong end to end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) messages: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) reordered: u64,
    pub(crate) corrupted: u64,
}

/// Follows every producer's sequence as messages arrive.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    tracks: HashMap<u32, Track>,
    tally: Tally,
    latencies_us: Vec<u64>,
}

impl Checker {
    /// Records one received message; `now_us` is on the same clock as `sent_us`.
    pub(crate) fn observe(&mut self, msg: &[u8], now_us: u64) {
        self.tally.messages += 1;
        let Some(d) = decode(msg) else {
            self.tally.corrupted += 1;
            return;
        };
        self.latencies_us.push(now_us.saturating_sub(d.sent_us));
        let t = self.tracks.entry(d.producer).or_default();
        if d.seq == t.next {
            t.next += 1;
        } else if d.seq > t.next {
            t.missing.extend(t.next..d.seq);
            t.next = d.seq + 1;
        } else if t.missing.remove(&d.seq) {
            self.tally.reordered += 1;
        } else {
            self.tally.duplicated += 1;
        }
    }

    /// The tally, given how many messages each producer had sent in all.
    pub(crate) fn finish(&self, sent: &HashMap<u32, u64>) -> Tally {
        let mut tally = self.tally;
        for (producer, total) in sent {
            match self.tracks.get(producer) {
                Some(t) => tally.lost += t.missing.len() as u64 + total.saturating_sub(t.next),
                None => tally.lost += total,
            }
        }
        tally
    }

    /// End-to-end latencies seen so far, in µs.
    pub(crate) fn latencies_us(&self) -> &[u64] {
        &self.latencies_us
    }
}

/// The `q` quantile (0.0..=1.0) of `values`, 0 when empty.
pub(crate) fn quantile(values: &[u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(n: u64) -> HashMap<u32, u64> {
        HashMap::from([(1, n)])
    }

    #[test]
    fn clean_stream() {
        let mut c = Checker::default();
        for s in 0..10 {
            c.observe(&encode(1, s, 0, 100), 5);
        }
        assert_eq!(
            c.finish(&sent(10)),
            Tally {
                messages: 10,
                ..Tally::default()
            }
        );
    }

    #[test]
    fn loss_duplication_reordering_corruption() {
        let mut c = Checker::default();
        for s in [0, 1, 3, 2, 3, 5] {
            c.observe(&encode(1, s, 0, 64), 1);
        }
        let mut bad = encode(1, 6, 0, 64).to_vec();
        bad[30] ^= 1;
        c.observe(&bad, 1);
        let t = c.finish(&sent(8));
        // 4 never came, 6 was corrupted (so missing), 7 never sent by the stream end.
        assert_eq!(
            (t.lost, t.duplicated, t.reordered, t.corrupted),
            (3, 1, 1, 1)
        );
    }

    #[test]
    fn quantiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 51);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&[], 0.99), 0);
    }
}

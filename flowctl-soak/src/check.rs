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
    /// Messages a producer handed to an at-most-once path that was cut
    /// (a dropped SSH connection) after the last one received from it:
    /// reported, not counted as `lost` (see [`Checker::cut`]).
    pub(crate) in_flight_lost: u64,
    /// Messages an at-most-once path dropped by design and counted where it
    /// dropped them (a ZeroMQ PUB at its HWM: `ZmqStats::dropped`), so that
    /// what was received plus these accounts for everything sent: reported,
    /// not a violation.
    pub(crate) dropped_at_most_once: u64,
}

/// Follows every producer's sequence as messages arrive.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    tracks: HashMap<u32, Track>,
    tally: Tally,
    /// A uniform sample of end-to-end latencies (reservoir sampling), so a
    /// long soak keeps constant memory: one entry per message would be
    /// hundreds of MB after ten minutes.
    latencies_us: Vec<u64>,
    /// Latencies offered to the sample so far.
    latencies_seen: u64,
}

/// Latencies kept by each [`Checker`]: enough for a stable p99.
const LATENCY_SAMPLE: usize = 65_536;

impl Checker {
    /// Distinct intact messages received so far: duplicates and corrupted
    /// ones do not count towards "everything has come".
    pub(crate) fn distinct(&self) -> u64 {
        self.tally.messages - self.tally.duplicated - self.tally.corrupted
    }

    /// Records one received message; `now_us` is on the same clock as `sent_us`.
    pub(crate) fn observe(&mut self, msg: &[u8], now_us: u64) {
        self.observe_decoded(decode(msg).as_ref(), now_us);
    }

    /// Records one received message that was already [`decode`]d (off the
    /// runtime's thread); `None` means its checksum did not hold.
    pub(crate) fn observe_decoded(&mut self, decoded: Option<&Decoded>, now_us: u64) {
        self.tally.messages += 1;
        let Some(d) = decoded else {
            self.tally.corrupted += 1;
            return;
        };
        self.sample_latency(now_us.saturating_sub(d.sent_us));
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

    /// Declares that `producer`'s stream was cut (its connection dropped)
    /// after it had handed `sent` messages to the transport, and returns how
    /// many of them count as sent for [`finish`](Checker::finish): those up
    /// to the last one received in order. The rest, the tail that was in
    /// flight when the connection went, is added to `in_flight_lost`. A gap
    /// before that point is still `lost`: an ordered stream that is cut loses
    /// a tail, never a message in the middle.
    pub(crate) fn cut(&mut self, producer: u32, sent: u64) -> u64 {
        let received = self.tracks.get(&producer).map_or(0, |t| t.next);
        self.tally.in_flight_lost += sent.saturating_sub(received);
        received.min(sent)
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

    /// A uniform sample of the end-to-end latencies seen so far, in µs.
    fn sample_latency(&mut self, us: u64) {
        self.latencies_seen += 1;
        if self.latencies_us.len() < LATENCY_SAMPLE {
            self.latencies_us.push(us);
        } else {
            // Deterministic, so that a seeded run repeats: a multiplicative hash of the count.
            let j = (self.latencies_seen.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11)
                % self.latencies_seen;
            if let Some(slot) = self.latencies_us.get_mut(j as usize) {
                *slot = us;
            }
        }
    }

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
    fn a_cut_stream_reports_its_tail_apart_from_losses() {
        let mut c = Checker::default();
        for s in [0, 1, 3, 4] {
            c.observe(&encode(1, s, 0, 64), 1);
        }
        // 9 were handed over before the cut: 5..9 were in flight.
        let counted = c.cut(1, 9);
        assert_eq!(counted, 5);
        let t = c.finish(&sent(counted));
        assert_eq!((t.messages, t.lost, t.in_flight_lost), (4, 1, 4));
    }

    #[test]
    fn the_latency_sample_is_bounded_and_spans_the_run() {
        let mut c = Checker::default();
        let n = 4 * LATENCY_SAMPLE as u64;
        for i in 0..n {
            c.sample_latency(i);
        }
        assert_eq!(c.latencies_us().len(), LATENCY_SAMPLE);
        // Late values replaced early ones: the sample's median is near the run's.
        let median = quantile(c.latencies_us(), 0.5);
        assert!(
            median > n / 3 && median < 2 * n / 3,
            "median {median} of 0..{n}"
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

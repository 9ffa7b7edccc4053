//! Issue 15, "inputs a peer controls": `Framed` fed arbitrary bytes in
//! arbitrary chunks, with tokio-util's `LengthDelimitedCodec` (its frames
//! kept by the consumer, or dropped as they arrive so that the receive
//! buffer is reused), a `LinesCodec` with a maximum length, and a custom
//! decoder. For every input: no panic, the receive buffer never holds or
//! allocates more than the limit plus one chunk (plus a length header), every
//! complete frame before an error comes out in order, and an error for a
//! frame too large names the limit.

use bytes::{Buf, Bytes, BytesMut};
use flowctl_core::compat::StreamSource;
use flowctl_core::frame::Framed;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Weighted};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, LengthDelimitedCodec, LinesCodec};

/// 10,000 cases per property, as issue 15 asks.
const CASES: u32 = 10_000;

/// What a decoder made of a whole input: the frames, then how it ended.
#[derive(Debug, PartialEq)]
enum End {
    Eof,
    TooLarge { size: usize, limit: usize },
    Truncated(usize),
    Decode,
}

/// `input` cut into chunks of the given sizes (cycled), as one source.
fn chunks(input: &[u8], sizes: &[usize]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let (mut pos, mut i) = (0, 0);
    while pos < input.len() {
        let n = sizes[i % sizes.len()].min(input.len() - pos);
        out.push(Bytes::copy_from_slice(&input[pos..pos + n]));
        pos += n;
        i += 1;
    }
    out
}

/// Runs `Framed` over the chunks; checks the memory bound after every call.
fn run<D>(
    input: &[u8],
    sizes: &[usize],
    decoder: D,
    max_buffer: usize,
    bound: usize,
) -> Result<(Vec<D::Item>, End), TestCaseError>
where
    D: Decoder + Send + 'static,
    D::Item: Weighted + Send + 'static,
    D::Error: Into<flowctl_core::BoxError>,
{
    run_map(input, sizes, decoder, max_buffer, bound, |frame| frame)
}

/// [`run`], passing each frame through `map` as soon as it arrives: a `map`
/// that copies the frame drops it before the next call, as a consumer that
/// is done with each frame does (the receive buffer can then be reused).
fn run_map<D, T>(
    input: &[u8],
    sizes: &[usize],
    decoder: D,
    max_buffer: usize,
    bound: usize,
    mut map: impl FnMut(D::Item) -> T,
) -> Result<(Vec<T>, End), TestCaseError>
where
    D: Decoder + Send + 'static,
    D::Item: Weighted + Send + 'static,
    D::Error: Into<flowctl_core::BoxError>,
{
    let src = StreamSource::new(futures::stream::iter(chunks(input, sizes)));
    let mut framed = Framed::new(src, decoder).max_buffer(max_buffer);
    let mut frames = Vec::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| TestCaseError::fail(format!("runtime: {e}")))?;
    let end = rt.block_on(async {
        loop {
            let res = framed.recv().await;
            prop_assert!(
                framed.capacity() <= bound,
                "capacity {} above the bound {bound}",
                framed.capacity()
            );
            match res {
                Ok(Some(frame)) => frames.push(map(frame)),
                Ok(None) => return Ok(End::Eof),
                Err(FlowError::FrameTooLarge { size, limit }) => {
                    return Ok(End::TooLarge { size, limit });
                }
                Err(FlowError::Truncated { remaining }) => return Ok(End::Truncated(remaining)),
                Err(e @ (FlowError::Decode(_) | FlowError::Io(_))) => {
                    prop_assert!(
                        !e.is_transient(),
                        "a protocol violation is not transient: {e}"
                    );
                    return Ok(End::Decode);
                }
                Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e}"))),
            }
        }
    })?;
    // After the end, the stream stays over.
    prop_assert!(matches!(rt.block_on(framed.recv()), Ok(None)));
    Ok((frames, end))
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1..64usize, 1..8)
}

/// Length-prefixed frames (u32 big endian), some above the limit, possibly
/// cut short; or plain garbage.
fn length_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (proptest::collection::vec(0..400usize, 0..8), any::<usize>()).prop_map(|(sizes, cut)| {
            let mut wire = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                wire.extend_from_slice(&(*n as u32).to_be_bytes());
                wire.extend(std::iter::repeat_n(i as u8, *n));
            }
            let cut = if wire.is_empty() {
                0
            } else {
                cut % (wire.len() + 1)
            };
            if cut % 3 == 0 {
                wire
            } else {
                wire[..cut].to_vec()
            }
        }),
        proptest::collection::vec(any::<u8>(), 0..600),
    ]
}

/// The reference: what a length-prefixed stream holds, read in one piece.
fn length_model(input: &[u8], limit: usize) -> (Vec<Vec<u8>>, End) {
    let mut buf = input;
    let mut frames = Vec::new();
    loop {
        if buf.len() < 4 {
            let end = if buf.is_empty() {
                End::Eof
            } else {
                End::Truncated(buf.len())
            };
            return (frames, end);
        }
        let n = buf.get_u32() as usize;
        if n > limit {
            return (frames, End::TooLarge { size: n, limit });
        }
        if buf.len() < n {
            return (frames, End::Truncated(buf.len()));
        }
        frames.push(buf[..n].to_vec());
        buf.advance(n);
    }
}

/// A peer's own framing: a one-byte length, then that many bytes; a length
/// of 255 is a protocol error (`InvalidData`, as tokio-util's codecs report).
#[derive(Debug, Clone)]
struct TinyFrames;

impl Decoder for TinyFrames {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> std::io::Result<Option<BytesMut>> {
        let Some(&n) = src.first() else {
            return Ok(None);
        };
        if n == 255 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "length byte 255 is reserved",
            ));
        }
        if src.len() < 1 + n as usize {
            return Ok(None);
        }
        src.advance(1);
        Ok(Some(src.split_to(n as usize)))
    }
}

/// The reference run of any decoder: the whole input in one buffer.
/// Ends with the bytes left over, or the decoder's error message.
fn whole<D: Decoder>(mut decoder: D, input: &[u8]) -> (Vec<D::Item>, Result<usize, String>)
where
    D::Error: std::fmt::Display,
{
    let mut buf = BytesMut::from(input);
    let mut frames = Vec::new();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(e) => return (frames, Err(e.to_string())),
        }
    }
    loop {
        match decoder.decode_eof(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, Ok(buf.len())),
            Err(_) => return (frames, Ok(buf.len().max(1))),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn length_delimited_frames_in_any_chunks(
        input in length_input(),
        sizes in chunk_sizes(),
        limit in 1..300usize,
    ) {
        let max_chunk = *sizes.iter().max().unwrap();
        let bound = limit + max_chunk + 4;
        let (frames, end) = run(&input, &sizes, LengthDelimitedCodec::new(), limit, bound)?;
        let (want, want_end) = length_model(&input, limit);
        let frames: Vec<Vec<u8>> = frames.iter().map(|f| f.to_vec()).collect();
        prop_assert_eq!(frames, want, "every complete frame, in order");
        prop_assert_eq!(end, want_end);
    }

    #[test]
    fn length_delimited_frames_dropped_on_arrival_in_any_chunks(
        input in length_input(),
        sizes in chunk_sizes(),
        limit in 1..300usize,
    ) {
        // Each frame is copied out and dropped at once: the buffer the
        // frames were split from is then Framed's alone, and reused.
        let max_chunk = *sizes.iter().max().unwrap();
        let bound = limit + max_chunk + 4;
        let codec = LengthDelimitedCodec::new();
        let (frames, end) = run_map(&input, &sizes, codec, limit, bound, |f| f.to_vec())?;
        let (want, want_end) = length_model(&input, limit);
        prop_assert_eq!(frames, want, "every complete frame, in order");
        prop_assert_eq!(end, want_end);
    }

    #[test]
    fn lines_with_a_maximum_length_in_any_chunks(
        input in proptest::collection::vec(prop_oneof![
            6 => b'a'..=b'c', 2 => Just(b'\n'), 1 => Just(b'\r'), 1 => Just(0xffu8),
        ], 0..600),
        sizes in chunk_sizes(),
        max_len in 1..80usize,
    ) {
        let max_chunk = *sizes.iter().max().unwrap();
        // Framed's own limit is above the codec's: the codec's maximum decides.
        let max_buffer = 2 * max_len + 1;
        let bound = max_buffer + max_chunk;
        let (lines, end) = run(&input, &sizes, LinesCodec::new_with_max_length(max_len), max_buffer, bound)?;
        let (want, want_end) = whole(LinesCodec::new_with_max_length(max_len), &input);
        prop_assert_eq!(&lines, &want, "every complete line, in order");
        for line in &lines {
            prop_assert!(line.len() <= max_len);
        }
        match (end, want_end) {
            (End::Eof, Ok(0)) => {}
            // Bytes after the last newline that the codec does not make a line of (a lone `\r`).
            (End::Truncated(n), Ok(m)) if n == m => {}
            // The codec's error: a line too long (naming its maximum) or not UTF-8.
            (End::TooLarge { size, limit }, Err(e)) => {
                prop_assert_eq!(e, "max line length exceeded");
                prop_assert_eq!(limit, max_len);
                prop_assert!(size > max_len && size <= max_len + max_chunk, "size {}", size);
            }
            (End::Decode, Err(e)) => prop_assert_ne!(e, "max line length exceeded"),
            (End::Decode, Ok(n)) if n > 0 => {} // the last line is not UTF-8
            (end, want) => prop_assert!(false, "ended with {:?}, the whole input with {:?}", end, want),
        }
    }

    #[test]
    fn a_custom_decoder_in_any_chunks(
        input in proptest::collection::vec(any::<u8>(), 0..600),
        sizes in chunk_sizes(),
        max_buffer in 1..300usize,
    ) {
        let max_chunk = *sizes.iter().max().unwrap();
        let bound = max_buffer + max_chunk;
        let (frames, end) = run(&input, &sizes, TinyFrames, max_buffer, bound)?;
        let (want, want_end) = whole(TinyFrames, &input);
        prop_assert!(frames.len() <= want.len());
        prop_assert_eq!(&frames[..], &want[..frames.len()], "a prefix of the frames, in order");
        match end {
            // Every frame came out, then the same ending as the whole input.
            End::Eof => prop_assert_eq!((frames.len(), want_end), (want.len(), Ok(0))),
            End::Decode => {
                prop_assert_eq!(frames.len(), want.len());
                prop_assert!(want_end.is_err(), "{:?}", want_end);
            }
            End::Truncated(n) => prop_assert_eq!((frames.len(), want_end), (want.len(), Ok(n))),
            // More than max_buffer bytes arrived without a complete frame:
            // the error names the limit, and the bytes held are bounded.
            End::TooLarge { size, limit } => {
                prop_assert_eq!(limit, max_buffer);
                prop_assert!(size > max_buffer && size <= max_buffer + max_chunk, "size {}", size);
            }
        }
    }
}

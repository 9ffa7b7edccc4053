use bytes::{BufMut, Bytes, BytesMut};
use flowctl_core::FlowError;
use flowctl_core::compat::StreamSource;
use flowctl_core::frame::Framed;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use tokio_util::codec::{LengthDelimitedCodec, LinesCodec};

/// Length-prefixed frames of sizes 0..n, each filled with its index.
fn encoded(n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
    let frames: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; i * 7 % 300]).collect();
    let mut wire = BytesMut::new();
    for f in &frames {
        wire.put_u32(f.len() as u32);
        wire.put_slice(f);
    }
    (frames, wire.to_vec())
}

fn chunked(
    wire: &[u8],
    size: usize,
) -> StreamSource<futures::stream::Iter<std::vec::IntoIter<Bytes>>> {
    let chunks: Vec<Bytes> = wire.chunks(size).map(Bytes::copy_from_slice).collect();
    StreamSource::new(futures::stream::iter(chunks))
}

#[tokio::test]
async fn frames_split_anywhere_across_chunks_come_out_whole_and_in_order() {
    let (frames, wire) = encoded(200);
    for size in [1, 2, 3, 5, 64, 1000, wire.len()] {
        let mut framed = Framed::new(chunked(&wire, size), LengthDelimitedCodec::new());
        for (i, f) in frames.iter().enumerate() {
            let got = framed
                .recv()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("frame {i} missing"));
            assert_eq!(&got[..], &f[..], "frame {i} with chunks of {size}");
        }
        assert_eq!(framed.recv().await.unwrap(), None);
        assert_eq!(framed.buffered(), 0);
    }
}

#[tokio::test]
async fn an_oversized_frame_is_an_error_naming_size_and_limit_after_the_frames_before_it() {
    let mut wire = BytesMut::new();
    for _ in 0..3 {
        wire.put_u32(10);
        wire.put_slice(&[1; 10]);
    }
    wire.put_u32(1_000_000); // claims a 1 MB frame
    wire.put_slice(&[2; 5000]);
    let mut framed =
        Framed::new(chunked(&wire, 1024), LengthDelimitedCodec::new()).max_buffer(4096);
    for _ in 0..3 {
        assert_eq!(framed.recv().await.unwrap().unwrap().len(), 10);
    }
    let err = framed.recv().await.unwrap_err();
    match err {
        FlowError::FrameTooLarge { size, limit } => {
            assert_eq!((size, limit), (1_000_000, 4096), "the declared size");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(
        framed.recv().await.unwrap().is_none(),
        "the stream is over after the error"
    );
}

#[tokio::test]
async fn a_decoder_error_is_reported_after_the_good_frames() {
    let text = "short\nok\nthis line is far too long for the codec\nnever\n";
    let src = StreamSource::new(futures::stream::iter(vec![Bytes::from(text)]));
    let mut lines = Framed::new(src, LinesCodec::new_with_max_length(10));
    assert_eq!(lines.recv().await.unwrap().as_deref(), Some("short"));
    assert_eq!(lines.recv().await.unwrap().as_deref(), Some("ok"));
    let err = lines.recv().await.unwrap_err();
    assert!(
        matches!(err, FlowError::FrameTooLarge { limit: 10, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_decoder_error_is_decode_and_not_transient() {
    let src = StreamSource::new(futures::stream::iter(vec![Bytes::from_static(
        b"ok\n\xff\xfe\n",
    )]));
    let mut lines = Framed::new(src, LinesCodec::new());
    assert_eq!(lines.recv().await.unwrap().as_deref(), Some("ok"));
    let err = lines.recv().await.unwrap_err();
    assert!(matches!(err, FlowError::Decode(_)), "{err}");
    assert!(!err.is_transient(), "a protocol violation is not retried");
}

/// Issue 15, item 5: `LengthDelimitedCodec::new()` fed a header declaring
/// 9,000,000 bytes gave `Io(InvalidData, "frame size too big")`, which
/// `is_transient()` called transient, instead of the error the docs promise.
#[tokio::test]
async fn a_header_declaring_9000000_bytes_is_frame_too_large_naming_the_declared_size() {
    let mut wire = BytesMut::new();
    wire.put_u32(3);
    wire.put_slice(b"abc");
    wire.put_u32(9_000_000);
    wire.put_slice(&[0; 100]);
    let mut framed = Framed::new(chunked(&wire, 16), LengthDelimitedCodec::new());
    assert_eq!(&framed.recv().await.unwrap().unwrap()[..], b"abc");
    let err = framed.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            FlowError::FrameTooLarge {
                size: 9_000_000,
                limit: 8_388_608
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "frame of 9000000 bytes exceeds the 8388608 byte limit"
    );
    assert!(!err.is_transient(), "a protocol violation is not retried");
    assert!(
        framed.capacity() < 1024,
        "nothing reserved for the frame: {}",
        framed.capacity()
    );
    assert!(framed.recv().await.unwrap().is_none(), "the stream is over");
}

/// Issue 15, item 5: below the codec's maximum, the codec reserved the
/// declared length before `max_buffer` was checked, and the error named the
/// bytes buffered so far. Now a frame of exactly the limit passes, one byte
/// more fails at its header, and the buffer never outgrows limit + one chunk.
#[tokio::test]
async fn frames_just_below_at_and_above_the_limit() {
    const LIMIT: usize = 4096;
    for chunk in [1, 7, 100, 5000] {
        for size in [LIMIT - 1, LIMIT, LIMIT + 1] {
            let mut wire = BytesMut::new();
            wire.put_u32(size as u32);
            wire.put_slice(&vec![5u8; size]);
            let mut framed =
                Framed::new(chunked(&wire, chunk), LengthDelimitedCodec::new()).max_buffer(LIMIT);
            let res = framed.recv().await;
            assert!(
                framed.capacity() <= LIMIT + chunk.max(4),
                "capacity {} with chunks of {chunk}",
                framed.capacity()
            );
            if size <= LIMIT {
                assert_eq!(res.unwrap().unwrap().len(), size);
                assert!(framed.recv().await.unwrap().is_none());
            } else {
                let err = res.unwrap_err();
                assert!(
                    matches!(err, FlowError::FrameTooLarge { size: s, limit: LIMIT } if s == size),
                    "{err}"
                );
            }
        }
    }
}

/// The declared size is read from a header of any layout the codec accepts.
#[tokio::test]
async fn the_declared_size_is_read_from_a_custom_header_layout() {
    let codec = || {
        LengthDelimitedCodec::builder()
            .length_field_offset(1)
            .length_field_length(3)
            .little_endian()
            .max_frame_length(1000)
            .new_codec()
    };
    let mut wire = BytesMut::new();
    wire.put_u8(0xaa);
    wire.put_uint_le(5, 3);
    wire.put_slice(b"hello");
    wire.put_u8(0xaa);
    wire.put_uint_le(70_000, 3);
    wire.put_slice(&[1; 10]);
    // The codec's own maximum (1000) is smaller than max_buffer: it is the limit.
    let mut framed = Framed::new(chunked(&wire, 3), codec());
    assert_eq!(&framed.recv().await.unwrap().unwrap()[..], b"hello");
    let err = framed.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            FlowError::FrameTooLarge {
                size: 70_000,
                limit: 1000
            }
        ),
        "{err}"
    );
    // max_buffer below the codec's maximum is the limit.
    let mut framed = Framed::new(chunked(&wire, 3), codec()).max_buffer(4);
    let err = framed.recv().await.unwrap_err();
    assert!(
        matches!(err, FlowError::FrameTooLarge { size: 5, limit: 4 }),
        "{err}"
    );
}

/// The codec's default 4-byte field, little endian: read as such (a big
/// endian read of 70,000 would be 1,879,113,984).
#[tokio::test]
async fn the_declared_size_is_read_from_a_four_byte_little_endian_header() {
    let codec = || {
        LengthDelimitedCodec::builder()
            .little_endian()
            .max_frame_length(100_000)
            .new_codec()
    };
    let mut wire = BytesMut::new();
    wire.put_u32_le(5);
    wire.put_slice(b"hello");
    wire.put_u32_le(70_000);
    wire.put_slice(&[1; 10]);
    let mut framed = Framed::new(chunked(&wire, 3), codec()).max_buffer(1000);
    assert_eq!(&framed.recv().await.unwrap().unwrap()[..], b"hello");
    let err = framed.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            FlowError::FrameTooLarge {
                size: 70_000,
                limit: 1000
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_stream_ending_inside_a_frame_is_truncated_not_silently_dropped() {
    let mut wire = BytesMut::new();
    wire.put_u32(4);
    wire.put_slice(b"full");
    wire.put_u32(100);
    wire.put_slice(b"only 13 bytes");
    let mut framed = Framed::new(chunked(&wire, 7), LengthDelimitedCodec::new());
    assert_eq!(&framed.recv().await.unwrap().unwrap()[..], b"full");
    let err = framed.recv().await.unwrap_err();
    // The codec has already consumed the 4-byte length header into its state.
    assert!(
        matches!(err, FlowError::Truncated { remaining: 13 }),
        "{err}"
    );
}

#[tokio::test]
async fn a_whole_frame_in_one_unshared_chunk_is_adopted_without_copying() {
    let mut wire = BytesMut::new();
    wire.put_u32(60_000);
    wire.put_slice(&[9; 60_000]);
    let chunk = wire.freeze();
    let payload_addr = chunk[4..].as_ptr() as usize;
    let src = StreamSource::new(futures::stream::iter(vec![chunk]));
    let mut framed = Framed::new(src, LengthDelimitedCodec::new());
    let frame = framed.recv().await.unwrap().unwrap();
    assert_eq!(frame.len(), 60_000);
    assert_eq!(
        frame.as_ptr() as usize,
        payload_addr,
        "the frame points into the received chunk"
    );
}

/// Found by the property tests: a length header followed by none of its bytes
/// at the end of the stream was a clean end (the codec had consumed the
/// header, so its buffer was empty), silently losing the frame.
#[tokio::test]
async fn a_stream_ending_right_after_a_length_header_is_truncated() {
    let mut wire = BytesMut::new();
    wire.put_u32(2);
    wire.put_slice(b"ok");
    wire.put_u32(5);
    let mut framed = Framed::new(chunked(&wire, 3), LengthDelimitedCodec::new());
    assert_eq!(&framed.recv().await.unwrap().unwrap()[..], b"ok");
    let err = framed.recv().await.unwrap_err();
    assert!(
        matches!(err, FlowError::Truncated { remaining: 0 }),
        "{err}"
    );
}

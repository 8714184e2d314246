//! Fuzz target for the frame decoder: arbitrary bytes, split into arbitrary chunks, fed to
//! a `FrameBuffer` for each direction (agent and hub messages), and to `decode_body`
//! directly.
//!
//! Checks that decoding never panics, that the buffer's invariants hold (a partial frame
//! never exceeds one frame's worth, `wanted` agrees with `next`), and that every message
//! that decodes re-encodes and decodes to an equal value. It must not do anything but
//! call the codec: no IO, no global state, so every crash reproduces from its input alone.

#![no_main]

use gantry_shared::frame::{self, FrameBuffer, LENGTH_PREFIX_BYTES};
use gantry_shared::message::{AgentMessage, HubMessage};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

/// Frame cap for the buffers under test: small, so the fuzzer reaches the limit.
const MAX_FRAME: usize = 64 * 1024;
/// At most this many chunk sizes are taken from the input's first bytes.
const MAX_SPLITS: usize = 8;

/// A decoded message must survive an encode/decode round trip unchanged.
fn assert_round_trip<T>(message: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = match frame::encode_to_vec(message, MAX_FRAME) {
        Ok(bytes) => bytes,
        Err(e) => panic!("decoded message does not re-encode: {e}: {message:?}"),
    };
    let mut buf = FrameBuffer::new(MAX_FRAME);
    buf.extend(&bytes);
    match buf.next_message::<T>() {
        Ok(Some(again)) => assert_eq!(&again, message, "round trip changed the message"),
        other => panic!("re-encoded message does not decode: {other:?}: {message:?}"),
    }
    assert_eq!(buf.buffered(), 0, "re-encoded frame left bytes behind");
    assert_eq!(buf.finish(), Ok(()));
}

/// Feed `chunks` of `stream` to a fresh buffer, draining whole messages after each chunk,
/// until the stream ends or the buffer reports an error (after which a real connection
/// is closed, so the buffer is not used again).
fn drive<T>(stream: &[u8], sizes: &[usize])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut buf = FrameBuffer::new(MAX_FRAME);
    let mut rest = stream;
    let mut size = sizes.iter().copied().cycle();
    while !rest.is_empty() {
        let take = size.next().unwrap_or(rest.len()).min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        buf.extend(chunk);
        loop {
            let before = buf.buffered();
            match buf.next_message::<T>() {
                Ok(Some(message)) => {
                    assert!(buf.buffered() < before, "a message was yielded without consuming bytes");
                    assert_round_trip(&message);
                }
                Ok(None) => {
                    assert_eq!(buf.buffered(), before, "waiting for more bytes consumed some");
                    assert!(
                        buf.buffered() < LENGTH_PREFIX_BYTES + MAX_FRAME,
                        "partial frame larger than one frame: {}",
                        buf.buffered()
                    );
                    match buf.wanted() {
                        Ok(wanted) => assert!(wanted > 0, "next wants more bytes but wanted() is 0"),
                        Err(e) => panic!("next waits for more bytes but wanted() fails: {e}"),
                    }
                    break;
                }
                Err(_) => return,
            }
        }
    }
    if buf.buffered() == 0 {
        assert_eq!(buf.finish(), Ok(()));
    } else {
        assert!(buf.finish().is_err(), "bytes left over but finish() is happy");
    }
}

/// Decode `body` directly; if it decodes, it must round-trip.
fn decode_direct<T>(body: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    if let Ok(message) = frame::decode_body::<T>(body) {
        assert_round_trip(&message);
    }
}

fuzz_target!(|data: &[u8]| {
    // Byte 0 says how many of the following bytes are chunk sizes (0..MAX_SPLITS); each
    // size byte `s` means a chunk of `s + 1` bytes, the sizes repeating. With no sizes the
    // stream goes in whole. Everything after the sizes is the stream.
    let Some((&first, after)) = data.split_first() else {
        return;
    };
    let count = usize::from(first) % MAX_SPLITS;
    let count = count.min(after.len());
    let (size_bytes, stream) = after.split_at(count);
    let sizes: Vec<usize> = size_bytes.iter().map(|&s| usize::from(s) + 1).collect();

    drive::<AgentMessage>(stream, &sizes);
    drive::<HubMessage>(stream, &sizes);

    decode_direct::<AgentMessage>(stream);
    decode_direct::<HubMessage>(stream);
    let _ = frame::peek_length(stream, MAX_FRAME);
});

//! Framing: a 4-byte big-endian length prefix, then a bincode-encoded message.
//!
//! Pure functions over byte buffers; the socket side lives in hub and agent. Limits are
//! enforced before anything is allocated: a length prefix above the frame cap is refused
//! without reading the body, bincode decodes under a size limit, and trailing bytes after
//! a message are an error. A partial frame is not an error but [`FrameBuffer::next_message`]
//! answering `Ok(None)`: wait for more bytes.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Default maximum frame body size: 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Hard ceiling for any configured frame size, and bincode's decode limit.
pub const MAX_FRAME_CEILING_BYTES: usize = 16 * 1024 * 1024;

/// bincode configuration for every frame body: standard (varint) encoding with a decode
/// limit, so no claimed length can make the decoder allocate past the ceiling.
fn config() -> bincode::config::Configuration<bincode::config::LittleEndian, bincode::config::Varint, bincode::config::Limit<MAX_FRAME_CEILING_BYTES>> {
    bincode::config::standard().with_limit::<MAX_FRAME_CEILING_BYTES>()
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame is empty")]
    Empty,
    #[error("frame body could not be decoded: {0}")]
    Decode(String),
    #[error("frame body has {extra} trailing bytes after the message")]
    TrailingBytes { extra: usize },
    #[error("stream ended inside a frame ({have} of {need} bytes received)")]
    Truncated { have: usize, need: usize },
    #[error("message could not be encoded: {0}")]
    Encode(String),
}

/// Clamp a configured frame size into `1..=MAX_FRAME_CEILING_BYTES`.
pub fn clamp_max_frame(max: usize) -> usize {
    max.clamp(1, MAX_FRAME_CEILING_BYTES)
}

/// Encode `message` as one frame (length prefix and body) appended to `out`.
pub fn encode<T: Serialize>(message: &T, max_frame: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let max = clamp_max_frame(max_frame);
    let body = bincode::serde::encode_to_vec(message, config()).map_err(|e| FrameError::Encode(e.to_string()))?;
    if body.len() > max {
        return Err(FrameError::TooLarge { len: body.len(), max });
    }
    // The clamp above keeps `body.len()` far below u32::MAX.
    let len = body.len() as u32;
    out.reserve(LENGTH_PREFIX_BYTES + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Encode `message` as one frame into a fresh buffer.
pub fn encode_to_vec<T: Serialize>(message: &T, max_frame: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode(message, max_frame, &mut out)?;
    Ok(out)
}

/// How many bytes a body of `len` bytes may make the decoder claim: four times its length
/// (room for the in-memory overhead of small containers), at least 4 KiB, rounded up to a
/// power of two and at most the ceiling. A length field cannot make the decoder reserve
/// more, so a ten-byte frame claiming a 15 MiB string is refused before any allocation.
pub fn decode_budget(len: usize) -> usize {
    len.saturating_mul(4).clamp(4096, MAX_FRAME_CEILING_BYTES).next_power_of_two()
}

fn decode_with_budget<T: DeserializeOwned>(body: &[u8]) -> Result<(T, usize), bincode::error::DecodeError> {
    use bincode::config::standard;
    use bincode::serde::decode_from_slice as decode;
    // bincode's limit is a const generic: pick the smallest bucket that covers the budget.
    match decode_budget(body.len()) {
        b if b <= 1 << 12 => decode(body, standard().with_limit::<{ 1 << 12 }>()),
        b if b <= 1 << 13 => decode(body, standard().with_limit::<{ 1 << 13 }>()),
        b if b <= 1 << 14 => decode(body, standard().with_limit::<{ 1 << 14 }>()),
        b if b <= 1 << 15 => decode(body, standard().with_limit::<{ 1 << 15 }>()),
        b if b <= 1 << 16 => decode(body, standard().with_limit::<{ 1 << 16 }>()),
        b if b <= 1 << 17 => decode(body, standard().with_limit::<{ 1 << 17 }>()),
        b if b <= 1 << 18 => decode(body, standard().with_limit::<{ 1 << 18 }>()),
        b if b <= 1 << 19 => decode(body, standard().with_limit::<{ 1 << 19 }>()),
        b if b <= 1 << 20 => decode(body, standard().with_limit::<{ 1 << 20 }>()),
        b if b <= 1 << 21 => decode(body, standard().with_limit::<{ 1 << 21 }>()),
        b if b <= 1 << 22 => decode(body, standard().with_limit::<{ 1 << 22 }>()),
        b if b <= 1 << 23 => decode(body, standard().with_limit::<{ 1 << 23 }>()),
        _ => decode(body, config()),
    }
}

/// Decode one frame body (without its prefix). The whole body must be one message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let (message, read) = decode_with_budget::<T>(body).map_err(|e| FrameError::Decode(e.to_string()))?;
    if read != body.len() {
        return Err(FrameError::TrailingBytes { extra: body.len() - read });
    }
    Ok(message)
}

/// Read the length prefix at the start of `buf`, if all four bytes are there, and check
/// it against the cap.
pub fn peek_length(buf: &[u8], max_frame: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX_BYTES) else {
        return Ok(None);
    };
    let mut raw = [0u8; LENGTH_PREFIX_BYTES];
    raw.copy_from_slice(prefix);
    let len = u32::from_be_bytes(raw) as usize;
    let max = clamp_max_frame(max_frame);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(Some(len))
}

/// Accumulates bytes from a stream and yields whole messages.
///
/// The buffer never holds more than one frame's worth (prefix plus at most `max_frame`)
/// beyond what the caller pushes in one go, because the length is checked before the body
/// is awaited.
#[derive(Debug)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    max_frame: usize,
}

impl FrameBuffer {
    pub fn new(max_frame: usize) -> Self {
        FrameBuffer { buf: Vec::new(), max_frame: clamp_max_frame(max_frame) }
    }

    /// The cap this buffer enforces.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Append received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the frame at the front needs, or zero if a whole frame (or
    /// nothing) is buffered. Lets the IO side read exactly what it needs.
    pub fn wanted(&self) -> Result<usize, FrameError> {
        match peek_length(&self.buf, self.max_frame)? {
            None => Ok(LENGTH_PREFIX_BYTES - self.buf.len()),
            Some(len) => Ok((LENGTH_PREFIX_BYTES + len).saturating_sub(self.buf.len())),
        }
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(len) = peek_length(&self.buf, self.max_frame)? else {
            return Ok(None);
        };
        let end = LENGTH_PREFIX_BYTES + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let result = decode_body(&self.buf[LENGTH_PREFIX_BYTES..end]);
        self.buf.drain(..end);
        result.map(Some)
    }

    /// Call when the stream has ended: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let need = match peek_length(&self.buf, self.max_frame)? {
            Some(len) => LENGTH_PREFIX_BYTES + len,
            None => LENGTH_PREFIX_BYTES,
        };
        Err(FrameError::Truncated { have: self.buf.len(), need })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AgentMessage, Heartbeat, HubMessage};

    fn heartbeat() -> AgentMessage {
        AgentMessage::Heartbeat(Heartbeat { seq: 7, agent_clock_unix_ms: 1_700_000_000_000 })
    }

    #[test]
    fn round_trips_a_message() {
        let bytes = encode_to_vec(&heartbeat(), DEFAULT_MAX_FRAME_BYTES).unwrap();
        let mut buf = FrameBuffer::new(DEFAULT_MAX_FRAME_BYTES);
        buf.extend(&bytes);
        assert_eq!(buf.next_message::<AgentMessage>().unwrap(), Some(heartbeat()));
        assert_eq!(buf.buffered(), 0);
        buf.finish().unwrap();
    }

    #[test]
    fn partial_frame_is_incomplete_not_an_error() {
        let bytes = encode_to_vec(&heartbeat(), DEFAULT_MAX_FRAME_BYTES).unwrap();
        let mut buf = FrameBuffer::new(DEFAULT_MAX_FRAME_BYTES);
        for (i, byte) in bytes.iter().enumerate() {
            assert_eq!(buf.next_message::<AgentMessage>().unwrap(), None, "byte {i}");
            buf.extend(&[*byte]);
        }
        assert_eq!(buf.next_message::<AgentMessage>().unwrap(), Some(heartbeat()));
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_the_body_arrives() {
        let mut buf = FrameBuffer::new(1024);
        buf.extend(&(1025u32).to_be_bytes());
        assert_eq!(buf.next_message::<AgentMessage>(), Err(FrameError::TooLarge { len: 1025, max: 1024 }));
        let mut buf = FrameBuffer::new(DEFAULT_MAX_FRAME_BYTES);
        buf.extend(&u32::MAX.to_be_bytes());
        assert!(matches!(buf.next_message::<AgentMessage>(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn encoding_refuses_messages_over_the_cap() {
        let big = AgentMessage::Renew(crate::message::RenewRequest { csr_der: vec![0; 2000] });
        assert!(matches!(encode_to_vec(&big, 1000), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut body = bincode::serde::encode_to_vec(heartbeat(), config()).unwrap();
        body.push(0);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let mut buf = FrameBuffer::new(DEFAULT_MAX_FRAME_BYTES);
        buf.extend(&frame);
        assert_eq!(buf.next_message::<AgentMessage>(), Err(FrameError::TrailingBytes { extra: 1 }));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let garbage = [0xffu8; 32];
        let mut frame = (garbage.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&garbage);
        let mut buf = FrameBuffer::new(DEFAULT_MAX_FRAME_BYTES);
        buf.extend(&frame);
        assert!(matches!(buf.next_message::<HubMessage>(), Err(FrameError::Decode(_))));
    }

    #[test]
    fn truncated_frame_at_end_of_stream_is_an_error() {
        let bytes = encode_to_vec(&heartbeat(), DEFAULT_MAX_FRAME_BYTES).unwrap();
        let mut buf = FrameBuffer::new(DEFAULT_MAX_FRAME_BYTES);
        buf.extend(&bytes[..bytes.len() - 1]);
        assert_eq!(buf.next_message::<AgentMessage>().unwrap(), None);
        assert!(matches!(buf.finish(), Err(FrameError::Truncated { .. })));
    }

    #[test]
    fn huge_claimed_vector_length_does_not_allocate() {
        // Enroll variant (0), then a token id string claiming u64::MAX bytes.
        let body = [0u8, 253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let mut buf = FrameBuffer::new(DEFAULT_MAX_FRAME_BYTES);
        buf.extend(&frame);
        assert!(matches!(buf.next_message::<AgentMessage>(), Err(FrameError::Decode(_))));
    }

    /// Regression: a 10-byte frame once made the decoder reserve 15 MiB (found by fuzzing
    /// with `-malloc_limit_mb=4`). The claim must now hit the decode budget first.
    #[test]
    fn tiny_frame_claiming_megabytes_hits_the_decode_budget() {
        let body = [0x00u8, 0xfc, 0x00, 0x00, 0xf0, 0x00];
        match decode_body::<AgentMessage>(&body) {
            Err(FrameError::Decode(message)) => assert!(message.contains("LimitExceeded"), "{message}"),
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    #[test]
    fn largest_legitimate_messages_fit_the_budget() {
        use crate::message::{EnrollRequest, Enrolled, HostFacts};
        let labels: Vec<(String, String)> = (0..32).map(|i| (format!("k{i}"), String::new())).collect();
        let enrolled =
            HubMessage::Enrolled(Enrolled { agent_id: "a".into(), org: "o".into(), cert_chain_der: vec![vec![1; 10], vec![2; 10]], not_after_unix: 1, labels });
        let bytes = encode_to_vec(&enrolled, DEFAULT_MAX_FRAME_BYTES).unwrap();
        assert_eq!(decode_body::<HubMessage>(&bytes[4..]).unwrap(), enrolled);
        let enroll = AgentMessage::Enroll(EnrollRequest {
            token_id: "t".repeat(64),
            token_secret: "s".repeat(64),
            csr_der: vec![7; 600_000],
            facts: HostFacts::default(),
            labels: Vec::new(),
        });
        let bytes = encode_to_vec(&enroll, DEFAULT_MAX_FRAME_BYTES).unwrap();
        assert_eq!(decode_body::<AgentMessage>(&bytes[4..]).unwrap(), enroll);
    }

    #[test]
    fn decode_budget_is_bounded_by_body_size() {
        assert_eq!(decode_budget(1), 4096);
        assert_eq!(decode_budget(10_000), 65536);
        assert_eq!(decode_budget(usize::MAX), MAX_FRAME_CEILING_BYTES);
    }

    #[test]
    fn empty_frame_is_refused() {
        let mut buf = FrameBuffer::new(DEFAULT_MAX_FRAME_BYTES);
        buf.extend(&0u32.to_be_bytes());
        assert_eq!(buf.next_message::<AgentMessage>(), Err(FrameError::Empty));
    }
}

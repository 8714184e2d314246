//! Framed messages over quinn streams: the socket side of `gantry_shared::frame`.
//!
//! Both the agent and the hub use these two types (the hub links this crate for that and
//! for the quickstart's local agent). Reads are cancel-safe: bytes already received stay in
//! the frame buffer if a `select!` drops the read future, so a message is never torn.

use gantry_shared::frame::{self, FrameBuffer, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest single read from a stream; bounds the buffer beyond one frame.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Why a framed stream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

impl WireError {
    /// Whether the peer broke the protocol (as opposed to the connection going away).
    pub fn is_protocol(&self) -> bool {
        matches!(self, WireError::Frame(_))
    }
}

/// Receiving half of a framed stream.
#[derive(Debug)]
pub struct FramedRecv {
    stream: quinn::RecvStream,
    buffer: FrameBuffer,
}

impl FramedRecv {
    pub fn new(stream: quinn::RecvStream, max_frame: usize) -> Self {
        FramedRecv { stream, buffer: FrameBuffer::new(max_frame) }
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly between
    /// frames. Cancel-safe.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, WireError> {
        loop {
            if let Some(message) = self.buffer.next_message::<T>()? {
                return Ok(Some(message));
            }
            let want = self.buffer.wanted()?.clamp(1, READ_CHUNK_BYTES);
            // quinn hands over its own buffer: an idle stream holds no read buffer of ours
            // (a fixed array here cost 16 KiB per waiting stream on the hub).
            match self.stream.read_chunk(want, true).await? {
                Some(chunk) => self.buffer.extend(&chunk.bytes),
                None => {
                    self.buffer.finish()?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Sending half of a framed stream.
#[derive(Debug)]
pub struct FramedSend {
    stream: quinn::SendStream,
    max_frame: usize,
    scratch: Vec<u8>,
}

impl FramedSend {
    pub fn new(stream: quinn::SendStream, max_frame: usize) -> Self {
        FramedSend { stream, max_frame, scratch: Vec::new() }
    }

    /// Encode and write one message. Not cancel-safe: do not race it in a `select!`.
    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), WireError> {
        self.scratch.clear();
        frame::encode(message, self.max_frame, &mut self.scratch)?;
        self.stream.write_all(&self.scratch).await?;
        Ok(())
    }

    /// Write raw bytes (for tests that speak a broken protocol on purpose).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Finish the stream: the peer reads to the end.
    pub fn finish(&mut self) -> Result<(), WireError> {
        self.stream.finish()?;
        Ok(())
    }
}

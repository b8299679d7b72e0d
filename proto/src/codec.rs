//! The protobuf codec of every Baton service: prost's, except that a
//! message that does not decode is the sender's fault (`INVALID_ARGUMENT`)
//! rather than the receiver's (`INTERNAL`, which tonic says by default).

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The buffer every call starts with, for encoding and for decoding (a
/// heartbeat is about 20 bytes, a hello with a few services 300); a
/// larger message makes it grow to fit. tonic's default is
/// 8 KiB each way, allocated eagerly per call: for a coordinator holding
/// 10,000 agent streams that is 160 MiB of buffers for messages that are
/// mostly under 200 bytes (heartbeats, pings, command updates).
pub const BUFFER_SIZE: usize = 256;

/// Above this many bytes of ready messages a streaming call yields to the
/// runtime (tonic's default).
const YIELD_THRESHOLD: usize = 32 << 10;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// [`ProstCodec`] with malformed messages refused as `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct StrictCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstDecoder::new(buffer_settings()))
    }
}

/// [`ProstDecoder`], with decoding errors as `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| match s.code() {
            Code::Internal => {
                Status::invalid_argument(format!("malformed message: {}", s.message()))
            }
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

//! The protobuf codec of every Keyhold service and client: prost's encoding, with one
//! difference in decoding. A body that does not decode as the call's message (invalid UTF-8
//! in a string, a wrong or unknown wire type, a truncated varint, random bytes) is the
//! caller's bad input, so it is INVALID_ARGUMENT naming the request body, where tonic's own
//! codec says INTERNAL. The check of who may call a method runs before (in the auth layer),
//! so a caller without the right is PERMISSION_DENIED whatever the body holds.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// prost's codec with decode failures as INVALID_ARGUMENT; `tonic-prost-build` writes it into
/// the generated servers and clients (`build.rs`).
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder(PhantomData)
    }
}

/// Decodes one message; a body that is not one is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "request body: not a valid protobuf message of this call: {e}"
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use crate::proto::keyhold::v1 as pb;

    /// The decode errors the codec maps: each of the malformed bodies fails to decode
    /// as a message with a string field (the gRPC round trip is tested in
    /// tests/api_malformed_bodies.rs).
    #[test]
    fn malformed_bodies_do_not_decode() {
        // Field 1 (user_ids, a string) holding invalid UTF-8.
        let bad_utf8 = [0x0a, 0x02, 0xff, 0xfe];
        // Field 1 with wire type 7, which does not exist.
        let wire_type_7 = [0x0f, 0x00];
        // Field 1 as a varint whose continuation bit never ends.
        let truncated = [0x08, 0xff, 0xff];
        for body in [&bad_utf8[..], &wire_type_7[..], &truncated[..]] {
            assert!(pb::GetUserKeysRequest::decode(body).is_err(), "{body:?}");
        }
    }
}

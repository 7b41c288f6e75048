//! How request bytes become messages, and what a client is told when they
//! cannot: the two wire errors tonic would otherwise report with codes the
//! protocol does not document.
//!
//! - [`Codec`] is the prost codec every generated service and client uses
//!   (`build.rs` names it), except that a message that does not parse
//!   (malformed protobuf, a string field that is not UTF-8) is
//!   INVALID_ARGUMENT, not INTERNAL: the fault is the caller's input.
//! - [`TooLargeLayer`] turns tonic's OUT_OF_RANGE for a request over the
//!   message size limit into RESOURCE_EXHAUSTED, the code gRPC itself uses
//!   for an oversized message and the one docs/protocol.md documents. It
//!   rewrites only trailers-only responses (a unary call, or a stream
//!   whose first request is too large), where the status is in the
//!   headers.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::codegen::http;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// The prost codec with input errors reported as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec { _pd: PhantomData }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`; a message that does not parse is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "malformed message: not a valid {}: {e}",
                std::any::type_name::<U>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("message")
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// What tonic's decoder says when a message is over the size limit.
const TOO_LARGE_PREFIX: &str = "Error, decoded message length too large";

/// Maps tonic's OUT_OF_RANGE "message too large" to RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Copy, Default)]
pub struct TooLargeLayer;

impl<S> tower::Layer<S> for TooLargeLayer {
    type Service = tower::util::MapResponse<S, fn(Response) -> Response>;

    fn layer(&self, inner: S) -> Self::Service {
        tower::util::MapResponse::new(inner, too_large_to_exhausted)
    }
}

type Response = http::Response<tonic::body::Body>;

fn too_large_to_exhausted(mut response: Response) -> Response {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != Code::OutOfRange || !status.message().starts_with(TOO_LARGE_PREFIX) {
        return response;
    }
    let detail = status.message()[TOO_LARGE_PREFIX.len()..].trim_start_matches([':', ' ']);
    let replaced = Status::resource_exhausted(format!("request too large: {detail}"));
    // Fails only for a message that is not a valid header value, which
    // this one always is; the original status stands if it ever did.
    let _ = replaced.add_header(response.headers_mut());
    response
}

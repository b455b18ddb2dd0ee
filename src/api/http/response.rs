//! Responses: what is stored of one, how a replay is rebuilt, and reading a body without
//! buffering more than a limit.
//!
//! Invariants: a stored response keeps the status, the allow-listed headers and the body
//! bytes exactly; a body over the limit is never buffered past it: what was read is kept as a
//! prefix and the rest streams to the first caller, while the record notes only that the body
//! was too large (its replays answer with a problem, see `mod.rs`).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{BoxError, IdempotentBody};

/// The header every replay carries.
pub(crate) const REPLAYED: &str = "idempotent-replayed";

/// A response as the store records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Bytes16)>,
    pub body: Bytes16,
    /// Set when the body was over the limit: how many bytes were read before giving up.
    pub omitted_after: Option<u64>,
}

/// Bytes that serialize as one byte string (not a sequence of numbers).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Bytes16(pub Vec<u8>);

impl Serialize for Bytes16 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes16 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Bytes16;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes16, E> {
                Ok(Bytes16(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes16, E> {
                Ok(Bytes16(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Bytes16, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Bytes16(v))
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

impl StoredResponse {
    /// What is stored of a response with `status`, `headers` and `body`: the headers on
    /// `allow`, in order.
    pub(crate) fn new(
        status: StatusCode,
        headers: &HeaderMap,
        allow: &[HeaderName],
        body: Vec<u8>,
        omitted_after: Option<u64>,
    ) -> Self {
        let headers = allow
            .iter()
            .flat_map(|name| {
                headers
                    .get_all(name)
                    .iter()
                    .map(move |v| (name.as_str().to_owned(), Bytes16(v.as_bytes().to_vec())))
            })
            .collect();
        Self {
            status: status.as_u16(),
            headers,
            body: Bytes16(body),
            omitted_after,
        }
    }

    /// The replay of this response: its status, stored headers and body, marked replayed.
    /// `None` if its bytes no longer make a response (never written so; a damaged record).
    pub(crate) fn replay(self) -> Option<Response<IdempotentBody>> {
        let status = StatusCode::from_u16(self.status).ok()?;
        let mut headers = HeaderMap::with_capacity(self.headers.len() + 1);
        for (name, value) in self.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_maybe_shared(Bytes::from(value.0)).ok()?,
            );
        }
        let mut response = Response::new(full(Bytes::from(self.body.0)));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
            .headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
        Some(response)
    }
}

/// A body of bytes already in memory.
pub(crate) fn full(bytes: Bytes) -> IdempotentBody {
    IdempotentBody(
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync(),
    )
}

/// A body of bytes in memory followed by trailers.
pub(crate) fn with_trailers(bytes: Bytes, trailers: Option<HeaderMap>) -> IdempotentBody {
    match trailers {
        None => full(bytes),
        Some(trailers) => IdempotentBody(
            Complete {
                data: Some(bytes),
                trailers: Some(trailers),
            }
            .boxed_unsync(),
        ),
    }
}

/// Data, then trailers.
struct Complete {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Complete {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// Any body, boxed.
pub(crate) fn boxed<B>(body: B) -> IdempotentBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    IdempotentBody(body.map_err(Into::into).boxed_unsync())
}

/// A body read up to a limit.
pub(crate) enum Collected {
    /// The whole body, within the limit, and its trailers if it had any.
    Whole(Bytes, Option<HeaderMap>),
    /// Over the limit: the body as it goes on (what was read, then the rest), unbuffered.
    TooLarge { read: u64, body: IdempotentBody },
    /// Reading failed.
    Failed(BoxError),
}

/// Reads `body` until its end or until more than `limit` bytes came.
pub(crate) async fn collect_limited<B>(body: B, limit: usize) -> Collected
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut chunks = VecDeque::new();
    let mut read = 0usize;
    let mut trailers: Option<HeaderMap> = None;
    loop {
        match body.as_mut().frame().await {
            None => {
                let mut whole = Vec::with_capacity(read);
                chunks
                    .iter()
                    .for_each(|c: &Bytes| whole.extend_from_slice(c));
                return Collected::Whole(Bytes::from(whole), trailers);
            }
            Some(Err(e)) => return Collected::Failed(e.into()),
            Some(Ok(frame)) => {
                let data = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        // Trailers go to the first caller (they are not stored for replays).
                        if let Ok(t) = frame.into_trailers() {
                            trailers.get_or_insert_with(HeaderMap::new).extend(t);
                        }
                        continue;
                    }
                };
                read += data.len();
                chunks.push_back(data);
                if read > limit {
                    return Collected::TooLarge {
                        read: read as u64,
                        body: IdempotentBody(
                            Prefixed {
                                read: chunks,
                                rest: body,
                            }
                            .boxed_unsync(),
                        ),
                    };
                }
            }
        }
    }
}

/// The chunks already read, then the rest of the body.
struct Prefixed<B> {
    read: VecDeque<Bytes>,
    rest: Pin<Box<B>>,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        self.rest
            .as_mut()
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_response_round_trips_through_the_codec() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("set-cookie", HeaderValue::from_static("secret=1"));
        let allow = [HeaderName::from_static("content-type")];
        let stored =
            StoredResponse::new(StatusCode::CREATED, &headers, &allow, b"{}".to_vec(), None);
        assert_eq!(stored.headers.len(), 1, "only allow-listed headers");
        let bytes =
            bincode::serde::encode_to_vec(&stored, bincode::config::standard()).expect("encode");
        assert!(
            bytes.len() < 64,
            "bytes are one string, not a sequence: {}",
            bytes.len()
        );
        let (back, _): (StoredResponse, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decode");
        assert_eq!(back, stored);
        let replay = back.replay().expect("a response");
        assert_eq!(replay.status(), StatusCode::CREATED);
        assert_eq!(replay.headers()[REPLAYED], "true");
        assert!(replay.headers().get("set-cookie").is_none());
    }
}

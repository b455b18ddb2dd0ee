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

use std::sync::LazyLock;

use super::problem::problem;
use super::{BoxError, IdempotentBody};
use crate::format::codec::{self, Codec, DECODE_LIMIT};
use crate::format::walk;

/// Headers a replay's map makes room for before it reads them.
const MAP_ROOM: usize = 64;

/// The header every replay carries.
pub(crate) const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

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

    /// The replay of this response (see [`replay`]).
    pub(crate) fn replay(self) -> Response<IdempotentBody> {
        let headers = self.headers.into_iter().map(|(name, value)| {
            let value = HeaderValue::from_maybe_shared(Bytes::from(value.0)).ok();
            (HeaderName::from_bytes(name.as_bytes()).ok(), value)
        });
        replay(
            self.status,
            headers,
            Bytes::from(self.body.0),
            self.omitted_after,
        )
    }
}

/// A stored response read in place from its bincode bytes (`standard` configuration:
/// varint integers, length-prefixed strings and byte strings, a tag byte before an option's
/// value), every field borrowing them: the status, the headers (their count, then their
/// bytes, walked again by [`StoredHeaders`]), the body, and the limit note.
///
/// Invariant: [`StoredResponseRef::read`] accepts exactly what bincode's decode of a
/// [`StoredResponse`] accepts and reads it as bincode does, or declines (`None`): UTF-8 names,
/// lengths within the bytes, nothing left over, a payload small enough that bincode's decode
/// limit cannot be reached. What it declines goes to the store's decode, which decides.
struct StoredResponseRef<'a> {
    status: u16,
    header_count: usize,
    headers: &'a [u8],
    body: &'a [u8],
    omitted_after: Option<u64>,
}

impl<'a> StoredResponseRef<'a> {
    fn read(payload: &'a [u8]) -> Option<Self> {
        // bincode counts a `Vec` of N headers as N times a (name, value) pair's size against
        // its limit, and every byte string's length: a payload this small stays within it.
        if payload.len() > DECODE_LIMIT / 64 {
            return None;
        }
        let mut rest = Cursor(payload);
        let status = u16::try_from(rest.varint(Width::U16)?).ok()?;
        let header_count = usize::try_from(rest.varint(Width::U64)?).ok()?;
        let headers_start = rest.0;
        for _ in 0..header_count {
            std::str::from_utf8(rest.bytes()?).ok()?;
            rest.bytes()?;
        }
        let headers = &headers_start[..headers_start.len() - rest.0.len()];
        let body = rest.bytes()?;
        let omitted_after = match rest.byte()? {
            0 => None,
            1 => Some(rest.varint(Width::U64)?),
            _ => return None,
        };
        rest.0.is_empty().then_some(Self {
            status,
            header_count,
            headers,
            body,
            omitted_after,
        })
    }
}

/// The widest varint a field takes: bincode refuses a wider discriminant for a `u16`.
#[derive(Clone, Copy, PartialEq)]
enum Width {
    U16,
    U64,
}

/// Bytes not read yet.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (bytes, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*bytes)
    }

    /// bincode's varint: one byte below 251, else 251 / 252 / 253 and a little-endian
    /// `u16` / `u32` / `u64`.
    fn varint(&mut self, width: Width) -> Option<u64> {
        match self.byte()? {
            small @ 0..=250 => Some(u64::from(small)),
            251 => Some(u64::from(u16::from_le_bytes(self.array()?))),
            252 if width == Width::U64 => Some(u64::from(u32::from_le_bytes(self.array()?))),
            253 if width == Width::U64 => Some(u64::from_le_bytes(self.array()?)),
            _ => None,
        }
    }

    /// A length-prefixed byte string.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint(Width::U64)?).ok()?;
        let (bytes, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(bytes)
    }
}

/// The headers of a [`StoredResponseRef`], parsed for a replay's map.
struct StoredHeaders<'a> {
    left: usize,
    rest: Cursor<'a>,
}

impl Iterator for StoredHeaders<'_> {
    type Item = (Option<HeaderName>, Option<HeaderValue>);

    fn next(&mut self) -> Option<Self::Item> {
        self.left = self.left.checked_sub(1)?;
        // Invariant: `StoredResponseRef::read` walked these pairs; a pair that is not there
        // reads as a header that does not parse.
        let name = self
            .rest
            .bytes()
            .and_then(|n| HeaderName::from_bytes(n).ok());
        let value = self
            .rest
            .bytes()
            .and_then(|v| HeaderValue::from_bytes(v).ok());
        Some((name, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for StoredHeaders<'_> {}

/// The shapes (`format::walk::shape`) a [`StoredResponse`] can have, by whether it has
/// headers and whether its body was omitted: its fields are fixed and every header has one
/// shape, so nothing else changes it. `None` if walking failed (it walks only this crate's
/// types; then replays take the generic decode).
static SHAPES: LazyLock<Option<[[u64; 2]; 2]>> = LazyLock::new(|| {
    let shape = |headers: bool, omitted: bool| {
        let stored = StoredResponse {
            status: 200,
            headers: match headers {
                true => vec![(String::new(), Bytes16::default())],
                false => Vec::new(),
            },
            body: Bytes16::default(),
            omitted_after: omitted.then_some(0),
        };
        walk::shape(&stored).ok()
    };
    Some([
        [shape(false, false)?, shape(false, true)?],
        [shape(true, false)?, shape(true, true)?],
    ])
});

/// The replay of a stored response's encoded bytes (`payload`, recorded with `codec` and
/// `shape`); `Err` with the decoder's message when they are not a stored response.
///
/// A bincode payload of the expected shape is read in place, and only its body and header
/// values are copied out. Anything else (JSON, a shape or an encoding that does not match)
/// goes through the store's own decode, which gives the same value or the error.
pub(crate) fn replay_payload(
    payload: &[u8],
    codec: Codec,
    shape: Option<u64>,
) -> Result<Response<IdempotentBody>, String> {
    if let Some(response) = replay_in_place(payload, codec, shape) {
        return Ok(response);
    }
    codec::decode::<StoredResponse>(payload, codec, shape).map(StoredResponse::replay)
}

/// [`replay_payload`]'s fast path: `None` whenever the store's decode must decide.
fn replay_in_place(
    payload: &[u8],
    codec: Codec,
    shape: Option<u64>,
) -> Option<Response<IdempotentBody>> {
    let shapes = SHAPES.as_ref()?;
    if codec != Codec::Bincode {
        return None;
    }
    let stored = StoredResponseRef::read(payload)?;
    let found =
        shapes[usize::from(stored.header_count > 0)][usize::from(stored.omitted_after.is_some())];
    if shape.is_some_and(|expected| expected != found) {
        return None;
    }
    let headers = StoredHeaders {
        left: stored.header_count,
        rest: Cursor(stored.headers),
    };
    Some(replay(
        stored.status,
        headers,
        Bytes::copy_from_slice(stored.body),
        stored.omitted_after,
    ))
}

/// The replay of a stored response: its status, stored headers and body, marked replayed. A
/// problem instead when its body was over the limit (`omitted_after`), or when what is stored
/// no longer makes a response (a header that does not parse: never written so).
fn replay(
    status: u16,
    headers: impl ExactSizeIterator<Item = (Option<HeaderName>, Option<HeaderValue>)>,
    body: Bytes,
    omitted_after: Option<u64>,
) -> Response<IdempotentBody> {
    if let Some(read) = omitted_after {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "response-not-stored",
            "Original response too large to replay",
            &format!(
                "the request ran once and answered {status}, with a body over the {read}-byte \
                 limit this endpoint stores; it is not run again"
            ),
        );
    }
    let unreadable = || {
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "response-not-stored",
            "Stored response unreadable",
            "the stored response for this key no longer makes a response",
        )
    };
    let Ok(status) = StatusCode::from_u16(status) else {
        return unreadable();
    };
    // Room for the replay mark and the `Content-Length` a server adds, so a small map never
    // grows; capped, since one name may repeat far past what a map may hold of names.
    let mut map = HeaderMap::with_capacity(headers.len().min(MAP_ROOM) + 2);
    for header in headers {
        let (Some(name), Some(value)) = header else {
            return unreadable();
        };
        // More than a map can hold: only damaged bytes say so (a handler's map held them).
        if map.try_append(name, value).is_err() {
            return unreadable();
        }
    }
    if map
        .try_insert(REPLAYED, HeaderValue::from_static("true"))
        .is_err()
    {
        return unreadable();
    }
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    *response.headers_mut() = map;
    response
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
    // A body of one chunk (the usual small one) is kept as it came: no queue, no copy.
    let mut first: Option<Bytes> = None;
    let mut more = VecDeque::new();
    let mut read = 0usize;
    let mut trailers: Option<HeaderMap> = None;
    loop {
        match body.as_mut().frame().await {
            None => {
                let whole = match first {
                    None => Bytes::new(),
                    Some(only) if more.is_empty() => only,
                    Some(first) => {
                        let mut whole = Vec::with_capacity(read);
                        whole.extend_from_slice(&first);
                        more.iter().for_each(|c: &Bytes| whole.extend_from_slice(c));
                        Bytes::from(whole)
                    }
                };
                return Collected::Whole(whole, trailers);
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
                match first {
                    None => first = Some(data),
                    Some(_) => more.push_back(data),
                }
                if read > limit {
                    if let Some(first) = first.take() {
                        more.push_front(first);
                    }
                    return Collected::TooLarge {
                        read: read as u64,
                        body: IdempotentBody(
                            Prefixed {
                                read: more,
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
        let replay = back.replay();
        assert_eq!(replay.status(), StatusCode::CREATED);
        assert_eq!(replay.headers()[&REPLAYED], "true");
        assert!(replay.headers().get("set-cookie").is_none());
    }

    /// Status, headers and body of a response, for comparing two replays.
    async fn parts(response: Response<IdempotentBody>) -> (StatusCode, HeaderMap, Bytes) {
        let (head, body) = response.into_parts();
        let body = body.collect().await.expect("a body in memory").to_bytes();
        (head.status, head.headers, body)
    }

    fn stored_response() -> impl proptest::strategy::Strategy<Value = StoredResponse> {
        use proptest::prelude::*;
        let name = prop::sample::select(vec![
            "content-type",
            "location",
            "etag",
            "x-custom-header",
            "Bad Name",
        ]);
        let value = prop::collection::vec(any::<u8>(), 0..12);
        (
            prop_oneof![Just(200u16), Just(201), Just(502), 0u16..1200],
            prop::collection::vec((name, value), 0..4),
            prop::collection::vec(any::<u8>(), 0..300),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(status, headers, body, omitted_after)| StoredResponse {
                status,
                headers: headers
                    .into_iter()
                    .map(|(n, v)| (n.to_owned(), Bytes16(v)))
                    .collect(),
                body: Bytes16(body),
                omitted_after,
            })
    }

    /// A payload over the in-place reader's size bound is declined, and replays through the
    /// store's decode with every byte of its body; one just under the bound is read in place.
    #[test]
    fn a_payload_over_the_in_place_bound_replays_through_the_decode() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let bound = DECODE_LIMIT / 64;
        for (body_len, in_place) in [(bound - 64, true), (bound + 1, false)] {
            let body: Vec<u8> = (0..body_len).map(|i| (i % 251) as u8).collect();
            let stored = StoredResponse {
                status: 201,
                headers: vec![("content-type".to_owned(), Bytes16(b"text/plain".to_vec()))],
                body: Bytes16(body.clone()),
                omitted_after: None,
            };
            let encoded = codec::encode(&stored, Codec::Bincode, 1 << 30).expect("encodes");
            assert_eq!(
                encoded.bytes.len() <= bound,
                in_place,
                "body of {body_len} bytes"
            );
            assert_eq!(
                replay_in_place(&encoded.bytes, Codec::Bincode, Some(encoded.shape)).is_some(),
                in_place,
                "body of {body_len} bytes"
            );
            let replayed = replay_payload(&encoded.bytes, Codec::Bincode, Some(encoded.shape))
                .expect("replays");
            let (status, headers, replayed_body) = rt.block_on(parts(replayed));
            assert_eq!(status, 201);
            assert_eq!(headers.get("content-type").expect("kept"), "text/plain");
            assert_eq!(
                replayed_body.as_ref(),
                body.as_slice(),
                "body of {body_len} bytes"
            );
        }
    }

    proptest::proptest! {
        /// Read in place or decoded by the store, a stored response replays the same, and its
        /// shape is the one `SHAPES` predicts; a payload with another shape is refused.
        #[test]
        fn a_response_read_in_place_replays_as_the_decoded_one(stored in stored_response()) {
            let encoded = codec::encode(&stored, Codec::Bincode, 1 << 20).expect("encodes");
            let shapes = SHAPES.as_ref().expect("shapes");
            let predicted = shapes[usize::from(!stored.headers.is_empty())]
                [usize::from(stored.omitted_after.is_some())];
            proptest::prop_assert_eq!(encoded.shape, predicted);
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let in_place = replay_in_place(&encoded.bytes, Codec::Bincode, Some(encoded.shape))
                .expect("read in place");
            let decoded = codec::decode::<StoredResponse>(&encoded.bytes, Codec::Bincode, Some(encoded.shape))
                .expect("decodes")
                .replay();
            proptest::prop_assert_eq!(rt.block_on(parts(in_place)), rt.block_on(parts(decoded)));
            let other_shape = encoded.shape ^ 1;
            proptest::prop_assert!(replay_payload(&encoded.bytes, Codec::Bincode, Some(other_shape)).is_err());
            let mut longer = encoded.bytes.clone();
            longer.push(0);
            proptest::prop_assert!(replay_payload(&longer, Codec::Bincode, Some(encoded.shape)).is_err());
            let json = codec::encode(&stored, Codec::Json, 1 << 20).expect("encodes as JSON");
            let from_json = replay_payload(&json.bytes, Codec::Json, Some(json.shape)).expect("replays");
            proptest::prop_assert_eq!(rt.block_on(parts(from_json)), rt.block_on(parts(
                replay_payload(&encoded.bytes, Codec::Bincode, Some(encoded.shape)).expect("replays"),
            )));
        }

        /// Whatever the bytes (a stored response damaged: a byte changed, cut short or
        /// extended, or a non-minimal varint), a response read in place is one the store's
        /// decode reads the same; bytes the store's decode refuses are never read in place.
        #[test]
        fn bytes_read_in_place_are_exactly_those_the_store_decodes(
            stored in stored_response(),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
            damage in 0u8..5,
        ) {
            let mut bytes = codec::encode(&stored, Codec::Bincode, 1 << 20).expect("encodes").bytes;
            let i = at.index(bytes.len());
            match damage {
                0 => bytes[i] = byte,
                1 => bytes.truncate(i),
                2 => bytes.insert(i, byte),
                // The status as a non-minimal varint (251, then a little-endian u16), or with a
                // discriminant too wide for a u16.
                3 => { let status = bytes.remove(0); bytes.splice(0..0, [251, status, 0]); }
                _ => { let status = bytes.remove(0); bytes.splice(0..0, [252, status, 0, 0, 0]); }
            }
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let decoded = codec::decode::<StoredResponse>(&bytes, Codec::Bincode, None);
            match (replay_in_place(&bytes, Codec::Bincode, None), decoded) {
                (Some(in_place), Ok(decoded)) => proptest::prop_assert_eq!(
                    rt.block_on(parts(in_place)),
                    rt.block_on(parts(decoded.replay()))
                ),
                (Some(_), Err(e)) => proptest::prop_assert!(false, "read in place, refused by the decode: {}", e),
                (None, _) => {}
            }
        }
    }
}

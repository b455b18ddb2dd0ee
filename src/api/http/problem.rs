//! Problem details (RFC 9457, `application/problem+json`) for the requests the layer answers
//! itself.
//!
//! Invariants: every answer the layer makes without running the handler is one of these, with
//! a stable `type` per cause (`urn:idemstore:problem:<cause>`), so clients can tell them apart
//! without parsing prose; none of them claims a key, and only one is ever stored: the 502 for a
//! handler whose response body failed after it ran.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::IdempotentBody;

/// The body of a problem answer.
pub(crate) fn problem_body(status: StatusCode, cause: &str, title: &str, detail: &str) -> Bytes {
    let body = serde_json::json!({
        "type": format!("urn:idemstore:problem:{cause}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    Bytes::from(body.to_string())
}

/// A problem answer: `status`, the cause's slug, a title and a detail.
pub(crate) fn problem(
    status: StatusCode,
    cause: &str,
    title: &str,
    detail: &str,
) -> Response<IdempotentBody> {
    let body = problem_body(status, cause, title, detail);
    let mut response = Response::new(super::response::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

//! The body type of the layer's responses and of the requests it passes on.
//!
//! Invariants: a named type with no lifetime or generic parameter (a boxed body inside), so
//! services over it have plain associated types, and futures holding them are provably
//! `Send`.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::BoxError;

/// A boxed HTTP body of [`Bytes`]: what the layer's service answers with, and what the
/// wrapped service receives.
pub struct IdempotentBody(pub(crate) UnsyncBoxBody<Bytes, BoxError>);

impl std::fmt::Debug for IdempotentBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentBody").finish_non_exhaustive()
    }
}

impl Body for IdempotentBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

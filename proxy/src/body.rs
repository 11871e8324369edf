//! The one body type of the data path: generated, buffered, or streamed
//! from a peer, without boxing.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

/// Runs when a streamed body ends or is dropped, told how many bytes passed
/// and whether the stream completed.
pub trait OnEnd: Send + Sync {
    fn on_end(&mut self, bytes: u64, completed: bool);
}

/// Two end hooks, in order.
struct Both(Box<dyn OnEnd>, Box<dyn OnEnd>);

impl OnEnd for Both {
    fn on_end(&mut self, bytes: u64, completed: bool) {
        self.0.on_end(bytes, completed);
        self.1.on_end(bytes, completed);
    }
}

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    /// Buffered data followed by trailers (gRPC, chunked trailers).
    WithTrailers {
        data: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
    },
    Stream {
        /// Bytes already read from `inner`, sent first.
        prefix: Option<Bytes>,
        inner: Incoming,
        bytes: u64,
        done: bool,
        on_end: Option<Box<dyn OnEnd>>,
    },
}

impl Body {
    pub fn empty() -> Body {
        Body::Empty
    }

    pub fn full(b: impl Into<Bytes>) -> Body {
        let b = b.into();
        if b.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(b))
        }
    }

    pub fn stream(inner: Incoming) -> Body {
        Body::Stream {
            prefix: None,
            inner,
            bytes: 0,
            done: false,
            on_end: None,
        }
    }

    /// A streamed body that calls `on_end` when it finishes or is dropped.
    pub fn stream_with(inner: Incoming, on_end: Box<dyn OnEnd>) -> Body {
        Body::Stream {
            prefix: None,
            inner,
            bytes: 0,
            done: false,
            on_end: Some(on_end),
        }
    }

    /// `prefix`, then the rest of `inner`.
    pub fn prefixed(prefix: Bytes, inner: Incoming) -> Body {
        Body::Stream {
            prefix: Some(prefix),
            inner,
            bytes: 0,
            done: false,
            on_end: None,
        }
    }

    /// This body, with `extra` called too when it ends: at the end of a
    /// stream, or at once for a body held in memory.
    pub fn on_end(mut self, mut extra: Box<dyn OnEnd>) -> Body {
        match &mut self {
            Body::Stream {
                on_end,
                done: false,
                ..
            } => {
                *on_end = Some(match on_end.take() {
                    Some(first) => Box::new(Both(first, extra)),
                    None => extra,
                });
            }
            Body::Stream { bytes, .. } => extra.on_end(*bytes, true),
            Body::Empty => extra.on_end(0, true),
            Body::Full(data) | Body::WithTrailers { data, .. } => {
                extra.on_end(data.as_ref().map_or(0, |d| d.len() as u64), true)
            }
        }
        self
    }

    /// Buffered data and trailers.
    pub fn with_trailers(data: Bytes, trailers: Option<http::HeaderMap>) -> Body {
        if trailers.is_none() {
            return Body::full(data);
        }
        Body::WithTrailers {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }
    }

    fn finish(&mut self, completed: bool) {
        if let Body::Stream {
            bytes,
            done,
            on_end,
            ..
        } = self
        {
            *done = true;
            if let Some(mut f) = on_end.take() {
                f.on_end(*bytes, completed);
            }
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // hyper may stop polling once the body says it has ended.
        let completed =
            matches!(self, Body::Stream { inner, .. } if http_body::Body::is_end_stream(inner));
        self.finish(completed);
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match this {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::WithTrailers { data, trailers } => match data.take() {
                Some(d) => Poll::Ready(Some(Ok(Frame::data(d)))),
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            },
            Body::Stream {
                prefix: prefix @ Some(_),
                bytes,
                ..
            } => {
                let p = prefix.take().unwrap_or_default();
                *bytes += p.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(p))))
            }
            Body::Stream { inner, bytes, .. } => {
                let res = Pin::new(inner).poll_frame(cx);
                match &res {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            *bytes += d.len() as u64;
                        }
                    }
                    Poll::Ready(None) => this.finish(true),
                    Poll::Ready(Some(Err(_))) => this.finish(false),
                    Poll::Pending => {}
                }
                res
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::WithTrailers { data, trailers } => data.is_none() && trailers.is_none(),
            Body::Stream {
                prefix,
                inner,
                done,
                ..
            } => prefix.is_none() && (*done || inner.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::WithTrailers { .. } => SizeHint::default(),
            Body::Stream {
                prefix: Some(_), ..
            } => SizeHint::default(),
            Body::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

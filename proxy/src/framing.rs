//! Request framing checks hyper cannot do for us.
//!
//! hyper resolves a request carrying both Content-Length and
//! Transfer-Encoding the RFC 9112 §6.3 way (chunked wins, the connection
//! closes after) and drops Content-Length before the proxy sees the
//! request. The mesh refuses such requests with 400 instead, as Envoy does:
//! they are how request smuggling starts, and no honest client sends them.
//!
//! [`Inspector`] wraps an HTTP/1 connection's read side, follows the
//! message framing of what the client sends (heads, fixed-length and
//! chunked bodies) and queues one verdict per request head; the request
//! handler takes them in order. It reads what hyper reads, copies only
//! request heads, and stops looking after an upgrade, a CONNECT, or
//! anything it cannot follow (hyper then rejects or handles it itself).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::server::{MAX_HEAD_BYTES, MAX_HEADERS};

/// What the scanner found wrong with a request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Both Content-Length and Transfer-Encoding.
    Ambiguous,
    /// A `#fragment` in the request target, which the URI parser would
    /// silently drop (RFC 9112 §3.2 has no fragment there).
    Fragment,
}

/// Verdicts on request heads, oldest first.
#[derive(Default)]
pub struct Verdicts(Mutex<VecDeque<Verdict>>);

impl Verdicts {
    /// The verdict on the next request the handler sees.
    pub fn next(&self) -> Verdict {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or(Verdict::Fine)
    }

    fn push(&self, v: Verdict) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(v);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Skipping this many body bytes.
    Fixed(u64),
    /// A chunk-size line (bytes of it so far are in `line`).
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Trailer lines after the last chunk, until an empty one.
    Trailers,
    /// Not following any more.
    Off,
}

/// Follows HTTP/1 request framing over a byte stream.
pub struct Scanner {
    state: State,
    head: Vec<u8>,
    line: Vec<u8>,
    verdicts: Arc<Verdicts>,
}

impl Scanner {
    pub fn new(verdicts: Arc<Verdicts>) -> Scanner {
        Scanner {
            state: State::Head,
            head: Vec::new(),
            line: Vec::new(),
            verdicts,
        }
    }

    /// Feeds bytes the client sent, in order.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = match self.state {
                State::Off => return,
                State::Head => self.head_bytes(bytes),
                State::Fixed(n) => {
                    let take = n.min(bytes.len() as u64);
                    self.state = if take == n {
                        State::Head
                    } else {
                        State::Fixed(n - take)
                    };
                    &bytes[take as usize..]
                }
                State::ChunkData(n) => {
                    let take = n.min(bytes.len() as u64);
                    self.state = if take == n {
                        State::ChunkSize
                    } else {
                        State::ChunkData(n - take)
                    };
                    &bytes[take as usize..]
                }
                State::ChunkSize | State::Trailers => self.line_bytes(bytes),
            };
        }
    }

    fn head_bytes<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let start = self.head.len().saturating_sub(3);
        self.head.extend_from_slice(bytes);
        let Some(end) = find(&self.head[start..], b"\r\n\r\n").map(|i| start + i + 4) else {
            if self.head.len() > MAX_HEAD_BYTES {
                self.state = State::Off; // hyper answers 431
            }
            return &[];
        };
        let used = bytes.len() - (self.head.len() - end);
        let head = std::mem::take(&mut self.head);
        self.state = self.judge(&head[..end]);
        &bytes[used..]
    }

    /// Records the verdict on a complete head and returns what follows it.
    fn judge(&self, head: &[u8]) -> State {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 1];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            // hyper rejects what httparse rejects.
            _ => return State::Off,
        }
        let mut length: Option<u64> = None;
        let mut te = None;
        let mut upgrade = req.method == Some("CONNECT");
        let mut cl_seen = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl_seen = true;
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let ambiguous = cl_seen && te.is_some();
        self.verdicts.push(if ambiguous {
            Verdict::Ambiguous
        } else if req.path.is_some_and(|p| p.contains('#')) {
            Verdict::Fragment
        } else {
            Verdict::Fine
        });
        if ambiguous || upgrade {
            // hyper closes after an ambiguous message; an upgrade ends HTTP.
            return State::Off;
        }
        match (te, length, cl_seen) {
            (Some(v), _, _) => {
                let chunked = v
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                if chunked {
                    State::ChunkSize
                } else {
                    State::Off
                }
            }
            // No body.
            (None, _, false) | (None, Some(0), true) => State::Head,
            (None, Some(n), true) => State::Fixed(n),
            // An unreadable length: hyper refuses it and closes.
            (None, None, true) => State::Off,
        }
    }

    fn line_bytes<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let Some(nl) = bytes.iter().position(|b| *b == b'\n') else {
            self.line.extend_from_slice(bytes);
            if self.line.len() > 4096 {
                self.state = State::Off;
            }
            return &[];
        };
        self.line.extend_from_slice(&bytes[..nl]);
        let line = std::mem::take(&mut self.line);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        self.state = match self.state {
            State::ChunkSize => {
                let hex = line
                    .split(|b| *b == b';')
                    .next()
                    .unwrap_or(b"")
                    .trim_ascii();
                match std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                {
                    Some(0) => State::Trailers,
                    // Data, then its CRLF.
                    Some(n) => State::ChunkData(n.saturating_add(2)),
                    None => State::Off,
                }
            }
            _ if line.is_empty() => State::Head,
            _ => State::Trailers,
        };
        &bytes[nl + 1..]
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A connection whose read side passes through a [`Scanner`].
pub struct Inspector<S> {
    inner: S,
    scanner: Scanner,
}

impl<S> Inspector<S> {
    pub fn new(inner: S, verdicts: Arc<Verdicts>) -> Inspector<S> {
        Inspector {
            inner,
            scanner: Scanner::new(verdicts),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Inspector<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res
            && self.scanner.state != State::Off
        {
            self.scanner.feed(&buf.filled()[before..]);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inspector<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_of(chunks: &[&[u8]]) -> (Vec<bool>, State) {
        let v = Arc::new(Verdicts::default());
        let mut s = Scanner::new(v.clone());
        for c in chunks {
            s.feed(c);
        }
        let out =
            v.0.lock()
                .unwrap()
                .iter()
                .map(|v| *v == Verdict::Ambiguous)
                .collect();
        (out, s.state)
    }

    /// Every split of `bytes` into two reads gives the same verdicts.
    fn all_splits(bytes: &[u8]) -> Vec<bool> {
        let (whole, _) = verdicts_of(&[bytes]);
        for i in 0..bytes.len() {
            let (split, _) = verdicts_of(&[&bytes[..i], &bytes[i..]]);
            assert_eq!(split, whole, "split at {i}");
        }
        whole
    }

    #[test]
    fn both_framings_are_ambiguous_in_either_order() {
        let a = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let b = b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n0\r\n\r\n";
        assert_eq!(all_splits(a), [true]);
        assert_eq!(all_splits(b), [true]);
    }

    #[test]
    fn follows_pipelined_fixed_and_chunked_bodies() {
        let stream = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: a\r\n\r\nPOST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nx-trailer: t\r\n\r\nPOST /d HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(all_splits(stream), [false, false, false, true]);
    }

    #[test]
    fn body_bytes_that_look_like_heads_are_not_heads() {
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        stream.extend_from_slice(body);
        stream.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(all_splits(&stream), [false, false]);
    }

    #[test]
    fn a_fragment_in_the_target_is_flagged() {
        let v = Arc::new(Verdicts::default());
        let mut s = Scanner::new(v.clone());
        s.feed(b"GET /admin#x HTTP/1.1\r\nHost: a\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(v.next(), Verdict::Fragment);
        assert_eq!(v.next(), Verdict::Fine);
    }

    #[test]
    fn stops_after_upgrades_and_what_it_cannot_follow() {
        let (v, s) = verdicts_of(&[b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nraw bytes"]);
        assert_eq!((v, s), (vec![false], State::Off));
        let (v, s) = verdicts_of(&[
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ]);
        assert_eq!((v, s), (vec![false], State::Off));
        let (v, s) = verdicts_of(&[b"G(T / HTTP/1.1\r\n\r\n"]);
        assert_eq!((v, s), (vec![], State::Off));
    }
}

//! Protocol detection on a connection's first bytes, without consuming
//! them.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tls,
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies what has arrived so far; `None` when more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return Some(Detected::Tls);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    // An HTTP/1 request line starts with a method token and a space.
    for (i, b) in buf.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' if i < 16 => continue,
            b' ' if i >= 3 => return Some(Detected::Http1),
            _ => return Some(Detected::Tcp),
        }
    }
    if buf.len() >= 16 {
        Some(Detected::Tcp)
    } else {
        None
    }
}

/// Peeks at the first bytes for up to `timeout`; a client that sends
/// nothing (a server-first protocol) is TCP.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let mut buf = [0u8; 24];
    peek_until(stream, timeout, &mut buf, classify)
        .await
        .unwrap_or(Detected::Tcp)
}

/// Peeks (consuming nothing) until `decide` has an answer for what has
/// arrived, the buffer is full, the peer closes or `timeout` passes
/// (`None` for the last two; a full buffer gets one last `decide`).
pub async fn peek_until<T>(
    stream: &TcpStream,
    timeout: Duration,
    buf: &mut [u8],
    mut decide: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        if let Some(d) = decide(&buf[..n]) {
            return Some(d);
        }
        // Partial first bytes: wait briefly for the rest.
        if n == buf.len() || Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Detected::Http2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Detected::Tls));
        assert_eq!(classify(b"\x00\x01binary"), Some(Detected::Tcp));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Tcp));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Tcp));
    }
}

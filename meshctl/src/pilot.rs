//! Reading a running pilot's status port (15014): the local demo's, or one
//! reached through `--pilot` / `MESH_PILOT`.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Where the local control plane listens.
pub const DEFAULT_ADDR: &str = "127.0.0.1:15014";
const TIMEOUT: Duration = Duration::from_secs(10);

/// `GET http://ADDR/PATH`, the body of a 200 answer, or an error saying
/// what went wrong and how to point meshctl elsewhere.
pub fn get(addr: &str, path: &str) -> Result<Bytes> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        tokio::time::timeout(TIMEOUT, fetch(addr, path))
            .await
            .map_err(|_| anyhow!("pilot at {addr} did not answer {path} within {TIMEOUT:?}"))?
    })
}

async fn fetch(addr: &str, path: &str) -> Result<Bytes> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| {
        format!(
            "cannot reach pilot at {addr} (is `meshctl demo` running? otherwise pass --pilot HOST:PORT)"
        )
    })?;
    let (status, body) = get_all(stream, addr, &[path])
        .await
        .with_context(|| format!("GET {path} from pilot at {addr}"))?
        .remove(0);
    if !status.is_success() {
        bail!(
            "pilot at {addr} answered {path} with {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

/// `GET` each path in turn over one HTTP/1.1 connection on `io`.
pub async fn get_all<T>(
    io: T,
    authority: &str,
    paths: &[&str],
) -> Result<Vec<(http::StatusCode, Bytes)>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let mut out = Vec::new();
    for path in paths {
        send.ready().await?;
        let req = http::Request::get(*path)
            .header(http::header::HOST, authority)
            .body(Empty::<Bytes>::new())?;
        let resp = send
            .send_request(req)
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        out.push((status, body));
    }
    Ok(out)
}

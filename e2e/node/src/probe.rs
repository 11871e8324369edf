//! Probes and lifecycle handlers: httpGet and tcpSocket from the host to
//! the pod's address, exec inside the container (same namespaces, mounts
//! and user). One attempt is one function a test can call.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ExecAction, HTTPGetAction, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How to run a command in the container (for exec actions).
pub type Exec<'a> = &'a (dyn Fn(&[String]) -> tokio::process::Command + Send + Sync);

pub fn port(c: &Container, p: &IntOrString) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} is out of range")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            c.ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .ok_or_else(|| format!("no container port named {name:?}"))
        }
    }
}

pub async fn http_get(
    c: &Container,
    pod_ip: Ipv4Addr,
    h: &HTTPGetAction,
    timeout: Duration,
) -> Result<(), String> {
    if h.scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("https"))
    {
        return Err("httpGet with scheme HTTPS is not supported by this node".into());
    }
    let port = port(c, &h.port)?;
    let ip: Ipv4Addr = match &h.host {
        Some(host) if !host.is_empty() => host
            .parse()
            .map_err(|_| format!("host {host:?} is not an IPv4 address"))?,
        _ => pod_ip,
    };
    let path = h.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/");
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for hd in h.http_headers.iter().flatten() {
        if hd.name.contains(['\r', '\n', ':']) || hd.value.contains(['\r', '\n']) {
            return Err(format!("httpHeaders: invalid header {:?}", hd.name));
        }
        req.push_str(&format!("{}: {}\r\n", hd.name, hd.value));
    }
    req.push_str("\r\n");
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(SocketAddr::from((ip, port)))
            .await
            .map_err(|e| format!("Get \"http://{ip}:{port}{path}\": {e}"))?;
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1024];
        let mut n = 0;
        loop {
            let m = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
            n += m;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf[..n]) {
                Ok(_) if resp.code.is_some() => {
                    let code = resp.code.unwrap_or(0);
                    return if (200..400).contains(&code) {
                        Ok(())
                    } else {
                        Err(format!("HTTP probe failed with statuscode: {code}"))
                    };
                }
                Err(httparse::Error::TooManyHeaders) => return Err("too many headers".into()),
                Err(e) => return Err(format!("malformed response: {e}")),
                Ok(_) if m == 0 || n == buf.len() => return Err("incomplete response".into()),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("Get \"http://{ip}:{port}{path}\": timeout after {timeout:?}"))?
}

pub async fn tcp(
    c: &Container,
    pod_ip: Ipv4Addr,
    t: &TCPSocketAction,
    timeout: Duration,
) -> Result<(), String> {
    let port = port(c, &t.port)?;
    let ip: Ipv4Addr = match &t.host {
        Some(h) if !h.is_empty() => h
            .parse()
            .map_err(|_| format!("host {h:?} is not an IPv4 address"))?,
        _ => pod_ip,
    };
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((ip, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("dial tcp {ip}:{port}: {e}")),
        Err(_) => Err(format!("dial tcp {ip}:{port}: i/o timeout")),
    }
}

pub async fn exec(e: &ExecAction, run: Exec<'_>, timeout: Duration) -> Result<(), String> {
    let argv = e.command.clone().unwrap_or_default();
    if argv.is_empty() {
        return Err("exec: no command".into());
    }
    let mut cmd = run(&argv);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("exec {argv:?}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            Err(format!(
                "command {argv:?} exited with {}: {}",
                out.status.code().unwrap_or(-1),
                text.trim()
            ))
        }
        Ok(Err(e)) => Err(format!("exec {argv:?}: {e}")),
        Err(_) => Err(format!("command {argv:?} timed out after {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_3xx_only() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for code in [200, 302, 500] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let c = Container::default();
        let h = HTTPGetAction {
            port: IntOrString::Int(port as i32),
            path: Some("/healthz".into()),
            ..Default::default()
        };
        let ip = Ipv4Addr::LOCALHOST;
        let t = Duration::from_secs(2);
        assert_eq!(http_get(&c, ip, &h, t).await, Ok(()));
        assert_eq!(http_get(&c, ip, &h, t).await, Ok(()));
        let e = http_get(&c, ip, &h, t).await.unwrap_err();
        assert!(e.contains("500"), "{e}");
    }

    #[test]
    fn named_ports_come_from_the_container() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "ports": [{"name": "http", "containerPort": 9080}]
        }))
        .unwrap();
        assert_eq!(port(&c, &IntOrString::String("http".into())), Ok(9080));
        assert!(port(&c, &IntOrString::String("grpc".into())).is_err());
        assert!(port(&c, &IntOrString::Int(70000)).is_err());
    }
}

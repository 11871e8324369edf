//! Config changes and shutdown without failed requests.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_swaps_under_load_fail_no_request() {
    let v1 = origin("v1").await;
    let v2 = origin("v2").await;
    let clusters = format!(
        "{}\n{}",
        cluster("v1", &[&v1], ""),
        cluster("v2", &[&v2], "")
    );
    let to_v1 = config("- action: {forward: [{cluster: v1}]}", &clusters);
    let to_v2 = config("- action: {forward: [{cluster: v2}]}", &clusters);
    let p = Arc::new(proxy(&to_v1).await);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (stop, failures, done, to) = (
                stop.clone(),
                failures.clone(),
                done.clone(),
                p.explicit.unwrap(),
            );
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    if send(&c, to, "svc:9080", "/", &[]).await.status != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for i in 0..20 {
        let cfg = if i % 2 == 0 { &to_v2 } else { &to_v1 };
        p.apply(serde_yaml::from_str(cfg).unwrap()).await.unwrap();
        // Let the load make progress under each config before the next swap.
        let before = done.load(Ordering::Relaxed);
        assert!(
            eventually(Duration::from_secs(5), || done.load(Ordering::Relaxed)
                >= before + 10)
            .await
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 200, "load was too light");
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(v1.hits() > 0 && v2.hits() > 0, "both configs served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_rejected_and_the_last_good_one_keeps_serving() {
    let v1 = origin("v1").await;
    let p = proxy(&config(
        "- action: {forward: [{cluster: v1}]}",
        &cluster("v1", &[&v1], ""),
    ))
    .await;
    let bad = config(
        "- action: {forward: [{cluster: nope}]}",
        &cluster("v1", &[&v1], ""),
    );
    let err = p
        .apply(serde_yaml::from_str(&bad).unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        "destinations[0].http[0].action.forward[0]: unknown cluster \"nope\""
    );
    let bad_regex = config(
        "- match: [{uri: {regex: \"(\"}}]\n  action: {forward: [{cluster: v1}]}",
        &cluster("v1", &[&v1], ""),
    );
    let err = p
        .apply(serde_yaml::from_str(&bad_regex).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.starts_with("destinations[0].http[0].match[0]: uri: invalid regex \"(\""),
        "{err}"
    );
    assert_eq!(
        send(&client(), p.explicit.unwrap(), "svc:9080", "/", &[])
            .await
            .body,
        "v1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_requests_and_refuses_new_ones() {
    let slow = origin_with(Arc::new(|_, _| {
        Reply::ok("done").delay(Duration::from_millis(300))
    }))
    .await;
    let p = Arc::new(
        proxy(&config(
            "- action: {forward: [{cluster: s}]}",
            &cluster("s", &[&slow], ""),
        ))
        .await,
    );
    let to = p.explicit.unwrap();
    let in_flight: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { send(&client(), to, "svc:9080", "/", &[]).await }))
        .collect();
    assert!(eventually(Duration::from_secs(2), || slow.hits() == 10).await);
    let start = Instant::now();
    p.drain(Duration::from_secs(5)).await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "drain waited {:?}",
        start.elapsed()
    );
    for t in in_flight {
        let r = t.await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "done"));
        assert_eq!(r.headers["connection"], "close");
    }
    assert!(
        tokio::net::TcpStream::connect(to).await.is_err(),
        "the listener is closed"
    );
}

fn write_config(path: &std::path::Path, body: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_its_file_and_drains_on_sigterm() {
    let v1 = origin_with(Arc::new(|_, _| {
        Reply::ok("v1").delay(Duration::from_millis(300))
    }))
    .await;
    let v2 = origin("v2").await;
    let dir = std::env::temp_dir().join(format!("mesh-proxy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.yaml");
    let clusters = format!(
        "{}\n{}",
        cluster("v1", &[&v1], ""),
        cluster("v2", &[&v2], "")
    );
    write_config(
        &file,
        &config("- action: {forward: [{cluster: v2}]}", &clusters),
    );
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args([
            "--config",
            file.to_str().unwrap(),
            "--mode",
            "explicit",
            "--reload-interval",
            "50ms",
        ])
        .args(["--explicit-addr", &format!("127.0.0.1:{}", ports[0])])
        .args(["--inbound-addr", &format!("127.0.0.1:{}", ports[1])])
        .args(["--admin-addr", &format!("127.0.0.1:{}", ports[2])])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", ports[3])])
        .args(["--ready-addr", &format!("127.0.0.1:{}", ports[4])])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let to: std::net::SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
    let ready = format!("127.0.0.1:{}", ports[4]).parse().unwrap();
    let c = client();
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(ready).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the proxy did not start");
    assert_eq!(
        send(&c, ready, "x", "/healthz/ready", &[]).await.status,
        200
    );
    assert_eq!(send(&c, to, "svc:9080", "/", &[]).await.body, "v2");
    // A broken file is ignored; the running config stays.
    write_config(&file, "destinations: [oops");
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", ports[3]).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rejected = false;
    while !rejected && Instant::now() < deadline {
        let body = send(&c, metrics, "x", "/stats/prometheus", &[]).await.body;
        rejected = body
            .lines()
            .any(|l| l == "mesh_proxy_config_rejected_total 1");
    }
    assert!(rejected, "the broken file was not read");
    assert_eq!(send(&c, to, "svc:9080", "/", &[]).await.body, "v2");
    write_config(
        &file,
        &config("- action: {forward: [{cluster: v1}]}", &clusters),
    );
    let mut switched = false;
    for _ in 0..100 {
        if send(&c, to, "svc:9080", "/", &[]).await.body == "v1" {
            switched = true;
            break;
        }
    }
    assert!(switched, "the new file was not applied");
    // SIGTERM with requests in flight: every one completes.
    let in_flight: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { send(&client(), to, "svc:9080", "/", &[]).await }))
        .collect();
    let before = v1.hits();
    assert!(eventually(Duration::from_secs(2), || v1.hits() >= before + 10).await);
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    for t in in_flight {
        assert_eq!(t.await.unwrap().status, 200);
    }
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits after draining")
        .unwrap();
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

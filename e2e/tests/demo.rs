//! `meshctl demo` as a user runs it: started as a process, the product
//! page served through the gateway, config changed live with `meshctl
//! apply` and `delete`, listed with `get`, and stopped with Ctrl-C.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_e2e::*;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn free_port() -> u16 {
    free_port_on(&["127.0.0.1".parse().unwrap()])
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn meshctl(home: &Path, args: &[&str]) -> Output {
    Command::new(binary("meshctl"))
        .args(args)
        .current_dir(repo())
        .env("MESH_HOME", home)
        .env_remove("MESH_PILOT")
        .stdin(Stdio::null())
        .output()
        .expect("meshctl runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Demo {
    child: Child,
    gateway: SocketAddr,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(home: &Path, gateway: u16) -> Child {
    Command::new(binary("meshctl"))
        .args(["demo", "--gateway-port", &gateway.to_string()])
        .args(["--xds-addr", &local(free_port()).to_string()])
        .args(["--status-addr", &local(free_port()).to_string()])
        .env("MESH_HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshctl demo starts")
}

/// GET through the gateway, with headers; status and body.
async fn call(gateway: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = hyper::Request::get(format!("http://{gateway}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client()
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .expect("the gateway answers");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, text(&body))
}

fn podname(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["podname"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_demo_serves_bookinfo_and_takes_config_live() {
    let home = std::env::temp_dir().join(format!("mesh-e2e-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let gateway = local(free_port());
    let spawned = Instant::now();
    let mut demo = Demo {
        child: start(&home, gateway.port()),
        gateway,
    };
    // It says when it is ready, and what to try.
    let stdout = demo.child.stdout.take().unwrap();
    let banner = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("Ctrl-C") {
                break;
            }
        }
        // Keep draining so the demo never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        banner
    });
    let banner = tokio::time::timeout(Duration::from_secs(60), banner)
        .await
        .expect("the demo became ready")
        .unwrap();
    assert!(banner.starts_with("Local mesh ready in"), "{banner}");
    assert!(
        banner.contains(&format!("http://{gateway}/productpage")),
        "{banner}"
    );
    assert!(
        banner.contains("meshctl apply -f samples/bookinfo/networking/"),
        "{banner}"
    );
    let (status, page) = call(demo.gateway, "/productpage", &[]).await;
    println!(
        "meshctl demo: first /productpage served {:?} after the process started",
        spawned.elapsed()
    );
    assert_eq!(status, 200);
    assert!(page.contains("<h1>The Comedy of Errors</h1>"), "{page}");
    assert!(
        page.contains("PublisherA"),
        "details came through the mesh: {page}"
    );
    assert!(page.contains("Reviews served by: <b>reviews-v"), "{page}");

    // Without routing, reviews rotate over the three versions.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let (_, body) = call(demo.gateway, "/api/v1/products/0/reviews", &[]).await;
        seen.insert(podname(&body));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["reviews-v1", "reviews-v2", "reviews-v3"]
    );

    // apply returns once pilot serves the change.
    let out = meshctl(
        &home,
        &[
            "apply",
            "-f",
            "samples/bookinfo/networking/virtual-service-all-v1.yaml",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("virtualservice.networking.mesh.dev/reviews created"));
    let moved = eventually(Duration::from_secs(5), || async {
        podname(
            &call(demo.gateway, "/api/v1/products/0/reviews", &[])
                .await
                .1,
        ) == "reviews-v1"
    })
    .await;
    assert!(moved, "all-v1 applied");
    for _ in 0..20 {
        let (_, body) = call(demo.gateway, "/api/v1/products/0/reviews", &[]).await;
        assert_eq!(podname(&body), "reviews-v1");
    }

    // Jason (signed in: a session cookie) sees v2 and its black stars.
    let out = meshctl(
        &home,
        &[
            "apply",
            "-f",
            "samples/bookinfo/networking/virtual-service-reviews-jason-v2.yaml",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let jason = [("cookie", "user=jason")];
    let routed = eventually(Duration::from_secs(5), || async {
        call(demo.gateway, "/productpage", &jason)
            .await
            .1
            .contains("Reviews served by: <b>reviews-v2</b>")
    })
    .await;
    assert!(routed, "jason routed to v2");
    let (_, page) = call(demo.gateway, "/productpage", &jason).await;
    assert!(page.contains("color:#000\">★★★★★"), "{page}");
    let (_, page) = call(demo.gateway, "/productpage", &[]).await;
    assert!(
        page.contains("Reviews served by: <b>reviews-v1</b>"),
        "{page}"
    );

    // get lists what pilot serves.
    let out = meshctl(&home, &["get", "virtualservices"]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        table.lines().next().unwrap().starts_with("NAMESPACE  NAME"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("default    reviews ")),
        "{table}"
    );
    let out = meshctl(&home, &["get", "dr", "reviews", "-o", "yaml"]);
    assert!(text(&out.stdout).contains("name: v3"), "{out:?}");

    // An invalid resource is refused with the reason; nothing changes.
    let bad = home.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: ratings}\n\
         spec:\n  hosts: [ratings]\n  http: [{route: [{destination: {host: ratings, subset: v1}, weight: 90}]}]\n",
    )
    .unwrap();
    let out = meshctl(&home, &["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).contains("weights must add up to 100, got 90"),
        "{out:?}"
    );
    let out = meshctl(&home, &["get", "vs", "ratings", "-o", "json"]);
    assert!(!text(&out.stdout).contains("\"weight\""), "{out:?}");

    // delete removes it again; everyone is back on v1.
    let out = meshctl(
        &home,
        &[
            "delete",
            "-f",
            "samples/bookinfo/networking/virtual-service-reviews-jason-v2.yaml",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let out = meshctl(&home, &["get", "vs", "reviews"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let back = eventually(Duration::from_secs(5), || async {
        !call(demo.gateway, "/productpage", &jason)
            .await
            .1
            .contains("reviews-v2")
    })
    .await;
    assert!(back, "jason's route deleted");

    // Istio's apiVersions apply as the mesh's do, and so does a directory.
    let dir = home.join("istio");
    std::fs::create_dir_all(&dir).unwrap();
    let split = std::fs::read_to_string(
        repo().join("samples/bookinfo/networking/virtual-service-reviews-50-v3.yaml"),
    )
    .unwrap()
    .replace("networking.mesh.dev/v1", "networking.istio.io/v1beta1");
    assert!(split.contains("networking.istio.io/v1beta1"), "{split}");
    std::fs::write(dir.join("reviews-50-v3.yaml"), split).unwrap();
    let out = meshctl(&home, &["apply", "-f", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let versions = || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let (_, body) = call(demo.gateway, "/api/v1/products/0/reviews", &[]).await;
            seen.insert(podname(&body));
        }
        seen.into_iter().collect::<Vec<_>>()
    };
    let split_applied = eventually(Duration::from_secs(5), || async {
        versions().await == ["reviews-v1", "reviews-v3"]
    })
    .await;
    assert!(split_applied, "50/50 v1/v3 from an Istio VirtualService");
    let out = meshctl(&home, &["delete", "-f", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let rotating = eventually(Duration::from_secs(5), || async {
        versions().await.len() == 3
    })
    .await;
    assert!(
        rotating,
        "deleting the directory's resources restores rotation"
    );

    // Every proxy took what it was sent.
    let out = meshctl(&home, &["proxy-status"]);
    let status = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        status.contains("ingressgateway.default") && status.contains("reviews-v3.default"),
        "{status}"
    );
    assert!(!status.contains("NACKED"), "{status}");

    // What one proxy runs, read from its admin port.
    let out = meshctl(&home, &["proxy-config", "routes", "productpage-v1"]);
    let routes = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        routes.contains("reviews") && routes.contains("details"),
        "{routes}"
    );
    let out = meshctl(
        &home,
        &["proxy-config", "clusters", "reviews-v2", "-o", "json"],
    );
    assert!(out.status.success(), "{out:?}");
    let clusters: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(clusters["clusters"].is_array(), "{clusters}");
    assert!(clusters.to_string().contains("ratings"), "{clusters}");

    // A second demo on the same gateway port says what is wrong.
    let other = home.join("other");
    let out = Command::new(binary("meshctl"))
        .args(["demo", "--gateway-port", &gateway.port().to_string()])
        .env("MESH_HOME", &other)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--gateway-port"), "{out:?}");

    // Ctrl-C stops it cleanly, and other commands see it gone.
    let pid = demo.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = demo.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "the demo stopped on Ctrl-C");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0));
    let out = meshctl(
        &home,
        &[
            "apply",
            "-f",
            "samples/bookinfo/networking/virtual-service-all-v1.yaml",
        ],
    );
    assert!(
        text(&out.stderr).contains("no local mesh is running"),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&home);
}

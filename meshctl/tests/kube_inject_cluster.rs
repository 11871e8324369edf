//! `meshctl kube-inject` with a reachable cluster: it uses the cluster's
//! Kubernetes version and the injector's settings there (a fake API server
//! on loopback, named by a kubeconfig).

use std::process::Command;

use axum::Router;
use axum::routing::get;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_inject_follows_the_cluster_unless_offline() {
    let app = Router::new()
        .route(
            "/version",
            get(|| async {
                axum::Json(json!({
                    "major": "1", "minor": "28+", "gitVersion": "v1.28.9", "gitCommit": "x",
                    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"
                }))
            }),
        )
        .route(
            "/api/v1/namespaces/mesh-system/configmaps/mesh-injector",
            get(|| async {
                axum::Json(json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "mesh-injector", "namespace": "mesh-system"},
                    "data": {"settings.yaml": "proxyImage: registry.example/mesh/proxy:9\n"}
                }))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = std::env::temp_dir().join(format!("meshctl-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\n\
             contexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let run = move |extra: &'static [&'static str]| {
        let kubeconfig = kubeconfig.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_meshctl"))
                    .arg("kube-inject")
                    .args(extra)
                    .args(["-f", "samples/callme/platform/callme.yaml"])
                    .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                    .env("KUBECONFIG", &kubeconfig)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = run(&[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("image: registry.example/mesh/proxy:9"),
        "the cluster's settings"
    );
    assert!(
        text.contains("- wait"),
        "1.28: classic sidecars holding the app"
    );
    let out = run(&["--kubernetes-minor", "30"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("restartPolicy: Always") && !text.contains("- wait"),
        "the flag wins"
    );
    let out = run(&["--offline"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("registry.example"), "offline: the defaults");
    assert!(text.contains("restartPolicy: Always"));
    let _ = std::fs::remove_dir_all(&dir);
}

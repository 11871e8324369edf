use std::collections::HashMap;

use super::*;

/// Starts `app` on loopback; its calls go to `hosts`.
async fn start(app: App, hosts: &HashMap<String, SocketAddr>, name: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = router(app, Upstream::direct(hosts.clone()), name.into());
    tokio::spawn(serve(listener, r));
    addr
}

async fn call(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let (s, body) = Upstream::new(None)
        .get(&addr.to_string(), path, &h, Duration::from_secs(5))
        .await
        .unwrap();
    (s, String::from_utf8(body.to_vec()).unwrap())
}

fn v(s: &str) -> App {
    App::Reviews { version: s.into() }
}

#[tokio::test]
async fn details_and_ratings_answer_bookinfo_json() {
    let none = HashMap::new();
    let d = start(App::Details, &none, "details").await;
    let (s, body) = call(d, "/details/0", &[]).await;
    assert_eq!(s, 200);
    let j: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["author"], "William Shakespeare");
    assert_eq!(j["ISBN-10"], "1234567890");
    let (s, body) = call(d, "/details/x", &[]).await;
    assert_eq!(s, 400);
    assert!(body.contains("numeric product id"));
    let r = start(App::Ratings, &none, "ratings").await;
    let (_, body) = call(r, "/ratings/7", &[]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"id": 7, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})
    );
    assert!(
        call(r, "/health", &[])
            .await
            .1
            .contains("Ratings is healthy")
    );
}

#[tokio::test]
async fn reviews_show_stars_by_version_and_say_when_ratings_is_down() {
    let none = HashMap::new();
    let ratings = start(App::Ratings, &none, "ratings").await;
    let hosts: HashMap<String, SocketAddr> = [("ratings:9080".to_string(), ratings)].into();
    let review = |body: &str| serde_json::from_str::<Value>(body).unwrap()["reviews"][0].clone();

    let v1 = start(v("v1"), &hosts, "reviews-v1").await;
    let (_, body) = call(v1, "/reviews/0", &[]).await;
    assert!(review(&body).get("rating").is_none(), "{body}");
    assert!(body.contains("\"podname\":\"reviews-v1\""));
    let v2 = start(v("v2"), &hosts, "reviews-v2").await;
    assert_eq!(
        review(&call(v2, "/reviews/0", &[]).await.1)["rating"],
        json!({"stars": 5, "color": "black"})
    );
    let v3 = start(v("v3"), &hosts, "reviews-v3").await;
    assert_eq!(
        review(&call(v3, "/reviews/0", &[]).await.1)["rating"],
        json!({"stars": 5, "color": "red"})
    );
    // Ratings nowhere to be found.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let v3 = start(
        v("v3"),
        &[("ratings:9080".to_string(), gone)].into(),
        "reviews-v3",
    )
    .await;
    let (s, body) = call(v3, "/reviews/0", &[]).await;
    assert_eq!(s, 200);
    assert_eq!(
        review(&body)["rating"],
        json!({"error": "Ratings service is currently unavailable"})
    );
}

#[tokio::test]
async fn productpage_renders_details_and_reviews_and_passes_the_user_on() {
    let none = HashMap::new();
    let details = start(App::Details, &none, "details").await;
    let ratings = start(App::Ratings, &none, "ratings").await;
    // A reviews that names the user it was called for, as its podname.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reviews = echo.local_addr().unwrap();
    tokio::spawn(serve(
        echo,
        Router::new().route(
            "/reviews/{id}",
            get(|h: HeaderMap| async move {
                let user = h.get("end-user").and_then(|v| v.to_str().ok()).unwrap_or("nobody");
                let trace = h.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
                axum::Json(json!({"id": "0", "podname": format!("{user}/{trace}"), "reviews": [
                    {"reviewer": "Reviewer1", "text": "t", "rating": {"stars": 4, "color": "red"}}
                ]}))
            }),
        ),
    ));
    let hosts: HashMap<String, SocketAddr> = [
        ("details:9080".to_string(), details),
        ("reviews:9080".to_string(), reviews),
        ("ratings:9080".to_string(), ratings),
    ]
    .into();
    let pp = start(App::Productpage, &hosts, "productpage").await;
    let (s, page) = call(pp, "/productpage", &[("x-request-id", "r-1")]).await;
    assert_eq!(s, 200);
    assert!(page.contains("<h1>The Comedy of Errors</h1>"), "{page}");
    assert!(
        page.contains("<th>Publisher:</th><td>PublisherA</td>"),
        "{page}"
    );
    assert!(page.contains("★★★★☆"), "{page}");
    assert!(
        page.contains("Reviews served by: <b>nobody/r-1</b>"),
        "{page}"
    );
    let (_, page) = call(pp, "/productpage", &[("cookie", "user=jason")]).await;
    assert!(page.contains("signed in as <b>jason</b>"), "{page}");
    assert!(page.contains("Reviews served by: <b>jason/-</b>"), "{page}");
    let (_, api) = call(
        pp,
        "/api/v1/products/0/reviews",
        &[("cookie", "a=b; user=jason")],
    )
    .await;
    assert!(api.contains("jason/-"), "{api}");
    let (_, api) = call(pp, "/api/v1/products/0/ratings", &[]).await;
    assert!(api.contains("Reviewer2"), "{api}");
    let (_, products) = call(pp, "/api/v1/products", &[]).await;
    assert!(products.contains("\"title\":\"The Comedy of Errors\""));
    // Details gone: the page says so and still shows the reviews.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut broken = hosts.clone();
    broken.insert("details:9080".into(), gone);
    let pp = start(App::Productpage, &broken, "productpage").await;
    let (s, page) = call(pp, "/productpage", &[]).await;
    assert_eq!(s, 200);
    assert!(
        page.contains("product details are currently unavailable"),
        "{page}"
    );
    assert!(page.contains("Reviews served by"), "{page}");
    // As bookinfo's productpage: 500 and an error object when details
    // cannot be reached.
    let (s, body) = call(pp, "/api/v1/products/0", &[]).await;
    assert_eq!(s, 500);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"error": "Sorry, product details are currently unavailable for this book."})
    );
}

#[tokio::test]
async fn caller_calls_callme() {
    let none = HashMap::new();
    let callme = start(
        App::Callme {
            version: "v2".into(),
        },
        &none,
        "callme",
    )
    .await;
    let caller = start(
        App::Caller {
            version: "v1".into(),
            callme_url: "http://callme-service:8091".into(),
        },
        &[("callme-service:8091".to_string(), callme)].into(),
        "caller",
    )
    .await;
    assert_eq!(
        call(callme, "/callme/ping", &[]).await.1,
        "callme-service:v2"
    );
    assert_eq!(
        call(caller, "/caller/ping", &[]).await,
        (
            StatusCode::OK,
            "caller-service:v1. Calling... callme-service:v2".to_string()
        )
    );
}

//! The mesh's sample apps, with the URLs, ports and JSON of Istio's
//! bookinfo and of the callme/caller tutorial:
//!
//! - `productpage` (9080): an HTML page with the book's details and reviews,
//!   a login form (the user is sent on as `end-user`), and the API under
//!   `/api/v1/products`.
//! - `details` (9080): `GET /details/<id>`.
//! - `reviews` v1 (no stars), v2 (black stars), v3 (red stars) (9080):
//!   `GET /reviews/<id>`; v2 and v3 call ratings and report an error object
//!   when it is unavailable.
//! - `ratings` (9080): `GET /ratings/<id>`.
//! - `callme` (8091): `GET /callme/ping` → `callme-service:<version>`.
//! - `caller` (8090): `GET /caller/ping` calls callme and answers
//!   `caller-service:<version>. Calling... <callme's answer>`.
//!
//! Every app answers `GET /health`. Calls to other services go through an
//! explicit proxy when one is given (the local mesh), otherwise straight to
//! the service name (Kubernetes, where the sidecar captures them). Trace
//! headers and `end-user` are passed on.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

/// Which app to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum App {
    Productpage,
    Details,
    Reviews { version: String },
    Ratings,
    Callme { version: String },
    Caller { version: String, callme_url: String },
}

impl App {
    /// The port the app listens on in Kubernetes.
    pub fn default_port(&self) -> u16 {
        match self {
            App::Callme { .. } => 8091,
            App::Caller { .. } => 8090,
            _ => 9080,
        }
    }
}

/// How an app reaches other services.
#[derive(Clone)]
pub struct Upstream {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    /// An explicit (HTTP forward) proxy: requests go to it, named by Host.
    proxy: Option<SocketAddr>,
    /// Without a proxy: addresses of service names (`ratings:9080`); names
    /// not listed are resolved by DNS.
    hosts: std::collections::HashMap<String, SocketAddr>,
}

impl Upstream {
    pub fn new(proxy: Option<SocketAddr>) -> Upstream {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        Upstream {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build(connector),
            proxy,
            hosts: Default::default(),
        }
    }

    /// Calls go straight to these addresses, by service name: the apps
    /// without a mesh.
    pub fn direct(hosts: impl IntoIterator<Item = (String, SocketAddr)>) -> Upstream {
        Upstream {
            hosts: hosts.into_iter().collect(),
            ..Upstream::new(None)
        }
    }

    /// `GET http://<authority><path>`, passing on `forward`; the status and
    /// body, or why there is none.
    pub async fn get(
        &self,
        authority: &str,
        path: &str,
        forward: &HeaderMap,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), String> {
        let uri = match self.proxy.or_else(|| self.hosts.get(authority).copied()) {
            Some(p) => format!("http://{p}{path}"),
            None => format!("http://{authority}{path}"),
        };
        let mut req = http::Request::get(uri)
            .header(header::HOST, authority)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        for (name, value) in forward {
            req.headers_mut().insert(name, value.clone());
        }
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| format!("timed out after {timeout:?}"))?
    }
}

/// Headers passed on to the services an app calls: trace context, the
/// request id and the logged-in user.
const FORWARDED: [&str; 12] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
    "end-user",
    "user-agent",
];

fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED {
        if let Some(v) = headers.get(name) {
            out.insert(name, v.clone());
        }
    }
    out
}

#[derive(Clone)]
struct Ctx {
    app: App,
    upstream: Upstream,
    /// What reviews reports as `podname`.
    name: String,
}

/// The app's routes.
pub fn router(app: App, upstream: Upstream, name: String) -> Router {
    let ctx = Ctx {
        app: app.clone(),
        upstream,
        name,
    };
    let r = Router::new();
    let r = match app {
        App::Productpage => r
            .route("/", get(index))
            .route("/productpage", get(productpage))
            .route("/login", post(login))
            .route("/logout", get(logout))
            .route("/api/v1/products", get(products))
            .route("/api/v1/products/{id}", get(api_details))
            .route("/api/v1/products/{id}/reviews", get(api_reviews))
            .route("/api/v1/products/{id}/ratings", get(api_ratings)),
        App::Details => r.route("/details/{id}", get(details)),
        App::Reviews { .. } => r.route("/reviews/{id}", get(reviews)),
        App::Ratings => r.route("/ratings/{id}", get(ratings)),
        App::Callme { .. } => r.route("/callme/ping", get(callme_ping)),
        App::Caller { .. } => r.route("/caller/ping", get(caller_ping)),
    };
    r.route("/health", get(health)).with_state(ctx)
}

/// Serves `router` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

async fn health(State(ctx): State<Ctx>) -> impl IntoResponse {
    let what = match ctx.app {
        App::Productpage => "Product page",
        App::Details => "Details",
        App::Reviews { .. } => "Reviews",
        App::Ratings => "Ratings",
        App::Callme { .. } => "Callme",
        App::Caller { .. } => "Caller",
    };
    axum::Json(json!({ "status": format!("{what} is healthy") }))
}

fn product_id(id: &str) -> Option<u32> {
    id.parse().ok()
}

fn bad_id() -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": "please provide numeric product id"})),
    )
        .into_response()
}

// ---- details, ratings, reviews ----

async fn details(Path(id): Path<String>) -> Response {
    match product_id(&id) {
        Some(id) => axum::Json(book_details(id)).into_response(),
        None => bad_id(),
    }
}

fn book_details(id: u32) -> Value {
    json!({
        "id": id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    })
}

async fn ratings(Path(id): Path<String>) -> Response {
    match product_id(&id) {
        Some(id) => axum::Json(json!({"id": id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}))
            .into_response(),
        None => bad_id(),
    }
}

const REVIEWS: [(&str, &str); 2] = [
    (
        "Reviewer1",
        "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
    ),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
    ),
];

async fn reviews(State(ctx): State<Ctx>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let id = match product_id(&id) {
        Some(id) => id,
        None => return bad_id(),
    };
    let App::Reviews { version } = &ctx.app else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // v1 shows no stars; v2 black ones, v3 red ones, from ratings (v2
    // waits up to 10 s for it, v3 2.5 s, as bookinfo does).
    let color = match version.as_str() {
        "v2" => Some(("black", Duration::from_secs(10))),
        "v3" => Some(("red", Duration::from_millis(2500))),
        _ => None,
    };
    let stars = match color {
        None => None,
        Some((color, timeout)) => {
            let got = ctx
                .upstream
                .get(
                    "ratings:9080",
                    &format!("/ratings/{id}"),
                    &forwarded(&headers),
                    timeout,
                )
                .await;
            Some(match got {
                Ok((s, body)) if s.is_success() => serde_json::from_slice::<Value>(&body)
                    .ok()
                    .map(|v| (color, v["ratings"].clone())),
                _ => None,
            })
        }
    };
    let list: Vec<Value> = REVIEWS
        .iter()
        .map(|(reviewer, text)| {
            let mut r = json!({"reviewer": reviewer, "text": text});
            match &stars {
                None => {}
                Some(Some((color, ratings))) => {
                    if let Some(n) = ratings[*reviewer].as_u64() {
                        r["rating"] = json!({"stars": n, "color": color});
                    }
                }
                Some(None) => {
                    r["rating"] = json!({"error": "Ratings service is currently unavailable"});
                }
            }
            r
        })
        .collect();
    axum::Json(json!({
        "id": id.to_string(),
        "podname": ctx.name,
        "clustername": "null",
        "reviews": list,
    }))
    .into_response()
}

// ---- productpage ----

const TITLE: &str = "The Comedy of Errors";
const SUMMARY: &str = "<a href=\"https://en.wikipedia.org/wiki/The_Comedy_of_Errors\">Wikipedia Summary</a>: The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his shortest and one of his most farcical comedies, with a major part of the humour coming from slapstick and mistaken identity, in addition to puns and word play.";

async fn index() -> Redirect {
    Redirect::to("/productpage")
}

async fn products() -> impl IntoResponse {
    axum::Json(json!([{"id": 0, "title": TITLE, "descriptionHtml": SUMMARY}]))
}

/// The logged-in user, from the session cookie.
fn user(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("user="))
        .filter(|u| {
            !u.is_empty()
                && u.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        .map(str::to_string)
}

/// What productpage passes on: the caller's trace headers, and the user
/// (from its session, unless the request names one already).
fn outgoing(headers: &HeaderMap) -> HeaderMap {
    let mut out = forwarded(headers);
    if let Some(u) = user(headers).and_then(|u| HeaderValue::from_str(&u).ok()) {
        out.insert("end-user", u);
    }
    out
}

/// details: 3 s. reviews: two tries of 3 s each, as bookinfo's productpage.
async fn fetch_details(ctx: &Ctx, id: u32, h: &HeaderMap) -> Result<(StatusCode, Bytes), String> {
    ctx.upstream
        .get(
            "details:9080",
            &format!("/details/{id}"),
            h,
            Duration::from_secs(3),
        )
        .await
}

async fn fetch_reviews(ctx: &Ctx, id: u32, h: &HeaderMap) -> Result<(StatusCode, Bytes), String> {
    let path = format!("/reviews/{id}");
    let mut last = Err(String::new());
    for _ in 0..2 {
        last = ctx
            .upstream
            .get("reviews:9080", &path, h, Duration::from_secs(3))
            .await;
        if matches!(&last, Ok((s, _)) if s.is_success()) {
            break;
        }
    }
    last
}

/// An upstream's 200 passed through; otherwise, as bookinfo's productpage,
/// an error object with the upstream's status (500 when there was none).
fn passthrough(got: Result<(StatusCode, Bytes), String>, what: &str) -> Response {
    let status = match got {
        Ok((StatusCode::OK, body)) => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response();
        }
        Ok((status, _)) => status,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        axum::Json(json!({"error": format!("Sorry, product {what} are currently unavailable for this book.")})),
    )
        .into_response()
}

async fn api_details(State(ctx): State<Ctx>, Path(id): Path<String>, h: HeaderMap) -> Response {
    match product_id(&id) {
        Some(id) => passthrough(fetch_details(&ctx, id, &outgoing(&h)).await, "details"),
        None => bad_id(),
    }
}

async fn api_reviews(State(ctx): State<Ctx>, Path(id): Path<String>, h: HeaderMap) -> Response {
    match product_id(&id) {
        Some(id) => passthrough(fetch_reviews(&ctx, id, &outgoing(&h)).await, "reviews"),
        None => bad_id(),
    }
}

async fn api_ratings(State(ctx): State<Ctx>, Path(id): Path<String>, h: HeaderMap) -> Response {
    match product_id(&id) {
        Some(id) => passthrough(
            ctx.upstream
                .get(
                    "ratings:9080",
                    &format!("/ratings/{id}"),
                    &outgoing(&h),
                    Duration::from_secs(3),
                )
                .await,
            "ratings",
        ),
        None => bad_id(),
    }
}

#[derive(serde::Deserialize)]
struct LoginForm {
    username: String,
}

async fn login(axum::Form(f): axum::Form<LoginForm>) -> Response {
    let name: String = f
        .username
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    (
        [(
            header::SET_COOKIE,
            format!("user={name}; Path=/; HttpOnly; SameSite=Lax"),
        )],
        Redirect::to("/productpage"),
    )
        .into_response()
}

async fn logout() -> Response {
    (
        [(header::SET_COOKIE, "user=; Path=/; Max-Age=0".to_string())],
        Redirect::to("/productpage"),
    )
        .into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn productpage(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    let h = outgoing(&headers);
    let (details, reviews) = tokio::join!(fetch_details(&ctx, 0, &h), fetch_reviews(&ctx, 0, &h));
    let ok_json = |r: Result<(StatusCode, Bytes), String>| match r {
        Ok((s, body)) if s.is_success() => serde_json::from_slice::<Value>(&body).ok(),
        _ => None,
    };
    let user = user(&headers);
    let mut page = String::with_capacity(4096);
    page.push_str(&format!(
        r#"<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Simple Bookstore App</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0; color: #222; }}
nav {{ background: #263238; color: #fff; padding: .7em 1.5em; display: flex; justify-content: space-between; align-items: center; }}
nav form {{ margin: 0; }}
main {{ display: grid; grid-template-columns: 1fr 1fr; gap: 2em; padding: 1.5em; max-width: 1100px; }}
h1 {{ grid-column: 1 / 3; margin: 0; }}
.summary {{ grid-column: 1 / 3; }}
table {{ border-collapse: collapse; }} td, th {{ text-align: left; padding: .25em 1em .25em 0; }}
blockquote {{ margin: 0 0 1.2em 0; padding-left: 1em; border-left: 3px solid #cfd8dc; }}
.stars {{ font-size: 1.3em; }} .error {{ color: #b71c1c; }} small {{ color: #607d8b; }}
</style></head><body>
<nav><b>BookInfo Sample</b>{}</nav>
<main>
<h1>{TITLE}</h1>
<p class="summary">{SUMMARY}</p>
"#,
        match &user {
            Some(u) => format!(
                r#"<span>signed in as <b>{}</b> · <a style="color:#fff" href="/logout">sign out</a></span>"#,
                escape(u)
            ),
            None => r#"<form method="post" action="/login"><input name="username" placeholder="user (try jason)"> <input type="password" name="passwd" placeholder="password"> <button>Sign in</button></form>"#.to_string(),
        }
    ));
    page.push_str("<section><h2>Book Details</h2>");
    match ok_json(details) {
        Some(d) => {
            page.push_str("<table>");
            for (label, key) in [
                ("Type", "type"),
                ("Pages", "pages"),
                ("Publisher", "publisher"),
                ("Language", "language"),
                ("ISBN-10", "ISBN-10"),
                ("ISBN-13", "ISBN-13"),
            ] {
                let v = match &d[key] {
                    Value::String(s) => s.clone(),
                    Value::Null => continue,
                    v => v.to_string(),
                };
                page.push_str(&format!("<tr><th>{label}:</th><td>{}</td></tr>", escape(&v)));
            }
            page.push_str("</table>");
        }
        None => page.push_str(
            r#"<p class="error">Sorry, product details are currently unavailable for this book.</p>"#,
        ),
    }
    page.push_str("</section><section><h2>Book Reviews</h2>");
    match ok_json(reviews) {
        Some(r) => {
            for review in r["reviews"].as_array().into_iter().flatten() {
                page.push_str(&format!(
                    "<blockquote><p>{}</p><small>{}</small>",
                    escape(review["text"].as_str().unwrap_or_default()),
                    escape(review["reviewer"].as_str().unwrap_or_default())
                ));
                let rating = &review["rating"];
                if let Some(n) = rating["stars"].as_u64() {
                    let color = rating["color"].as_str().unwrap_or("black");
                    let n = n.min(5) as usize;
                    page.push_str(&format!(
                        r#"<div class="stars" style="color:{}">{}{}</div>"#,
                        if color == "red" { "#d32f2f" } else { "#000" },
                        "★".repeat(n),
                        "☆".repeat(5 - n)
                    ));
                } else if let Some(e) = rating["error"].as_str() {
                    page.push_str(&format!(r#"<p class="error">{}</p>"#, escape(e)));
                }
                page.push_str("</blockquote>");
            }
            page.push_str(&format!(
                "<small>Reviews served by: <b>{}</b></small>",
                escape(r["podname"].as_str().unwrap_or("?"))
            ));
        }
        None => page.push_str(
            r#"<p class="error">Sorry, product reviews are currently unavailable for this book.</p>"#,
        ),
    }
    page.push_str("</section></main></body></html>\n");
    Html(page).into_response()
}

// ---- callme / caller ----

async fn callme_ping(State(ctx): State<Ctx>) -> Response {
    match &ctx.app {
        App::Callme { version } => format!("callme-service:{version}").into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn caller_ping(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    let App::Caller {
        version,
        callme_url,
    } = &ctx.app
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let authority = callme_url
        .strip_prefix("http://")
        .unwrap_or(callme_url)
        .trim_end_matches('/');
    let got = ctx
        .upstream
        .get(
            authority,
            "/callme/ping",
            &forwarded(&headers),
            Duration::from_secs(10),
        )
        .await;
    match got {
        Ok((s, body)) if s.is_success() => format!(
            "caller-service:{version}. Calling... {}",
            String::from_utf8_lossy(&body)
        )
        .into_response(),
        Ok((s, body)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "caller-service:{version}. Calling... failed: {s} {}",
                String::from_utf8_lossy(&body)
            ),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("caller-service:{version}. Calling... failed: {e}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests;

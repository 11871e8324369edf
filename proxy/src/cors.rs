//! CORS (a VirtualService's `corsPolicy`): preflights answered by the
//! proxy, actual responses decorated with the allow headers.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::Body;
use crate::state::Cors;

fn allowed_origin<'a>(cors: &Cors, headers: &'a HeaderMap) -> Option<&'a HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let s = origin.to_str().ok()?;
    cors.origins.iter().any(|m| m.matches(s)).then_some(origin)
}

/// Answers a CORS preflight (OPTIONS with Origin and
/// Access-Control-Request-Method) from an allowed origin. Preflights from
/// other origins go to the upstream, as Envoy does by default.
pub fn preflight(cors: &Cors, req: &Request<Incoming>) -> Option<Response<Body>> {
    if req.method() != Method::OPTIONS
        || !req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return None;
    }
    let origin = allowed_origin(cors, req.headers())?.clone();
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if let Some(m) = &cors.methods {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, m.clone());
    }
    if let Some(v) = &cors.headers {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
    }
    if let Some(v) = &cors.max_age {
        h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
    }
    if cors.credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    Some(resp)
}

/// Adds the CORS headers to an actual (non-preflight) response when the
/// request's origin is allowed.
pub fn decorate(cors: &Cors, origin: Option<&HeaderValue>, resp_headers: &mut HeaderMap) {
    let Some(origin) = origin else { return };
    let allowed = origin
        .to_str()
        .is_ok_and(|o| cors.origins.iter().any(|m| m.matches(o)));
    if !allowed {
        return;
    }
    resp_headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    resp_headers.append(header::VARY, HeaderValue::from_static("origin"));
    if let Some(v) = &cors.expose {
        resp_headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
    }
    if cors.credentials {
        resp_headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

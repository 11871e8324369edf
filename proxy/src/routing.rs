//! Route matching: VirtualService matches compiled once per config (regexes
//! built, header names parsed, source labels decided against this proxy's
//! own workload) and evaluated per request without allocating.

use std::collections::BTreeMap;

use http::header::{HeaderMap, HeaderName};
use mesh_api::networking::{HttpMatchRequest, StringMatch};
use regex::Regex;

/// A compiled `StringMatch`.
#[derive(Debug)]
pub enum Matcher {
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(Regex),
    /// `{}`: the header or parameter is present, whatever its value.
    Present,
}

impl Matcher {
    pub fn compile(m: &StringMatch, ignore_case: bool) -> Result<Matcher, String> {
        if let Some(e) = &m.exact {
            return Ok(Matcher::Exact(e.as_str().into()));
        }
        if let Some(p) = &m.prefix {
            return Ok(Matcher::Prefix(p.as_str().into()));
        }
        if let Some(r) = &m.regex {
            let pattern = if ignore_case {
                format!("(?i){r}")
            } else {
                r.clone()
            };
            return mesh_api::validate::compile_regex(&pattern)
                .map(Matcher::Regex)
                .map_err(|e| format!("invalid regex {r:?}: {e}"));
        }
        Ok(Matcher::Present)
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Matcher::Exact(e) => v == &**e,
            Matcher::Prefix(p) => v.starts_with(&**p),
            Matcher::Regex(r) => r.is_match(v),
            Matcher::Present => true,
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        match self {
            Matcher::Exact(e) => v.eq_ignore_ascii_case(e),
            Matcher::Prefix(p) => {
                v.len() >= p.len() && v.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            // Compiled with (?i).
            Matcher::Regex(r) => r.is_match(v),
            Matcher::Present => true,
        }
    }
}

/// What a route match looks at.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub port: u16,
    pub headers: &'a HeaderMap,
}

/// A compiled `HTTPMatchRequest`.
#[derive(Debug)]
pub struct RouteMatch {
    uri: Option<Matcher>,
    ignore_uri_case: bool,
    scheme: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<(HeaderName, Matcher)>,
    without_headers: Vec<(HeaderName, Matcher)>,
    query: Vec<(Box<str>, Matcher)>,
    port: Option<u16>,
    /// Decided at compile time: sourceLabels, sourceNamespace and gateways
    /// are facts about this proxy, not the request.
    applies_here: bool,
}

/// Facts about this proxy that decide `sourceLabels`, `sourceNamespace`
/// and `gateways` matches.
pub struct Here<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub namespace: &'a str,
    /// `mesh` for sidecars; the gateway's `namespace/name`s for gateways.
    pub gateways: &'a [String],
}

impl RouteMatch {
    pub fn compile(m: &HttpMatchRequest, here: &Here) -> Result<RouteMatch, String> {
        let compile = |field: &str, sm: &Option<StringMatch>, ic: bool| {
            sm.as_ref()
                .map(|sm| Matcher::compile(sm, ic).map_err(|e| format!("{field}: {e}")))
                .transpose()
        };
        let headers = |field: &str, map: &BTreeMap<String, StringMatch>| {
            map.iter()
                .map(|(name, sm)| {
                    let hn = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("{field}: invalid header name {name:?}"))?;
                    Ok((hn, Matcher::compile(sm, false)?))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        let labels_ok = m
            .source_labels
            .iter()
            .all(|(k, v)| here.labels.get(k) == Some(v));
        let ns_ok = m
            .source_namespace
            .as_deref()
            .is_none_or(|ns| ns == here.namespace);
        let gw_ok = m.gateways.is_empty()
            || m.gateways
                .iter()
                .any(|g| here.gateways.iter().any(|h| gateway_matches(h, g)));
        Ok(RouteMatch {
            uri: compile("uri", &m.uri, m.ignore_uri_case)?,
            ignore_uri_case: m.ignore_uri_case,
            scheme: compile("scheme", &m.scheme, false)?,
            method: compile("method", &m.method, false)?,
            authority: compile("authority", &m.authority, false)?,
            headers: headers("headers", &m.headers)?,
            without_headers: headers("withoutHeaders", &m.without_headers)?,
            query: m
                .query_params
                .iter()
                .map(|(k, sm)| Ok((k.as_str().into(), Matcher::compile(sm, false)?)))
                .collect::<Result<_, String>>()?,
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            applies_here: labels_ok && ns_ok && gw_ok,
        })
    }

    pub fn matches(&self, r: &RequestView) -> bool {
        if !self.applies_here {
            return false;
        }
        if let Some(p) = self.port
            && p != r.port
        {
            return false;
        }
        if let Some(m) = &self.uri {
            let ok = if self.ignore_uri_case {
                m.matches_ignore_case(r.path)
            } else {
                m.matches(r.path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(m) = &self.method
            && !m.matches(r.method)
        {
            return false;
        }
        if let Some(m) = &self.scheme
            && !m.matches(r.scheme)
        {
            return false;
        }
        if let Some(m) = &self.authority
            && !m.matches(r.authority)
        {
            return false;
        }
        for (name, m) in &self.headers {
            match r.headers.get(name).and_then(|v| v.to_str().ok()) {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        for (name, m) in &self.without_headers {
            if let Some(v) = r.headers.get(name).and_then(|v| v.to_str().ok())
                && m.matches(v)
            {
                return false;
            }
        }
        for (key, m) in &self.query {
            match query_param(r.query, key) {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        true
    }
}

/// A VirtualService `gateways` entry against one of this proxy's gateway
/// names (`mesh` or `namespace/name`); a bare name matches any namespace.
fn gateway_matches(here: &str, wanted: &str) -> bool {
    if here == wanted {
        return true;
    }
    match (here.split_once('/'), wanted.split_once('/')) {
        (Some((_, name)), None) => name == wanted,
        _ => false,
    }
}

/// The raw value of the first `key=value` pair of a query string.
pub fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn here() -> (BTreeMap<String, String>, Vec<String>) {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), "productpage".to_string());
        (labels, vec!["mesh".to_string()])
    }

    fn view<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        let (p, q) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        RequestView {
            method: "GET",
            path: p,
            query: q,
            scheme: "http",
            authority: "reviews:9080",
            port: 9080,
            headers,
        }
    }

    fn compile(yaml: &str) -> RouteMatch {
        let (labels, gws) = here();
        let m: HttpMatchRequest = serde_yaml::from_str(yaml).unwrap();
        RouteMatch::compile(
            &m,
            &Here {
                labels: &labels,
                namespace: "default",
                gateways: &gws,
            },
        )
        .unwrap()
    }

    #[test]
    fn uri_forms() {
        let h = HeaderMap::new();
        assert!(compile("uri: {exact: /a}").matches(&view("/a", &h)));
        assert!(!compile("uri: {exact: /a}").matches(&view("/ab", &h)));
        assert!(compile("uri: {prefix: /a}").matches(&view("/ab", &h)));
        assert!(compile("uri: {regex: '/a/[0-9]+'}").matches(&view("/a/12", &h)));
        // Regexes match the whole path.
        assert!(!compile("uri: {regex: '/a/[0-9]+'}").matches(&view("/a/12/x", &h)));
        assert!(compile("{uri: {prefix: /API}, ignoreUriCase: true}").matches(&view("/api/x", &h)));
    }

    #[test]
    fn headers_present_absent_and_query() {
        let mut h = HeaderMap::new();
        h.insert("end-user", "jason".parse().unwrap());
        assert!(compile("headers: {end-user: {exact: jason}}").matches(&view("/", &h)));
        assert!(!compile("headers: {end-user: {exact: bob}}").matches(&view("/", &h)));
        assert!(compile("headers: {end-user: {}}").matches(&view("/", &h)));
        assert!(!compile("withoutHeaders: {end-user: {}}").matches(&view("/", &h)));
        assert!(compile("withoutHeaders: {x-debug: {}}").matches(&view("/", &h)));
        assert!(compile("queryParams: {v: {exact: '2'}}").matches(&view("/p?a=1&v=2", &h)));
        assert!(!compile("queryParams: {v: {exact: '2'}}").matches(&view("/p?v=3", &h)));
    }

    #[test]
    fn source_labels_are_decided_by_this_workload() {
        let h = HeaderMap::new();
        assert!(compile("sourceLabels: {app: productpage}").matches(&view("/", &h)));
        assert!(!compile("sourceLabels: {app: reviews}").matches(&view("/", &h)));
        assert!(!compile("sourceNamespace: other").matches(&view("/", &h)));
        assert!(!compile("gateways: [default/public]").matches(&view("/", &h)));
        assert!(compile("port: 9080").matches(&view("/", &h)));
        assert!(!compile("port: 80").matches(&view("/", &h)));
    }
}

//! Reading multi-document YAML into resources, with errors that name the
//! file, line and column.
//!
//! Documents are split on `---` lines (a line starting with `---` at column
//! 0 is always a document marker in YAML), so each document's errors carry
//! their line in the whole file. A document is then read by its apiVersion:
//! the mesh's own groups and Istio's (converted on read, same schema), the
//! legacy `config.istio.io/v1alpha2` RouteRule (converted by
//! [`crate::convert`]), and anything else passed through untouched.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::legacy::RouteRule;
use crate::networking::{
    DestinationRule, Gateway, RateLimitPolicy, ServiceEntry, Sidecar, VirtualService, WorkloadEntry,
};
use crate::resource::{Kind, Resource};
use crate::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};

/// Where a document starts: file (or `-` for stdin) and 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A document that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct LoadError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// One document of a YAML stream.
#[derive(Clone, Debug)]
pub struct Document {
    pub origin: Origin,
    pub item: Item,
}

#[derive(Clone, Debug)]
pub enum Item {
    /// A mesh resource; `api_version` is what the document said (the mesh's
    /// or Istio's).
    Resource {
        resource: Box<Resource>,
        api_version: String,
    },
    /// A legacy Istio RouteRule, for [`crate::convert`] to turn into a
    /// VirtualService and DestinationRule.
    RouteRule(Box<RouteRule>),
    /// Anything else: Kubernetes objects, unsupported Istio kinds.
    Other {
        api_version: String,
        kind: String,
        value: serde_yaml::Value,
    },
    Invalid(LoadError),
}

/// How the mesh treats a document's apiVersion and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    Mesh(Kind),
    /// An Istio resource whose schema is the mesh's.
    Istio(Kind),
    RouteRule,
    /// A kind of an Istio or mesh group that the mesh does not implement.
    Unsupported,
    /// Not a mesh or Istio group (Kubernetes objects and the like).
    Foreign,
}

const ISTIO_NETWORKING: [&str; 3] = [
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];
const ISTIO_SECURITY: [&str; 2] = ["security.istio.io/v1beta1", "security.istio.io/v1"];

pub fn disposition(api_version: &str, kind: &str) -> Disposition {
    let (group, _) = api_version.split_once('/').unwrap_or(("", api_version));
    let known = Kind::from_kind_name(kind);
    match known {
        Some(k) if k.api_version() == api_version => return Disposition::Mesh(k),
        Some(k)
            if k.group() == crate::networking::GROUP
                && k != Kind::RateLimitPolicy
                && ISTIO_NETWORKING.contains(&api_version) =>
        {
            return Disposition::Istio(k);
        }
        Some(k) if k.group() == crate::security::GROUP && ISTIO_SECURITY.contains(&api_version) => {
            return Disposition::Istio(k);
        }
        _ => {}
    }
    if api_version == "config.istio.io/v1alpha2" && kind == "RouteRule" {
        return Disposition::RouteRule;
    }
    if group.ends_with(".istio.io") || group.ends_with(".mesh.dev") {
        Disposition::Unsupported
    } else {
        Disposition::Foreign
    }
}

/// Splits `text` into documents and reads each one. Empty documents (only
/// comments or blank) are skipped.
pub fn parse_stream(file: &str, text: &str) -> Vec<Document> {
    split_documents(text)
        .into_iter()
        .filter_map(|(line, doc)| parse_document(file, line, &doc))
        .collect()
}

/// Returns each document's first line (1-based) and its text. Column
/// positions are kept: content after a `---` marker on the same line stays
/// in place, the marker blanked.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_start = line == "---"
            || line.starts_with("--- ")
            || line.starts_with("---\t")
            || line.starts_with("---#");
        let is_end = line == "..." || line.starts_with("... ") || line.starts_with("...#");
        if is_start || is_end {
            if !current.trim().is_empty() {
                docs.push((start, std::mem::take(&mut current)));
            }
            current.clear();
            start = i + 1;
            if is_start {
                // Keep inline content (`--- |`) at its column.
                current.push_str("   ");
                current.push_str(&line[3..]);
                current.push('\n');
            } else {
                start = i + 2;
            }
            continue;
        }
        if current.is_empty() {
            start = i + 1;
        }
        current.push_str(line);
        current.push('\n');
    }
    if !current.trim().is_empty() {
        docs.push((start, current));
    }
    docs.retain(|(_, d)| has_content(d));
    // Point each document at its first line of content, not a comment.
    for (start, doc) in &mut docs {
        let skip = doc
            .lines()
            .take_while(|l| {
                let t = l.trim();
                t.is_empty() || t.starts_with('#')
            })
            .count();
        if skip > 0 {
            *start += skip;
            *doc = doc.lines().skip(skip).collect::<Vec<_>>().join("\n");
            doc.push('\n');
        }
    }
    docs
}

/// True when a document has something besides comments and blank lines.
fn has_content(doc: &str) -> bool {
    doc.lines().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    })
}

/// Turns a serde_yaml error into one located in the whole file. Positions
/// inside the message (libyaml's "while parsing … at line N") are shifted
/// too, and the one repeating the error's own position is dropped.
fn located(file: &str, first_line: usize, err: &serde_yaml::Error) -> LoadError {
    let (line, column) = err
        .location()
        .map_or((first_line, 1), |l| (first_line + l.line() - 1, l.column()));
    let shifted = shift_lines(&err.to_string(), first_line - 1);
    let own = format!(" at line {line} column {column}");
    let message = match shifted.rfind(&own) {
        Some(i) => format!("{}{}", &shifted[..i], &shifted[i + own.len()..]),
        None => shifted,
    };
    LoadError {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

/// Adds `offset` to every "line N" in `text`.
fn shift_lines(text: &str, offset: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("line ") {
        out.push_str(&rest[..i + 5]);
        rest = &rest[i + 5..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

#[derive(Deserialize)]
struct Typed<S> {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: S,
}

fn typed<S: DeserializeOwned>(
    file: &str,
    line: usize,
    doc: &str,
) -> Result<(ObjectMeta, S), LoadError> {
    serde_yaml::from_str::<Typed<S>>(doc)
        .map(|t| (t.metadata, t.spec))
        .map_err(|e| located(file, line, &e))
}

/// Reads one document whose kind is known to be a mesh kind.
pub fn parse_resource(
    file: &str,
    line: usize,
    doc: &str,
    kind: Kind,
) -> Result<Resource, LoadError> {
    macro_rules! read {
        ($variant:ident) => {{
            let (metadata, spec) = typed(file, line, doc)?;
            Resource::$variant($variant { metadata, spec })
        }};
    }
    Ok(match kind {
        Kind::VirtualService => read!(VirtualService),
        Kind::DestinationRule => read!(DestinationRule),
        Kind::Gateway => read!(Gateway),
        Kind::ServiceEntry => read!(ServiceEntry),
        Kind::Sidecar => read!(Sidecar),
        Kind::WorkloadEntry => read!(WorkloadEntry),
        Kind::RateLimitPolicy => read!(RateLimitPolicy),
        Kind::PeerAuthentication => read!(PeerAuthentication),
        Kind::AuthorizationPolicy => read!(AuthorizationPolicy),
        Kind::RequestAuthentication => read!(RequestAuthentication),
    })
}

fn parse_document(file: &str, line: usize, doc: &str) -> Option<Document> {
    let origin = Origin {
        file: file.to_string(),
        line,
    };
    let invalid = |e: LoadError| {
        Some(Document {
            origin: origin.clone(),
            item: Item::Invalid(e),
        })
    };
    let value: serde_yaml::Value = match serde_yaml::from_str(doc) {
        Ok(v) => v,
        Err(e) => return invalid(located(file, line, &e)),
    };
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_string);
    let (api_version, kind) = match (field("apiVersion"), field("kind")) {
        (Some(a), Some(k)) => (a, k),
        (a, _) => {
            if value.is_null() {
                return None;
            }
            let missing = if a.is_none() { "apiVersion" } else { "kind" };
            return invalid(LoadError {
                file: file.to_string(),
                line,
                column: 1,
                message: format!("{missing}: missing or not a string"),
            });
        }
    };
    let item = match disposition(&api_version, &kind) {
        Disposition::Mesh(k) | Disposition::Istio(k) => match parse_resource(file, line, doc, k) {
            Ok(resource) => Item::Resource {
                resource: Box::new(resource),
                api_version,
            },
            Err(e) => Item::Invalid(e),
        },
        Disposition::RouteRule => match serde_yaml::from_str::<RouteRule>(doc) {
            Ok(rr) => Item::RouteRule(Box::new(rr)),
            Err(e) => Item::Invalid(located(file, line, &e)),
        },
        Disposition::Unsupported | Disposition::Foreign => Item::Other {
            api_version,
            kind,
            value,
        },
    };
    Some(Document { origin, item })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_keeping_lines() {
        let text = "# header\n---\na: 1\n---\n\n# only a comment\n---\nb: 2\nc: |\n  x\n...\n";
        let docs = split_documents(text);
        assert_eq!(docs.len(), 2);
        // Each document points at its first line of content.
        assert_eq!(docs[0].0, 3);
        assert!(docs[0].1.starts_with("a: 1"));
        assert_eq!(docs[1].0, 8);
    }

    #[test]
    fn yaml_syntax_error_names_file_line_and_column() {
        let text = "apiVersion: networking.mesh.dev/v1\nkind: Gateway\nmetadata:\n  name: gw\n---\napiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n";
        let docs = parse_stream("svc.yaml", text);
        assert_eq!(docs.len(), 2);
        let Item::Invalid(e) = &docs[1].item else {
            panic!("expected an error, got {:?}", docs[1].item)
        };
        assert_eq!(e.file, "svc.yaml");
        assert_eq!(e.line, 9, "{e}");
    }

    #[test]
    fn type_error_names_field_path_and_line() {
        let text = "apiVersion: networking.mesh.dev/v1\nkind: VirtualService\nmetadata:\n  name: r\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weigth: 10\n";
        let docs = parse_stream("vs.yaml", text);
        let Item::Invalid(e) = &docs[0].item else {
            panic!("expected an error")
        };
        assert_eq!(e.line, 10, "{e}");
        assert!(
            e.message
                .starts_with("spec.http[0].route[0]: unknown field `weigth`"),
            "{e}"
        );
    }
}

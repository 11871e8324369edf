//! A pod's volumes as directories under the agent's state directory:
//! emptyDir, configMap, secret, downwardAPI and projected (service-account
//! tokens from the TokenRequest API, with the audience and expiry asked,
//! renewed at 80 % of their lifetime). Each sync rewrites only files whose
//! content changed, so a ConfigMap edit reaches a running pod. Any other
//! volume type is refused before the pod starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::Api;
use kube::api::PostParams;

use crate::env;

/// Why a volume cannot be used: the field at fault.
pub fn unsupported(v: &Volume) -> Option<String> {
    let known = v.empty_dir.is_some()
        || v.config_map.is_some()
        || v.secret.is_some()
        || v.downward_api.is_some()
        || v.projected.is_some();
    if known {
        if let Some(p) = &v.projected {
            for (i, s) in p.sources.iter().flatten().enumerate() {
                let ok = s.service_account_token.is_some()
                    || s.config_map.is_some()
                    || s.secret.is_some()
                    || s.downward_api.is_some();
                if !ok {
                    return Some(format!(
                        "volume {:?}: projected source {i} is not supported by this node (serviceAccountToken, configMap, secret and downwardAPI are)",
                        v.name
                    ));
                }
            }
        }
        return None;
    }
    let kind = serde_json::to_value(v)
        .ok()
        .and_then(|j| {
            j.as_object()
                .and_then(|o| o.keys().find(|k| *k != "name").cloned())
        })
        .unwrap_or_else(|| "unknown".into());
    Some(format!(
        "volume {:?}: type {kind} is not supported by this node (emptyDir, configMap, secret, downwardAPI and projected are)",
        v.name
    ))
}

/// Renewal times of the tokens a pod's volumes hold, by file.
#[derive(Default)]
pub struct Tokens {
    renew_at: BTreeMap<PathBuf, Instant>,
}

pub struct Ctx<'a> {
    pub client: &'a kube::Client,
    pub pod: &'a Pod,
    pub root: &'a Path,
    pub node: &'a env::NodeFacts,
}

/// Brings every volume's files up to date. An error names the volume and
/// what is missing (a ConfigMap that does not exist, say): the caller
/// retries and reports it as `FailedMount`.
pub async fn sync(ctx: &Ctx<'_>, tokens: &mut Tokens) -> Result<(), String> {
    let spec = ctx.pod.spec.as_ref().ok_or("pod has no spec")?;
    let ns = ctx.pod.metadata.namespace.as_deref().unwrap_or("default");
    for v in spec.volumes.iter().flatten() {
        let dir = ctx.root.join(&v.name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut files: BTreeMap<String, (Vec<u8>, i32)> = BTreeMap::new();
        let fail = |e: String| format!("volume {:?}: {e}", v.name);
        if v.empty_dir.is_some() {
            continue;
        } else if let Some(c) = &v.config_map {
            let mode = c.default_mode.unwrap_or(0o644);
            if let Some(data) = config_map(ctx.client, ns, &c.name, c.optional.unwrap_or(false))
                .await
                .map_err(fail)?
            {
                project(&data, c.items.as_deref(), mode, &mut files).map_err(fail)?;
            }
        } else if let Some(s) = &v.secret {
            let mode = s.default_mode.unwrap_or(0o644);
            let name = s.secret_name.clone().unwrap_or_default();
            if let Some(data) = secret(ctx.client, ns, &name, s.optional.unwrap_or(false))
                .await
                .map_err(fail)?
            {
                project(&data, s.items.as_deref(), mode, &mut files).map_err(fail)?;
            }
        } else if let Some(d) = &v.downward_api {
            let mode = d.default_mode.unwrap_or(0o644);
            downward(
                ctx,
                d.items.as_deref().unwrap_or_default(),
                mode,
                &mut files,
            )
            .map_err(fail)?;
        } else if let Some(p) = &v.projected {
            let mode = p.default_mode.unwrap_or(0o644);
            for s in p.sources.iter().flatten() {
                if let Some(c) = &s.config_map
                    && let Some(data) =
                        config_map(ctx.client, ns, &c.name, c.optional.unwrap_or(false))
                            .await
                            .map_err(fail)?
                {
                    project(&data, c.items.as_deref(), mode, &mut files).map_err(fail)?;
                }
                if let Some(c) = &s.secret
                    && let Some(data) = secret(ctx.client, ns, &c.name, c.optional.unwrap_or(false))
                        .await
                        .map_err(fail)?
                {
                    project(&data, c.items.as_deref(), mode, &mut files).map_err(fail)?;
                }
                if let Some(d) = &s.downward_api {
                    downward(
                        ctx,
                        d.items.as_deref().unwrap_or_default(),
                        mode,
                        &mut files,
                    )
                    .map_err(fail)?;
                }
                if let Some(t) = &s.service_account_token {
                    let file = dir.join(&t.path);
                    let due = tokens
                        .renew_at
                        .get(&file)
                        .is_none_or(|at| Instant::now() >= *at);
                    if due {
                        let ttl = t.expiration_seconds.unwrap_or(3600).max(600);
                        let token = token(ctx, ns, t.audience.as_deref(), ttl)
                            .await
                            .map_err(fail)?;
                        tokens.renew_at.insert(
                            file,
                            Instant::now() + Duration::from_secs(ttl as u64 * 8 / 10),
                        );
                        files.insert(t.path.clone(), (token.into_bytes(), mode));
                    }
                }
            }
        } else {
            return Err(unsupported(v).unwrap_or_default());
        }
        for (path, (data, mode)) in files {
            write(&dir, &path, &data, mode)
                .map_err(|e| format!("volume {:?}: {path}: {e}", v.name))?;
        }
    }
    Ok(())
}

fn project(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: i32,
    files: &mut BTreeMap<String, (Vec<u8>, i32)>,
) -> Result<(), String> {
    match items {
        None => {
            for (k, v) in data {
                files.insert(k.clone(), (v.clone(), mode));
            }
        }
        Some(items) => {
            for i in items {
                let v = data
                    .get(&i.key)
                    .ok_or_else(|| format!("key {:?} not found", i.key))?;
                files.insert(i.path.clone(), (v.clone(), i.mode.unwrap_or(mode)));
            }
        }
    }
    Ok(())
}

fn downward(
    ctx: &Ctx<'_>,
    items: &[DownwardAPIVolumeFile],
    mode: i32,
    files: &mut BTreeMap<String, (Vec<u8>, i32)>,
) -> Result<(), String> {
    for i in items {
        let value = if let Some(f) = &i.field_ref {
            env::field(ctx.pod, ctx.node, &f.field_path)?
        } else if let Some(r) = &i.resource_field_ref {
            env::resource(ctx.pod, ctx.node, r)?
        } else {
            return Err(format!("{}: neither fieldRef nor resourceFieldRef", i.path));
        };
        files.insert(i.path.clone(), (value.into_bytes(), i.mode.unwrap_or(mode)));
    }
    Ok(())
}

/// The data of a ConfigMap or Secret; None when it is absent and optional.
async fn data<K>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
    what: &str,
    flatten: impl FnOnce(K) -> BTreeMap<String, Vec<u8>>,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match Api::<K>::namespaced(client.clone(), ns).get_opt(name).await {
        Ok(Some(obj)) => Ok(Some(flatten(obj))),
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(format!("{what} {ns}/{name} not found")),
        Err(e) => Err(format!("{what} {ns}/{name}: {e}")),
    }
}

pub async fn config_map(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    data(client, ns, name, optional, "configmap", |c: ConfigMap| {
        let mut out: BTreeMap<String, Vec<u8>> = c
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        out.extend(
            c.binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0)),
        );
        out
    })
    .await
}

pub async fn secret(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    data(client, ns, name, optional, "secret", |s: Secret| {
        let mut out: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        out.extend(
            s.string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        out
    })
    .await
}

/// A token of the pod's service account, bound to the pod.
async fn token(
    ctx: &Ctx<'_>,
    ns: &str,
    audience: Option<&str>,
    ttl: i64,
) -> Result<String, String> {
    let spec = ctx.pod.spec.as_ref().ok_or("pod has no spec")?;
    let sa = spec.service_account_name.as_deref().unwrap_or("default");
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]),
            expiration_seconds: Some(ttl),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: ctx.pod.metadata.name.clone(),
                uid: ctx.pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), ns);
    let out: TokenRequest = api
        .create_subresource("token", sa, &PostParams::default(), &req)
        .await
        .map_err(|e| format!("token for service account {ns}/{sa}: {e}"))?;
    out.status
        .and_then(|s| s.token)
        .ok_or_else(|| format!("token for service account {ns}/{sa}: no token in the answer"))
}

/// Writes a file atomically, only when its content changed.
fn write(dir: &Path, rel: &str, data: &[u8], mode: i32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if rel.split('/').any(|p| p == ".." || p.is_empty()) {
        return Err(std::io::Error::other("path must be relative, without .."));
    }
    let path = dir.join(rel);
    if std::fs::read(&path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("mesh-node-tmp");
    std::fs::write(&tmp, data)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode as u32 & 0o777))?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_volume_types_are_named() {
        let v: Volume = serde_json::from_value(serde_json::json!({
            "name": "data", "hostPath": {"path": "/var/lib"}
        }))
        .unwrap();
        let why = unsupported(&v).unwrap();
        assert!(
            why.contains("\"data\"") && why.contains("hostPath"),
            "{why}"
        );
        let ok: Volume =
            serde_json::from_value(serde_json::json!({"name": "x", "emptyDir": {}})).unwrap();
        assert_eq!(unsupported(&ok), None);
    }

    #[test]
    fn files_are_rewritten_only_when_changed_and_never_outside() {
        let dir = std::env::temp_dir().join(format!("mesh-node-vol-{}", std::process::id()));
        write(&dir, "a/b", b"1", 0o600).unwrap();
        assert_eq!(std::fs::read(dir.join("a/b")).unwrap(), b"1");
        write(&dir, "a/b", b"2", 0o600).unwrap();
        assert_eq!(std::fs::read(dir.join("a/b")).unwrap(), b"2");
        assert!(write(&dir, "../x", b"1", 0o600).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

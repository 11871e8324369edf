//! What `meshctl kube-inject` learns from the cluster of the current
//! kubeconfig context, when one answers: its Kubernetes version (native or
//! classic sidecars) and the injector's settings (ConfigMap
//! `mesh-system/mesh-injector`, key `settings.yaml`, what the webhook
//! mounts).

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;

pub struct Injection {
    pub minor: u32,
    /// `None` when the cluster has no injector settings.
    pub settings: Option<mesh_injector::Settings>,
}

/// Asks the cluster; `Err` says why it could not (no kubeconfig, not
/// reachable, unreadable settings).
pub fn injection() -> Result<Injection, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), ask())
            .await
            .map_err(|_| "the cluster did not answer within 5 s".to_string())?
    })
}

async fn ask() -> Result<Injection, String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| e.to_string())?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| e.to_string())?;
    let minor: u32 = version
        .minor
        .trim_end_matches('+')
        .parse()
        .map_err(|_| format!("unexpected Kubernetes minor version {:?}", version.minor))?;
    let maps: kube::Api<ConfigMap> = kube::Api::namespaced(client, "mesh-system");
    let settings =
        match maps
            .get_opt("mesh-injector")
            .await
            .map_err(|e| e.to_string())?
        {
            None => None,
            Some(cm) => match cm.data.as_ref().and_then(|d| d.get("settings.yaml")) {
                None => None,
                Some(text) => Some(serde_yaml::from_str(text).map_err(|e| {
                    format!("ConfigMap mesh-system/mesh-injector settings.yaml: {e}")
                })?),
            },
        };
    Ok(Injection { minor, settings })
}

//! Reading Events back from the fake as `kubectl describe` does: by a
//! field selector on the involved object, through a real `kube::Client`.

use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::ListParams;

/// The Events about `kind` `name` in baton-system, by field selector.
pub async fn events_about(client: &kube::Client, kind: &str, name: &str) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(client.clone(), "baton-system");
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind={kind},involvedObject.name={name}"
    ));
    Ok(api.list(&params).await?.items)
}

/// Waits until an Event with `reason` is about `kind` `name`; returns it.
pub async fn until_event(
    client: &kube::Client,
    kind: &str,
    name: &str,
    reason: &str,
) -> Result<Event> {
    for _ in 0..100 {
        if let Some(e) = events_about(client, kind, name)
            .await?
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
        {
            return Ok(e);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "no {reason} Event on {kind} {name}; there are: {:?}",
        events_about(client, kind, name)
            .await?
            .iter()
            .map(|e| (e.reason.clone(), e.message.clone()))
            .collect::<Vec<_>>()
    )
}

//! Garbage collection by ownerReferences and namespace finalization: passes that the
//! controller manager runs periodically on the active master.
//!
//! - Background deletion: an object whose owners (by uid) are all gone is deleted.
//! - Foreground deletion (`foregroundDeletion` finalizer on the owner): dependents are
//!   deleted; the finalizer is removed once none remains, which removes the owner.
//! - Orphan (`orphan` finalizer): dependents lose the ownerReference; then the
//!   finalizer is removed.
//! - Terminating namespaces are emptied and removed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::objects::DecodeCache;
use super::registry::{DeleteOptions, Registry};
use super::resources::{self, ResourceDef, NAMESPACES};
use crate::store::KeyValue;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct GcStats {
    pub deleted: usize,
    pub orphaned: usize,
    pub finalized: usize,
}

/// What garbage collection needs of an object: its metadata, decoded alone (the rest of
/// the object is skipped unparsed). A pass looks at every object of every kind.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct GcMeta {
    uid: String,
    name: String,
    namespace: Option<String>,
    owner_references: Vec<OwnerUid>,
    #[serde(deserialize_with = "present")]
    deletion_timestamp: bool,
    finalizers: Vec<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
struct OwnerUid {
    uid: String,
}

#[derive(Deserialize)]
struct MetaOnly {
    #[serde(default)]
    metadata: GcMeta,
}

/// A field that is there (and not `null`) at all.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<serde::de::IgnoredAny>::deserialize(d)?.is_some())
}

impl GcMeta {
    fn decode(kv: &KeyValue) -> Result<Self, ApiError> {
        serde_json::from_slice::<MetaOnly>(&kv.value)
            .map(|m| m.metadata)
            .map_err(|e| ApiError::Internal(format!("corrupt object at {}: {e}", kv.key)))
    }

    fn has_finalizer(&self, f: &str) -> bool {
        self.finalizers.iter().any(|x| x == f)
    }

    fn ns(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
}

async fn remove_finalizer(
    reg: &Registry,
    def: &ResourceDef,
    ns: Option<&str>,
    name: &str,
    f: &str,
) -> Result<(), ApiError> {
    reg.update_with(def, ns, name, |o| {
        if let Some(a) = o
            .pointer_mut("/metadata/finalizers")
            .and_then(Value::as_array_mut)
        {
            a.retain(|x| x != f);
        }
        Ok(())
    })
    .await
    .map(|_| ())
}

/// Objects decoded by earlier passes, by key, with the mod revision they were decoded at:
/// a pass reads every object of every kind, and only those written since are decoded
/// again (decoding ~10 000 unchanged nodes, leases and pods every 2 s was a sixth of a
/// busy active master's CPU).
#[derive(Default)]
pub(crate) struct GcCache {
    /// One per kind, in the order of `resources::ALL`.
    kinds: Vec<DecodeCache<Arc<GcMeta>>>,
}

/// One garbage-collection pass over every served kind.
#[cfg(test)]
pub(crate) async fn collect_once(reg: &Registry) -> Result<GcStats, ApiError> {
    collect(reg, &mut GcCache::default()).await
}

/// One pass, decoding only what changed since `cache` last saw it.
pub(crate) async fn collect(reg: &Registry, cache: &mut GcCache) -> Result<GcStats, ApiError> {
    let mut stats = GcStats::default();
    // Everything, with its def.
    let mut all: Vec<(&'static ResourceDef, Arc<GcMeta>)> = Vec::new();
    cache
        .kinds
        .resize_with(resources::ALL.len(), DecodeCache::default);
    for (def, kind) in resources::ALL.iter().zip(&mut cache.kinds) {
        let r = reg
            .store()
            .range(&Registry::prefix(def, None), None, 0)
            .await?;
        let objs = kind.refresh(r.kvs, |kv| Ok(Arc::new(GcMeta::decode(kv)?)))?;
        all.extend(objs.into_iter().map(|o| (def, o)));
    }
    let by_uid: HashSet<&str> = all.iter().map(|(_, o)| o.uid.as_str()).collect();
    let mut dependents: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (_, o)) in all.iter().enumerate() {
        for r in &o.owner_references {
            dependents.entry(r.uid.as_str()).or_default().push(i);
        }
    }
    let mut touched: HashSet<usize> = HashSet::new();
    for (def, o) in &all {
        if !o.deletion_timestamp {
            continue;
        }
        let (uid, name, ns) = (o.uid.as_str(), o.name.as_str(), o.ns());
        let deps = dependents.get(uid).cloned().unwrap_or_default();
        if o.has_finalizer("orphan") {
            for &i in &deps {
                let (ddef, d) = &all[i];
                let uid = uid.to_string();
                match reg
                    .update_with(ddef, d.ns(), &d.name, |x| {
                        if let Some(a) = x
                            .pointer_mut("/metadata/ownerReferences")
                            .and_then(Value::as_array_mut)
                        {
                            a.retain(|r| r["uid"] != json!(uid));
                        }
                        let empty = x
                            .pointer("/metadata/ownerReferences")
                            .and_then(Value::as_array)
                            .is_some_and(Vec::is_empty);
                        if empty {
                            if let Some(m) = x["metadata"].as_object_mut() {
                                m.remove("ownerReferences");
                            }
                        }
                        Ok(())
                    })
                    .await
                {
                    Ok(_) => stats.orphaned += 1,
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
                touched.insert(i);
            }
            remove_finalizer(reg, def, ns, name, "orphan").await?;
            stats.finalized += 1;
        } else if o.has_finalizer("foregroundDeletion") {
            if deps.is_empty() {
                remove_finalizer(reg, def, ns, name, "foregroundDeletion").await?;
                stats.finalized += 1;
            } else {
                for &i in &deps {
                    let (ddef, d) = &all[i];
                    if d.deletion_timestamp {
                        continue;
                    }
                    let opts = DeleteOptions {
                        propagation_policy: Some("Foreground".into()),
                        ..Default::default()
                    };
                    match reg.delete(ddef, d.ns(), &d.name, &opts).await {
                        Ok(_) => stats.deleted += 1,
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e),
                    }
                    touched.insert(i);
                }
            }
        }
    }
    // Background: dependents whose owners are all gone.
    for (i, (def, o)) in all.iter().enumerate() {
        if o.owner_references.is_empty() || touched.contains(&i) || o.deletion_timestamp {
            continue;
        }
        if o.owner_references
            .iter()
            .all(|r| !by_uid.contains(r.uid.as_str()))
        {
            match reg
                .delete(def, o.ns(), &o.name, &DeleteOptions::default())
                .await
            {
                Ok(_) => stats.deleted += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
    }
    // Terminating namespaces.
    for (def, o) in &all {
        if def.kind == NAMESPACES.kind
            && o.deletion_timestamp
            && reg.finalize_namespace(&o.name).await?
        {
            stats.finalized += 1;
        }
    }
    Ok(stats)
}

/// Run [`collect_once`] every `every` until `shutdown`; errors are logged and retried.
pub(crate) async fn run(reg: Registry, every: Duration, shutdown: CancellationToken) {
    let mut cache = GcCache::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match collect(&reg, &mut cache).await {
            Ok(st) if st != GcStats::default() => tracing::debug!(?st, "garbage collection pass"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "garbage collection pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(v: Value) -> KeyValue {
        KeyValue {
            key: "/registry/pods/default/p".into(),
            value: serde_json::to_vec(&v).unwrap().into(),
            create_revision: 1,
            mod_revision: 1,
        }
    }

    #[test]
    fn metadata_is_decoded_alone() {
        let m = GcMeta::decode(&kv(json!({
            "spec": {"containers": [{"name": "c"}]},
            "metadata": {
                "name": "p", "namespace": "default", "uid": "u1",
                "labels": {"a": "b"},
                "ownerReferences": [{"uid": "o1", "kind": "ReplicaSet", "name": "rs"}],
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "finalizers": ["orphan"]
            },
            "status": {"phase": "Pending"}
        })))
        .unwrap();
        assert_eq!(m.uid, "u1");
        assert_eq!((m.name.as_str(), m.ns()), ("p", Some("default")));
        assert_eq!(m.owner_references, vec![OwnerUid { uid: "o1".into() }]);
        assert!(m.deletion_timestamp);
        assert!(m.has_finalizer("orphan") && !m.has_finalizer("foregroundDeletion"));
    }

    #[test]
    fn absent_or_null_fields_are_empty() {
        let m = GcMeta::decode(&kv(json!({
            "metadata": {"name": "n", "deletionTimestamp": null}
        })))
        .unwrap();
        assert_eq!((m.ns(), m.deletion_timestamp), (None, false));
        assert!(m.owner_references.is_empty() && m.finalizers.is_empty());
        assert_eq!(GcMeta::decode(&kv(json!({}))).unwrap(), GcMeta::default());
        let bad = KeyValue {
            value: b"{not json".to_vec().into(),
            ..kv(json!({}))
        };
        assert!(GcMeta::decode(&bad).is_err());
    }
}

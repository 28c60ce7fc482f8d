//! A local, decoded copy of every object of one kind, kept current from the store's
//! watch (kube's informer): list once, then apply each event as it comes, so a loop that
//! looks at 10 000 pods many times a second pays per change, not per object per look.
//!
//! Invariant: after [`Informer::drain`], the copy equals the store's objects of the kind
//! at some revision at or after the previous drain (a watch that ends, because it fell
//! behind or leadership moved, makes the next drain list again, and reports every object
//! as changed).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::FutureExt;

use super::error::ApiError;
use super::objects::{def_of, from_value, ApiObject};
use super::registry::Registry;
use super::resources::ResourceDef;
use crate::store::{Event, KeyValue, WatchReceiver};

/// One object that changed: its state before and after (`None`: absent).
pub(crate) struct Change<T> {
    pub(crate) old: Option<Arc<T>>,
    pub(crate) new: Option<Arc<T>>,
}

pub(crate) struct Informer<T> {
    def: &'static ResourceDef,
    /// By store key, so iteration is in key order (namespace, then name), as a list is.
    objects: BTreeMap<String, Arc<T>>,
    /// `None` until the first list, and after the watch ended.
    watch: Option<WatchReceiver>,
}

impl<T: ApiObject> Informer<T> {
    pub(crate) fn new() -> Result<Self, ApiError> {
        Ok(Self {
            def: def_of::<T>()?,
            objects: BTreeMap::new(),
            watch: None,
        })
    }

    /// Every object, in key order (namespace, then name).
    pub(crate) fn objects(&self) -> impl Iterator<Item = &Arc<T>> {
        self.objects.values()
    }

    pub(crate) fn len(&self) -> usize {
        self.objects.len()
    }

    /// Wait until the store reports a change of this kind, apply it and return it (empty
    /// when the watch ended: the next [`Self::drain`] lists again). Pending forever before
    /// the first drain. Cancel-safe.
    pub(crate) async fn changed(&mut self) -> Result<Vec<Change<T>>, ApiError> {
        let Some(w) = self.watch.as_mut() else {
            return std::future::pending().await;
        };
        match w.recv().await {
            Some(Ok(ev)) => Ok(self.apply(&ev)?.into_iter().collect()),
            _ => {
                self.watch = None;
                Ok(Vec::new())
            }
        }
    }

    /// Bring the copy up to date without waiting: list (and start watching) when not
    /// watching, else apply every event already queued. Returns what changed.
    pub(crate) async fn drain(&mut self, reg: &Registry) -> Result<Vec<Change<T>>, ApiError> {
        let mut changes = Vec::new();
        while let Some(w) = self.watch.as_mut() {
            match w.recv().now_or_never() {
                None => return Ok(changes),
                Some(Some(Ok(ev))) => changes.extend(self.apply(&ev)?),
                Some(_) => self.watch = None,
            }
        }
        changes.extend(self.relist(reg).await?);
        Ok(changes)
    }

    /// List every object and watch from the list's revision; every object that differs
    /// from the copy is a change.
    async fn relist(&mut self, reg: &Registry) -> Result<Vec<Change<T>>, ApiError> {
        let store = reg.store();
        let prefix = Registry::prefix(self.def, None);
        let listed = store.range(&prefix, None, 0).await?;
        let watch = store.watch(&prefix, listed.revision).await?;
        let mut old = std::mem::take(&mut self.objects);
        let mut changes = Vec::new();
        for kv in &listed.kvs {
            let new = Arc::new(self.decode(kv)?);
            let before = old.remove(&kv.key);
            self.objects.insert(kv.key.clone(), new.clone());
            changes.push(Change {
                old: before,
                new: Some(new),
            });
        }
        changes.extend(old.into_values().map(|o| Change {
            old: Some(o),
            new: None,
        }));
        self.watch = Some(watch);
        Ok(changes)
    }

    fn apply(&mut self, ev: &Event) -> Result<Option<Change<T>>, ApiError> {
        Ok(match ev {
            Event::Put { kv, .. } => {
                let new = Arc::new(self.decode(kv)?);
                let old = self.objects.insert(kv.key.clone(), new.clone());
                Some(Change {
                    old,
                    new: Some(new),
                })
            }
            Event::Delete { prev, .. } => self.objects.remove(&prev.key).map(|o| Change {
                old: Some(o),
                new: None,
            }),
        })
    }

    fn decode(&self, kv: &KeyValue) -> Result<T, ApiError> {
        from_value(Registry::decode(self.def, kv)?)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::*;
    use crate::store::MemStore;

    fn pod(name: &str) -> serde_json::Value {
        json!({"metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    }

    fn names(inf: &Informer<Pod>) -> Vec<String> {
        let mut v: Vec<String> = inf
            .objects()
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn follows_creates_updates_and_deletes() {
        let reg = Registry::new(Arc::new(MemStore::new()));
        let pods = ResourceDef::find("", "pods").unwrap();
        reg.create(pods, Some("default"), pod("a"), false)
            .await
            .unwrap();
        let mut inf = Informer::<Pod>::new().unwrap();
        let first = inf.drain(&reg).await.unwrap();
        assert_eq!((first.len(), names(&inf)), (1, vec!["a".to_string()]));
        assert!(inf.drain(&reg).await.unwrap().is_empty(), "nothing new");

        reg.create(pods, Some("default"), pod("b"), false)
            .await
            .unwrap();
        let got = inf.changed().await.unwrap();
        assert!(got[0].old.is_none() && got[0].new.is_some());
        reg.update_with(pods, Some("default"), "a", |o| {
            o["metadata"]["labels"] = json!({"x": "y"});
            Ok(())
        })
        .await
        .unwrap();
        let opts = crate::api::registry::DeleteOptions {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        reg.delete(pods, Some("default"), "b", &opts).await.unwrap();
        let got = inf.drain(&reg).await.unwrap();
        assert_eq!(got.len(), 2, "an update and a delete");
        assert_eq!(names(&inf), vec!["a".to_string()]);
        let a = inf.objects().next().unwrap();
        assert_eq!(a.metadata.labels.as_ref().unwrap()["x"], "y");
    }
}

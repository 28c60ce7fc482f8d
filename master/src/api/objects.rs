//! A typed object layer for code inside the master (controllers, scheduler, node
//! lifecycle): the same semantics as the HTTP API, on k8s-openapi types.
//!
//! ```ignore
//! let objs = Objects::new(store);
//! let pods: Vec<Pod> = objs.list::<Pod>(Some("default"), &ListOptions::default()).await?.0;
//! objs.update_status(&pod).await?;
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::{Metadata, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::registry::{
    DeleteOptions, ListOptions, Registry, Subresource, WatchEvent, WatchOptions,
};
use super::resources::ResourceDef;
use crate::store::{KeyValue, Store};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A typed watch event.
#[derive(Debug, Clone)]
pub enum TypedEvent<T> {
    Added(T),
    Modified(T),
    Deleted(T),
    /// Everything up to this resourceVersion has been delivered.
    Bookmark(String),
    /// The watch ended with this error (e.g. 410 Gone: relist).
    Error(ApiError),
}

/// Typed access to the served objects. Cheap to clone.
#[derive(Clone)]
pub struct Objects {
    registry: Registry,
}

/// The k8s-openapi types this layer accepts.
pub trait ApiObject:
    Resource + Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned + Clone + Send + Sync + 'static
{
}
impl<T> ApiObject for T where
    T: Resource
        + Metadata<Ty = ObjectMeta>
        + Serialize
        + DeserializeOwned
        + Clone
        + Send
        + Sync
        + 'static
{
}

fn def_of<T: Resource>() -> Result<&'static ResourceDef, ApiError> {
    ResourceDef::find(T::GROUP, T::URL_PATH_SEGMENT)
        .ok_or_else(|| ApiError::Internal(format!("{} is not served by this API", T::KIND)))
}

fn to_value<T: Serialize>(o: &T) -> Result<Value, ApiError> {
    serde_json::to_value(o).map_err(|e| ApiError::Internal(e.to_string()))
}

fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v)
        .map_err(|e| ApiError::Internal(format!("decoding stored object: {e}")))
}

fn ns_of<T: ApiObject>(def: &ResourceDef, o: &T) -> Option<String> {
    if def.namespaced {
        Some(
            o.metadata()
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
        )
    } else {
        None
    }
}

fn name_of<T: ApiObject>(o: &T) -> Result<String, ApiError> {
    o.metadata()
        .name
        .clone()
        .ok_or_else(|| ApiError::BadRequest("metadata.name is required".into()))
}

/// Objects of one kind decoded by an earlier [`DecodeCache::refresh`] (for instance via
/// [`Objects::list_all_cached`]), by key, with the mod revision they were decoded at.
pub struct DecodeCache<T> {
    decoded: HashMap<String, Slot<T>>,
    /// Counts refreshes; a slot not seen by the latest one is gone from the store.
    pass: u64,
}

struct Slot<T> {
    rev: u64,
    seen: u64,
    obj: T,
}

impl<T> Default for DecodeCache<T> {
    fn default() -> Self {
        Self {
            decoded: HashMap::new(),
            pass: 0,
        }
    }
}

impl<T: Clone> DecodeCache<T> {
    /// The objects of `kvs` (every object of one kind, as just read), decoding with
    /// `decode` only those not seen at the same mod revision by the previous call.
    /// Objects no longer in `kvs` leave the cache. The cache is updated in place (a
    /// pass over 10 000 pods used to rebuild it, and its allocations were a visible
    /// share of a busy active master's CPU); `T` is meant to be cheap to clone (`Arc`).
    pub fn refresh(
        &mut self,
        kvs: Vec<KeyValue>,
        mut decode: impl FnMut(&KeyValue) -> Result<T, ApiError>,
    ) -> Result<Vec<T>, ApiError> {
        self.pass += 1;
        let pass = self.pass;
        let mut items = Vec::with_capacity(kvs.len());
        for kv in kvs {
            match self.decoded.get_mut(kv.key.as_str()) {
                Some(slot) => {
                    if slot.rev != kv.mod_revision {
                        slot.obj = decode(&kv)?;
                        slot.rev = kv.mod_revision;
                    }
                    slot.seen = pass;
                    items.push(slot.obj.clone());
                }
                None => {
                    let obj = decode(&kv)?;
                    items.push(obj.clone());
                    let slot = Slot {
                        rev: kv.mod_revision,
                        seen: pass,
                        obj,
                    };
                    self.decoded.insert(kv.key, slot);
                }
            }
        }
        self.decoded.retain(|_, s| s.seen == pass);
        Ok(items)
    }
}

impl Objects {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            registry: Registry::new(store),
        }
    }

    pub fn from_registry(registry: Registry) -> Self {
        Self { registry }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Get one object; `Ok(None)` when absent.
    pub async fn get<T: ApiObject>(
        &self,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<T>, ApiError> {
        let def = def_of::<T>()?;
        match self.registry.get(def, ns, name).await {
            Ok(v) => Ok(Some(from_value(v)?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// List (one namespace, or all with `None`); returns the items and the list's resourceVersion.
    pub async fn list<T: ApiObject>(
        &self,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> Result<(Vec<T>, u64), ApiError> {
        let def = def_of::<T>()?;
        let r = self.registry.list(def, ns, opts).await?;
        let items = r
            .items
            .into_iter()
            .map(from_value)
            .collect::<Result<Vec<T>, _>>()?;
        Ok((items, r.revision))
    }

    /// Every object of a kind (in `ns`, or all), read like [`Self::list`] but decoding
    /// only the objects written since `cache` last saw them: a controller pass reads
    /// everything every time, and decoding thousands of unchanged nodes, leases and pods
    /// per pass was most of the active master's CPU.
    pub async fn list_all_cached<T: ApiObject>(
        &self,
        ns: Option<&str>,
        cache: &mut DecodeCache<Arc<T>>,
    ) -> Result<Vec<Arc<T>>, ApiError> {
        let def = def_of::<T>()?;
        let r = self
            .registry
            .store()
            .range(&Registry::prefix(def, ns), None, 0)
            .await?;
        cache.refresh(r.kvs, |kv| {
            Ok(Arc::new(from_value(Registry::decode(def, kv)?)?))
        })
    }

    /// Create (namespace from `metadata.namespace`, default `default`).
    pub async fn create<T: ApiObject>(&self, obj: &T) -> Result<T, ApiError> {
        let def = def_of::<T>()?;
        let ns = ns_of(def, obj);
        from_value(
            self.registry
                .create(def, ns.as_deref(), to_value(obj)?, false)
                .await?,
        )
    }

    /// Replace the object (spec/metadata); its `resourceVersion`, if set, must be current.
    pub async fn update<T: ApiObject>(&self, obj: &T) -> Result<T, ApiError> {
        self.put(obj, Subresource::Main).await
    }

    /// Replace the object's status; its `resourceVersion`, if set, must be current.
    pub async fn update_status<T: ApiObject>(&self, obj: &T) -> Result<T, ApiError> {
        self.put(obj, Subresource::Status).await
    }

    async fn put<T: ApiObject>(&self, obj: &T, sub: Subresource) -> Result<T, ApiError> {
        let def = def_of::<T>()?;
        let ns = ns_of(def, obj);
        let name = name_of(obj)?;
        from_value(
            self.registry
                .update(def, ns.as_deref(), &name, to_value(obj)?, sub)
                .await?,
        )
    }

    /// Read-modify-write with automatic retries on conflicts (no validation).
    pub async fn modify<T, F>(&self, ns: Option<&str>, name: &str, mut f: F) -> Result<T, ApiError>
    where
        T: ApiObject,
        F: FnMut(&mut T) + Send,
    {
        let def = def_of::<T>()?;
        let v = self
            .registry
            .update_with(def, ns, name, |v| {
                let mut t: T = from_value(v.clone())?;
                f(&mut t);
                *v = to_value(&t)?;
                Ok(())
            })
            .await?;
        from_value(v)
    }

    /// Delete; returns the last state (with `deletionTimestamp` when deletion is pending).
    pub async fn delete<T: ApiObject>(
        &self,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<T, ApiError> {
        let def = def_of::<T>()?;
        from_value(self.registry.delete(def, ns, name, opts).await?)
    }

    /// Bind a pod to a node (the scheduler's write).
    pub async fn bind(&self, ns: &str, pod: &str, node: &str) -> Result<(), ApiError> {
        self.registry.bind(ns, pod, node).await.map(|_| ())
    }

    /// Watch a collection from `opts.resource_version` (None → current state as Added first).
    pub async fn watch<T: ApiObject>(
        &self,
        ns: Option<&str>,
        opts: WatchOptions,
    ) -> Result<mpsc::Receiver<TypedEvent<T>>, ApiError> {
        let def = def_of::<T>()?;
        let mut raw = self.registry.watch(def, ns, opts).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Some(WatchEvent { kind, object }) = raw.recv().await {
                let ev = match kind {
                    "BOOKMARK" => TypedEvent::Bookmark(
                        object
                            .pointer("/metadata/resourceVersion")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    "ERROR" => {
                        let msg = object["message"]
                            .as_str()
                            .unwrap_or("watch error")
                            .to_string();
                        TypedEvent::Error(match object["code"].as_u64() {
                            Some(410) => ApiError::Gone(msg),
                            Some(503) => ApiError::Unavailable(msg),
                            _ => ApiError::Internal(msg),
                        })
                    }
                    k => match from_value::<T>(object) {
                        Ok(o) if k == "ADDED" => TypedEvent::Added(o),
                        Ok(o) if k == "MODIFIED" => TypedEvent::Modified(o),
                        Ok(o) => TypedEvent::Deleted(o),
                        Err(e) => TypedEvent::Error(e),
                    },
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

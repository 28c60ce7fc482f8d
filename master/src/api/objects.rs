//! Typed objects for code inside the master: which k8s-openapi types map to which served
//! resource ([`ApiObject`]), and [`DecodeCache`], which decodes again only the objects that
//! changed since the last look (the garbage collector's metadata caches). The controllers
//! and the scheduler follow objects through [`super::informer`]. Writes go through the
//! [`super::registry::Registry`], as the HTTP API's do.

use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::error::ApiError;
use super::resources::ResourceDef;
use crate::store::KeyValue;

/// The k8s-openapi types this layer accepts.
pub(crate) trait ApiObject:
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

pub(crate) fn def_of<T: Resource>() -> Result<&'static ResourceDef, ApiError> {
    ResourceDef::find(T::GROUP, T::URL_PATH_SEGMENT)
        .ok_or_else(|| ApiError::Internal(format!("{} is not served by this API", T::KIND)))
}

pub(crate) fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v)
        .map_err(|e| ApiError::Internal(format!("decoding stored object: {e}")))
}

/// Objects of one kind decoded by an earlier [`DecodeCache::refresh`], by key, with the mod revision they were decoded at.
pub(crate) struct DecodeCache<T> {
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
    pub(crate) fn refresh(
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

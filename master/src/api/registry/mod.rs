//! The generic object storage behind every resource: Kubernetes object semantics
//! (metadata, optimistic concurrency, graceful deletion, finalizers, watches) on top
//! of the [`Store`]. Objects are `serde_json::Value`s checked through k8s-openapi types.
//!
//! This file: the options and results, CRUD with compare-and-swap, deletion. Beside it:
//! [`defaults`] (field defaults), [`continue_token`], [`namespaces`] (lifecycle),
//! [`subresources`] (binding, scale), [`watch`].

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::{ApiError, Cause};
use super::patch::{self, PatchLimits, PatchType};
use super::resources::{self, ResourceDef, DEPLOYMENTS, NAMESPACES, PODS, REPLICASETS};
use super::selector::{FieldSelector, LabelSelector};
use super::validate::{normalize, validate};
use crate::clock::{now_rfc3339, rfc3339_after};
use crate::store::{Command, CommandResult, Event, KeyValue, Precondition, Store, StoreError};

pub(crate) mod continue_token;
mod defaults;
mod namespaces;
mod subresources;
mod watch;

use continue_token::{decode_continue, encode_continue};
use defaults::*;
pub(crate) use namespaces::ensure_defaults;

/// Namespaces that always exist and cannot be deleted (`kube-node-lease` can be recreated).
pub(crate) const DEFAULT_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-node-lease", "kube-public"];
const UNDELETABLE_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

/// Which part of an object a write targets.
/// How many times [`Registry::read_modify_write`] reads again after losing a race.
const CAS_ATTEMPTS: usize = 8;

/// What a read-modify-write decided for the object it read.
enum Step {
    /// Store this over the revision read (nothing is written when it equals the object).
    Write(Value),
    /// Answer this and write nothing (a dry run).
    Answer(Value),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subresource {
    Main,
    Status,
}

/// Options of a list (and of the initial state of a watch).
#[derive(Debug, Clone, Default)]
pub(crate) struct ListOptions {
    pub label_selector: LabelSelector,
    pub field_selector: FieldSelector,
    /// 0 = everything.
    pub limit: usize,
    pub continue_token: Option<String>,
}

impl ListOptions {
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.label_selector.matches_object(obj) && self.field_selector.matches(obj)
    }
}

/// One page of a list.
#[derive(Debug, Clone)]
pub(crate) struct ListResult {
    pub items: Vec<Value>,
    pub revision: u64,
    pub continue_token: Option<String>,
}

/// `DeleteOptions` (body or query of a DELETE).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    /// `Background` (default), `Foreground` or `Orphan`.
    pub propagation_policy: Option<String>,
    pub orphan_dependents: Option<bool>,
    pub preconditions: Option<DeletePreconditions>,
    #[serde(default)]
    pub dry_run: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeletePreconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// Options of a watch.
#[derive(Debug, Clone, Default)]
pub(crate) struct WatchOptions {
    pub label_selector: LabelSelector,
    pub field_selector: FieldSelector,
    /// Start after this revision; `None`/0 = send the current state as ADDED first.
    pub resource_version: Option<u64>,
    pub allow_bookmarks: bool,
    pub timeout: Option<Duration>,
    /// How often to send a BOOKMARK when idle (if allowed).
    pub bookmark_interval: Option<Duration>,
}

/// What a watch event says happened (its `type` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchEventType {
    Added,
    Modified,
    Deleted,
    /// Progress: only `metadata.resourceVersion` of the object is meaningful.
    Bookmark,
    /// The watch ends; the object is a `Status`.
    Error,
}

impl WatchEventType {
    /// The wire name (`ADDED`...).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WatchEventType::Added => "ADDED",
            WatchEventType::Modified => "MODIFIED",
            WatchEventType::Deleted => "DELETED",
            WatchEventType::Bookmark => "BOOKMARK",
            WatchEventType::Error => "ERROR",
        }
    }
}

/// One watch event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WatchEvent {
    pub kind: WatchEventType,
    pub object: Value,
}

/// The object storage of the API. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Registry {
    store: Arc<dyn Store>,
    /// The size of stored objects and of JSON patches (`[limits]`).
    limits: PatchLimits,
}

fn meta_str<'a>(o: &'a Value, field: &str) -> Option<&'a str> {
    o.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn meta_mut(o: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !o.get("metadata").is_some_and(Value::is_object) {
        o["metadata"] = json!({});
    }
    o["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

fn finalizers(o: &Value) -> Vec<String> {
    o.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a marked-for-deletion object may now be removed from the store.
/// A namespace's `spec.finalizers` (`kubernetes`) keep it until its content is gone.
fn deletion_complete(o: &Value) -> bool {
    let namespace_held = o["kind"] == "Namespace"
        && o.pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
    !namespace_held
        && o.pointer("/metadata/deletionTimestamp").is_some()
        && finalizers(o).is_empty()
        && o.pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0
}

impl Registry {
    /// A registry with the default `[limits]`.
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self::with_limits(store, PatchLimits::default())
    }

    pub(crate) fn with_limits(store: Arc<dyn Store>, limits: PatchLimits) -> Self {
        Self { store, limits }
    }

    pub(crate) fn limits(&self) -> PatchLimits {
        self.limits
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// `/registry/{plural}/{ns}/{name}` or `/registry/{plural}/{name}`.
    pub(crate) fn key(def: &ResourceDef, ns: Option<&str>, name: &str) -> String {
        match (def.namespaced, ns) {
            (true, Some(ns)) => format!("/registry/{}/{ns}/{name}", def.plural),
            _ => format!("/registry/{}/{name}", def.plural),
        }
    }

    /// The key prefix of a collection (one namespace, or all).
    pub(crate) fn prefix(def: &ResourceDef, ns: Option<&str>) -> String {
        match (def.namespaced, ns) {
            (true, Some(ns)) => format!("/registry/{}/{ns}/", def.plural),
            _ => format!("/registry/{}/", def.plural),
        }
    }

    /// Decode a stored value; `metadata.resourceVersion` is the key's mod revision.
    pub(crate) fn decode(def: &ResourceDef, kv: &KeyValue) -> Result<Value, ApiError> {
        let mut v: Value = serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::Internal(format!("corrupt object at {}: {e}", kv.key)))?;
        v["kind"] = json!(def.kind);
        v["apiVersion"] = json!(def.api_version());
        meta_mut(&mut v).insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
        Ok(v)
    }

    /// The stored form of an object (no `resourceVersion`), refused when larger than
    /// `[limits] max_object_bytes`.
    fn encode(&self, def: &ResourceDef, o: &Value) -> Result<Vec<u8>, ApiError> {
        let mut o = o.clone();
        meta_mut(&mut o).remove("resourceVersion");
        let bytes = serde_json::to_vec(&o).unwrap_or_default();
        let limit = self.limits.max_bytes;
        if bytes.len() > limit {
            return Err(ApiError::TooLarge(format!(
                "{} {:?} is {} bytes, more than the limit of {limit}",
                def.qualified(),
                meta_str(&o, "name").unwrap_or_default(),
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::NotFound {
            group: def.group.into(),
            resource: def.qualified(),
            name: name.into(),
        }
    }

    fn conflict(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::Conflict {
            group: def.group.into(),
            resource: def.qualified(),
            name: name.into(),
            message: "the object has been modified; please apply your changes to the latest version and try again".into(),
        }
    }

    async fn get_kv(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
    ) -> Result<(Value, u64), ApiError> {
        let kv = self
            .store
            .get(&Self::key(def, ns, name))
            .await?
            .ok_or_else(|| Self::not_found(def, name))?;
        Ok((Self::decode(def, &kv)?, kv.mod_revision))
    }

    /// Read one object (404 `NotFound` when absent).
    pub(crate) async fn get(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        Ok(self.get_kv(def, ns, name).await?.0)
    }

    /// LIST (one page when `opts.limit` is set).
    pub(crate) async fn list(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> Result<ListResult, ApiError> {
        let (items, revision, continue_token) = self
            .list_with(def, ns, opts, |kv| {
                let o = Self::decode(def, kv)?;
                Ok(opts.matches(&o).then_some(o))
            })
            .await?;
        Ok(ListResult {
            items,
            revision,
            continue_token,
        })
    }

    /// LIST without selectors, each item already encoded as the JSON the API returns
    /// (see [`raw_item`]): no tree of values is built for the items' specs and statuses,
    /// which made listing 10 000 pods mostly parsing and printing JSON. `None` when `opts`
    /// has selectors (they need the decoded object).
    pub(crate) async fn list_json(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> Result<Option<(Vec<Vec<u8>>, u64, Option<String>)>, ApiError> {
        if !opts.label_selector.is_empty() || !opts.field_selector.requirements.is_empty() {
            return Ok(None);
        }
        let r = self
            .list_with(def, ns, opts, |kv| raw_item(def, kv).map(Some))
            .await?;
        Ok(Some(r))
    }

    /// The pages of a list: `item` turns each stored object into an item, or `None` to
    /// skip it. Returns the items, the revision read at and the continue token.
    async fn list_with<T>(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        opts: &ListOptions,
        mut item: impl FnMut(&KeyValue) -> Result<Option<T>, ApiError>,
    ) -> Result<(Vec<T>, u64, Option<String>), ApiError> {
        let prefix = Self::prefix(def, ns);
        let mut start = match &opts.continue_token {
            Some(t) if !t.is_empty() => Some(decode_continue(t)?),
            _ => None,
        };
        let mut items = Vec::new();
        let mut revision = None;
        let page = if opts.limit == 0 {
            0
        } else {
            opts.limit.max(50)
        };
        loop {
            let r = self.store.range(&prefix, start.as_deref(), page).await?;
            let rev = *revision.get_or_insert(r.revision);
            for (i, kv) in r.kvs.iter().enumerate() {
                let Some(o) = item(kv)? else {
                    continue;
                };
                items.push(o);
                if opts.limit != 0 && items.len() == opts.limit {
                    let rest = i + 1 < r.kvs.len() || r.more;
                    let token = rest.then(|| encode_continue(&kv.key, rev));
                    return Ok((items, rev, token));
                }
            }
            if !r.more || r.kvs.is_empty() {
                return Ok((items, rev, None));
            }
            start = r.kvs.last().map(|kv| kv.key.clone());
        }
    }

    /// Create an object in `ns` (ignored for cluster-scoped kinds).
    pub(crate) async fn create(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut o = obj;
        if !o.is_object() {
            return Err(ApiError::BadRequest(
                "the body must be a JSON object".into(),
            ));
        }
        let ns = if def.namespaced {
            let url_ns = ns.map(String::from);
            let body_ns = meta_str(&o, "namespace").map(String::from);
            let ns = match (url_ns, body_ns) {
                (Some(u), Some(b)) if u != b => {
                    return Err(ApiError::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ))
                }
                (Some(u), _) => u,
                (None, Some(b)) => b,
                (None, None) => "default".to_string(),
            };
            self.check_namespace_open(&ns).await?;
            Some(ns)
        } else {
            None
        };
        let meta = meta_mut(&mut o);
        let mut generate = None;
        if meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            if let Some(g) = meta.get("generateName").and_then(Value::as_str) {
                generate = Some(g.to_string());
                let name = format!("{g}{}", random_suffix(5));
                meta.insert("name".into(), json!(name));
            }
        }
        if let Some(ns) = &ns {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            meta.remove(f);
        }
        apply_create_defaults(def, &mut o);
        let mut o = normalize(def, o)?;
        validate(def, &o)?;
        let mut name = meta_str(&o, "name").unwrap_or_default().to_string();
        if dry_run {
            return Ok(o);
        }
        // A generated name that is taken is generated again (like kube-apiserver since
        // 1.32, up to 8 tries) rather than answered 409.
        let mut tries = 0;
        loop {
            let key = Self::key(def, ns.as_deref(), &name);
            match self
                .store
                .write(Command::Put {
                    key,
                    value: self.encode(def, &o)?,
                    expect: Precondition::Absent,
                })
                .await?
            {
                CommandResult::Ok { revision, .. } => {
                    meta_mut(&mut o).insert("resourceVersion".into(), json!(revision.to_string()));
                    return Ok(o);
                }
                CommandResult::Conflict { .. } => match &generate {
                    Some(g) if tries < 7 => {
                        tries += 1;
                        name = format!("{g}{}", random_suffix(5));
                        meta_mut(&mut o).insert("name".into(), json!(name));
                    }
                    _ => {
                        return Err(ApiError::AlreadyExists {
                            group: def.group.into(),
                            resource: def.qualified(),
                            name,
                        })
                    }
                },
            }
        }
    }

    /// Write `new` over the revision `rev` of the object (CAS); removes it instead when
    /// its deletion is complete (deletionTimestamp set, no finalizers, no grace left).
    async fn put_cas(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        rev: u64,
        mut new: Value,
    ) -> Result<Value, ApiError> {
        let key = Self::key(def, ns, name);
        let cmd = if deletion_complete(&new) {
            Command::Delete {
                key,
                expect: Precondition::ModRevision(rev),
            }
        } else {
            Command::Put {
                key,
                value: self.encode(def, &new)?,
                expect: Precondition::ModRevision(rev),
            }
        };
        let removed = matches!(cmd, Command::Delete { .. });
        match self.store.write(cmd).await? {
            CommandResult::Ok { revision, .. } => {
                meta_mut(&mut new).insert("resourceVersion".into(), json!(revision.to_string()));
                if removed && def.namespaced {
                    if let Some(ns) = ns {
                        if let Err(e) = self.remove_namespace_if_done(ns).await {
                            tracing::debug!(namespace = ns, error = %e, "namespace finalization");
                        }
                    }
                }
                Ok(new)
            }
            CommandResult::Conflict { current: None, .. } => Err(Self::not_found(def, name)),
            CommandResult::Conflict { .. } => Err(Self::conflict(def, name)),
        }
    }

    /// Bump `metadata.generation` when the spec changed.
    fn bump_generation(old: &Value, new: &mut Value) {
        let gen = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let g = if old.get("spec") != new.get("spec") {
            gen + 1
        } else {
            gen
        };
        meta_mut(new).insert("generation".into(), json!(g));
    }

    /// Turn a client's full object into what an update stores.
    fn prepare_update(
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        cur: &Value,
        body: Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::BadRequest(
                "the body must be a JSON object".into(),
            ));
        }
        if let Some(n) = meta_str(&body, "name") {
            if n != name {
                return Err(ApiError::BadRequest(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        let mut new = match sub {
            Subresource::Status => {
                let mut o = cur.clone();
                o["status"] = body.get("status").cloned().unwrap_or(json!({}));
                o
            }
            Subresource::Main => {
                let mut o = body;
                if def.has_status() {
                    match cur.get("status") {
                        Some(s) => o["status"] = s.clone(),
                        None => {
                            o.as_object_mut().map(|m| m.remove("status"));
                        }
                    }
                }
                o
            }
        };
        {
            let cm = cur.get("metadata").cloned().unwrap_or(json!({}));
            let m = meta_mut(&mut new);
            m.insert("name".into(), json!(name));
            match ns {
                Some(ns) if def.namespaced => {
                    m.insert("namespace".into(), json!(ns));
                }
                _ => {
                    m.remove("namespace");
                }
            }
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match cm.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
            m.remove("resourceVersion");
        }
        if sub == Subresource::Main {
            apply_spec_defaults(def, &mut new);
        }
        if *def == NAMESPACES && sub == Subresource::Main {
            new["spec"] = cur.get("spec").cloned().unwrap_or(json!({}));
        }
        let mut new = normalize(def, new)?;
        validate(def, &new)?;
        if *def == PODS && sub == Subresource::Main {
            let old_spec = pod_spec_mutable_view(&cur["spec"]);
            if old_spec != pod_spec_mutable_view(&new["spec"]) {
                return Err(ApiError::Invalid {
                    group: String::new(),
                    kind: PODS.kind.into(),
                    name: name.into(),
                    causes: vec![Cause::forbidden(
                        "spec",
                        "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                    )],
                });
            }
        }
        Self::bump_generation(cur, &mut new);
        Ok(new)
    }

    /// The compare-and-swap loop every change of an existing object goes through: read
    /// the object and its revision, let `decide` say what to do with it, and store the
    /// result only over the revision read. A write that lost the race to another one
    /// reads again and decides again, at most [`CAS_ATTEMPTS`] times, then answers 409
    /// (a client may retry). An error from `decide` (a failed precondition, an invalid
    /// object) ends the loop at once: reading again would not change it.
    async fn read_modify_write<F>(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        mut decide: F,
    ) -> Result<Value, ApiError>
    where
        F: FnMut(&Value, u64) -> Result<Step, ApiError> + Send,
    {
        for _ in 0..CAS_ATTEMPTS {
            let (cur, rev) = self.get_kv(def, ns, name).await?;
            let new = match decide(&cur, rev)? {
                Step::Write(new) if same_stored(&new, &cur) => return Ok(cur),
                Step::Write(new) => new,
                Step::Answer(v) => return Ok(v),
            };
            match self.put_cas(def, ns, name, rev, new).await {
                Err(ApiError::Conflict { .. }) => continue,
                r => return r,
            }
        }
        Err(Self::conflict(def, name))
    }

    /// PUT: replace an object (or its status). A `metadata.resourceVersion` in `body`
    /// must match the stored one (409 `Conflict` otherwise). With `dry_run` the result
    /// is computed but not stored.
    pub(crate) async fn update_opts(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        body: Value,
        sub: Subresource,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let want_rev = meta_str(&body, "resourceVersion")
            .map(|r| {
                r.parse::<u64>()
                    .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {r:?}")))
            })
            .transpose()?;
        self.read_modify_write(def, ns, name, |cur, rev| {
            if want_rev.is_some_and(|w| w != rev) {
                return Err(Self::conflict(def, name));
            }
            let new = Self::prepare_update(def, ns, name, cur, body.clone(), sub)?;
            Ok(if dry_run {
                Step::Answer(new)
            } else {
                Step::Write(new)
            })
        })
        .await
    }

    /// PATCH with any [`PatchType`]. Server-side apply (`Apply`) creates a missing object.
    /// With `dry_run` the result is computed but not stored.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn patch_opts(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        patch_body: &Value,
        sub: Subresource,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let patched = self
            .read_modify_write(def, ns, name, |cur, rev| {
                let new =
                    Self::patched(def, ns, name, cur, rev, kind, patch_body, sub, self.limits)?;
                Ok(if dry_run && !same_stored(&new, cur) {
                    Step::Answer(new)
                } else {
                    Step::Write(new)
                })
            })
            .await;
        match patched {
            Err(e) if e.is_not_found() && kind == PatchType::Apply => {
                let mut o = patch::strip_directives(patch_body);
                meta_mut(&mut o).insert("name".into(), json!(name));
                self.create(def, ns, o, dry_run).await
            }
            r => r,
        }
    }

    /// What a PATCH makes of the object `cur` read at revision `rev`.
    #[allow(clippy::too_many_arguments)]
    fn patched(
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        cur: &Value,
        rev: u64,
        kind: PatchType,
        patch_body: &Value,
        sub: Subresource,
        limits: PatchLimits,
    ) -> Result<Value, ApiError> {
        let mut base = cur.clone();
        if kind == PatchType::Apply {
            // The applied config is the whole intent: its resourceVersion (if any) counts.
            meta_mut(&mut base).remove("resourceVersion");
        }
        let patched =
            patch::apply_limited(&base, patch_body, kind, limits).map_err(|e| match e {
                patch::PatchError::TestFailed(_) => ApiError::Invalid {
                    group: def.group.into(),
                    kind: def.qualified_kind(),
                    name: name.into(),
                    causes: vec![Cause::invalid("", "", &e.to_string())],
                },
                patch::PatchError::TooLarge { .. }
                | patch::PatchError::TooManyOperations { .. } => {
                    ApiError::TooLarge(format!("{} {name:?}: {e}", def.qualified()))
                }
                e => ApiError::BadRequest(e.to_string()),
            })?;
        let explicit_rev = meta_str(&patched, "resourceVersion")
            .map(String::from)
            .filter(|r| *r != rev.to_string());
        if explicit_rev.is_some() && kind != PatchType::Apply {
            return Err(Self::conflict(def, name));
        }
        Self::prepare_update(def, ns, name, cur, patched, sub)
    }

    /// Read-modify-write with retries on conflicts, for server-internal changes (no
    /// validation; generation bumped when the spec changes).
    pub(crate) async fn update_with<F>(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        mut f: F,
    ) -> Result<Value, ApiError>
    where
        F: FnMut(&mut Value) -> Result<(), ApiError> + Send,
    {
        self.read_modify_write(def, ns, name, |cur, _| {
            let mut new = cur.clone();
            f(&mut new)?;
            Self::bump_generation(cur, &mut new);
            Ok(Step::Write(new))
        })
        .await
    }

    /// DELETE. Returns the last state of the object: removed at once, or marked with
    /// `deletionTimestamp` (graceful pod deletion, finalizers, foreground/orphan GC).
    pub(crate) async fn delete(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        if *def == NAMESPACES {
            return self.delete_namespace(name, opts).await;
        }
        self.delete_object(def, ns, name, opts).await
    }

    /// DELETE of anything but a namespace (whose deletion deletes objects).
    async fn delete_object(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        self.read_modify_write(def, ns, name, |cur, rev| {
            let new = Self::marked_for_deletion(def, name, cur, rev, opts)?;
            Ok(if opts.dry_run.is_empty() {
                Step::Write(new)
            } else {
                Step::Answer(new)
            })
        })
        .await
    }

    /// `cur` (read at revision `rev`) marked deleted as `opts` ask: the GC finalizer of
    /// the propagation policy added, and `deletionTimestamp` set after the pod's grace
    /// period (at once for everything else, or for a pod that never ran).
    fn marked_for_deletion(
        def: &ResourceDef,
        name: &str,
        cur: &Value,
        rev: u64,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        Self::check_preconditions(def, name, cur, rev, opts)?;
        let policy =
            opts.propagation_policy
                .as_deref()
                .unwrap_or(if opts.orphan_dependents == Some(true) {
                    "Orphan"
                } else {
                    "Background"
                });
        let gc_finalizer = match policy {
            "Foreground" => Some("foregroundDeletion"),
            "Orphan" => Some("orphan"),
            "Background" => None,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unsupported propagationPolicy {other:?}"
                )))
            }
        };
        // Only kinds that own others get the GC finalizers.
        let gc_finalizer = gc_finalizer.filter(|_| [DEPLOYMENTS, REPLICASETS].contains(def));
        let grace = if *def == PODS {
            Self::pod_grace_seconds(cur, opts)
        } else {
            0
        };
        let already = cur.pointer("/metadata/deletionTimestamp").is_some();
        let mut new = cur.clone();
        let m = meta_mut(&mut new);
        if let Some(f) = gc_finalizer {
            let list = m.entry("finalizers").or_insert(json!([]));
            if let Some(a) = list.as_array_mut() {
                if !a.iter().any(|x| x == f) {
                    a.push(json!(f));
                }
            }
        }
        let cur_grace = m.get("deletionGracePeriodSeconds").and_then(Value::as_i64);
        if !already || cur_grace.is_some_and(|g| grace < g) {
            m.insert("deletionTimestamp".into(), json!(rfc3339_after(grace)));
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
        }
        Ok(new)
    }

    /// The DELETE's preconditions (uid, resourceVersion) against `cur` read at `rev`.
    fn check_preconditions(
        def: &ResourceDef,
        name: &str,
        cur: &Value,
        rev: u64,
        opts: &DeleteOptions,
    ) -> Result<(), ApiError> {
        let Some(p) = &opts.preconditions else {
            return Ok(());
        };
        if p.uid
            .as_deref()
            .is_some_and(|u| Some(u) != meta_str(cur, "uid"))
        {
            return Err(ApiError::Conflict {
                group: def.group.into(),
                resource: def.qualified(),
                name: name.into(),
                message: format!(
                    "Precondition failed: UID in precondition: {}, UID in object meta: {}",
                    p.uid.as_deref().unwrap_or_default(),
                    meta_str(cur, "uid").unwrap_or_default()
                ),
            });
        }
        if p.resource_version
            .as_deref()
            .is_some_and(|r| r != rev.to_string())
        {
            return Err(Self::conflict(def, name));
        }
        Ok(())
    }

    /// A pod's grace period: the request's, else the pod's own, else 30 s; none for a
    /// pod never bound to a node or already finished (nothing runs to stop).
    fn pod_grace_seconds(pod: &Value, opts: &DeleteOptions) -> i64 {
        let bound = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let terminal = matches!(
            pod.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        if !bound || terminal {
            return 0;
        }
        opts.grace_period_seconds
            .or_else(|| {
                pod.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(0)
    }

    /// Delete every object of a collection matching `list` (DeleteCollection).
    pub(crate) async fn delete_collection(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        list: &ListOptions,
        opts: &DeleteOptions,
    ) -> Result<Vec<Value>, ApiError> {
        let items = self.list(def, ns, list).await?.items;
        let mut out = Vec::new();
        for o in items {
            let n = meta_str(&o, "name").unwrap_or_default().to_string();
            let ons = meta_str(&o, "namespace").map(String::from);
            match self.delete(def, ons.as_deref(), &n, opts).await {
                Ok(v) => out.push(v),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// Whether `a` and `b` store the same: equal but for `metadata.resourceVersion`,
/// which is the key's revision rather than part of the stored value.
fn same_stored(a: &Value, b: &Value) -> bool {
    let (Some(oa), Some(ob)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    let fields_equal = oa.len() == ob.len()
        && oa
            .iter()
            .all(|(k, v)| k == "metadata" || ob.get(k) == Some(v));
    let (ma, mb) = match (oa.get("metadata"), ob.get("metadata")) {
        (Some(Value::Object(ma)), Some(Value::Object(mb))) => (ma, mb),
        (ma, mb) => return fields_equal && ma == mb,
    };
    let len = |m: &serde_json::Map<String, Value>| {
        m.len() - usize::from(m.contains_key("resourceVersion"))
    };
    fields_equal
        && len(ma) == len(mb)
        && ma
            .iter()
            .all(|(k, v)| k == "resourceVersion" || mb.get(k) == Some(v))
}

/// A stored object as the API returns it, encoded directly: what [`Registry::decode`]
/// then `serde_json::to_vec` give, byte for byte (`kind`, `apiVersion` and
/// `metadata.resourceVersion` set, keys in order), but only the top level and `metadata`
/// are parsed; `spec`, `status` and the rest are copied as stored.
pub(crate) fn raw_item(def: &ResourceDef, kv: &KeyValue) -> Result<Vec<u8>, ApiError> {
    use serde_json::value::RawValue;
    let corrupt =
        |e: serde_json::Error| ApiError::Internal(format!("corrupt object at {}: {e}", kv.key));
    let top: std::collections::BTreeMap<String, &RawValue> =
        serde_json::from_slice(&kv.value).map_err(corrupt)?;
    let mut meta: serde_json::Map<String, Value> = match top.get("metadata") {
        Some(m) => serde_json::from_str(m.get()).map_err(corrupt)?,
        None => serde_json::Map::new(),
    };
    meta.insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
    let mut fixed: std::collections::BTreeMap<&str, Vec<u8>> = std::collections::BTreeMap::new();
    fixed.insert(
        "apiVersion",
        serde_json::to_vec(&def.api_version()).map_err(corrupt)?,
    );
    fixed.insert("kind", serde_json::to_vec(def.kind).map_err(corrupt)?);
    fixed.insert("metadata", serde_json::to_vec(&meta).map_err(corrupt)?);
    let mut keys: Vec<&str> = top
        .keys()
        .map(String::as_str)
        .chain(fixed.keys().copied())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = Vec::with_capacity(kv.value.len() + 64);
    out.push(b'{');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k).map_err(corrupt)?;
        out.push(b':');
        match fixed.get(k) {
            Some(v) => out.extend_from_slice(v),
            None => out.extend_from_slice(top[*k].get().as_bytes()),
        }
    }
    out.push(b'}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::same_stored;
    use serde_json::json;

    #[test]
    fn same_stored_ignores_the_resource_version_only() {
        let a = json!({"metadata": {"name": "a", "resourceVersion": "7"}, "spec": {"x": 1}});
        let b = json!({"metadata": {"name": "a"}, "spec": {"x": 1}});
        assert!(same_stored(&a, &b) && same_stored(&b, &a));
        let renamed = json!({"metadata": {"name": "b", "resourceVersion": "7"}, "spec": {"x": 1}});
        assert!(!same_stored(&a, &renamed));
        let respec = json!({"metadata": {"name": "a", "resourceVersion": "7"}, "spec": {"x": 2}});
        assert!(!same_stored(&a, &respec));
        let more = json!({"metadata": {"name": "a"}, "spec": {"x": 1}, "status": {}});
        assert!(!same_stored(&b, &more) && !same_stored(&more, &b));
        let labelled = json!({"metadata": {"name": "a", "labels": {}}, "spec": {"x": 1}});
        assert!(!same_stored(&a, &labelled) && !same_stored(&labelled, &a));
        assert!(!same_stored(
            &json!({"spec": 1}),
            &json!({"metadata": {}, "spec": 1})
        ));
    }
}

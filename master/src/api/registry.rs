//! The generic object storage behind every resource: Kubernetes object semantics
//! (metadata, optimistic concurrency, graceful deletion, finalizers, watches) on top
//! of the [`Store`]. Objects are `serde_json::Value`s checked through k8s-openapi types.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::{ApiError, Cause};
use super::patch::{self, PatchType};
use super::resources::{self, ResourceDef, NAMESPACES, PODS};
use super::selector::{FieldSelector, LabelSelector};
use super::table;
use super::validate::{normalize, validate};
use crate::store::{Command, CommandResult, Event, KeyValue, Precondition, Store, StoreError};

/// Namespaces that always exist and cannot be deleted (`kube-node-lease` can be recreated).
/// The largest object stored, as JSON (etcd's default request limit, which
/// kube-apiserver inherits).
pub(crate) const MAX_OBJECT_BYTES: usize = 1536 * 1024;

pub(crate) const DEFAULT_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-node-lease", "kube-public"];
const UNDELETABLE_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

/// Which part of an object a write targets.
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

/// One watch event: `ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` or `ERROR` (object = Status).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WatchEvent {
    pub kind: &'static str,
    pub object: Value,
}

/// The object storage of the API. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Registry {
    store: Arc<dyn Store>,
}

/// Current time as Kubernetes formats it (RFC 3339, seconds, `Z`).
pub(crate) fn now_rfc3339() -> String {
    table::now().to_string()
}

fn rfc3339_after(secs: i64) -> String {
    let t = table::now();
    k8s_openapi::jiff::Timestamp::from_second(t.as_second().saturating_add(secs))
        .unwrap_or(t)
        .to_string()
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

fn random_suffix(n: usize) -> String {
    // Kubernetes' alphabet for generated names (no vowels, no confusable digits).
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes
        .iter()
        .take(n)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        "IfNotPresent"
    } else {
        match last.split_once(':') {
            None => "Always",
            Some((_, "latest")) => "Always",
            Some(_) => "IfNotPresent",
        }
    }
}

/// Kubernetes' defaults of a pod spec (the fields the workers and kubectl rely on).
pub(crate) fn default_pod_spec(spec: &mut Value) {
    let Some(m) = spec.as_object_mut() else {
        return;
    };
    m.entry("restartPolicy").or_insert(json!("Always"));
    m.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    m.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    m.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
    m.entry("securityContext").or_insert(json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
                let policy = image_pull_policy(image);
                c.entry("imagePullPolicy").or_insert(json!(policy));
                c.entry("terminationMessagePath")
                    .or_insert(json!("/dev/termination-log"));
                c.entry("terminationMessagePolicy").or_insert(json!("File"));
                c.entry("resources").or_insert(json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        p.entry("protocol").or_insert(json!("TCP"));
                    }
                }
            }
        }
    }
}

/// Spec defaults (applied on create and on every main-resource update, as Kubernetes does).
fn apply_spec_defaults(def: &ResourceDef, o: &mut Value) {
    match def.kind {
        "Pod" => {
            if let Some(spec) = o.get_mut("spec") {
                default_pod_spec(spec);
            }
        }
        "Deployment" | "ReplicaSet" => {
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                if def.kind == "Deployment" {
                    spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                    let strategy = spec.entry("strategy").or_insert(json!({}));
                    if strategy.get("type").is_none() {
                        strategy["type"] = json!("RollingUpdate");
                    }
                    if strategy["type"] == "RollingUpdate"
                        && strategy.get("rollingUpdate").is_none()
                    {
                        strategy["rollingUpdate"] =
                            json!({"maxUnavailable": "25%", "maxSurge": "25%"});
                    }
                }
                if let Some(ps) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
                    default_pod_spec(ps);
                }
            }
        }
        "Service" => {
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("type").or_insert(json!("ClusterIP"));
                spec.entry("sessionAffinity").or_insert(json!("None"));
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        p.entry("protocol").or_insert(json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            p.entry("targetPort").or_insert(port);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// Defaults applied on create, per kind (spec defaults plus the initial status).
fn apply_create_defaults(def: &ResourceDef, o: &mut Value) {
    apply_spec_defaults(def, o);
    match def.kind {
        "Pod" => o["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"}),
        "Deployment" | "ReplicaSet" => o["status"] = json!({}),
        "Namespace" => {
            let name = o.pointer("/metadata/name").cloned().unwrap_or(Value::Null);
            if let Some(m) = o.pointer_mut("/metadata").and_then(Value::as_object_mut) {
                let labels = m.entry("labels").or_insert(json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), name);
                }
            }
            o["spec"] = json!({"finalizers": ["kubernetes"]});
            o["status"] = json!({"phase": "Active"});
        }
        "Event" => {
            if let Some(m) = o.as_object_mut() {
                m.entry("count").or_insert(json!(1));
                if !m.contains_key("eventTime") {
                    let now = now_rfc3339();
                    m.entry("firstTimestamp").or_insert(json!(now.clone()));
                    m.entry("lastTimestamp").or_insert(json!(now));
                }
                m.entry("type").or_insert(json!("Normal"));
            }
        }
        _ => {}
    }
}

/// Pod spec fields a main-resource update may change (everything else is immutable).
fn pod_spec_mutable_view(spec: &Value) -> Value {
    let mut s = spec.clone();
    for list in ["containers", "initContainers"] {
        if let Some(cs) = s.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                c.remove("image");
            }
        }
    }
    if let Some(m) = s.as_object_mut() {
        m.remove("activeDeadlineSeconds");
        m.remove("tolerations");
        m.remove("terminationGracePeriodSeconds");
    }
    s
}

/// Continue tokens: the last returned key, opaque to clients.
fn encode_continue(key: &str, rev: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"k": key, "rv": rev}).to_string())
}

fn decode_continue(token: &str) -> Result<String, ApiError> {
    let bad = || ApiError::BadRequest("invalid continue token".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    v["k"].as_str().map(String::from).ok_or_else(bad)
}

impl Registry {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
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
    /// [`MAX_OBJECT_BYTES`].
    fn encode(def: &ResourceDef, o: &Value) -> Result<Vec<u8>, ApiError> {
        let mut o = o.clone();
        meta_mut(&mut o).remove("resourceVersion");
        let bytes = serde_json::to_vec(&o).unwrap_or_default();
        if bytes.len() > MAX_OBJECT_BYTES {
            return Err(ApiError::TooLarge(format!(
                "{} {:?} is {} bytes, more than the limit of {MAX_OBJECT_BYTES}",
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

    /// List a collection (one namespace or all), filtered, paged by `limit`/`continue`.
    pub(crate) async fn list(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> Result<ListResult, ApiError> {
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
                let o = Self::decode(def, kv)?;
                if !opts.matches(&o) {
                    continue;
                }
                items.push(o);
                if opts.limit != 0 && items.len() == opts.limit {
                    let rest = i + 1 < r.kvs.len() || r.more;
                    let token = rest.then(|| encode_continue(&kv.key, rev));
                    return Ok(ListResult {
                        items,
                        revision: rev,
                        continue_token: token,
                    });
                }
            }
            if !r.more || r.kvs.is_empty() {
                return Ok(ListResult {
                    items,
                    revision: rev,
                    continue_token: None,
                });
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
                    value: Self::encode(def, &o)?,
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

    async fn check_namespace_open(&self, ns: &str) -> Result<(), ApiError> {
        match self.get(&NAMESPACES, None, ns).await {
            Ok(n) => {
                if n.pointer("/metadata/deletionTimestamp").is_some() {
                    Err(ApiError::Forbidden(format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    )))
                } else {
                    Ok(())
                }
            }
            Err(e) if e.is_not_found() && DEFAULT_NAMESPACES.contains(&ns) => {
                ensure_defaults(self.store.as_ref()).await?;
                Ok(())
            }
            Err(e) => Err(e),
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
                value: Self::encode(def, &new)?,
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

    /// Remove a terminating namespace once nothing is left in it.
    async fn remove_namespace_if_done(&self, ns: &str) -> Result<(), ApiError> {
        let Some(kv) = self.store.get(&Self::key(&NAMESPACES, None, ns)).await? else {
            return Ok(());
        };
        let n = Self::decode(&NAMESPACES, &kv)?;
        if n.pointer("/metadata/deletionTimestamp").is_none() || !finalizers(&n).is_empty() {
            return Ok(());
        }
        for def in resources::ALL.iter().filter(|d| d.namespaced) {
            if !self
                .store
                .range(&Self::prefix(def, Some(ns)), None, 1)
                .await?
                .kvs
                .is_empty()
            {
                return Ok(());
            }
        }
        self.store
            .write(Command::Delete {
                key: kv.key,
                expect: Precondition::ModRevision(kv.mod_revision),
            })
            .await?;
        Ok(())
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
        if def.kind == "Namespace" && sub == Subresource::Main {
            new["spec"] = cur.get("spec").cloned().unwrap_or(json!({}));
        }
        let mut new = normalize(def, new)?;
        validate(def, &new)?;
        if def.kind == "Pod" && sub == Subresource::Main {
            let old_spec = pod_spec_mutable_view(&cur["spec"]);
            if old_spec != pod_spec_mutable_view(&new["spec"]) {
                return Err(ApiError::Invalid {
                    group: String::new(),
                    kind: "Pod".into(),
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
        for _ in 0..8 {
            let (cur, rev) = self.get_kv(def, ns, name).await?;
            if want_rev.is_some_and(|w| w != rev) {
                return Err(Self::conflict(def, name));
            }
            let new = Self::prepare_update(def, ns, name, &cur, body.clone(), sub)?;
            if dry_run {
                return Ok(new);
            }
            match self.put_cas(def, ns, name, rev, new).await {
                Err(ApiError::Conflict { .. }) if want_rev.is_none() => continue,
                r => return r,
            }
        }
        Err(Self::conflict(def, name))
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
        for _ in 0..8 {
            let (cur, rev) = match self.get_kv(def, ns, name).await {
                Ok(x) => x,
                Err(e) if e.is_not_found() && kind == PatchType::Apply => {
                    let mut o = patch::strip_directives(patch_body);
                    meta_mut(&mut o).insert("name".into(), json!(name));
                    return self.create(def, ns, o, dry_run).await;
                }
                Err(e) => return Err(e),
            };
            let mut base = cur.clone();
            if kind == PatchType::Apply {
                // The applied config is the whole intent: its resourceVersion (if any) counts.
                meta_mut(&mut base).remove("resourceVersion");
            }
            let patched = patch::apply(&base, patch_body, kind).map_err(|e| match e {
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
            let new = Self::prepare_update(def, ns, name, &cur, patched, sub)?;
            if new == strip_rv(&cur) {
                return Ok(cur);
            }
            if dry_run {
                return Ok(new);
            }
            match self.put_cas(def, ns, name, rev, new).await {
                Err(ApiError::Conflict { .. }) => continue,
                r => return r,
            }
        }
        Err(Self::conflict(def, name))
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
        for _ in 0..8 {
            let (cur, rev) = self.get_kv(def, ns, name).await?;
            let mut new = cur.clone();
            f(&mut new)?;
            if new == cur {
                return Ok(cur);
            }
            Self::bump_generation(&cur, &mut new);
            match self.put_cas(def, ns, name, rev, new).await {
                Err(ApiError::Conflict { .. }) => continue,
                r => return r,
            }
        }
        Err(Self::conflict(def, name))
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
        if def.kind == "Namespace" {
            return self.delete_namespace(name, opts).await;
        }
        self.delete_object(def, ns, name, opts).await
    }

    async fn delete_object(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        for _ in 0..8 {
            let (cur, rev) = self.get_kv(def, ns, name).await?;
            if let Some(p) = &opts.preconditions {
                if p.uid
                    .as_deref()
                    .is_some_and(|u| Some(u) != meta_str(&cur, "uid"))
                {
                    return Err(ApiError::Conflict {
                        group: def.group.into(),
                        resource: def.qualified(),
                        name: name.into(),
                        message: format!(
                            "Precondition failed: UID in precondition: {}, UID in object meta: {}",
                            p.uid.as_deref().unwrap_or_default(),
                            meta_str(&cur, "uid").unwrap_or_default()
                        ),
                    });
                }
                if p.resource_version
                    .as_deref()
                    .is_some_and(|r| r != rev.to_string())
                {
                    return Err(Self::conflict(def, name));
                }
            }
            let mut new = cur.clone();
            let policy = opts.propagation_policy.as_deref().unwrap_or(
                if opts.orphan_dependents == Some(true) {
                    "Orphan"
                } else {
                    "Background"
                },
            );
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
            let gc_finalizer =
                gc_finalizer.filter(|_| matches!(def.kind, "Deployment" | "ReplicaSet"));
            let grace = if def.kind == "Pod" {
                let bound = cur
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .is_some_and(|n| !n.is_empty());
                let terminal = matches!(
                    cur.pointer("/status/phase").and_then(Value::as_str),
                    Some("Succeeded" | "Failed")
                );
                if bound && !terminal {
                    opts.grace_period_seconds
                        .or_else(|| {
                            cur.pointer("/spec/terminationGracePeriodSeconds")
                                .and_then(Value::as_i64)
                        })
                        .unwrap_or(30)
                        .max(0)
                } else {
                    0
                }
            } else {
                0
            };
            let already = cur.pointer("/metadata/deletionTimestamp").is_some();
            {
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
            }
            if !opts.dry_run.is_empty() {
                return Ok(new);
            }
            if new == cur {
                return Ok(cur);
            }
            match self.put_cas(def, ns, name, rev, new).await {
                Err(ApiError::Conflict { .. }) => continue,
                r => return r,
            }
        }
        Err(Self::conflict(def, name))
    }

    async fn delete_namespace(&self, name: &str, opts: &DeleteOptions) -> Result<Value, ApiError> {
        if UNDELETABLE_NAMESPACES.contains(&name) {
            return Err(ApiError::Forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        if !opts.dry_run.is_empty() {
            return self.get(&NAMESPACES, None, name).await;
        }
        let marked = self
            .update_with(&NAMESPACES, None, name, |o| {
                if o.pointer("/metadata/deletionTimestamp").is_none() {
                    meta_mut(o).insert("deletionTimestamp".into(), json!(now_rfc3339()));
                    meta_mut(o).insert("deletionGracePeriodSeconds".into(), json!(0));
                }
                o["status"] = json!({"phase": "Terminating"});
                Ok(())
            })
            .await?;
        self.finalize_namespace(name).await?;
        Ok(marked)
    }

    /// Delete the content of a terminating namespace; remove it once empty.
    /// Returns whether the namespace is gone.
    pub(crate) async fn finalize_namespace(&self, name: &str) -> Result<bool, ApiError> {
        let mut remaining = 0;
        for def in resources::ALL.iter().filter(|d| d.namespaced) {
            let items = self
                .list(def, Some(name), &ListOptions::default())
                .await?
                .items;
            for o in items {
                let n = meta_str(&o, "name").unwrap_or_default().to_string();
                match self
                    .delete_object(def, Some(name), &n, &DeleteOptions::default())
                    .await
                {
                    // Still there: graceful pod deletion or finalizers pending.
                    Ok(_) => {
                        if self.get(def, Some(name), &n).await.is_ok() {
                            remaining += 1;
                        }
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if remaining > 0 {
            return Ok(false);
        }
        let (cur, rev) = match self.get_kv(&NAMESPACES, None, name).await {
            Ok(x) => x,
            Err(e) if e.is_not_found() => return Ok(true),
            Err(e) => return Err(e),
        };
        if cur.pointer("/metadata/deletionTimestamp").is_none() || !finalizers(&cur).is_empty() {
            return Ok(false);
        }
        self.store
            .write(Command::Delete {
                key: Self::key(&NAMESPACES, None, name),
                expect: Precondition::ModRevision(rev),
            })
            .await?;
        Ok(true)
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

    /// `pods/{name}/binding`: assign a pod to a node (409 if already bound elsewhere).
    pub(crate) async fn bind(&self, ns: &str, pod: &str, node: &str) -> Result<Value, ApiError> {
        if node.is_empty() {
            return Err(ApiError::Invalid {
                group: String::new(),
                kind: "Binding".into(),
                name: pod.into(),
                causes: vec![Cause::required("target.name")],
            });
        }
        self.update_with(&PODS, Some(ns), pod, |p| {
            let cur = p
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if !cur.is_empty() {
                return Err(ApiError::Conflict {
                    group: String::new(),
                    resource: "pods".into(),
                    name: pod.into(),
                    message: format!("pod {pod} is already assigned to node \"{cur}\""),
                });
            }
            if p.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(ApiError::Conflict {
                    group: String::new(),
                    resource: "pods".into(),
                    name: pod.into(),
                    message: "pod is being deleted, cannot be assigned to a host".into(),
                });
            }
            p["spec"]["nodeName"] = json!(node);
            let conds = p["status"]
                .as_object_mut()
                .map(|s| s.entry("conditions").or_insert(json!([])));
            if let Some(Value::Array(a)) = conds {
                a.retain(|c| c["type"] != "PodScheduled");
                a.push(json!({"type": "PodScheduled", "status": "True",
                    "lastProbeTime": null, "lastTransitionTime": now_rfc3339()}));
            }
            Ok(())
        })
        .await
    }

    /// The autoscaling/v1 `Scale` of a deployment or replica set.
    pub(crate) fn scale_of(o: &Value) -> Value {
        let m = &o["metadata"];
        let selector = o
            .pointer("/spec/selector")
            .and_then(|s| LabelSelector::from_object(s).ok())
            .map(|s| s.to_string())
            .unwrap_or_default();
        json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"],
            },
            "spec": {"replicas": o.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
            "status": {
                "replicas": o.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
                "selector": selector,
            },
        })
    }

    /// Set `spec.replicas` through the scale subresource.
    pub(crate) async fn set_replicas(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        replicas: i64,
        want_rev: Option<u64>,
    ) -> Result<Value, ApiError> {
        if replicas < 0 {
            return Err(ApiError::Invalid {
                group: "autoscaling".into(),
                kind: "Scale.autoscaling".into(),
                name: name.into(),
                causes: vec![Cause::invalid(
                    "spec.replicas",
                    replicas,
                    "must be greater than or equal to 0",
                )],
            });
        }
        let (_, rev) = self.get_kv(def, ns, name).await?;
        if want_rev.is_some_and(|w| w != rev) {
            return Err(Self::conflict(def, name));
        }
        let o = self
            .update_with(def, ns, name, |o| {
                o["spec"]["replicas"] = json!(replicas);
                Ok(())
            })
            .await?;
        Ok(Self::scale_of(&o))
    }

    /// Watch a collection. Events are filtered by the selectors (an object leaving the
    /// selection is sent as DELETED, one entering as ADDED). The channel ends at the
    /// timeout, when the receiver is dropped, or after an ERROR event.
    pub(crate) async fn watch(
        &self,
        def: &'static ResourceDef,
        ns: Option<&str>,
        opts: WatchOptions,
    ) -> Result<mpsc::Receiver<WatchEvent>, ApiError> {
        let prefix = Self::prefix(def, ns);
        let (tx, rx) = mpsc::channel(256);
        let mut initial = Vec::new();
        let start = match opts.resource_version {
            Some(r) if r > 0 => r,
            _ => {
                let r = self.store.range(&prefix, None, 0).await?;
                for kv in &r.kvs {
                    let o = Self::decode(def, kv)?;
                    if opts.label_selector.matches_object(&o) && opts.field_selector.matches(&o) {
                        initial.push(WatchEvent {
                            kind: "ADDED",
                            object: o,
                        });
                    }
                }
                r.revision
            }
        };
        let mut events = match self.store.watch(&prefix, start).await {
            Ok(e) => e,
            Err(e @ StoreError::Compacted { .. }) => {
                let _ = tx.try_send(WatchEvent {
                    kind: "ERROR",
                    object: ApiError::from(e).status(),
                });
                return Ok(rx);
            }
            Err(e) => return Err(e.into()),
        };
        tokio::spawn(async move {
            for ev in initial {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
            let bookmark_every = opts.bookmark_interval.unwrap_or(Duration::from_secs(30));
            let mut last_rev = start;
            let matches =
                |o: &Value| opts.label_selector.matches_object(o) && opts.field_selector.matches(o);
            let needle = opts.field_selector.required_json();
            loop {
                let sleep_until = deadline.unwrap_or_else(|| {
                    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
                });
                tokio::select! {
                    _ = tokio::time::sleep_until(sleep_until) => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(bookmark_every), if opts.allow_bookmarks => {
                        let bm = WatchEvent {
                            kind: "BOOKMARK",
                            object: json!({"kind": def.kind, "apiVersion": def.api_version(),
                                "metadata": {"resourceVersion": last_rev.to_string()}}),
                        };
                        if tx.send(bm).await.is_err() {
                            return;
                        }
                    }
                    ev = events.recv() => {
                        let ev = match ev {
                            None => return,
                            // Leadership lost: end the stream like a stopping API server
                            // does; clients re-watch (through the proxy, on the new active).
                            Some(Err(StoreError::NotActive { .. } | StoreError::Timeout)) => return,
                            Some(Err(e)) => {
                                let _ = tx.send(WatchEvent { kind: "ERROR", object: ApiError::from(e).status() }).await;
                                return;
                            }
                            Some(Ok(ev)) => ev,
                        };
                        last_rev = ev.revision();
                        let out = match convert_event(def, &ev, needle.as_deref(), &matches) {
                            Ok(Some(e)) => e,
                            Ok(None) => continue,
                            Err(e) => WatchEvent { kind: "ERROR", object: e.status() },
                        };
                        if tx.send(out).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

fn strip_rv(o: &Value) -> Value {
    let mut o = o.clone();
    meta_mut(&mut o).remove("resourceVersion");
    o
}

fn convert_event(
    def: &ResourceDef,
    ev: &Event,
    needle: Option<&[u8]>,
    matches: &dyn Fn(&Value) -> bool,
) -> Result<Option<WatchEvent>, ApiError> {
    // An object whose JSON lacks the selector's required bytes cannot match: skip
    // decoding it (most events, when each node watches only its own pods).
    let may_match =
        |kv: &KeyValue| needle.is_none_or(|n| memchr::memmem::find(&kv.value, n).is_some());
    Ok(match ev {
        Event::Put { kv, prev } => {
            let old_matched = match prev {
                Some(p) if may_match(p) => matches(&Registry::decode(def, p)?),
                _ => false,
            };
            if !old_matched && !may_match(kv) {
                return Ok(None);
            }
            let new = Registry::decode(def, kv)?;
            let kind = match (old_matched, matches(&new)) {
                (false, true) => "ADDED",
                (true, true) => "MODIFIED",
                (true, false) => "DELETED",
                (false, false) => return Ok(None),
            };
            Some(WatchEvent { kind, object: new })
        }
        Event::Delete { prev, revision } => {
            if !may_match(prev) {
                return Ok(None);
            }
            let mut o = Registry::decode(def, prev)?;
            meta_mut(&mut o).insert("resourceVersion".into(), json!(revision.to_string()));
            matches(&o).then_some(WatchEvent {
                kind: "DELETED",
                object: o,
            })
        }
    })
}

/// Create the default namespaces and the bootstrap RBAC policy when absent (idempotent).
pub(crate) async fn ensure_defaults(store: &dyn Store) -> Result<(), ApiError> {
    for ns in DEFAULT_NAMESPACES {
        let o = json!({
            "kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        create_if_absent(store, &NAMESPACES, o).await?;
    }
    use crate::auth::bootstrap;
    for o in bootstrap::cluster_roles() {
        create_if_absent(store, &super::resources::CLUSTERROLES, o).await?;
    }
    for o in bootstrap::cluster_role_bindings() {
        create_if_absent(store, &super::resources::CLUSTERROLEBINDINGS, o).await?;
    }
    Ok(())
}

/// Store cluster-scoped object `o` (with a new uid and creation time) unless one of its
/// name exists: what an operator changed stays.
async fn create_if_absent(
    store: &dyn Store,
    def: &ResourceDef,
    mut o: Value,
) -> Result<(), ApiError> {
    let name = meta_str(&o, "name").unwrap_or_default().to_string();
    let key = Registry::key(def, None, &name);
    if store.get(&key).await?.is_some() {
        return Ok(());
    }
    let meta = meta_mut(&mut o);
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
    // a concurrent creator winning the race is as good as this write
    store
        .write(Command::Put {
            key,
            value: serde_json::to_vec(&o).unwrap_or_default(),
            expect: Precondition::Absent,
        })
        .await?;
    Ok(())
}

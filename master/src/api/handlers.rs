//! HTTP handlers: path routing, content negotiation, verbs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Value};

use super::error::{success_status, ApiError};
use super::patch::PatchType;
use super::protobuf;
use super::registry::{
    ensure_defaults, DeleteOptions, ListOptions, Registry, Subresource, WatchEventType,
    WatchOptions,
};
use super::resources::{self, ResourceDef, PODS};
use super::selector::{FieldSelector, LabelSelector};
use super::table::{self, IncludeObject};
use super::ApiInfo;
use crate::auth::review::{self, Review};
use crate::auth::{node, Attributes, Auth, Identity};
use ballast_config::schema::LimitsConfig;

/// The longest a watch runs before the server ends it (whatever `timeoutSeconds` asks).
pub(crate) const MAX_WATCH_TIMEOUT: Duration = Duration::from_secs(3600);

/// Shared state of the router.
pub(crate) struct ApiState {
    pub registry: Registry,
    pub info: ApiInfo,
    pub auth: Auth,
    pub defaults_ready: std::sync::atomic::AtomicBool,
}

pub(crate) type Shared = Arc<ApiState>;

/// A JSON response with `Content-Type: application/json`.
pub(crate) fn json_response(code: StatusCode, v: &Value) -> Response {
    let mut r = (code, serde_json::to_vec(v).unwrap_or_default()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A JSON list whose items are already encoded ([`Registry::list_json`]): the bytes
/// `json_response` gives for the decoded list (keys in the same sorted order).
fn raw_list_response(
    def: &ResourceDef,
    (items, rev, token): (Vec<Vec<u8>>, u64, Option<String>),
) -> Response {
    let mut meta = json!({"resourceVersion": rev.to_string()});
    if let Some(c) = &token {
        meta["continue"] = json!(c);
    }
    let json = |v: &Value| serde_json::to_vec(v).unwrap_or_default();
    let mut body = Vec::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 256);
    body.extend_from_slice(b"{\"apiVersion\":");
    body.extend_from_slice(&json(&json!(def.api_version())));
    body.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"],\"kind\":");
    body.extend_from_slice(&json(&json!(def.list_kind())));
    body.extend_from_slice(b",\"metadata\":");
    body.extend_from_slice(&json(&meta));
    body.push(b'}');
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) async fn version(State(st): State<Shared>) -> Response {
    let v = &st.info.git_version;
    let (major, minor) = v
        .trim_start_matches('v')
        .split_once('.')
        .map(|(a, b)| {
            (
                a.to_string(),
                b.split('.').next().unwrap_or("0").to_string(),
            )
        })
        .unwrap_or(("1".into(), "33".into()));
    json_response(
        StatusCode::OK,
        &json!({
            "major": major, "minor": minor, "gitVersion": v,
            "gitCommit": "ballast", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "rust",
            "compiler": "rustc", "platform": "linux/amd64",
        }),
    )
}

pub(crate) async fn openapi_v2() -> Response {
    let mut r = (StatusCode::OK, Body::empty()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

pub(crate) async fn not_found() -> Response {
    ApiError::NoRoute.into_response()
}

/// Where a request points.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    ResourceList,
    Collection {
        def: &'static ResourceDef,
        ns: Option<String>,
    },
    Item {
        def: &'static ResourceDef,
        ns: Option<String>,
        name: String,
        sub: Option<String>,
    },
}

fn parse_target(group: &str, rest: &[&str]) -> Option<Target> {
    let find = |plural: &str| ResourceDef::find(group, plural);
    let item = |def: &'static ResourceDef, ns: Option<&str>, name: &str, sub: Option<&str>| {
        if sub.is_some_and(|s| !def.has_subresource(s)) {
            return None;
        }
        Some(Target::Item {
            def,
            ns: ns.map(String::from),
            name: name.to_string(),
            sub: sub.map(String::from),
        })
    };
    match rest {
        [] => Some(Target::ResourceList),
        [res] => find(res).map(|def| Target::Collection { def, ns: None }),
        ["namespaces", ns, res]
            if group.is_empty() && resources::NAMESPACES.has_subresource(res) =>
        {
            item(&resources::NAMESPACES, None, ns, Some(res))
        }
        ["namespaces", ns, res] => {
            let def = find(res).filter(|d| d.namespaced)?;
            Some(Target::Collection {
                def,
                ns: Some((*ns).to_string()),
            })
        }
        [res, name] => {
            let def = find(res).filter(|d| !d.namespaced)?;
            item(def, None, name, None)
        }
        [res, name, sub] => {
            let def = find(res).filter(|d| !d.namespaced)?;
            item(def, None, name, Some(sub))
        }
        ["namespaces", ns, res, name] => {
            let def = find(res).filter(|d| d.namespaced)?;
            item(def, Some(ns), name, None)
        }
        ["namespaces", ns, res, name, sub] => {
            let def = find(res).filter(|d| d.namespaced)?;
            item(def, Some(ns), name, Some(sub))
        }
        _ => None,
    }
}

/// How the client wants objects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Json,
    Table,
    Metadata,
}

fn output_of(headers: &HeaderMap) -> Output {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // Take the first acceptable media type in the client's order.
    for part in accept.split(',') {
        let p = part.trim();
        if p.contains("as=Table") {
            return Output::Table;
        }
        if p.contains("as=PartialObjectMetadata") {
            return Output::Metadata;
        }
        if p.starts_with("application/json")
            || p.starts_with("*/*")
            || p.starts_with("application/*")
        {
            return Output::Json;
        }
    }
    Output::Json
}

fn to_metadata(o: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
        "metadata": o.get("metadata").cloned().unwrap_or(json!({}))})
}

fn render_object(def: &ResourceDef, o: &Value, out: Output, include: IncludeObject) -> Value {
    match out {
        Output::Json => o.clone(),
        Output::Metadata => to_metadata(o),
        Output::Table => {
            let rv = o
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            table::table(def, std::slice::from_ref(o), &rv, None, include)
        }
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string()
}

/// Decode a request body (JSON, or Kubernetes protobuf).
fn decode_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let ct = content_type(headers);
    let base = ct.split(';').next().unwrap_or_default().trim();
    match base {
        "application/vnd.kubernetes.protobuf" => protobuf::decode(body),
        "application/json" | "" | "*/*" => serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding JSON body: {e}"))),
        "application/yaml" => serde_json::from_slice(body).map_err(|_| {
            ApiError::UnsupportedMediaType(
                "YAML bodies are not supported; send JSON".into(),
            )
        }),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/vnd.kubernetes.protobuf (got {other})"
        ))),
    }
}

fn q_bool(q: &HashMap<String, String>, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true" | "1"))
}

/// List options from the query, within `[limits]`: selectors of at most
/// `max_selector_terms` terms (400 beyond), pages of at most `max_list_page` items.
fn list_options(q: &HashMap<String, String>, l: &LimitsConfig) -> Result<ListOptions, ApiError> {
    let label_selector = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let field_selector = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let terms = label_selector
        .requirements
        .iter()
        .map(|r| r.terms())
        .sum::<usize>()
        + field_selector.requirements.len();
    if terms > l.max_selector_terms {
        return Err(ApiError::BadRequest(format!(
            "the label and field selectors have {terms} terms, more than the limit of {}",
            l.max_selector_terms
        )));
    }
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(0);
    Ok(ListOptions {
        label_selector,
        field_selector,
        limit: if limit == 0 {
            0
        } else {
            limit.min(l.max_list_page)
        },
        continue_token: q.get("continue").cloned(),
    })
}

fn delete_options(
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<DeleteOptions, ApiError> {
    let mut opts: DeleteOptions = if body.iter().all(u8::is_ascii_whitespace) {
        DeleteOptions::default()
    } else {
        serde_json::from_value(decode_body(headers, body)?)
            .map_err(|e| ApiError::BadRequest(format!("invalid DeleteOptions: {e}")))?
    };
    if let Some(g) = q.get("gracePeriodSeconds") {
        opts.grace_period_seconds = Some(
            g.parse()
                .map_err(|_| ApiError::BadRequest(format!("invalid gracePeriodSeconds {g:?}")))?,
        );
    }
    if let Some(p) = q.get("propagationPolicy") {
        opts.propagation_policy = Some(p.clone());
    }
    if q.contains_key("dryRun") {
        opts.dry_run = vec!["All".into()];
    }
    Ok(opts)
}

fn verb_of(method: &Method, target: &Target, q: &HashMap<String, String>) -> &'static str {
    match (method.as_str(), target) {
        ("GET", Target::Collection { .. }) if q_bool(q, "watch") => "watch",
        ("GET", Target::Collection { .. }) => "list",
        ("GET", _) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Target::Collection { .. }) => "deletecollection",
        ("DELETE", _) => "delete",
        _ => "other",
    }
}

/// The authorization attributes of a resource request. `body_name` is the name a create
/// gives its object (only the node authorizer looks at it).
fn attributes_of(
    method: &Method,
    target: &Target,
    q: &HashMap<String, String>,
    body_name: &str,
) -> Attributes {
    let (def, ns, name, sub) = match target {
        Target::Collection { def, ns } => (*def, ns.as_deref(), body_name, ""),
        Target::Item { def, ns, name, sub } => (
            *def,
            ns.as_deref(),
            name.as_str(),
            sub.as_deref().unwrap_or(""),
        ),
        Target::ResourceList => unreachable!("resource lists are discovery"),
    };
    let verb = match (method.as_str(), sub) {
        // a log is read with GET; kube authorizes `get pods/log`
        ("POST", "binding") => "create",
        _ => verb_of(method, target, q),
    };
    Attributes::Resource {
        verb: verb.into(),
        api_group: def.group.into(),
        resource: def.plural.into(),
        subresource: sub.into(),
        namespace: ns.unwrap_or_default().into(),
        name: name.into(),
        field_selector: q.get("fieldSelector").cloned().unwrap_or_default(),
    }
}

/// Authorize `attrs` for `user`: `Err` is the 403 to answer.
async fn authorize(st: &ApiState, user: &Identity, attrs: &Attributes) -> Result<(), ApiError> {
    let d = st.auth.authz.authorize(user, attrs).await?;
    if d.allowed {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            attrs.forbidden_message(&user.user, &d.reason),
        ))
    }
}

/// The request body, read up to `[limits] max_request_body` (413 beyond it).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if is_length_limit(&e) {
            ApiError::TooLarge(format!(
                "the request body is larger than the limit of {limit} bytes"
            ))
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {e}"))
        }
    })
}

/// Whether reading a body failed on its length limit (axum wraps `LengthLimitError`).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Entry point for everything under `/api` and `/apis`. The server's authentication
/// layer put the user in the request; without one nothing is served.
pub(crate) async fn dispatch(
    State(st): State<Shared>,
    user: Option<Extension<Identity>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(Extension(user)) = user else {
        return ApiError::Unauthorized.into_response();
    };
    let body = match read_body(body, st.info.limits.max_request_body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    // the default namespaces and RBAC policy (normally written on activation)
    if !st.defaults_ready.load(std::sync::atomic::Ordering::Relaxed) {
        match ensure_defaults(st.registry.store().as_ref()).await {
            Ok(()) => st
                .defaults_ready
                .store(true, std::sync::atomic::Ordering::Relaxed),
            Err(e) => return e.into_response(),
        }
    }
    let q: HashMap<String, String> = Query::try_from_uri(&uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let path = uri.path().trim_end_matches('/');
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let discovery = matches!(segs.as_slice(), ["api"] | ["apis"] | ["apis", _])
        || matches!(segs.as_slice(), ["api", _] | ["apis", _, _]);
    if discovery {
        let attrs = Attributes::non_resource("get", uri.path());
        if let Err(e) = authorize(&st, &user, &attrs).await {
            return e.into_response();
        }
    }
    let (group, version, rest): (&str, Option<&str>, &[&str]) = match segs.as_slice() {
        ["api"] => {
            return json_response(
                StatusCode::OK,
                &resources::api_versions(&st.info.server_address),
            )
        }
        ["apis"] => return json_response(StatusCode::OK, &resources::api_group_list()),
        ["apis", g] => {
            return match resources::api_group(g) {
                Some(v) => json_response(StatusCode::OK, &v),
                None => ApiError::NoRoute.into_response(),
            }
        }
        ["api", v, rest @ ..] => ("", Some(*v), rest),
        ["apis", g, v, rest @ ..] => (*g, Some(*v), rest),
        _ => return ApiError::NoRoute.into_response(),
    };
    let version = version.unwrap_or("v1");
    if version != "v1" {
        return ApiError::NoRoute.into_response();
    }
    let Some(target) = parse_target(group, rest) else {
        return ApiError::NoRoute.into_response();
    };
    if target == Target::ResourceList {
        return match resources::api_resource_list(group, version) {
            Some(v) => json_response(StatusCode::OK, &v),
            None => ApiError::NoRoute.into_response(),
        };
    }
    let body_name = if method == Method::POST && node::node_name(&user).is_some() {
        // the node authorizer decides creates (its own Node, its Lease) by the new name
        decode_body(&headers, &body)
            .ok()
            .and_then(|o| o.pointer("/metadata/name")?.as_str().map(String::from))
            .unwrap_or_default()
    } else {
        String::new()
    };
    let attrs = attributes_of(&method, &target, &q, &body_name);
    if let Err(e) = authorize(&st, &user, &attrs).await {
        return e.into_response();
    }
    let resp = match serve(&st, &user, &method, target, &headers, &q, &body).await {
        Ok(r) => r,
        Err(e) => {
            if e.code().is_server_error() {
                tracing::warn!(%method, %uri, error = %e, "api request failed");
            }
            e.into_response()
        }
    };
    let mut resp = resp;
    if let Ok(v) = HeaderValue::from_str(&st.info.master_id) {
        resp.headers_mut().insert("x-ballast-master", v);
    }
    resp
}

/// RBAC objects may only grant what their writer holds: the write is computed as a dry
/// run, checked, and only then made (a concurrent change between the two is judged by
/// what this request asked for).
async fn check_rbac_write(
    st: &ApiState,
    user: &Identity,
    def: &ResourceDef,
    ns: Option<&str>,
    dry: Result<Value, ApiError>,
) -> Result<(), ApiError> {
    if def.group != resources::CLUSTERROLES.group {
        return Ok(());
    }
    let obj = dry?;
    st.auth
        .authz
        .check_escalation(user, def, ns.unwrap_or_default(), &obj)
        .await
        .map_err(|why| {
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            ApiError::Forbidden(format!("{} {name:?} is forbidden: {why}", def.qualified()))
        })
}

/// One resource request, with what every handler reads of it.
struct Call<'a> {
    st: &'a ApiState,
    user: &'a Identity,
    method: &'a Method,
    headers: &'a HeaderMap,
    q: &'a HashMap<String, String>,
    body: &'a Bytes,
    out: Output,
    include: IncludeObject,
    dry_run: bool,
}

impl Call<'_> {
    fn object_response(&self, code: StatusCode, def: &ResourceDef, o: &Value) -> Response {
        json_response(code, &render_object(def, o, self.out, self.include))
    }
}

fn is_rbac(def: &ResourceDef) -> bool {
    def.group == resources::CLUSTERROLES.group
}

/// `PUT`/`PATCH` of `status` changes the status only.
fn subresource_of(sub: Option<&str>) -> Subresource {
    if sub.is_some() {
        Subresource::Status
    } else {
        Subresource::Main
    }
}

async fn serve(
    st: &ApiState,
    user: &Identity,
    method: &Method,
    target: Target,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let call = Call {
        st,
        user,
        method,
        headers,
        q,
        body,
        out: output_of(headers),
        include: IncludeObject::parse(q.get("includeObject").map(String::as_str)),
        dry_run: q.contains_key("dryRun"),
    };
    if let Target::Collection { def, .. } | Target::Item { def, .. } = &target {
        if let Some(kind) = Review::of(def) {
            if *method != Method::POST || !matches!(target, Target::Collection { .. }) {
                return Err(ApiError::MethodNotAllowed);
            }
            let obj = decode_body(headers, body)?;
            let answered = review::review(kind, user, obj, &st.auth.authn, &st.auth.authz).await?;
            return Ok(json_response(StatusCode::CREATED, &answered));
        }
    }
    match target {
        Target::ResourceList => Err(ApiError::NoRoute),
        Target::Collection { def, ns } => serve_collection(&call, def, ns.as_deref()).await,
        Target::Item { def, ns, name, sub } => {
            let name = &name;
            let (ns, sub) = (ns.as_deref(), sub.as_deref());
            serve_item(&call, Item { def, ns, name, sub }).await
        }
    }
}

async fn serve_collection(
    c: &Call<'_>,
    def: &'static ResourceDef,
    ns: Option<&str>,
) -> Result<Response, ApiError> {
    let reg = &c.st.registry;
    match *c.method {
        Method::GET if q_bool(c.q, "watch") => {
            let lopts = list_options(c.q, &c.st.info.limits)?;
            watch(reg, def, ns, c.q, lopts, c.out, c.include).await
        }
        Method::GET => list(c, def, ns).await,
        Method::POST => {
            let obj = decode_body(c.headers, c.body)?;
            if is_rbac(def) {
                let dry = reg.create(def, ns, obj.clone(), true).await;
                check_rbac_write(c.st, c.user, def, ns, dry).await?;
            }
            let created = reg.create(def, ns, obj, c.dry_run).await?;
            Ok(c.object_response(StatusCode::CREATED, def, &created))
        }
        Method::DELETE => {
            let lopts = list_options(c.q, &c.st.info.limits)?;
            let dopts = delete_options(c.q, c.headers, c.body)?;
            let items = reg.delete_collection(def, ns, &lopts, &dopts).await?;
            let revision = reg.store().revision().to_string();
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": def.list_kind(), "apiVersion": def.api_version(),
                    "metadata": {"resourceVersion": revision}, "items": items}),
            ))
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// LIST, as JSON straight from the stored bytes where it can, else as a Table or as
/// partial object metadata when the client asks for those.
async fn list(c: &Call<'_>, def: &ResourceDef, ns: Option<&str>) -> Result<Response, ApiError> {
    let reg = &c.st.registry;
    let opts = list_options(c.q, &c.st.info.limits)?;
    if c.out == Output::Json {
        if let Some(raw) = reg.list_json(def, ns, &opts).await? {
            return Ok(raw_list_response(def, raw));
        }
    }
    let r = reg.list(def, ns, &opts).await?;
    let rv = r.revision.to_string();
    let continue_token = r.continue_token.as_deref();
    let v = match c.out {
        Output::Table => table::table(def, &r.items, &rv, continue_token, c.include),
        _ => {
            let mut meta = json!({"resourceVersion": rv});
            if let Some(t) = continue_token {
                meta["continue"] = json!(t);
            }
            let (kind, api_version, items) = if c.out == Output::Metadata {
                let items = r.items.iter().map(to_metadata).collect::<Vec<_>>();
                (
                    "PartialObjectMetadataList".into(),
                    "meta.k8s.io/v1".into(),
                    items,
                )
            } else {
                (def.list_kind(), def.api_version(), r.items)
            };
            json!({"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items})
        }
    };
    Ok(json_response(StatusCode::OK, &v))
}

/// The object a request names, and the subresource.
#[derive(Clone, Copy)]
struct Item<'a> {
    def: &'static ResourceDef,
    ns: Option<&'a str>,
    name: &'a str,
    sub: Option<&'a str>,
}

async fn serve_item(c: &Call<'_>, item: Item<'_>) -> Result<Response, ApiError> {
    let Item { def, ns, name, sub } = item;
    let reg = &c.st.registry;
    match (sub, c.method.clone()) {
        (None | Some("status"), Method::GET) => {
            let o = reg.get(def, ns, name).await?;
            Ok(c.object_response(StatusCode::OK, def, &o))
        }
        (None | Some("status"), Method::PUT) => {
            let s = subresource_of(sub);
            let obj = decode_body(c.headers, c.body)?;
            if is_rbac(def) {
                let dry = reg.update_opts(def, ns, name, obj.clone(), s, true).await;
                check_rbac_write(c.st, c.user, def, ns, dry).await?;
            }
            let o = reg.update_opts(def, ns, name, obj, s, c.dry_run).await?;
            Ok(c.object_response(StatusCode::OK, def, &o))
        }
        (None | Some("status"), Method::PATCH) => patch(c, item).await,
        (None, Method::DELETE) => {
            let opts = delete_options(c.q, c.headers, c.body)?;
            let o = reg.delete(def, ns, name, &opts).await?;
            Ok(json_response(StatusCode::OK, &o))
        }
        (Some("scale"), Method::GET) => {
            let o = reg.get(def, ns, name).await?;
            Ok(json_response(StatusCode::OK, &Registry::scale_of(&o)))
        }
        (Some("scale"), Method::PUT | Method::PATCH) => scale(c, item).await,
        (Some("binding"), Method::POST) => {
            let b = decode_body(c.headers, c.body)?;
            let node = b
                .pointer("/target/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            reg.bind(ns.unwrap_or("default"), name, node).await?;
            Ok(json_response(StatusCode::CREATED, &success_status(201)))
        }
        (Some("log"), Method::GET) => pod_log(c.st, ns.unwrap_or("default"), name, c.q).await,
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// PATCH of an object or its status; server-side apply answers 201 when it created it.
async fn patch(c: &Call<'_>, item: Item<'_>) -> Result<Response, ApiError> {
    let Item { def, ns, name, sub } = item;
    let reg = &c.st.registry;
    let s = subresource_of(sub);
    let ct = content_type(c.headers);
    let kind = PatchType::from_content_type(&ct).ok_or_else(|| {
        ApiError::UnsupportedMediaType(format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct})"))
    })?;
    let patch: Value = serde_json::from_slice(c.body)
        .map_err(|e| ApiError::BadRequest(format!("invalid patch body: {e}")))?;
    let existed = kind != PatchType::Apply || reg.get(def, ns, name).await.is_ok();
    if is_rbac(def) {
        let dry = reg.patch_opts(def, ns, name, kind, &patch, s, true).await;
        check_rbac_write(c.st, c.user, def, ns, dry).await?;
    }
    let o = reg
        .patch_opts(def, ns, name, kind, &patch, s, c.dry_run)
        .await?;
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(c.object_response(code, def, &o))
}

/// PUT or PATCH of the `scale` subresource: only `spec.replicas` changes.
async fn scale(c: &Call<'_>, item: Item<'_>) -> Result<Response, ApiError> {
    let Item { def, ns, name, .. } = item;
    let reg = &c.st.registry;
    let o = reg.get(def, ns, name).await?;
    let cur = Registry::scale_of(&o);
    let new = match decode_body_or_patch(c.headers, c.body, c.method)? {
        ScaleInput::Full(v) => v,
        ScaleInput::Patch(kind, p) => super::patch::apply_limited(&cur, &p, kind, reg.limits())
            .map_err(|e| ApiError::BadRequest(e.to_string()))?,
    };
    let replicas = new
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| ApiError::BadRequest("spec.replicas must be an integer".into()))?;
    let cur_rev = cur
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str);
    let want_rev = new
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|r| Some(*r) != cur_rev)
        .map(|r| r.parse::<u64>().unwrap_or(0));
    let s = reg.set_replicas(def, ns, name, replicas, want_rev).await?;
    Ok(json_response(StatusCode::OK, &s))
}

enum ScaleInput {
    Full(Value),
    Patch(PatchType, Value),
}

fn decode_body_or_patch(
    headers: &HeaderMap,
    body: &Bytes,
    method: &Method,
) -> Result<ScaleInput, ApiError> {
    if *method == Method::PUT {
        return Ok(ScaleInput::Full(decode_body(headers, body)?));
    }
    let ct = content_type(headers);
    let kind = PatchType::from_content_type(&ct)
        .ok_or_else(|| ApiError::UnsupportedMediaType(format!("unsupported patch type {ct}")))?;
    let p: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid patch body: {e}")))?;
    Ok(ScaleInput::Patch(kind, p))
}

async fn pod_log(
    st: &ApiState,
    ns: &str,
    name: &str,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let pod = st.registry.get(&PODS, Some(ns), name).await?;
    let containers: Vec<String> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    let container = match q.get("container") {
        Some(c) if containers.contains(c) => c.clone(),
        Some(c) => {
            return Err(ApiError::BadRequest(format!(
                "container {c} is not valid for pod {name}"
            )))
        }
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Err(ApiError::BadRequest(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            )))
        }
    };
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if node_name.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    match &st.info.logs {
        Some(logs) => {
            let req = super::LogRequest {
                namespace: ns.to_string(),
                pod: name.to_string(),
                container,
                node_name,
                follow: q_bool(q, "follow"),
                tail_lines: q.get("tailLines").and_then(|t| t.parse().ok()),
                previous: q_bool(q, "previous"),
                timestamps: q_bool(q, "timestamps"),
                since_seconds: q.get("sinceSeconds").and_then(|t| t.parse().ok()),
            };
            logs.logs(req).await
        }
        None => Err(ApiError::Unavailable(
            "log proxying to the worker is not available on this master yet".into(),
        )),
    }
}

async fn watch(
    reg: &Registry,
    def: &'static ResourceDef,
    ns: Option<&str>,
    q: &HashMap<String, String>,
    lopts: ListOptions,
    out: Output,
    include: IncludeObject,
) -> Result<Response, ApiError> {
    let rv = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(r) => Some(
            r.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {r:?}")))?,
        ),
    };
    let opts = WatchOptions {
        label_selector: lopts.label_selector,
        field_selector: lopts.field_selector,
        resource_version: rv,
        allow_bookmarks: q_bool(q, "allowWatchBookmarks"),
        // a watch ends after at most MAX_WATCH_TIMEOUT (clients re-watch from their last
        // resourceVersion): no timeout overflows a deadline
        timeout: q
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(MAX_WATCH_TIMEOUT)),
        bookmark_interval: None,
    };
    let rx = reg.watch(def, ns, opts).await?;
    let stream = futures::stream::unfold((rx, true), move |(mut rx, first)| async move {
        let ev = rx.recv().await?;
        let object = match (out, ev.kind) {
            (_, WatchEventType::Error) => ev.object,
            (Output::Table, WatchEventType::Bookmark) => {
                json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": ev.object["metadata"].clone(), "columnDefinitions": [], "rows": []})
            }
            (Output::Table, _) => {
                let rv = ev
                    .object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let mut t = table::table(def, std::slice::from_ref(&ev.object), &rv, None, include);
                if !first {
                    t["columnDefinitions"] = json!([]);
                }
                t
            }
            (Output::Metadata, WatchEventType::Bookmark) => ev.object,
            (Output::Metadata, _) => to_metadata(&ev.object),
            (Output::Json, _) => ev.object,
        };
        let next_first = first && ev.kind == WatchEventType::Bookmark;
        let mut line = serde_json::to_vec(&json!({"type": ev.kind.as_str(), "object": object}))
            .unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(line)), (rx, next_first)))
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("", &["namespaces", "default", "pods", "p", "log"]),
            Some(Target::Item {
                def: &PODS,
                ns: Some("default".into()),
                name: "p".into(),
                sub: Some("log".into())
            })
        );
        assert!(matches!(
            parse_target("", &["namespaces", "x", "status"]),
            Some(Target::Item { sub: Some(_), .. })
        ));
        assert!(matches!(
            parse_target("", &["namespaces", "x"]),
            Some(Target::Item { sub: None, .. })
        ));
        assert!(matches!(
            parse_target("", &["nodes", "n", "status"]),
            Some(Target::Item { .. })
        ));
        assert!(matches!(
            parse_target("apps", &["deployments"]),
            Some(Target::Collection { ns: None, .. })
        ));
        assert_eq!(parse_target("", &["pods", "p"]), None);
        assert_eq!(
            parse_target("", &["namespaces", "d", "pods", "p", "nope"]),
            None
        );
    }

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"));
        assert_eq!(output_of(&h), Output::Table);
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.kubernetes.protobuf, */*"),
        );
        assert_eq!(output_of(&h), Output::Json);
    }
}

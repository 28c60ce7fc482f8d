//! Patches: JSON merge patch (RFC 7386), strategic merge patch (Kubernetes), JSON patch
//! (RFC 6902). All pure functions on `serde_json::Value`.

use serde_json::{Map, Value};

/// A patch that cannot be applied (400 BadRequest, 422 for a failed `test`, 413 when it
/// would grow the object past the limit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatchError {
    #[error("invalid patch: {0}")]
    Invalid(String),
    #[error("the JSON patch test operation failed at {0}")]
    TestFailed(String),
    #[error("the patched object would exceed {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the JSON patch has {ops} operations, more than the limit of {limit}")]
    TooManyOperations { ops: usize, limit: usize },
}

/// Bounds on what a patch may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PatchLimits {
    /// Operations in one JSON patch (kube-apiserver: 10 000).
    pub max_operations: usize,
    /// The patched object, as JSON, in bytes (about: see [`json_size`]).
    pub max_bytes: usize,
}

impl PatchLimits {
    /// `[limits] max_patch_operations` and `max_object_bytes`.
    pub(crate) fn of(l: &ballast_config::schema::LimitsConfig) -> Self {
        Self {
            max_operations: l.max_patch_operations,
            max_bytes: l.max_object_bytes,
        }
    }
}

impl Default for PatchLimits {
    fn default() -> Self {
        Self::of(&ballast_config::schema::LimitsConfig::default())
    }
}

/// About the size of `v` as JSON (exact for ASCII without escapes): what a patch adds is
/// counted with it, so a patch that copies a document into itself is refused as soon as
/// the document would pass the limit, not after it filled the memory.
pub(crate) fn json_size(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(b) => 4 + usize::from(!*b),
        Value::Number(n) => n.to_string().len(),
        Value::String(s) => s.len() + 2,
        // brackets, the items, and a comma between two items
        Value::Array(a) => 2 + a.iter().map(json_size).sum::<usize>() + a.len().saturating_sub(1),
        // braces, `"key":value` per entry, commas between entries
        Value::Object(o) => {
            2 + o
                .iter()
                .map(|(k, x)| k.len() + 3 + json_size(x))
                .sum::<usize>()
                + o.len().saturating_sub(1)
        }
    }
}

/// The patch types the API accepts (by Content-Type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchType {
    Json,
    Merge,
    StrategicMerge,
    Apply,
}

impl PatchType {
    pub(crate) fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        Some(match base {
            "application/json-patch+json" => PatchType::Json,
            "application/merge-patch+json" => PatchType::Merge,
            "application/strategic-merge-patch+json" => PatchType::StrategicMerge,
            "application/apply-patch+yaml" | "application/apply-patch+json" => PatchType::Apply,
            _ => return None,
        })
    }
}

/// Apply a patch of `kind` to `target`, within the default [`PatchLimits`].
pub(crate) fn apply(target: &Value, patch: &Value, kind: PatchType) -> Result<Value, PatchError> {
    apply_limited(target, patch, kind, PatchLimits::default())
}

/// Apply a patch of `kind` to `target` within `limits`. A merge patch can only produce
/// what the target and the patch hold, so only JSON patches (which can copy) are counted
/// as they go; every result is checked.
pub(crate) fn apply_limited(
    target: &Value,
    patch: &Value,
    kind: PatchType,
    limits: PatchLimits,
) -> Result<Value, PatchError> {
    let out = match kind {
        PatchType::Json => json_patch_limited(target, patch, limits)?,
        PatchType::Merge => merge_patch(target, patch),
        PatchType::StrategicMerge | PatchType::Apply => strategic_merge(target, patch)?,
    };
    if json_size(&out) > limits.max_bytes {
        return Err(PatchError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    Ok(out)
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &Value, patch: &Value) -> Value {
    match patch {
        Value::Object(p) => {
            let mut out = match target {
                Value::Object(t) => t.clone(),
                _ => Map::new(),
            };
            for (k, v) in p {
                if v.is_null() {
                    out.remove(k);
                } else {
                    let cur = out.get(k).cloned().unwrap_or(Value::Null);
                    out.insert(k.clone(), merge_patch(&cur, v));
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// How a list field merges in a strategic merge patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListStrategy {
    /// Replace the whole list.
    Atomic,
    /// Merge objects by this key.
    Key(&'static str),
    /// A set of primitives (union).
    Set,
}

/// The merge strategy of list field `field` whose parent path is `path` (field names only).
/// Mirrors the `patchMergeKey` tags of the Kubernetes types that this API serves.
fn list_strategy(path: &[String], field: &str) -> ListStrategy {
    let in_container = path
        .iter()
        .any(|p| p == "containers" || p == "initContainers" || p == "ephemeralContainers");
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses" => ListStrategy::Key("name"),
        "ports" if in_container => ListStrategy::Key("containerPort"),
        "ports" => ListStrategy::Key("port"),
        "volumeMounts" => ListStrategy::Key("mountPath"),
        "volumeDevices" => ListStrategy::Key("devicePath"),
        "ownerReferences" => ListStrategy::Key("uid"),
        "conditions" | "addresses" => ListStrategy::Key("type"),
        "hostAliases" => ListStrategy::Key("ip"),
        "podIPs" | "hostIPs" => ListStrategy::Key("ip"),
        "finalizers" => ListStrategy::Set,
        _ => ListStrategy::Atomic,
    }
}

/// Remove every `$`-directive from a value that is inserted as is.
pub(crate) fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|e| {
                    !e.as_object()
                        .is_some_and(|m| m.len() == 1 && m.contains_key("$patch"))
                })
                .map(strip_directives)
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Kubernetes strategic merge patch (`$patch`, `$retainKeys`, `$setElementOrder/`,
/// `$deleteFromPrimitiveList/`, `null` deletion, keyed list merges).
pub(crate) fn strategic_merge(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    let Value::Object(p) = patch else {
        return Err(PatchError::Invalid("patch must be a JSON object".into()));
    };
    let t = match target {
        Value::Object(t) => t.clone(),
        _ => Map::new(),
    };
    Ok(merge_map(t, p, &mut Vec::new())?.map_or(Value::Object(Map::new()), Value::Object))
}

/// Merge `patch` into `orig`; `None` means `$patch: delete` removed the whole map.
fn merge_map(
    mut orig: Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<Option<Map<String, Value>>, PatchError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let Value::Object(m) = strip_directives(&Value::Object(patch.clone())) else {
                unreachable!()
            };
            return Ok(Some(m));
        }
        Some("delete") => return Ok(None),
        Some("merge") | None => {}
        Some(other) => return Err(PatchError::Invalid(format!("unknown $patch: {other}"))),
    }
    if let Some(keep) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep
            .as_array()
            .ok_or_else(|| PatchError::Invalid("$retainKeys must be a list".into()))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        orig.retain(|k, _| keep.contains(&k.as_str()));
    }
    let mut orders = Vec::new();
    for (k, v) in patch {
        if k == "$patch" || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            orders.push((field.to_string(), v.clone()));
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let del = v.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(cur)) = orig.get_mut(field) {
                cur.retain(|e| !del.contains(e));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            orig.remove(k);
            continue;
        }
        let cur = orig.remove(k);
        let merged = match (cur, v) {
            (Some(Value::Object(c)), Value::Object(pv)) => {
                path.push(k.clone());
                let r = merge_map(c, pv, path);
                path.pop();
                r?.map(Value::Object)
            }
            (Some(Value::Array(c)), Value::Array(pv)) => {
                Some(Value::Array(merge_list(c, pv, path, k)?))
            }
            (_, Value::Object(pv)) => {
                // New map: still honour a `$patch: delete` inside it.
                if pv.get("$patch").and_then(Value::as_str) == Some("delete") {
                    None
                } else {
                    Some(strip_directives(v))
                }
            }
            _ => Some(strip_directives(v)),
        };
        if let Some(m) = merged {
            orig.insert(k.clone(), m);
        }
    }
    for (field, order) in orders {
        let strategy = list_strategy(path, &field);
        if let (Some(Value::Array(cur)), Some(order)) = (orig.get_mut(&field), order.as_array()) {
            reorder(cur, order, strategy);
        }
    }
    Ok(Some(orig))
}

fn key_of(v: &Value, strategy: ListStrategy) -> Option<Value> {
    match strategy {
        ListStrategy::Key(k) => v.get(k).cloned(),
        _ => Some(v.clone()),
    }
}

/// Order `list` like `order` (elements given by merge key, or by value for primitives);
/// elements not named keep their relative order after the named ones.
fn reorder(list: &mut [Value], order: &[Value], strategy: ListStrategy) {
    let pos = |v: &Value| {
        let k = key_of(v, strategy);
        order
            .iter()
            .position(|o| key_of(o, strategy) == k || Some(o) == k.as_ref())
            .unwrap_or(usize::MAX)
    };
    list.sort_by_key(pos);
}

fn merge_list(
    orig: Vec<Value>,
    patch: &[Value],
    path: &mut Vec<String>,
    field: &str,
) -> Result<Vec<Value>, PatchError> {
    let replace = patch.iter().any(|e| {
        e.as_object()
            .is_some_and(|m| m.get("$patch").and_then(Value::as_str) == Some("replace"))
    });
    let strategy = list_strategy(path, field);
    if replace || strategy == ListStrategy::Atomic {
        return Ok(strip_directives(&Value::Array(patch.to_vec()))
            .as_array()
            .cloned()
            .unwrap_or_default());
    }
    let mut out = orig;
    match strategy {
        ListStrategy::Set => {
            for e in patch {
                if !out.contains(e) {
                    out.push(e.clone());
                }
            }
        }
        ListStrategy::Key(key) => {
            for e in patch {
                let Some(pm) = e.as_object() else {
                    return Err(PatchError::Invalid(format!(
                        "{field}: list elements must be objects with key {key}"
                    )));
                };
                let kv = pm.get(key).cloned();
                let idx = kv
                    .as_ref()
                    .and_then(|kv| out.iter().position(|o| o.get(key) == Some(kv)));
                if pm.get("$patch").and_then(Value::as_str) == Some("delete") {
                    if let Some(i) = idx {
                        out.remove(i);
                    }
                    continue;
                }
                match idx {
                    Some(i) => {
                        let cur = match out[i].take() {
                            Value::Object(m) => m,
                            _ => Map::new(),
                        };
                        path.push(field.to_string());
                        let merged = merge_map(cur, pm, path);
                        path.pop();
                        match merged? {
                            Some(m) => out[i] = Value::Object(m),
                            None => {
                                out.remove(i);
                            }
                        }
                    }
                    None => out.push(strip_directives(e)),
                }
            }
        }
        ListStrategy::Atomic => unreachable!(),
    }
    Ok(out)
}

fn unescape_pointer(tok: &str) -> String {
    tok.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(p: &str) -> Result<Vec<String>, PatchError> {
    if p.is_empty() {
        return Ok(vec![]);
    }
    let rest = p
        .strip_prefix('/')
        .ok_or_else(|| PatchError::Invalid(format!("bad JSON pointer {p}")))?;
    Ok(rest.split('/').map(unescape_pointer).collect())
}

fn parent_mut<'a>(
    doc: &'a mut Value,
    toks: &[String],
    path: &str,
) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m.get_mut(t),
            Value::Array(a) => t.parse::<usize>().ok().and_then(move |i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| PatchError::Invalid(format!("path {path} does not exist")))?;
    }
    Ok(cur)
}

fn remove_at(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    let toks = split_pointer(path)?;
    let (last, parents) = toks
        .split_last()
        .ok_or_else(|| PatchError::Invalid("cannot remove the root".into()))?;
    match parent_mut(doc, parents, path)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| PatchError::Invalid(format!("path {path} does not exist"))),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| PatchError::Invalid(format!("bad index in {path}")))?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(PatchError::Invalid(format!("index out of range in {path}")))
            }
        }
        _ => Err(PatchError::Invalid(format!("path {path} does not exist"))),
    }
}

fn add_at(doc: &mut Value, path: &str, value: Value, replace: bool) -> Result<(), PatchError> {
    let toks = split_pointer(path)?;
    let Some((last, parents)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parents, path)? {
        Value::Object(m) => {
            if replace && !m.contains_key(last) {
                return Err(PatchError::Invalid(format!("path {path} does not exist")));
            }
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" && !replace {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| PatchError::Invalid(format!("bad index in {path}")))?;
            if replace {
                let slot = a
                    .get_mut(i)
                    .ok_or_else(|| PatchError::Invalid(format!("index out of range in {path}")))?;
                *slot = value;
            } else if i <= a.len() {
                a.insert(i, value);
            } else {
                return Err(PatchError::Invalid(format!("index out of range in {path}")));
            }
            Ok(())
        }
        _ => Err(PatchError::Invalid(format!("path {path} does not exist"))),
    }
}

/// RFC 6902 JSON patch.
#[cfg(test)]
pub(crate) fn json_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    json_patch_limited(target, patch, PatchLimits::default())
}

fn json_patch_limited(
    target: &Value,
    patch: &Value,
    limits: PatchLimits,
) -> Result<Value, PatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| PatchError::Invalid("a JSON patch must be a list of operations".into()))?;
    if ops.len() > limits.max_operations {
        return Err(PatchError::TooManyOperations {
            ops: ops.len(),
            limit: limits.max_operations,
        });
    }
    let mut doc = target.clone();
    // an upper bound of the document's size: what is added counts, what is removed not
    let mut size = json_size(&doc);
    let mut grow = |by: usize| {
        size += by;
        if size > limits.max_bytes {
            Err(PatchError::TooLarge {
                limit: limits.max_bytes,
            })
        } else {
            Ok(())
        }
    };
    for op in ops {
        let name = op["op"].as_str().unwrap_or_default();
        let path = op["path"]
            .as_str()
            .ok_or_else(|| PatchError::Invalid("operation without path".into()))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Invalid(format!("{name} {path} needs a value")))
        };
        let from = || {
            op["from"]
                .as_str()
                .ok_or_else(|| PatchError::Invalid(format!("{name} {path} needs from")))
        };
        match name {
            "add" => {
                let v = value()?;
                grow(json_size(&v) + path.len())?;
                add_at(&mut doc, path, v, false)?
            }
            "replace" => {
                let v = value()?;
                grow(json_size(&v))?;
                add_at(&mut doc, path, v, true)?
            }
            "remove" => {
                remove_at(&mut doc, path)?;
            }
            "move" => {
                let v = remove_at(&mut doc, from()?)?;
                add_at(&mut doc, path, v, false)?;
            }
            "copy" => {
                let src = doc.pointer(from()?).ok_or_else(|| {
                    PatchError::Invalid(format!(
                        "path {} does not exist",
                        from().unwrap_or_default()
                    ))
                })?;
                // counted before the copy is made: each copy of a document into itself
                // doubles it
                grow(json_size(src) + path.len())?;
                let v = src.clone();
                add_at(&mut doc, path, v, false)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(PatchError::TestFailed(path.to_string()));
                }
            }
            other => return Err(PatchError::Invalid(format!("unknown operation {other}"))),
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_json_patch_that_doubles_the_document_is_refused_early() {
        // 2 KB of `copy` from "" (the whole document) into itself: 30 doublings would be
        // gigabytes; the limit stops it after a few
        let target = json!({"metadata": {"name": "x"}, "data": "y".repeat(1000)});
        let ops: Vec<Value> = (0..30)
            .map(|i| json!({"op": "copy", "from": "", "path": format!("/c{i}")}))
            .collect();
        let e = json_patch(&target, &Value::Array(ops)).unwrap_err();
        assert!(matches!(e, PatchError::TooLarge { .. }), "{e}");
        let many: Vec<Value> = (0..10_001)
            .map(|_| json!({"op": "test", "path": "/metadata/name", "value": "x"}))
            .collect();
        assert!(matches!(
            json_patch(&target, &Value::Array(many)),
            Err(PatchError::TooManyOperations { .. })
        ));
        // and within the limits patches still apply
        let ok = json!([{"op": "copy", "from": "/metadata/name", "path": "/n"}]);
        assert_eq!(json_patch(&target, &ok).unwrap()["n"], "x");
    }

    #[test]
    fn json_size_matches_serde_for_plain_values() {
        let v = json!({"a": [1, true, null, "str"], "b": {"c": false, "d": 12.5}});
        assert_eq!(json_size(&v), serde_json::to_vec(&v).unwrap().len());
    }

    #[test]
    fn merge_patch_null_deletes() {
        let t = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        let r = merge_patch(&t, &json!({"a": null, "b": {"c": 5}, "l": [3]}));
        assert_eq!(r, json!({"b": {"c": 5, "d": 3}, "l": [3]}));
    }

    fn deploy() -> Value {
        json!({"metadata": {"name": "d", "labels": {"app": "x", "old": "y"}},
        "spec": {"replicas": 1, "template": {"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "E1", "value": "1"}], "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "b:1"}
        ]}}}})
    }

    #[test]
    fn strategic_merges_containers_by_name() {
        let p = json!({
            "metadata": {"labels": {"old": null}},
            "spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
                "containers": [
                    {"name": "a", "image": "a:2", "env": [{"name": "E2", "value": "2"}]},
                ]
            }}}
        });
        let r = strategic_merge(&deploy(), &p).unwrap();
        assert_eq!(r["metadata"]["labels"], json!({"app": "x"}));
        let cs = r["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0]["name"], "b");
        assert_eq!(cs[1]["image"], "a:2");
        assert_eq!(cs[1]["env"].as_array().unwrap().len(), 2);
        assert_eq!(cs[1]["ports"][0]["containerPort"], 80);
        assert!(!r.to_string().contains('$'));
    }

    #[test]
    fn strategic_delete_and_replace_directives() {
        let p = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "b", "$patch": "delete"}
        ]}}}});
        let r = strategic_merge(&deploy(), &p).unwrap();
        assert_eq!(
            r["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        let p = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "c", "image": "c"}, {"$patch": "replace"}
        ]}}}});
        let r = strategic_merge(&deploy(), &p).unwrap();
        assert_eq!(
            r["spec"]["template"]["spec"]["containers"],
            json!([{"name": "c", "image": "c"}])
        );

        let p = json!({"metadata": {"labels": {"$patch": "replace", "z": "1"}}});
        let r = strategic_merge(&deploy(), &p).unwrap();
        assert_eq!(r["metadata"]["labels"], json!({"z": "1"}));

        let p = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}});
        let t = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let r = strategic_merge(&t, &p).unwrap();
        assert_eq!(r["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn strategic_primitive_sets() {
        let t = json!({"metadata": {"finalizers": ["a", "b"]}});
        let r = strategic_merge(&t, &json!({"metadata": {"finalizers": ["c"]}})).unwrap();
        assert_eq!(r["metadata"]["finalizers"], json!(["a", "b", "c"]));
        let r = strategic_merge(
            &t,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        )
        .unwrap();
        assert_eq!(r["metadata"]["finalizers"], json!(["b"]));
        // Atomic lists are replaced.
        let t = json!({"spec": {"containers": [{"name": "a", "args": ["1", "2"]}]}});
        let r = strategic_merge(
            &t,
            &json!({"spec": {"containers": [{"name": "a", "args": ["3"]}]}}),
        )
        .unwrap();
        assert_eq!(r["spec"]["containers"][0]["args"], json!(["3"]));
    }

    #[test]
    fn json_patch_ops() {
        let t = json!({"a": {"b": [1, 2]}, "c": 1});
        let p = json!([
            {"op": "add", "path": "/a/b/-", "value": 3},
            {"op": "replace", "path": "/c", "value": 2},
            {"op": "test", "path": "/c", "value": 2},
            {"op": "remove", "path": "/a/b/0"},
            {"op": "copy", "from": "/c", "path": "/d"},
            {"op": "move", "from": "/d", "path": "/e"}
        ]);
        assert_eq!(
            json_patch(&t, &p).unwrap(),
            json!({"a": {"b": [2, 3]}, "c": 2, "e": 2})
        );
        assert!(matches!(
            json_patch(&t, &json!([{"op": "test", "path": "/c", "value": 9}])),
            Err(PatchError::TestFailed(_))
        ));
        assert!(json_patch(&t, &json!([{"op": "remove", "path": "/zz"}])).is_err());
    }
}

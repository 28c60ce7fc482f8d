//! Label and field selectors, parsed (not matched as strings).

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// A selector parse error (400 BadRequest in the API).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub(crate) struct SelectorError(pub String);

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    /// What it costs to evaluate, for `[limits] max_selector_terms`: one per value.
    pub(crate) fn terms(&self) -> usize {
        match self {
            Requirement::In(_, vs) | Requirement::NotIn(_, vs) => vs.len().max(1),
            _ => 1,
        }
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Eq(k, v) => labels.get(k) == Some(v),
            Requirement::NotEq(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => !labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Eq(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEq(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(",")),
            Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(",")),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::NotExists(k) => write!(f, "!{k}"),
        }
    }
}

/// A label selector: all requirements must hold. Empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c)
            }
            ')' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn check_key(k: &str, whole: &str) -> Result<String, SelectorError> {
    let k = k.trim();
    let ok = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(k.to_string())
    } else {
        Err(SelectorError(format!("{whole}: invalid label key \"{k}\"")))
    }
}

fn check_value(v: &str, whole: &str) -> Result<String, SelectorError> {
    let v = v.trim();
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(v.to_string())
    } else {
        Err(SelectorError(format!(
            "{whole}: invalid label value \"{v}\""
        )))
    }
}

fn parse_set(rest: &str, whole: &str) -> Result<Vec<String>, SelectorError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError(format!("{whole}: expected a set like (a,b)")))?;
    inner
        .split(',')
        .map(|v| check_value(v, whole))
        .collect::<Result<Vec<_>, _>>()
}

impl LabelSelector {
    /// Parse the `labelSelector` query syntax (`a=b,c!=d,e in (x,y),f notin (z),g,!h`).
    pub(crate) fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        for term in split_top_level(s) {
            let t = term.trim();
            if t.is_empty() {
                return Err(SelectorError(format!("{s}: empty requirement")));
            }
            let req = if let Some(k) = t.strip_prefix('!') {
                Requirement::NotExists(check_key(k, t)?)
            } else if let Some((k, v)) = t.split_once("!=") {
                Requirement::NotEq(check_key(k, t)?, check_value(v, t)?)
            } else if let Some((k, v)) = t.split_once("==") {
                Requirement::Eq(check_key(k, t)?, check_value(v, t)?)
            } else if let Some((k, v)) = t.split_once('=') {
                Requirement::Eq(check_key(k, t)?, check_value(v, t)?)
            } else if let Some((k, rest)) = t.split_once(" notin ") {
                Requirement::NotIn(check_key(k, t)?, parse_set(rest, t)?)
            } else if let Some((k, rest)) = t.split_once(" in ") {
                Requirement::In(check_key(k, t)?, parse_set(rest, t)?)
            } else if t.contains(' ') || t.contains('(') {
                return Err(SelectorError(t.to_string()));
            } else {
                Requirement::Exists(check_key(t, t)?)
            };
            requirements.push(req);
        }
        Ok(Self { requirements })
    }

    /// From a `metav1.LabelSelector` object (`matchLabels`, `matchExpressions`).
    /// An absent selector (`null`) matches nothing in Kubernetes; callers decide.
    pub(crate) fn from_object(sel: &Value) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in ml {
                requirements.push(Requirement::Eq(
                    k.clone(),
                    v.as_str().unwrap_or_default().to_string(),
                ));
            }
        }
        if let Some(me) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in me {
                let key = e["key"].as_str().unwrap_or_default().to_string();
                let values: Vec<String> = e["values"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                requirements.push(match e["operator"].as_str().unwrap_or_default() {
                    "In" => Requirement::In(key, values),
                    "NotIn" => Requirement::NotIn(key, values),
                    "Exists" => Requirement::Exists(key),
                    "DoesNotExist" => Requirement::NotExists(key),
                    op => {
                        return Err(SelectorError(format!(
                            "{op}: not a valid selector operator"
                        )))
                    }
                });
            }
        }
        Ok(Self { requirements })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Match against an object's `metadata.labels`.
    pub(crate) fn matches_object(&self, obj: &Value) -> bool {
        self.is_empty() || self.matches(&labels_of(obj))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.requirements.iter().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

/// The `metadata.labels` of an object as a map.
pub(crate) fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// One field requirement: `field=value` or `field!=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldRequirement {
    pub field: String,
    pub value: String,
    pub negate: bool,
}

/// A field selector (`metadata.name=x,status.phase!=Failed`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

/// Split on unescaped `sep`, keeping escapes for the value decoder.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Find the first unescaped occurrence of one of the operators.
fn find_op(s: &str) -> Option<(usize, &'static str)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        // bytes, not `&s[i..]`: `i` walks bytes and may stand inside a multi-byte
        // character (the operators are ASCII, so a match is at a character boundary)
        for op in ["!=", "==", "="] {
            if b[i..].starts_with(op.as_bytes()) {
                return Some((i, op));
            }
        }
        i += 1;
    }
    None
}

impl FieldSelector {
    pub(crate) fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        for term in split_escaped(s, ',') {
            let (i, op) = find_op(&term)
                .ok_or_else(|| SelectorError(format!("invalid field selector: {term}")))?;
            let field = term[..i].trim().to_string();
            if field.is_empty() {
                return Err(SelectorError(format!("invalid field selector: {term}")));
            }
            requirements.push(FieldRequirement {
                field,
                value: unescape(&term[i + op.len()..]),
                negate: op == "!=",
            });
        }
        Ok(Self { requirements })
    }

    /// Bytes that the JSON of every matching object contains: `"value"` of an
    /// equality whose value can only be a JSON string (not a number, bool or null) and
    /// needs no escaping. Lets a watch skip decoding objects that cannot match.
    pub(crate) fn required_json(&self) -> Option<Vec<u8>> {
        self.requirements
            .iter()
            .find(|r| {
                !r.negate
                    && !r.value.is_empty()
                    && r.value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
                    && r.value.parse::<f64>().is_err()
                    && !matches!(r.value.as_str(), "true" | "false" | "null")
            })
            .map(|r| format!("\"{}\"", r.value).into_bytes())
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let v = field_value(obj, &r.field);
            (v == r.value) != r.negate
        })
    }
}

/// The string value of a dotted field path (missing → empty string, like Kubernetes).
pub(crate) fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Found by `./task fuzz` (selectors): a multi-byte character before the operator
    /// panicked the request's task.
    #[test]
    fn field_selectors_with_multibyte_characters_parse() {
        let f = FieldSelector::parse("(\u{3da}=x").unwrap();
        assert_eq!(f.requirements.len(), 1);
        assert!(FieldSelector::parse("é\\é!=ü,ß==1").is_ok());
        assert!(LabelSelector::parse("(\u{3da}=").is_err());
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_ops() {
        let l = labels(&[("app", "web"), ("tier", "fe")]);
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (db,web)", true),
            ("app notin (db,web)", false),
            ("app notin (db)", true),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("missing!=x", true),
            ("app=web,tier in (fe, be),!gone", true),
            ("app=web,tier=be", false),
            ("", true),
        ] {
            let s = LabelSelector::parse(sel).unwrap();
            assert_eq!(s.matches(&l), want, "{sel}");
        }
        assert!(LabelSelector::parse("a in b").is_err());
        assert!(LabelSelector::parse("a=b,,c").is_err());
        assert!(LabelSelector::parse("kubernetes.io/cluster-service=true").is_ok());
    }

    #[test]
    fn label_selector_from_object_and_display() {
        let s = LabelSelector::from_object(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]
        }))
        .unwrap();
        assert_eq!(s.to_string(), "app=web,tier in (a,b)");
        assert_eq!(LabelSelector::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn required_json_only_for_string_equalities() {
        let req = |s: &str| FieldSelector::parse(s).unwrap().required_json();
        assert_eq!(req("spec.nodeName=w1"), Some(b"\"w1\"".to_vec()));
        assert_eq!(
            req("status.phase!=Failed,spec.nodeName=n-1.z"),
            Some(b"\"n-1.z\"".to_vec())
        );
        for none in [
            "spec.nodeName=",
            "spec.replicas=3",
            "spec.x=true",
            "a!=b",
            "a=x y",
            "",
        ] {
            assert_eq!(req(none), None, "{none}");
        }
    }

    #[test]
    fn field_selector_terms_any_order() {
        let pod = json!({"metadata": {"name": "p", "namespace": "default"},
            "spec": {"nodeName": "w1"}, "status": {"phase": "Running"}});
        let s =
            FieldSelector::parse("spec.nodeName=w1,status.phase!=Failed,status.phase!=Succeeded")
                .unwrap();
        assert!(s.matches(&pod));
        let s = FieldSelector::parse("status.phase!=Succeeded,spec.nodeName==w1").unwrap();
        assert!(s.matches(&pod));
        let s = FieldSelector::parse("spec.nodeName=w2").unwrap();
        assert!(!s.matches(&pod));
        let s = FieldSelector::parse("spec.nodeName=").unwrap();
        assert!(!s.matches(&pod));
        let ev = json!({"involvedObject": {"uid": "u1", "kind": "Node", "name": "a,b"}});
        let s = FieldSelector::parse("involvedObject.kind=Node,involvedObject.name=a\\,b").unwrap();
        assert!(s.matches(&ev));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}

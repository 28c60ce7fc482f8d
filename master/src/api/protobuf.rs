//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`), as kubectl
//! 1.33 sends for `create deployment` / `run`. The envelope is the magic `k8s\0` followed by
//! a `runtime.Unknown` whose `raw` is the object; the prost types come from `k8s-pb`. The
//! decoded object is converted to its JSON form (the API's canonical form) field by field
//! for the kinds this API serves; fields outside that subset are dropped.

use std::collections::BTreeMap;

use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::authentication::v1 as authn;
use k8s_pb::api::authorization::v1 as authz;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::rbac::v1 as rbac;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;
use serde_json::{json, Map, Value};

use super::error::ApiError;

const MAGIC: &[u8] = b"k8s\0";

/// Conversion of a k8s-pb message to its Kubernetes JSON form (`omitempty` semantics:
/// absent optionals and empty lists/maps are left out).
pub(crate) trait ToJson {
    fn to_json(&self) -> Value;
}

/// Go encodes every non-pointer string, so an empty string means "unset" (JSON `omitempty`).
impl ToJson for String {
    fn to_json(&self) -> Value {
        if self.is_empty() {
            Value::Null
        } else {
            json!(self)
        }
    }
}
impl ToJson for i32 {
    fn to_json(&self) -> Value {
        json!(self)
    }
}
impl ToJson for i64 {
    fn to_json(&self) -> Value {
        json!(self)
    }
}
impl ToJson for bool {
    fn to_json(&self) -> Value {
        json!(self)
    }
}
impl<T: ToJson> ToJson for Option<T> {
    fn to_json(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToJson::to_json)
    }
}
impl<T: ToJson> ToJson for Vec<T> {
    fn to_json(&self) -> Value {
        if self.is_empty() {
            Value::Null
        } else {
            // an empty string in a list is a value (`apiGroups: [""]`, the core group)
            let item = |x: &T| match x.to_json() {
                Value::Null => json!(""),
                v => v,
            };
            Value::Array(self.iter().map(item).collect())
        }
    }
}
impl<T: ToJson> ToJson for BTreeMap<String, T> {
    fn to_json(&self) -> Value {
        if self.is_empty() {
            Value::Null
        } else {
            Value::Object(self.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
        }
    }
}
impl ToJson for Quantity {
    fn to_json(&self) -> Value {
        self.string.to_json()
    }
}
impl ToJson for IntOrString {
    fn to_json(&self) -> Value {
        match self.r#type {
            Some(1) => self.str_val.to_json(),
            _ => self.int_val.unwrap_or(0).to_json(),
        }
    }
}
impl ToJson for meta::Time {
    fn to_json(&self) -> Value {
        // The zero time (Go's default) is "unset".
        match self.seconds.unwrap_or(0) {
            0 => Value::Null,
            secs => k8s_openapi::jiff::Timestamp::from_second(secs)
                .map_or(Value::Null, |t| json!(t.to_string())),
        }
    }
}

fn put(m: &mut Map<String, Value>, k: &str, v: Value) {
    if !v.is_null() {
        m.insert(k.to_string(), v);
    }
}

macro_rules! to_json {
    ($ty:ty { $($field:ident => $json:literal),* $(,)? }) => {
        impl ToJson for $ty {
            fn to_json(&self) -> Value {
                let mut m = Map::new();
                $( put(&mut m, $json, self.$field.to_json()); )*
                Value::Object(m)
            }
        }
    };
}

to_json!(meta::OwnerReference { api_version => "apiVersion", kind => "kind", name => "name",
    uid => "uid", controller => "controller", block_owner_deletion => "blockOwnerDeletion" });
to_json!(meta::ObjectMeta { name => "name", generate_name => "generateName", namespace => "namespace",
    uid => "uid", resource_version => "resourceVersion", generation => "generation",
    creation_timestamp => "creationTimestamp", deletion_timestamp => "deletionTimestamp",
    deletion_grace_period_seconds => "deletionGracePeriodSeconds", labels => "labels",
    annotations => "annotations", owner_references => "ownerReferences", finalizers => "finalizers" });
to_json!(meta::LabelSelectorRequirement { key => "key", operator => "operator", values => "values" });
to_json!(meta::Preconditions {
    uid => "uid",
    resource_version => "resourceVersion",
});
to_json!(meta::DeleteOptions {
    grace_period_seconds => "gracePeriodSeconds",
    preconditions => "preconditions",
    orphan_dependents => "orphanDependents",
    propagation_policy => "propagationPolicy",
    dry_run => "dryRun",
});
to_json!(meta::LabelSelector { match_labels => "matchLabels", match_expressions => "matchExpressions" });

to_json!(core::ContainerPort { name => "name", host_port => "hostPort", container_port => "containerPort",
    protocol => "protocol", host_ip => "hostIP" });
to_json!(core::ObjectFieldSelector { api_version => "apiVersion", field_path => "fieldPath" });
to_json!(core::ResourceFieldSelector { container_name => "containerName", resource => "resource",
    divisor => "divisor" });
impl ToJson for core::ConfigMapKeySelector {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        put(
            &mut m,
            "name",
            self.local_object_reference
                .as_ref()
                .map_or(Value::Null, |r| r.name.to_json()),
        );
        put(&mut m, "key", self.key.to_json());
        put(&mut m, "optional", self.optional.to_json());
        Value::Object(m)
    }
}
impl ToJson for core::SecretKeySelector {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        put(
            &mut m,
            "name",
            self.local_object_reference
                .as_ref()
                .map_or(Value::Null, |r| r.name.to_json()),
        );
        put(&mut m, "key", self.key.to_json());
        put(&mut m, "optional", self.optional.to_json());
        Value::Object(m)
    }
}
to_json!(core::EnvVarSource { field_ref => "fieldRef", resource_field_ref => "resourceFieldRef",
    config_map_key_ref => "configMapKeyRef", secret_key_ref => "secretKeyRef" });
to_json!(core::EnvVar { name => "name", value => "value", value_from => "valueFrom" });
to_json!(core::ResourceRequirements { limits => "limits", requests => "requests" });
to_json!(core::VolumeMount { name => "name", read_only => "readOnly", mount_path => "mountPath",
    sub_path => "subPath", mount_propagation => "mountPropagation", sub_path_expr => "subPathExpr" });
to_json!(core::ExecAction { command => "command" });
to_json!(core::HttpHeader { name => "name", value => "value" });
to_json!(core::HttpGetAction { path => "path", port => "port", host => "host", scheme => "scheme",
    http_headers => "httpHeaders" });
to_json!(core::TcpSocketAction { port => "port", host => "host" });
impl ToJson for core::Probe {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(h) = &self.handler {
            put(&mut m, "exec", h.exec.to_json());
            put(&mut m, "httpGet", h.http_get.to_json());
            put(&mut m, "tcpSocket", h.tcp_socket.to_json());
        }
        put(
            &mut m,
            "initialDelaySeconds",
            self.initial_delay_seconds.to_json(),
        );
        put(&mut m, "timeoutSeconds", self.timeout_seconds.to_json());
        put(&mut m, "periodSeconds", self.period_seconds.to_json());
        put(&mut m, "successThreshold", self.success_threshold.to_json());
        put(&mut m, "failureThreshold", self.failure_threshold.to_json());
        put(
            &mut m,
            "terminationGracePeriodSeconds",
            self.termination_grace_period_seconds.to_json(),
        );
        Value::Object(m)
    }
}
to_json!(core::Capabilities { add => "add", drop => "drop" });
to_json!(core::SecurityContext { capabilities => "capabilities", privileged => "privileged",
    run_as_user => "runAsUser", run_as_group => "runAsGroup", run_as_non_root => "runAsNonRoot",
    read_only_root_filesystem => "readOnlyRootFilesystem",
    allow_privilege_escalation => "allowPrivilegeEscalation" });
to_json!(core::PodSecurityContext { run_as_user => "runAsUser", run_as_group => "runAsGroup",
    run_as_non_root => "runAsNonRoot", supplemental_groups => "supplementalGroups", fs_group => "fsGroup" });
to_json!(core::Container { name => "name", image => "image", command => "command", args => "args",
    working_dir => "workingDir", ports => "ports", env => "env", resources => "resources",
    volume_mounts => "volumeMounts", liveness_probe => "livenessProbe", readiness_probe => "readinessProbe",
    startup_probe => "startupProbe", termination_message_path => "terminationMessagePath",
    termination_message_policy => "terminationMessagePolicy", image_pull_policy => "imagePullPolicy",
    security_context => "securityContext", stdin => "stdin", stdin_once => "stdinOnce", tty => "tty",
    restart_policy => "restartPolicy" });
to_json!(core::KeyToPath { key => "key", path => "path", mode => "mode" });
to_json!(core::EmptyDirVolumeSource { medium => "medium", size_limit => "sizeLimit" });
to_json!(core::HostPathVolumeSource { path => "path", r#type => "type" });
to_json!(core::SecretVolumeSource { secret_name => "secretName", items => "items",
    default_mode => "defaultMode", optional => "optional" });
impl ToJson for core::ConfigMapVolumeSource {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        put(
            &mut m,
            "name",
            self.local_object_reference
                .as_ref()
                .map_or(Value::Null, |r| r.name.to_json()),
        );
        put(&mut m, "items", self.items.to_json());
        put(&mut m, "defaultMode", self.default_mode.to_json());
        put(&mut m, "optional", self.optional.to_json());
        Value::Object(m)
    }
}
impl ToJson for core::Volume {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        put(&mut m, "name", self.name.to_json());
        if let Some(s) = &self.volume_source {
            put(&mut m, "emptyDir", s.empty_dir.to_json());
            put(&mut m, "hostPath", s.host_path.to_json());
            put(&mut m, "secret", s.secret.to_json());
            put(&mut m, "configMap", s.config_map.to_json());
        }
        Value::Object(m)
    }
}
to_json!(core::LocalObjectReference { name => "name" });
to_json!(core::Toleration { key => "key", operator => "operator", value => "value", effect => "effect",
    toleration_seconds => "tolerationSeconds" });
to_json!(core::PodSpec { volumes => "volumes", init_containers => "initContainers",
    containers => "containers", restart_policy => "restartPolicy",
    termination_grace_period_seconds => "terminationGracePeriodSeconds",
    active_deadline_seconds => "activeDeadlineSeconds", dns_policy => "dnsPolicy",
    node_selector => "nodeSelector", service_account_name => "serviceAccountName",
    automount_service_account_token => "automountServiceAccountToken", node_name => "nodeName",
    host_network => "hostNetwork", security_context => "securityContext",
    image_pull_secrets => "imagePullSecrets", hostname => "hostname", subdomain => "subdomain",
    scheduler_name => "schedulerName", tolerations => "tolerations",
    priority_class_name => "priorityClassName", priority => "priority",
    enable_service_links => "enableServiceLinks" });
to_json!(core::PodTemplateSpec { metadata => "metadata", spec => "spec" });
to_json!(core::Pod { metadata => "metadata", spec => "spec" });
to_json!(core::NamespaceSpec { finalizers => "finalizers" });
to_json!(core::Namespace { metadata => "metadata", spec => "spec" });
to_json!(core::ServicePort { name => "name", protocol => "protocol", app_protocol => "appProtocol",
    port => "port", target_port => "targetPort", node_port => "nodePort" });
to_json!(core::ServiceSpec { ports => "ports", selector => "selector", cluster_ip => "clusterIP",
    cluster_ips => "clusterIPs", r#type => "type", external_ips => "externalIPs",
    session_affinity => "sessionAffinity", external_name => "externalName" });
to_json!(core::Service { metadata => "metadata", spec => "spec" });
to_json!(apps::RollingUpdateDeployment { max_unavailable => "maxUnavailable", max_surge => "maxSurge" });
to_json!(apps::DeploymentStrategy { r#type => "type", rolling_update => "rollingUpdate" });
to_json!(apps::DeploymentSpec { replicas => "replicas", selector => "selector", template => "template",
    strategy => "strategy", min_ready_seconds => "minReadySeconds",
    revision_history_limit => "revisionHistoryLimit", paused => "paused",
    progress_deadline_seconds => "progressDeadlineSeconds" });
to_json!(apps::Deployment { metadata => "metadata", spec => "spec" });
to_json!(apps::ReplicaSetSpec { replicas => "replicas", min_ready_seconds => "minReadySeconds",
    selector => "selector", template => "template" });
to_json!(apps::ReplicaSet { metadata => "metadata", spec => "spec" });

/// Go fields that are not pointers are always encoded; in JSON their zero value is
/// omitted (`omitempty`). These are the ones among the converted fields.
const OMIT_ZERO: &[&str] = &[
    "generation",
    "minReadySeconds",
    "paused",
    "stdin",
    "stdinOnce",
    "tty",
    "hostNetwork",
    "readOnly",
    "hostPort",
    "nodePort",
];

fn omit_zero(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, v| {
                !(OMIT_ZERO.contains(&k.as_str()) && (*v == json!(0) || *v == json!(false)))
            });
            m.values_mut().for_each(omit_zero);
        }
        Value::Array(a) => a.iter_mut().for_each(omit_zero),
        _ => {}
    }
}

to_json!(rbac::PolicyRule { verbs => "verbs", api_groups => "apiGroups", resources => "resources",
    resource_names => "resourceNames", non_resource_ur_ls => "nonResourceURLs" });
to_json!(rbac::Subject { kind => "kind", api_group => "apiGroup", name => "name", namespace => "namespace" });
to_json!(rbac::RoleRef { api_group => "apiGroup", kind => "kind", name => "name" });
to_json!(rbac::Role { metadata => "metadata", rules => "rules" });
to_json!(rbac::ClusterRole { metadata => "metadata", rules => "rules" });
to_json!(rbac::RoleBinding { metadata => "metadata", subjects => "subjects", role_ref => "roleRef" });
to_json!(rbac::ClusterRoleBinding { metadata => "metadata", subjects => "subjects", role_ref => "roleRef" });
to_json!(authz::ResourceAttributes { namespace => "namespace", verb => "verb", group => "group",
    version => "version", resource => "resource", subresource => "subresource", name => "name" });
to_json!(authz::NonResourceAttributes { path => "path", verb => "verb" });
to_json!(authz::SelfSubjectAccessReviewSpec { resource_attributes => "resourceAttributes",
    non_resource_attributes => "nonResourceAttributes" });
to_json!(authz::SelfSubjectAccessReview { metadata => "metadata", spec => "spec" });
to_json!(authz::SubjectAccessReviewSpec { resource_attributes => "resourceAttributes",
    non_resource_attributes => "nonResourceAttributes", user => "user", groups => "groups", uid => "uid" });
to_json!(authz::SubjectAccessReview { metadata => "metadata", spec => "spec" });
to_json!(authn::SelfSubjectReview { metadata => "metadata" });
to_json!(authn::TokenReviewSpec { token => "token", audiences => "audiences" });
to_json!(authn::TokenReview { metadata => "metadata", spec => "spec" });

/// Bytes are base64 in JSON.
fn bytes_map(m: &BTreeMap<String, Vec<u8>>) -> Value {
    use base64::Engine as _;
    if m.is_empty() {
        return Value::Null;
    }
    Value::Object(
        m.iter()
            .map(|(k, v)| {
                let b64 = base64::engine::general_purpose::STANDARD.encode(v);
                (k.clone(), Value::String(b64))
            })
            .collect(),
    )
}

impl ToJson for core::ConfigMap {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        put(&mut m, "metadata", self.metadata.to_json());
        put(&mut m, "immutable", self.immutable.to_json());
        put(&mut m, "data", self.data.to_json());
        put(&mut m, "binaryData", bytes_map(&self.binary_data));
        Value::Object(m)
    }
}

impl ToJson for core::Secret {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        put(&mut m, "metadata", self.metadata.to_json());
        put(&mut m, "immutable", self.immutable.to_json());
        put(&mut m, "data", bytes_map(&self.data));
        put(&mut m, "stringData", self.string_data.to_json());
        put(&mut m, "type", self.r#type.to_json());
        Value::Object(m)
    }
}

fn convert<T: Message + Default + ToJson>(raw: &[u8]) -> Result<Value, ApiError> {
    T::decode(raw)
        .map(|m| {
            let mut v = m.to_json();
            omit_zero(&mut v);
            v
        })
        .map_err(|e| ApiError::BadRequest(format!("invalid protobuf object: {e}")))
}

/// Decode a Kubernetes protobuf body into the object's JSON form (status is not carried:
/// the API resets it on create anyway).
pub(crate) fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let inner = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| ApiError::BadRequest("protobuf body without the k8s\\0 envelope".into()))?;
    let unknown = Unknown::decode(inner)
        .map_err(|e| ApiError::BadRequest(format!("invalid protobuf envelope: {e}")))?;
    let tm = unknown.type_meta.unwrap_or_default();
    let api_version = tm.api_version.unwrap_or_default();
    let kind = tm.kind.unwrap_or_default();
    let raw = unknown.raw.unwrap_or_default();
    let mut v = match (api_version.as_str(), kind.as_str()) {
        ("apps/v1", "Deployment") => convert::<apps::Deployment>(&raw)?,
        ("apps/v1", "ReplicaSet") => convert::<apps::ReplicaSet>(&raw)?,
        ("v1", "Pod") => convert::<core::Pod>(&raw)?,
        ("v1", "Namespace") => convert::<core::Namespace>(&raw)?,
        ("v1", "Service") => convert::<core::Service>(&raw)?,
        ("v1", "ConfigMap") => convert::<core::ConfigMap>(&raw)?,
        ("v1", "Secret") => convert::<core::Secret>(&raw)?,
        (_, "DeleteOptions") => convert::<meta::DeleteOptions>(&raw)?,
        ("rbac.authorization.k8s.io/v1", "Role") => convert::<rbac::Role>(&raw)?,
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => convert::<rbac::ClusterRole>(&raw)?,
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => convert::<rbac::RoleBinding>(&raw)?,
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            convert::<rbac::ClusterRoleBinding>(&raw)?
        }
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => {
            convert::<authz::SelfSubjectAccessReview>(&raw)?
        }
        ("authorization.k8s.io/v1", "SubjectAccessReview") => {
            convert::<authz::SubjectAccessReview>(&raw)?
        }
        ("authentication.k8s.io/v1", "SelfSubjectReview") => {
            convert::<authn::SelfSubjectReview>(&raw)?
        }
        ("authentication.k8s.io/v1", "TokenReview") => convert::<authn::TokenReview>(&raw)?,
        _ => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "protobuf bodies of {api_version}/{kind} are not supported; send JSON"
            )))
        }
    };
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
    Ok(v)
}

/// Encode an object the way kubectl does (for tests).
#[cfg(test)]
pub(crate) fn encode<T: Message>(api_version: &str, kind: &str, obj: &T) -> Vec<u8> {
    let u = Unknown {
        type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
        }),
        raw: Some(obj.encode_to_vec()),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    let mut out = MAGIC.to_vec();
    out.extend(u.encode_to_vec());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_kubectl_style_deployment() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let d = apps::Deployment {
            metadata: Some(meta::ObjectMeta {
                name: Some("web".into()),
                labels: labels.clone(),
                ..Default::default()
            }),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(2),
                selector: Some(meta::LabelSelector {
                    match_labels: labels.clone(),
                    ..Default::default()
                }),
                template: Some(core::PodTemplateSpec {
                    metadata: Some(meta::ObjectMeta {
                        labels,
                        ..Default::default()
                    }),
                    spec: Some(core::PodSpec {
                        restart_policy: Some(String::new()),
                        containers: vec![core::Container {
                            name: Some("busybox".into()),
                            image: Some("busybox".into()),
                            command: vec!["sleep".into(), "1000".into()],
                            resources: Some(Default::default()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                }),
                strategy: Some(Default::default()),
                ..Default::default()
            }),
            status: Some(Default::default()),
        };
        let body = encode("apps/v1", "Deployment", &d);
        let v = decode(&body).unwrap();
        assert_eq!(v["kind"], "Deployment");
        assert_eq!(v["metadata"]["name"], "web");
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(v["spec"]["selector"]["matchLabels"]["app"], "web");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["command"], json!(["sleep", "1000"]));
        assert_eq!(c["resources"], json!({}));
        assert!(v.get("status").is_none());
        assert!(v["spec"]["template"]["spec"].get("restartPolicy").is_none());
        assert!(decode(b"nope").is_err());
    }

    #[test]
    fn decodes_delete_options() {
        let o = meta::DeleteOptions {
            grace_period_seconds: Some(0),
            propagation_policy: Some("Background".into()),
            ..Default::default()
        };
        let v = decode(&encode("v1", "DeleteOptions", &o)).unwrap();
        assert_eq!(v["gracePeriodSeconds"], 0);
        assert_eq!(v["propagationPolicy"], "Background");
    }

    #[test]
    fn int_or_string() {
        let i = IntOrString {
            r#type: Some(1),
            int_val: None,
            str_val: Some("25%".into()),
        };
        assert_eq!(i.to_json(), json!("25%"));
        let i = IntOrString {
            r#type: Some(0),
            int_val: Some(8080),
            str_val: None,
        };
        assert_eq!(i.to_json(), json!(8080));
    }
}

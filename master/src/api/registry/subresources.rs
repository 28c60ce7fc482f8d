//! Subresources with their own semantics: `pods/binding` and `*/scale`.

use super::*;

impl Registry {
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
}

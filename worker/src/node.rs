//! The Node object and its heartbeats: registration, the Lease in `kube-node-lease`
//! renewed every `lease_interval`, and the node status (`Ready`, `lastHeartbeatTime`)
//! posted less often, and at once after the API comes back.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_config::Capacity;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::{retry, Api, ApiError};
use crate::metrics::Metrics;

/// The kubelet version the worker reports.
pub(crate) const KUBELET_VERSION: &str = "v1.33.0-ballast";

/// What a node says about itself.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    pub name: String,
    pub ip: IpAddr,
    pub port: u16,
    pub zone: String,
    pub capacity: Capacity,
    pub lease_interval: Duration,
    /// `leaseDurationSeconds` of the Lease.
    pub lease_duration: Duration,
    /// Boot id of this worker process (changes on every start).
    pub boot_id: String,
}

/// The Node object to create.
pub(crate) fn node_object(info: &NodeInfo) -> Node {
    let labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", info.name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch()),
        ("topology.kubernetes.io/zone", info.zone.as_str()),
        ("node.ballast.io/worker", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(info.name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(Default::default()),
        status: Some(node_status(info, None, crate::now())),
    }
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

/// The node status; `prev` keeps the `Ready` transition time while it stays `True`.
pub(crate) fn node_status(
    info: &NodeInfo,
    prev: Option<&NodeStatus>,
    now: Timestamp,
) -> NodeStatus {
    let res: BTreeMap<String, Quantity> = [
        ("cpu", info.capacity.cpu.clone()),
        ("memory", info.capacity.memory.clone()),
        ("pods", info.capacity.pods.to_string()),
        ("ephemeral-storage", "100Gi".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v)))
    .collect();
    let prev_cond = |t: &str| {
        prev.and_then(|p| p.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == t))
            .cloned()
    };
    let cond = |t: &str, status: &str, reason: &str, message: &str| {
        let since = prev_cond(t)
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time)
            .unwrap_or(Time(now));
        NodeCondition {
            type_: t.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_heartbeat_time: Some(Time(now)),
            last_transition_time: Some(since),
        }
    };
    NodeStatus {
        capacity: Some(res.clone()),
        allocatable: Some(res),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: info.ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: info.name.clone(),
            },
        ]),
        conditions: Some(vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            cond(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            cond(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "ballast worker is posting ready status",
            ),
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: info.port.into(),
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: arch().into(),
            boot_id: info.boot_id.clone(),
            container_runtime_version: format!("ballast://{}", env!("CARGO_PKG_VERSION")),
            kernel_version: kernel_version(),
            kube_proxy_version: String::new(),
            kubelet_version: KUBELET_VERSION.into(),
            machine_id: info.name.clone(),
            operating_system: "linux".into(),
            os_image: "Ballast worker (local processes)".into(),
            system_uuid: info.boot_id.clone(),
            swap: None,
        }),
        phase: Some("Running".into()),
        ..Default::default()
    }
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The Lease renewed as the heartbeat.
pub(crate) fn lease_object(info: &NodeInfo, node_uid: Option<&str>, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(info.name.clone()),
            namespace: Some("kube-node-lease".into()),
            owner_references: node_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: info.name.clone(),
                    uid: uid.into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(info.name.clone()),
            lease_duration_seconds: Some(info.lease_duration.as_secs().max(1) as i32),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

fn node_path(name: &str) -> String {
    format!("/api/v1/nodes/{name}")
}

fn lease_path(name: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}")
}

/// Create the Node (or update the labels of an existing one); returns its uid.
async fn register(api: &Api, info: &NodeInfo) -> Result<Option<String>, ApiError> {
    let want = node_object(info);
    let node: Node = match api.get::<Node>(&node_path(&info.name)).await {
        Ok(_) => {
            let patch = json!({"metadata": {"labels": want.metadata.labels}});
            api.merge_patch(&node_path(&info.name), &patch).await?
        }
        Err(e) if e.is_not_found() => match api.post::<Node>("/api/v1/nodes", &want).await {
            Ok(n) => n,
            Err(e) if e.is_conflict() => api.get(&node_path(&info.name)).await?,
            Err(e) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    Ok(node.metadata.uid)
}

/// Post the node status (Ready, heartbeat time).
async fn post_status(api: &Api, info: &NodeInfo) -> Result<(), ApiError> {
    let cur: Node = api.get(&node_path(&info.name)).await?;
    let status = node_status(info, cur.status.as_ref(), crate::now());
    let body = Node {
        metadata: ObjectMeta {
            name: Some(info.name.clone()),
            ..Default::default()
        },
        spec: None,
        status: Some(status),
    };
    let _: Node = api
        .put(&format!("{}/status", node_path(&info.name)), &body)
        .await?;
    Ok(())
}

/// Renew (or create) the Lease.
async fn renew(api: &Api, info: &NodeInfo, node_uid: Option<&str>) -> Result<(), ApiError> {
    let lease = lease_object(info, node_uid, crate::now_micro());
    match api.put::<Lease>(&lease_path(&info.name), &lease).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => {
            let path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";
            match api.post::<Lease>(path, &lease).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_conflict() => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Register the node, then keep its lease and status fresh until `shutdown`.
pub(crate) async fn run(
    api: Arc<Api>,
    info: NodeInfo,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let status_every = (info.lease_interval * 3).max(Duration::from_secs(1));
    let mut node_uid = None;
    let mut registered = false;
    let mut last_status: Option<Instant> = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(info.lease_interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if !registered {
            match retry("register node", &shutdown, || register(&api, &info)).await {
                Ok(uid) => {
                    tracing::info!(node = %info.name, route = %api.route().describe(), "node registered");
                    node_uid = uid;
                    registered = true;
                }
                Err(ApiError::Cancelled) => return,
                Err(e) => {
                    tracing::error!(node = %info.name, error = %e, "cannot register the node");
                    continue;
                }
            }
        }
        let t0 = Instant::now();
        match renew(&api, &info, node_uid.as_deref()).await {
            Ok(()) => {
                metrics.heartbeat.observe(t0.elapsed().as_secs_f64());
                if failing {
                    tracing::info!(node = %info.name, "lease renewed again");
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(node = %info.name, error = %e, "cannot renew the lease");
                }
                failing = true;
                continue;
            }
        }
        let due = last_status.is_none_or(|t| t.elapsed() >= status_every);
        if due || failing {
            match post_status(&api, &info).await {
                Ok(()) => {
                    last_status = Some(Instant::now());
                    failing = false;
                }
                Err(e) if e.is_not_found() => {
                    tracing::warn!(node = %info.name, "node object is gone; registering again");
                    registered = false;
                }
                Err(e) => {
                    tracing::warn!(node = %info.name, error = %e, "cannot post the node status");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> NodeInfo {
        NodeInfo {
            name: "w1".into(),
            ip: "127.0.2.1".parse().unwrap(),
            port: 10250,
            zone: "zone-a".into(),
            capacity: Capacity::default(),
            lease_interval: Duration::from_secs(2),
            lease_duration: Duration::from_secs(8),
            boot_id: "b".into(),
        }
    }

    #[test]
    fn node_carries_addresses_labels_capacity_and_version() {
        let n = node_object(&info());
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["kind"], "Node");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/hostname"], "w1");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/os"], "linux");
        assert_eq!(
            v["metadata"]["labels"]["topology.kubernetes.io/zone"],
            "zone-a"
        );
        assert_eq!(v["status"]["capacity"]["cpu"], "4");
        assert_eq!(v["status"]["allocatable"]["memory"], "8Gi");
        assert_eq!(v["status"]["capacity"]["pods"], "110");
        assert_eq!(v["status"]["addresses"][0]["type"], "InternalIP");
        assert_eq!(v["status"]["addresses"][0]["address"], "127.0.2.1");
        assert_eq!(
            v["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"],
            10250
        );
        assert_eq!(v["status"]["nodeInfo"]["kubeletVersion"], KUBELET_VERSION);
        let ready = v["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(ready["status"], "True");
    }

    #[test]
    fn ready_transition_time_is_kept_while_ready() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_700_000_100).unwrap();
        let s0 = node_status(&info(), None, t0);
        let s1 = node_status(&info(), Some(&s0), t1);
        let ready = |s: &NodeStatus| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .unwrap()
                .clone()
        };
        assert_eq!(ready(&s1).last_transition_time, Some(Time(t0)));
        assert_eq!(ready(&s1).last_heartbeat_time, Some(Time(t1)));
        // After the controller marked it Unknown, the transition is now.
        let mut unknown = s1.clone();
        for c in unknown.conditions.as_mut().unwrap() {
            if c.type_ == "Ready" {
                c.status = "Unknown".into();
            }
        }
        let s2 = node_status(&info(), Some(&unknown), t1);
        assert_eq!(ready(&s2).last_transition_time, Some(Time(t1)));
    }

    #[test]
    fn lease_names_its_holder_and_duration() {
        let l = lease_object(&info(), Some("u1"), Timestamp::from_second(1).unwrap());
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(v["metadata"]["namespace"], "kube-node-lease");
        assert_eq!(v["spec"]["holderIdentity"], "w1");
        assert_eq!(v["spec"]["leaseDurationSeconds"], 8);
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "Node");
        assert!(v["spec"]["renewTime"].as_str().unwrap().starts_with("1970"));
    }
}

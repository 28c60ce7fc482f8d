//! Real kubectl (Debian's 1.20 and the machine's 1.33) against real masters, through the
//! proxy, with real workers running the pods.

use std::time::Duration;

use ballast_tests::*;

const T: Duration = Duration::from_secs(120);

fn deployment_yaml(name: &str, ns: &str, replicas: u32, tag: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
  labels:
    app: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: {name}
  strategy:
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        app: {name}
        tag: "{tag}"
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: busybox:{tag}
        command: ["sh", "-c", "echo started {tag}; exec sleep 1000"]
        resources:
          requests:
            cpu: 100m
            memory: 16Mi
"#
    )
}

fn cluster(block: u8) -> Cluster {
    let c = Cluster::start(ClusterOpts::new(block).workers(2).proxy(true), |_| {});
    c.wait_one_active(T);
    c
}

fn wait_nodes_ready(k: &Kubectl) {
    wait_until("both nodes Ready", T, || {
        let out = k.run(&["get", "nodes"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let ready = text
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("Ready"))
            .count();
        (ready == 2).then_some(text)
    });
}

/// The everyday kubectl workflow, with both kubectl versions, each in its own namespace.
fn workflow(k: &Kubectl, ns: &str) {
    let v = k.ok(&["version"]);
    assert!(v.contains("Server Version"), "{v}");
    k.ok(&["create", "namespace", ns]);
    wait_nodes_ready(k);

    // apply (create), rollout status, get with columns.
    k.ok_stdin(&["apply", "-f", "-"], &deployment_yaml("web", ns, 2, "1"));
    k.ok(&[
        "-n",
        ns,
        "rollout",
        "status",
        "deployment/web",
        "--timeout=120s",
    ]);
    let deploys = k.ok(&["-n", ns, "get", "deploy"]);
    assert!(
        deploys.contains("READY") && deploys.contains("2/2"),
        "{deploys}"
    );
    let pods = k.ok(&["-n", ns, "get", "pods", "-o", "wide"]);
    assert_eq!(
        pods.lines().filter(|l| l.contains("Running")).count(),
        2,
        "{pods}"
    );
    assert!(
        pods.contains("NODE") && (pods.contains(" w1 ") || pods.contains(" w2 ")),
        "{pods}"
    );

    // apply (change): a new template rolls out.
    k.ok_stdin(&["apply", "-f", "-"], &deployment_yaml("web", ns, 3, "2"));
    k.ok(&[
        "-n",
        ns,
        "rollout",
        "status",
        "deployment/web",
        "--timeout=120s",
    ]);
    let pods = k.ok(&["-n", ns, "get", "pods", "-l", "tag=2"]);
    assert_eq!(
        pods.lines().filter(|l| l.contains("Running")).count(),
        3,
        "{pods}"
    );

    // scale.
    k.ok(&["-n", ns, "scale", "deployment/web", "--replicas=1"]);
    wait_until("scaled to 1", T, || {
        let p = k.ok(&["-n", ns, "get", "pods", "-l", "app=web", "--no-headers"]);
        (p.lines().filter(|l| !l.contains("Terminating")).count() == 1).then_some(())
    });

    // get -w follows changes.
    let watch_out = k.home_dir().join("watch.out");
    let mut watch = k.spawn(&["-n", ns, "get", "deployments", "-w"], &watch_out);
    wait_until("get -w prints the list", T, || {
        std::fs::read_to_string(&watch_out)
            .ok()
            .filter(|t| t.contains("web"))
            .map(|_| ())
    });

    // create deployment (protobuf body from 1.33, JSON from 1.20).
    k.ok(&[
        "-n",
        ns,
        "create",
        "deployment",
        "other",
        "--image=busybox",
        "--",
        "sleep",
        "1000",
    ]);
    let y = k.ok(&["-n", ns, "get", "deployment", "other", "-o", "yaml"]);
    assert!(y.contains("kind: Deployment") && y.contains("sleep"), "{y}");

    wait_until("get -w shows the new deployment", T, || {
        std::fs::read_to_string(&watch_out)
            .ok()
            .filter(|t| t.contains("other"))
            .map(|_| ())
    });
    let _ = watch.kill();
    let _ = watch.wait();

    // A stale resourceVersion is a conflict, as on a Kubernetes API server.
    let stale = k.ok(&["-n", ns, "get", "deployment", "other", "-o", "json"]);
    k.ok(&["-n", ns, "label", "deployment", "other", "touched=yes"]);
    let out = k.run_stdin(&["replace", "-f", "-"], &stale);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the object has been modified"),
        "{err}"
    );

    // -A, describe, events.
    let all = k.ok(&["get", "pods", "-A"]);
    assert!(all.contains(ns), "{all}");
    let d = k.ok(&["describe", "node", "w1"]);
    assert!(d.contains("Name:") && d.contains("w1"), "{d}");
    let pod = k.ok(&[
        "-n",
        ns,
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let d = k.ok(&["-n", ns, "describe", "pod", pod.trim()]);
    assert!(d.contains("Node:") && d.contains("Scheduled"), "{d}");
    let ev = k.ok(&["-n", ns, "get", "events"]);
    assert!(ev.contains("Scheduled"), "{ev}");

    // Errors as a Kubernetes API server gives them.
    let out = k.run(&["get", "frobnicators"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the server doesn't have a resource type"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = k.run(&["create", "namespace", ns]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("AlreadyExists"),
        "{out:?}"
    );
    let out = k.run_stdin(
        &["create", "-f", "-"],
        &format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: Bad_Name\n  namespace: {ns}\nspec:\n  containers: []\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is invalid"), "{err}");

    // delete (kubectl waits for it), garbage collection of the pods.
    k.ok(&["-n", ns, "delete", "deployment", "web"]);
    wait_until("web's pods collected", T, || {
        let p = k.ok(&["-n", ns, "get", "pods", "-l", "app=web", "--no-headers"]);
        p.trim().is_empty().then_some(())
    });
}

#[test]
fn kubectl_1_33_workflow() {
    let c = cluster(31);
    let k = Kubectl::new("1.33", &c.proxy_url(), c.dir());
    workflow(&k, "k133");
}

#[test]
fn kubectl_1_20_workflow() {
    let c = cluster(32);
    let k = Kubectl::new("1.20", &c.proxy_url(), c.dir());
    workflow(&k, "k120");
}

/// Right after a kill -9 of the active master, kubectl keeps working through the proxy
/// and nothing is lost.
#[test]
fn kubectl_survives_failover() {
    let mut c = cluster(33);
    let k = Kubectl::new("1.33", &c.proxy_url(), c.dir());
    wait_nodes_ready(&k);
    k.ok_stdin(
        &["apply", "-f", "-"],
        &deployment_yaml("web", "default", 2, "1"),
    );
    k.ok(&["rollout", "status", "deployment/web", "--timeout=120s"]);
    let before = k.ok(&["get", "pods", "-o", "jsonpath={.items[*].metadata.uid}"]);
    let (active, term) = c.wait_one_active(T);
    c.kill(&active);
    // Every command succeeds (kubectl's own retry on 503 + Retry-After allowed).
    let deploys = k.ok(&["get", "deploy", "web"]);
    assert!(deploys.contains("2/2"), "{deploys}");
    k.ok(&["scale", "deployment/web", "--replicas=3"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=120s"]);
    let (new_active, new_term) = c.wait_one_active(T);
    assert_ne!(new_active, active);
    assert!(new_term > term);
    let after = k.ok(&["get", "pods", "-o", "jsonpath={.items[*].metadata.uid}"]);
    for uid in before.split_whitespace() {
        assert!(
            after.contains(uid),
            "pod {uid} lost across failover: {after}"
        );
    }
}

/// ConfigMaps and Secrets: created, read and listed with both kubectls; a Secret's
/// `stringData` is stored base64 in `data`; `view` reads ConfigMaps but not Secrets.
#[test]
fn configmaps_and_secrets_with_kubectl_1_20_and_1_33() {
    let c = cluster(34);
    for v in ["1.20", "1.33"] {
        let k = Kubectl::new(v, &c.proxy_url(), c.dir());
        let tag = v.replace('.', "");
        let cm = format!("cm-{tag}");
        k.ok(&[
            "create",
            "configmap",
            &cm,
            "--from-literal=a=b",
            "--from-literal=c=d",
        ]);
        let a = k.ok(&["get", "configmap", &cm, "-o", "jsonpath={.data.a}"]);
        assert_eq!(a.trim(), "b", "{v}");
        let table = k.ok(&["get", "cm", &cm]);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&cm) && l.split_whitespace().nth(1) == Some("2")),
            "{v}: {table}"
        );
        let s = format!("s-{tag}");
        k.ok(&[
            "create",
            "secret",
            "generic",
            &s,
            "--from-literal=password=hunter2",
        ]);
        let data = k.ok(&["get", "secret", &s, "-o", "jsonpath={.data.password}"]);
        assert_eq!(data.trim(), "aHVudGVyMg==", "{v}: base64 of hunter2");
        let table = k.ok(&["get", "secrets", &s]);
        assert!(table.contains("Opaque"), "{v}: {table}");
        k.ok(&["delete", "secret", &s]);
    }
    let k = Kubectl::new("1.33", &c.proxy_url(), c.dir());
    k.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: plain\nstringData:\n  token: abc\n",
    );
    let data = k.ok(&["get", "secret", "plain", "-o", "jsonpath={.data.token}"]);
    assert_eq!(data.trim(), "YWJj", "stringData stored base64 in data");
    // view may read ConfigMaps, not Secrets
    k.ok(&[
        "create",
        "rolebinding",
        "v",
        "--clusterrole=view",
        "--user=viewer",
    ]);
    let viewer = k.as_user(&c.proxy_url(), c.dir(), "viewer", &[]);
    assert!(viewer.run(&["get", "configmap", "cm-133"]).status.success());
    assert!(!viewer.run(&["get", "secret", "plain"]).status.success());
}

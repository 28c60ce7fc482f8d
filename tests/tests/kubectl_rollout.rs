//! Rollouts as users drive them, with kubectl 1.33 and 1.20 through the proxy: `set
//! image`, `rollout history`, `rollout undo` back to the previous image, `rollout pause`
//! (template changes wait) and `resume`, `rollout restart` (new pods, same image).
//! Block 62.

use std::time::Duration;

use ballast_tests::*;

const T: Duration = Duration::from_secs(120);

fn deployment_yaml(name: &str, ns: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
spec:
  replicas: 2
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
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: busybox:1
        command: ["sleep", "6262"]
"#
    )
}

/// The images of the running (not terminating) pods of deployment `web`.
fn pod_images(k: &Kubectl, ns: &str) -> Vec<String> {
    let out = k.ok(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        "app=web",
        "-o",
        "jsonpath={range .items[*]}{.metadata.deletionTimestamp}|{.spec.containers[0].image}{\"\\n\"}{end}",
    ]);
    out.lines()
        .filter_map(|l| l.split_once('|'))
        .filter(|(deleting, _)| deleting.is_empty())
        .map(|(_, image)| image.to_string())
        .collect()
}

fn wait_images(k: &Kubectl, ns: &str, image: &str) {
    wait_until(&format!("every pod on {image}"), T, || {
        let images = pod_images(k, ns);
        (images.len() == 2 && images.iter().all(|i| i == image)).then_some(())
    });
}

/// The revisions `kubectl rollout history` lists for deployment `web`, and its output.
fn history_of(k: &Kubectl, ns: &str) -> (Vec<String>, String) {
    let history = k.ok(&["rollout", "history", "-n", ns, "deployment/web"]);
    let revisions = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .map(String::from)
        .collect();
    (revisions, history)
}

fn rollouts(k: &Kubectl, ns: &str) {
    k.ok(&["create", "namespace", ns]);
    k.ok_stdin(&["apply", "-f", "-"], &deployment_yaml("web", ns));
    k.ok(&[
        "rollout",
        "status",
        "-n",
        ns,
        "deployment/web",
        "--timeout=120s",
    ]);
    wait_images(k, ns, "busybox:1");

    k.ok(&["set", "image", "-n", ns, "deployment/web", "main=busybox:2"]);
    k.ok(&[
        "rollout",
        "status",
        "-n",
        ns,
        "deployment/web",
        "--timeout=120s",
    ]);
    wait_images(k, ns, "busybox:2");

    let (revisions, history) = history_of(k, ns);
    assert_eq!(revisions, ["1", "2"], "{history}");
    let two = k.ok(&[
        "rollout",
        "history",
        "-n",
        ns,
        "deployment/web",
        "--revision=2",
    ]);
    assert!(two.contains("busybox:2"), "{two}");

    let undo = k.ok(&["rollout", "undo", "-n", ns, "deployment/web"]);
    assert!(undo.contains("rolled back"), "{undo}");
    k.ok(&[
        "rollout",
        "status",
        "-n",
        ns,
        "deployment/web",
        "--timeout=120s",
    ]);
    wait_images(k, ns, "busybox:1");
    let (revisions, history) = history_of(k, ns);
    // Revision 1 became revision 3, as kube-controller-manager renumbers it.
    assert_eq!(revisions, ["2", "3"], "{history}");

    k.ok(&["rollout", "pause", "-n", ns, "deployment/web"]);
    k.ok(&["set", "image", "-n", ns, "deployment/web", "main=busybox:3"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        pod_images(k, ns),
        ["busybox:1", "busybox:1"],
        "a paused rollout moved"
    );
    k.ok(&["rollout", "resume", "-n", ns, "deployment/web"]);
    k.ok(&[
        "rollout",
        "status",
        "-n",
        ns,
        "deployment/web",
        "--timeout=120s",
    ]);
    wait_images(k, ns, "busybox:3");

    let before = k.ok(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    k.ok(&["rollout", "restart", "-n", ns, "deployment/web"]);
    k.ok(&[
        "rollout",
        "status",
        "-n",
        ns,
        "deployment/web",
        "--timeout=120s",
    ]);
    wait_until("restarted pods", T, || {
        let now = k.ok(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        let fresh = now
            .split_whitespace()
            .filter(|p| !before.contains(p))
            .count();
        (fresh == 2 && pod_images(k, ns) == ["busybox:3", "busybox:3"]).then_some(())
    });
}

#[test]
fn rollout_history_undo_pause_resume_restart_with_both_kubectls() {
    let c = Cluster::start(ClusterOpts::new(62).workers(1).proxy(true), |_| {});
    c.wait_one_active(T);
    let k133 = Kubectl::new("1.33", &c.proxy_url(), c.dir());
    wait_until("w1 Ready", T, || {
        k133.ok(&["get", "nodes"]).contains(" Ready").then_some(())
    });
    rollouts(&k133, "k133");
    let k120 = Kubectl::new("1.20", &c.proxy_url(), c.dir());
    rollouts(&k120, "k120");
}

//! Workers with real masters, the proxy and real pod processes: the pods' processes do not
//! go down with the masters, a worker's crash neither kills nor duplicates them, and a
//! lost worker's pods are replaced on the other one; `kubectl logs` shows their output.
//!
//! The tests of this file take a lock: each starts a whole cluster, and the machine has
//! few cores.

use std::time::{Duration, Instant};

use ballast_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

/// A cluster that, on drop, first kills its workers, then every pod process they recorded
/// (those outlive a SIGKILLed worker by design, so the harness alone would leave them
/// behind), then the rest.
fn api(c: &Cluster, method: &str, path: &str, body: Option<&Value>) -> Option<Response> {
    let b = body.map(|v| v.to_string());
    http(method, &format!("{}{path}", c.proxy_url()), b.as_deref()).ok()
}

fn pod_body(name: &str, node: &str, script: &str, grace: i64) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"test": "worker"}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": grace,
            "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}]
        }
    })
}

fn create_pod(c: &Cluster, body: &Value) {
    wait_until("pod created", T, || {
        let r = api(c, "POST", "/api/v1/namespaces/default/pods", Some(body))?;
        (r.status == 201 || r.status == 200 || r.status == 409).then_some(())
    });
}

fn get_pod(c: &Cluster, name: &str) -> Option<Value> {
    let r = api(
        c,
        "GET",
        &format!("/api/v1/namespaces/default/pods/{name}"),
        None,
    )?;
    (r.status == 200).then(|| r.json())
}

/// The pid in the reported `containerID` (`ballast://PID`) of a running container.
fn reported_pid(p: &Value) -> Option<u32> {
    let cs = &p["status"]["containerStatuses"][0];
    cs["state"]["running"].as_object()?;
    cs["containerID"]
        .as_str()?
        .strip_prefix("ballast://")?
        .parse()
        .ok()
}

fn restarts(p: &Value) -> i64 {
    p["status"]["containerStatuses"][0]["restartCount"]
        .as_i64()
        .unwrap_or(-1)
}

/// Wait until `name` runs; returns its process id.
fn wait_running(c: &Cluster, name: &str) -> u32 {
    wait_until(&format!("pod {name} Running"), T, || {
        let p = get_pod(c, name)?;
        (p["status"]["phase"] == "Running").then_some(())?;
        reported_pid(&p)
    })
}

fn node_ready(c: &Cluster, node: &str) -> bool {
    api(c, "GET", &format!("/api/v1/nodes/{node}"), None)
        .filter(|r| r.status == 200)
        .map(|r| {
            r.json()["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .unwrap_or(false)
}

fn wait_nodes_ready(c: &Cluster, nodes: &[&str]) {
    wait_until("nodes Ready", T, || {
        nodes.iter().all(|n| node_ready(c, n)).then_some(())
    });
}

fn start(block: u8, workers: usize) -> Cluster {
    let c = Cluster::start(ClusterOpts::new(block).workers(workers).proxy(true), |_| {});
    c.wait_one_active(T);
    c
}

/// kill -9 of the active master, then every master down for 30 s: the pods' processes
/// are untouched (and one that dies meanwhile is restarted by its worker), statuses catch
/// up afterwards, w2 (DNS route) follows the active master; logs are served; deleting a
/// pod stops its process within the grace period.
#[test]
fn pods_survive_failover_and_a_control_plane_outage() {
    let mut c = start(41, 2);
    wait_nodes_ready(&c, &["w1", "w2"]);
    let script = "echo started; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done";
    create_pod(&c, &pod_body("p1", "w1", script, 3));
    create_pod(&c, &pod_body("p2", "w2", script, 3));
    let pid1 = wait_running(&c, "p1");
    let pid2 = wait_running(&c, "p2");
    assert!(pid_alive(pid1) && pid_alive(pid2));

    // Logs straight from the worker, as a master fetches them (masters' certificates
    // only: admin and anonymous clients are refused).
    let url = format!(
        "https://{}/containerLogs/default/p1/main?tailLines=50",
        c.worker_addr("w1")
    );
    let as_master = c.node_client("m1");
    let logs = wait_until("p1 logs", T, || {
        let r = request(&as_master, "GET", &url, None).ok()?;
        (r.status == 200 && r.body.contains("tick 1")).then_some(r.body)
    });
    assert!(logs.contains("started"), "{logs}");
    assert_eq!(
        http("GET", &url, None).unwrap().status,
        403,
        "admin's certificate"
    );
    let anon = request(&test_pki().anonymous_client(), "GET", &url, None).unwrap();
    assert_eq!(anon.status, 401);

    // kill -9 of the active master.
    let (old, _) = c.wait_one_active(T);
    c.kill(&old);
    let (new, _) = wait_until("a new active master", T, || {
        let a = c.active_masters();
        (a.len() == 1 && a[0].0 != old).then(|| a[0].clone())
    });
    // Both workers renew their leases through the new master (w2 by DNS) and keep their
    // nodes Ready.
    for w in ["w1", "w2"] {
        let renew = || {
            let path =
                format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{w}");
            let r = api(&c, "GET", &path, None).filter(|r| r.status == 200)?;
            r.json()["spec"]["renewTime"].as_str().map(str::to_string)
        };
        let first = wait_until("a lease read", T, renew);
        let second = wait_until(&format!("{w} renews its lease"), T, || {
            renew().filter(|r| *r > first)
        });
        wait_until(&format!("{w} renews its lease again"), T, || {
            renew().filter(|r| *r > second)
        });
    }
    // for 10 s after the failover, neither process is touched
    let watch_from = Instant::now();
    while watch_from.elapsed() < Duration::from_secs(10) {
        assert!(
            pid_alive(pid1) && pid_alive(pid2),
            "a pod's process died after the failover"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_nodes_ready(&c, &["w1", "w2"]);
    for (name, pid) in [("p1", pid1), ("p2", pid2)] {
        let p = get_pod(&c, name).unwrap();
        assert_eq!(
            reported_pid(&p),
            Some(pid),
            "{name} kept its process after failover to {new}"
        );
        assert_eq!(restarts(&p), 0, "{name}");
        assert!(pid_alive(pid));
    }

    // Every master down for 30 s.
    c.start_node(&old);
    wait_until("all masters up", T, || {
        c.master_ids()
            .iter()
            .all(|m| status_of(&format!("{}/livez", c.master_url(m))) == 200)
            .then_some(())
    });
    for m in c.master_ids() {
        c.kill(&m);
    }
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    // A process that dies meanwhile is restarted by its worker alone.
    let _ = kill(Pid::from_raw(-(pid1 as i32)), Signal::SIGKILL);
    let new1 = wait_until("p1 restarted without masters", T, || {
        pod_processes(c.dir())
            .get("p1")
            .copied()
            .filter(|p| *p != pid1 && pid_alive(*p))
    });
    while down.elapsed() < Duration::from_secs(30) {
        assert!(pid_alive(pid2), "p2's process must not be touched");
        std::thread::sleep(Duration::from_millis(500));
    }
    for m in c.master_ids() {
        c.start_node(&m);
    }
    c.wait_one_active(T);
    // Statuses catch up.
    wait_until("p1 status caught up", T, || {
        let p = get_pod(&c, "p1")?;
        (reported_pid(&p) == Some(new1) && restarts(&p) == 1).then_some(())
    });
    let p2 = get_pod(&c, "p2").unwrap();
    assert_eq!(reported_pid(&p2), Some(pid2));
    assert_eq!(restarts(&p2), 0);
    wait_nodes_ready(&c, &["w1", "w2"]);

    // Deleting stops the process within the grace period (3 s), then the object goes.
    let t0 = Instant::now();
    let r = api(
        &c,
        "DELETE",
        "/api/v1/namespaces/default/pods/p2",
        Some(&json!({})),
    )
    .unwrap();
    assert!(r.status == 200 || r.status == 202, "{}", r.body);
    wait_until("p2 gone", T, || {
        let r = api(&c, "GET", "/api/v1/namespaces/default/pods/p2", None)?;
        (r.status == 404).then_some(())
    });
    assert!(!pid_alive(pid2), "p2's process stopped");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
}

fn count_sleepers(marker: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if comm.trim() == "sleep"
            && cmd.contains(marker)
            && pid_alive(e.file_name().to_str().unwrap_or("0").parse().unwrap_or(0))
        {
            n += 1;
        }
    }
    n
}

/// kill -9 of a worker leaves its processes running; the next worker adopts them (no
/// duplicate); SIGTERM of the worker stops them.
#[test]
fn a_restarted_worker_adopts_its_processes_and_sigterm_stops_them() {
    let mut c = start(42, 1);
    wait_nodes_ready(&c, &["w1"]);
    let body = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "s", "namespace": "default"},
        "spec": {
            "nodeName": "w1",
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "4242"]}]
        }
    });
    create_pod(&c, &body);
    let pid = wait_running(&c, "s");
    assert_eq!(count_sleepers("4242"), 1);

    c.kill("w1");
    std::thread::sleep(Duration::from_secs(2));
    assert!(pid_alive(pid), "the process survives its worker");
    c.start_node("w1");
    wait_until("worker back", T, || {
        (status_of(&format!("https://{}/livez", c.worker_addr("w1"))) == 200).then_some(())
    });
    // the restarted worker has taken the pod up again: it counts it running
    let metrics = format!("https://{}/metrics", c.worker_addr("w1"));
    wait_until("the restarted worker adopted the pod", T, || {
        let m = http("GET", &metrics, None).ok()?.body;
        m.lines()
            .any(|l| l == "ballast_worker_pods_running 1")
            .then_some(())
    });
    assert!(pid_alive(pid));
    assert_eq!(count_sleepers("4242"), 1, "no duplicate after the restart");
    assert_eq!(pod_processes(c.dir()).get("s"), Some(&pid));
    let p = get_pod(&c, "s").unwrap();
    assert_eq!(reported_pid(&p), Some(pid));
    assert_eq!(restarts(&p), 0);

    let (_, by_itself) = c.terminate("w1", Duration::from_secs(30));
    assert!(by_itself, "the worker stops on SIGTERM");
    assert!(
        !pid_alive(pid),
        "SIGTERM of the worker stops its pods' processes"
    );
    assert_eq!(count_sleepers("4242"), 0);
}

/// `kubectl logs` and `logs -f` show a pod's process output (through the master, which
/// proxies to the worker's `/containerLogs`).
#[test]
fn kubectl_logs_show_the_process_output() {
    let c = start(43, 2);
    wait_nodes_ready(&c, &["w1", "w2"]);
    let script =
        "echo hello from $HOSTNAME; i=0; while true; do echo line $i; i=$((i+1)); sleep 1; done";
    create_pod(&c, &pod_body("talker", "w2", script, 2));
    wait_running(&c, "talker");
    let k = Kubectl::new("1.33", &c.proxy_url(), c.dir());
    let text = wait_until("kubectl logs", T, || {
        let out = k.run(&["logs", "talker", "--tail=100"]);
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success() && s.contains("line 1")).then_some(s)
    });
    assert!(text.contains("hello from talker"), "{text}");
    let tail = k.ok(&["logs", "talker", "--tail=1"]);
    assert_eq!(tail.lines().count(), 1, "{tail}");
    let out = run(
        "timeout",
        &[
            "4",
            k.bin.to_str().unwrap(),
            "--kubeconfig",
            k.kubeconfig().to_str().unwrap(),
            "logs",
            "-f",
            "talker",
            "--tail=1",
        ],
    );
    let followed = String::from_utf8_lossy(&out.stdout);
    assert!(
        followed.lines().filter(|l| l.starts_with("line ")).count() >= 2,
        "logs -f streams: {followed}"
    );
}

/// A killed worker's node becomes NotReady and its deployment pods are replaced on the
/// other worker.
#[test]
fn a_lost_workers_pods_are_replaced() {
    let mut c = start(44, 2);
    wait_nodes_ready(&c, &["w1", "w2"]);
    let k = Kubectl::new("1.33", &c.proxy_url(), c.dir());
    let deploy = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: 4
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: busybox
        command: ["sh", "-c", "exec sleep 100000"]
"#;
    k.ok_stdin(&["apply", "-f", "-"], deploy);
    let pods = |node: &str| -> Vec<String> {
        let out = k.ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.phase}{\"\\n\"}{end}",
        ]);
        out.lines()
            .filter(|l| l.ends_with(" Running"))
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect()
    };
    wait_until("pods running on both workers", T, || {
        let (a, b) = (pods("w1"), pods("w2"));
        (!a.is_empty() && !b.is_empty() && a.len() + b.len() == 4).then_some(())
    });
    let w1_pids: Vec<u32> = wait_until("w1's processes recorded", T, || {
        let p = pod_processes(&c.dir().join("w1"));
        (!p.is_empty()).then(|| p.into_values().collect())
    });
    c.kill("w1");
    wait_until("w1 NotReady", T, || (!node_ready(&c, "w1")).then_some(()));
    wait_until("all 4 replicas on w2", Duration::from_secs(180), || {
        (pods("w2").len() == 4).then_some(())
    });
    // The processes of the lost worker kept running; when it comes back it stops them,
    // since their pods are no longer its own.
    assert!(w1_pids.iter().all(|p| pid_alive(*p)));
    c.start_node("w1");
    wait_until("w1's old processes stopped", T, || {
        w1_pids.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    wait_nodes_ready(&c, &["w1", "w2"]);
}

fn delete_pod_and_wait(c: &Cluster, name: &str) {
    let path = format!("/api/v1/namespaces/default/pods/{name}");
    let r = api(c, "DELETE", &path, Some(&json!({}))).unwrap();
    assert!(r.status == 200 || r.status == 202, "{}", r.body);
    wait_until(&format!("{name} gone"), T, || {
        (api(c, "GET", &path, None)?.status == 404).then_some(())
    });
}

/// `/proc/PID/stat` fields 5 and 6: process group and session.
fn group_and_session(pid: u32) -> (u32, u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (rest[2].parse().unwrap(), rest[3].parse().unwrap())
}

/// Pods are confined as far as a process runtime can: their own session and cgroup (a
/// process that starts a new session still ends with its container, on deletion and when
/// the main process exits), the user and group of `securityContext`, resource limits, and
/// exec probes that leave nothing behind.
#[test]
fn pods_are_confined_to_their_session_cgroup_user_and_limits() {
    let c = start(35, 1);
    wait_nodes_ready(&c, &["w1"]);
    // sleep durations that mark this run's processes (a failed run may leave some)
    let base = 1_000_000 + (std::process::id() % 100_000) * 10;
    let mark = |n: u32| (base + n).to_string();

    // runAsUser / runAsGroup, rlimits, a working directory of its own, limits
    let script = format!(
        "echo ids=$(id -u):$(id -g) nofile=$(ulimit -n) core=$(ulimit -c) cwd=$(pwd); \
         touch mine && echo wrote; exec sleep {}",
        mark(0)
    );
    let mut body = pod_body("runas", "w1", &script, 1);
    body["spec"]["securityContext"] = json!({"runAsUser": 65534, "runAsGroup": 65534});
    body["spec"]["containers"][0]["resources"] =
        json!({"limits": {"memory": "64Mi", "cpu": "250m"}});
    create_pod(&c, &body);
    let pid = wait_running(&c, "runas");
    let log = wait_until("runas log", T, || {
        let r = api(&c, "GET", "/api/v1/namespaces/default/pods/runas/log", None)?;
        (r.status == 200 && r.body.contains("wrote")).then_some(r.body)
    });
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1;
    assert!(log.contains("ids=65534:65534"), "{log}");
    assert!(
        log.contains(&format!("nofile={}", hard.min(65536))),
        "{log}"
    );
    assert!(log.contains("core=0"), "{log}");
    assert!(log.contains("cwd=") && log.contains("/main.work"), "{log}");
    assert_eq!(
        group_and_session(pid),
        (pid, pid),
        "its own session and group"
    );
    let pod = get_pod(&c, "runas").unwrap();
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2 = cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    assert!(v2.ends_with(&format!("/ballast-w1/{uid}/main")), "{cgroup}");
    // The pod's directory stays the worker's (passable, not writable, by the pod's user);
    // the container's own working directory is the user's.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = |p: &std::path::Path| std::fs::metadata(p).unwrap();
    let pods_dir = c.dir().join("w1").join("pods");
    let pod_dir = pods_dir.join(format!("default_runas_{uid}"));
    assert_eq!(meta(&pod_dir).permissions().mode() & 0o777, 0o711);
    assert_eq!(meta(&pod_dir).uid(), 0);
    assert_eq!(
        meta(&pod_dir.join("main.log")).permissions().mode() & 0o777,
        0o600
    );
    let work = pod_dir.join("main.work");
    assert_eq!(meta(&work).permissions().mode() & 0o777, 0o700);
    assert_eq!((meta(&work).uid(), meta(&work).gid()), (65534, 65534));
    assert!(
        work.join("mine").exists(),
        "the container wrote in its directory"
    );
    // Limits apply where the memory controller is the worker's, and are reported as not
    // enforced where it is not (this machine's cgroup v2 has no memory controller).
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .map(|l| l.split_whitespace().nth(4).unwrap().to_string())
        .unwrap();
    let memory_max = std::path::Path::new(&mount)
        .join(v2.trim_start_matches('/'))
        .join("memory.max");
    if memory_max.exists() {
        assert_eq!(
            std::fs::read_to_string(&memory_max).unwrap().trim(),
            "67108864"
        );
    } else {
        wait_until("a LimitsNotEnforced event", T, || {
            let r = api(&c, "GET", "/api/v1/namespaces/default/events", None)?;
            r.json()["items"]
                .as_array()?
                .iter()
                .any(|e| {
                    e["reason"] == "LimitsNotEnforced" && e["involvedObject"]["name"] == "runas"
                })
                .then_some(())
        });
    }

    // runAsNonRoot without a user would run as root here: refused, with the reason
    let mut body = pod_body("nonroot", "w1", "sleep 1", 1);
    body["spec"]["securityContext"] = json!({"runAsNonRoot": true});
    create_pod(&c, &body);
    let waiting = wait_until("nonroot waiting", T, || {
        let p = get_pod(&c, "nonroot")?;
        let w = p["status"]["containerStatuses"][0]["state"]["waiting"].clone();
        (w["reason"] == "CreateContainerConfigError").then_some(w)
    });
    assert!(
        waiting["message"]
            .as_str()
            .unwrap()
            .contains("runAsNonRoot"),
        "{waiting}"
    );

    // A process that leaves the container's session ends with the pod ...
    create_pod(
        &c,
        &pod_body(
            "escape",
            "w1",
            &format!("setsid sleep {} & exec sleep {}", mark(1), mark(2)),
            1,
        ),
    );
    wait_running(&c, "escape");
    wait_until("the escaped process runs", T, || {
        (count_sleepers(&mark(1)) == 1).then_some(())
    });
    delete_pod_and_wait(&c, "escape");
    wait_until(
        "the escaped process is gone",
        Duration::from_secs(10),
        || (count_sleepers(&mark(1)) == 0).then_some(()),
    );
    // ... and when its main process exits
    let mut body = pod_body(
        "leftover",
        "w1",
        &format!("setsid sleep {} & sleep 1; exit 0", mark(3)),
        1,
    );
    body["spec"]["restartPolicy"] = json!("Never");
    create_pod(&c, &body);
    wait_until("leftover Succeeded", T, || {
        (get_pod(&c, "leftover")?["status"]["phase"] == "Succeeded").then_some(())
    });
    wait_until(
        "what it left behind is gone",
        Duration::from_secs(10),
        || (count_sleepers(&mark(3)) == 0).then_some(()),
    );

    // An exec probe that times out takes what it started with it.
    let mut body = pod_body("probed", "w1", &format!("exec sleep {}", mark(5)), 1);
    body["spec"]["containers"][0]["readinessProbe"] = json!({
        "exec": {"command": ["sh", "-c", format!("sleep {} & sleep {}", mark(4), mark(6))]},
        "periodSeconds": 1, "timeoutSeconds": 1
    });
    create_pod(&c, &body);
    wait_running(&c, "probed");
    let probed_uid = get_pod(&c, "probed").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let probed_dir = pods_dir.join(format!("default_probed_{probed_uid}"));
    assert_eq!(
        meta(&probed_dir).permissions().mode() & 0o777,
        0o700,
        "a pod running as the worker keeps a private directory"
    );
    let mut most = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        most = most.max(count_sleepers(&mark(4)));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(most >= 1, "the probe ran");
    // one probe runs at a time, and one being killed may still show: a few at most (each
    // timed-out probe left one behind for good before, 8 in these 8 s)
    assert!(most <= 4, "timed-out probes left {most} processes behind");
    for name in ["runas", "nonroot", "probed", "leftover"] {
        delete_pod_and_wait(&c, name);
    }
    wait_until("every pod process gone", Duration::from_secs(10), || {
        (count_sleepers(&mark(0)) + count_sleepers(&mark(4)) + count_sleepers(&mark(5)) == 0)
            .then_some(())
    });
}

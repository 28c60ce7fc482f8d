//! In-process Raft group tests: three masters on `127.50.1.{1,2,3}` (address block 50).

use std::time::Duration;

use axum::Router;
use ballast_config::local::{local_cluster, AddressPlan};
use ballast_config::LoadedConfig;
use tokio_util::sync::CancellationToken;

use crate::store::{Command, Event, Precondition, StoreError};
use crate::Master;

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn put(key: &str) -> Command {
    Command::Put {
        key: key.into(),
        value: b"v".to_vec(),
        expect: Precondition::Any,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_watch_end_when_the_quorum_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = LoadedConfig {
        path: dir.path().join("ballast.toml"),
        config: local_cluster(3, 0, AddressPlan::block(50)),
        warnings: vec![],
    };
    ballast_config::pki::init(&loaded.pki_dir(), &loaded.config).unwrap();
    let mut masters = Vec::new();
    for m in &loaded.config.masters {
        let sd = CancellationToken::new();
        let h = Master::start(loaded.clone(), m.id.clone(), sd.clone())
            .await
            .expect("start master");
        let leadership = h.leadership.clone();
        let store = h.store();
        let serving = tokio::spawn(h.serve(Router::new()));
        masters.push((m.id.clone(), sd, leadership, store, serving));
    }
    let active = wait_for("exactly one active master", || {
        let a: Vec<usize> = (0..3).filter(|i| masters[*i].2.is_active()).collect();
        (a.len() == 1).then(|| a[0])
    })
    .await;
    let active_id = masters[active].0.clone();
    let leadership = masters[active].2.clone();
    let store = masters[active].3.clone();
    let token = wait_for("a leader token", || leadership.token()).await;
    assert_eq!(leadership.status().term, token.term());

    // Leader-only work starts on the active master and stops when leadership ends.
    let (runs_tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
    let work_shutdown = CancellationToken::new();
    let lw = leadership.clone();
    let ws = work_shutdown.clone();
    tokio::spawn(async move {
        lw.run_while_active(ws, move |tok| {
            let runs_tx = runs_tx.clone();
            async move {
                let _ = runs_tx.send(("start", tok.term()));
                tok.revoked().await;
                let _ = runs_tx.send(("stop", tok.term()));
            }
        })
        .await
    });
    let started = tokio::time::timeout(Duration::from_secs(10), runs.recv())
        .await
        .expect("leader-only work started");
    assert_eq!(started, Some(("start", token.term())));

    let mut watch = store.watch("/t/", 0).await.expect("watch on the active");
    store.write(put("/t/a")).await.expect("write on the active");
    let ev = watch.recv().await.unwrap().unwrap();
    assert!(matches!(ev, Event::Put { ref kv, .. } if kv.key == "/t/a"));
    assert!(store.get("/t/a").await.unwrap().is_some());

    // Concurrent writes are grouped into shared Raft entries, yet each gets its own
    // result: its own revision, or its own conflict.
    let writes = (0..200).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let key = format!("/t/many/{}", i % 100);
            let cmd = Command::Put {
                key: key.clone(),
                value: b"v".to_vec(),
                expect: Precondition::Absent,
            };
            (key, store.write(cmd).await.expect("write on the active"))
        })
    });
    let mut revisions = std::collections::BTreeSet::new();
    let mut created = std::collections::BTreeSet::new();
    let mut conflicts = 0;
    for w in writes.collect::<Vec<_>>() {
        match w.await.unwrap() {
            (key, crate::store::CommandResult::Ok { revision, .. }) => {
                assert!(revisions.insert(revision), "revision {revision} twice");
                assert!(created.insert(key.clone()), "{key} created twice");
                assert_eq!(
                    store.get(&key).await.unwrap().unwrap().create_revision,
                    revision
                );
            }
            (_, crate::store::CommandResult::Conflict { .. }) => conflicts += 1,
        }
    }
    assert_eq!((created.len(), conflicts), (100, 100));

    // Followers refuse reads and writes and name the active master.
    for (i, (_, _, _, s, _)) in masters.iter().enumerate() {
        if i == active {
            continue;
        }
        let want = Some(active_id.clone());
        let leader_known =
            |e: StoreError| matches!(e, StoreError::NotActive { ref leader } if *leader == want);
        assert!(leader_known(s.get("/t/a").await.unwrap_err()));
        assert!(leader_known(s.write(put("/t/b")).await.unwrap_err()));
        assert!(s.watch("/t/", 0).await.is_err());
    }

    // Stop both followers: the active loses its lease, its token is revoked and the
    // watch ends with NotActive; writes are refused promptly.
    for (i, m) in masters.iter().enumerate() {
        if i != active {
            m.1.cancel();
        }
    }
    tokio::time::timeout(Duration::from_secs(10), token.revoked())
        .await
        .expect("token revoked after the quorum is lost");
    assert!(!token.is_valid());
    let stopped = tokio::time::timeout(Duration::from_secs(10), runs.recv())
        .await
        .expect("leader-only work stopped");
    assert_eq!(stopped, Some(("stop", token.term())));
    work_shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), watch.recv())
        .await
        .expect("watch ends");
    assert!(
        matches!(end, Some(Err(StoreError::NotActive { .. }))),
        "{end:?}"
    );
    let started = std::time::Instant::now();
    let err = store.write(put("/t/c")).await.unwrap_err();
    assert!(matches!(err, StoreError::NotActive { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "write refusal was not prompt"
    );
    assert!(store.get("/t/a").await.is_err(), "read without a quorum");

    for m in &masters {
        m.1.cancel();
    }
    for m in masters {
        let _ = tokio::time::timeout(Duration::from_secs(10), m.4).await;
    }
}

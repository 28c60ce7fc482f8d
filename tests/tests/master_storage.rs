//! Storage faults: the active master's disk fills up; a master's `raft.redb` is cut short
//! or corrupted while it is stopped; a bit of its snapshot file flips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ballast_tests::*;

const LONG: Duration = Duration::from_secs(60);

/// A small tmpfs mounted on a master's data dir for the test's life.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        Self(dir.to_path_buf())
    }

    /// Fill the disk: write zeros until the file system refuses.
    fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.0.join("fill")).unwrap();
        let block = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = f.write_all(&block) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                return;
            }
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("fill")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn put(c: &Cluster, key: &str, value: &str) -> Option<u16> {
    let url = format!("{}/internal/kv/{key}", c.proxy_url());
    http_timeout("PUT", &url, Some(value), Duration::from_secs(10))
        .ok()
        .map(|r| r.status)
}

/// The active master's disk fills: it acknowledges nothing it could not persist, its Raft
/// stops and the process exits naming its data dir, another master takes over; started
/// again once space is freed (as `Restart=on-failure` would), it comes back as a follower
/// that has every write.
#[test]
fn a_full_disk_costs_the_active_its_role_and_no_acknowledged_write() {
    let mut c = Cluster::configure(ClusterOpts::new(47).proxy(true), |_| {});
    let disks: Vec<SmallDisk> = c
        .master_ids()
        .iter()
        .map(|m| SmallDisk::mount(&c.dir().join(m), "48m"))
        .collect();
    for id in c.node_ids() {
        c.start_node(&id);
    }
    let (full, _) = c.wait_one_active(LONG);
    let mut acked = Vec::new();
    for i in 0..20 {
        let key = format!("disk/{i:04}");
        wait_until("a write", LONG, || {
            (put(&c, &key, "v")? == 200).then_some(())
        });
        acked.push(key);
    }
    let disk = &disks[c.master_ids().iter().position(|m| *m == full).unwrap()];
    let filled = Instant::now();
    disk.fill();
    // Writes go on; each is either acknowledged (and then kept) or refused.
    let mut refused = 0;
    let mut i = 20;
    let new = loop {
        let key = format!("disk/{i:04}");
        i += 1;
        match put(&c, &key, "v") {
            Some(200) => acked.push(key),
            _ => refused += 1,
        }
        let a = c.active_masters();
        if a.len() == 1 && a[0].0 != full {
            break a[0].0.clone();
        }
        assert!(
            filled.elapsed() < LONG,
            "{full} still active with a full disk: {a:?}"
        );
    };
    println!(
        "{full}'s disk full → {new} active after {:.2} s ({refused} writes refused meanwhile)",
        filled.elapsed().as_secs_f64()
    );
    wait_until("the master with the full disk exits", LONG, || {
        (!c.is_running(&full)).then_some(())
    });
    let log = std::fs::read_to_string(c.log_path(&full)).unwrap();
    let data = c.dir().join(&full).display().to_string();
    assert!(
        log.lines().any(|l| l.contains("raft stopped")
            && l.contains("No space left on device")
            && l.contains(&data)),
        "{full}'s log names neither the cause nor its data dir"
    );
    for j in 0..10 {
        let key = format!("disk/after/{j}");
        wait_until("a write at the new active", LONG, || {
            (put(&c, &key, "v")? == 200).then_some(())
        });
        acked.push(key);
    }

    // Space freed: the next start serves again, as a follower with every write.
    disk.free();
    c.start_node(&full);
    let applied = |id: &str| c.master_gauge(id, "ballast_master_raft_applied_index");
    wait_until("the master with the freed disk caught up", LONG, || {
        let (leader, theirs) = (applied(&new)?, applied(&full)?);
        (theirs >= leader).then_some(())
    });
    assert!(c.is_running(&full), "{full} exited with space to write");
    for key in &acked {
        let r = c.read_kv(key);
        assert_eq!(r.status, 200, "acknowledged write {key} lost: {}", r.body);
    }
    c.kill(&new);
    let (next, _) = c.wait_one_active(LONG);
    println!("after the new active's kill, {next} is active");
    drop(c);
    drop(disks);
}

/// A stopped master's `raft.redb` cut short, or with bytes overwritten in its middle:
/// started again, it either refuses to start with an error naming the file, or runs
/// without having lost anything it had (its log reaches the leader's before it may vote:
/// here checked by every acknowledged write being readable after the others fail over to
/// it).
#[test]
fn a_damaged_raft_log_is_refused_by_name_or_loses_nothing() {
    let mut c = Cluster::start(ClusterOpts::new(48).proxy(true), |_| {});
    let (active, _) = c.wait_one_active(LONG);
    let victim = c.master_ids().into_iter().find(|m| *m != active).unwrap();
    let file = c.dir().join(&victim).join("raft.redb");
    let mut acked = Vec::new();
    for (round, damage) in ["truncate", "overwrite"].iter().enumerate() {
        for i in 0..30 {
            let key = format!("damage/{round}/{i:04}");
            wait_until("a write", LONG, || {
                (put(&c, &key, "v")? == 200).then_some(())
            });
            acked.push(key);
        }
        c.kill(&victim);
        let len = std::fs::metadata(&file).unwrap().len();
        match *damage {
            "truncate" => {
                let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                f.set_len(len / 2).unwrap();
            }
            _ => {
                use std::io::{Seek, SeekFrom, Write};
                let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                f.seek(SeekFrom::Start(len / 3)).unwrap();
                f.write_all(&vec![0xA5; 64 * 1024]).unwrap();
            }
        }
        let log_before = std::fs::read_to_string(c.log_path(&victim)).unwrap().len();
        c.start_node(&victim);
        std::thread::sleep(Duration::from_secs(3));
        let log = std::fs::read_to_string(c.log_path(&victim)).unwrap();
        let log = &log[log_before..];
        if c.is_running(&victim) {
            println!(
                "{damage}: {victim} started; its log: {}",
                log.lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        } else {
            println!(
                "{damage}: {victim} refused to start: {}",
                log.lines().last().unwrap_or("")
            );
            assert!(
                log.contains(&file.display().to_string()),
                "the error does not name {}:\n{log}",
                file.display()
            );
            // the operator's way back: the lost-data-dir path
            std::fs::remove_dir_all(c.dir().join(&victim)).unwrap();
            c.start_node(&victim);
        }
        let applied = |id: &str| c.master_gauge(id, "ballast_master_raft_applied_index");
        let (leader, _) = c.wait_one_active(LONG);
        wait_until("the damaged master caught up", LONG, || {
            (applied(&victim)? >= applied(&leader)?).then_some(())
        });
        // the others stop: the damaged master must win with everything acknowledged
        if leader != victim {
            c.kill(&leader);
            let (now, _) = c.wait_one_active(LONG);
            for key in &acked {
                let r = c.read_kv(key);
                assert_eq!(
                    r.status, 200,
                    "{damage}: acknowledged {key} lost at {now}: {}",
                    r.body
                );
            }
            c.start_node(&leader);
        }
    }
}

/// A digit inside a follower's snapshot file changes while it is stopped (the JSON still
/// parses, so only the checksum can tell): the master refuses to start, naming the file;
/// started again with its data dir moved away it catches up, and nothing acknowledged is
/// lost.
#[test]
fn a_damaged_snapshot_is_refused_by_name() {
    let mut c = Cluster::start(ClusterOpts::new(37).proxy(true), |cfg| {
        cfg.raft.snapshot_after_logs = 20;
    });
    let (active, _) = c.wait_one_active(LONG);
    let victim = c.master_ids().into_iter().find(|m| *m != active).unwrap();
    let file = c
        .dir()
        .join(&victim)
        .join("snapshots")
        .join("snapshot.json");
    let mut acked = Vec::new();
    for i in 0..60 {
        let key = format!("snap/{i:04}");
        wait_until("a write", LONG, || {
            (put(&c, &key, "1234567890")? == 200).then_some(())
        });
        acked.push(key);
    }
    wait_until("the follower took a snapshot", LONG, || {
        (c.master_gauge(&victim, "ballast_master_raft_snapshot_index")? > 0 && file.exists())
            .then_some(())
    });
    c.kill(&victim);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2
        + bytes[bytes.len() / 2..]
            .iter()
            .position(u8::is_ascii_digit)
            .expect("a digit in the second half of the snapshot");
    bytes[at] = if bytes[at] == b'7' { b'8' } else { b'7' };
    std::fs::write(&file, &bytes).unwrap();

    let log_before = std::fs::read_to_string(c.log_path(&victim)).unwrap().len();
    c.start_node(&victim);
    wait_until("the damaged master exits", LONG, || {
        (!c.is_running(&victim)).then_some(())
    });
    let log = std::fs::read_to_string(c.log_path(&victim)).unwrap();
    let log = &log[log_before..];
    println!(
        "{victim} refused to start: {}",
        log.lines().last().unwrap_or("")
    );
    assert!(
        log.contains(&file.display().to_string()) && log.contains("checksum"),
        "the error does not name {} and its checksum:\n{log}",
        file.display()
    );

    // The operator's way back: the lost-data-dir path.
    std::fs::remove_dir_all(c.dir().join(&victim)).unwrap();
    c.start_node(&victim);
    let applied = |id: &str| c.master_gauge(id, "ballast_master_raft_applied_index");
    wait_until("the damaged master caught up", LONG, || {
        (applied(&victim)? >= applied(&active)?).then_some(())
    });
    c.kill(&active);
    let (now, _) = c.wait_one_active(LONG);
    for key in &acked {
        let r = c.read_kv(key);
        assert_eq!(
            r.status, 200,
            "acknowledged {key} lost at {now}: {}",
            r.body
        );
        assert_eq!(r.json()["value"], "1234567890", "{key} at {now}");
    }
}

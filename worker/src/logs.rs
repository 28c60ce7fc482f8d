//! Container log files: where they live, size-bounded rotation, tail and follow.
//!
//! A container's stdout and stderr go straight to `<container>.log` (opened `O_APPEND`),
//! so the process never depends on the worker to write its output and survives a worker
//! crash. Rotation is copy-and-truncate: when the file grows past `max_log_bytes`, its
//! last `max_log_bytes` bytes are copied to `<container>.log.1` and the file is truncated;
//! the writer keeps appending at the new end. At most `2 × max_log_bytes` per container.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// The directory of one pod's logs under the worker's data dir.
pub(crate) fn pod_dir(data_dir: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    data_dir
        .join("pods")
        .join(format!("{namespace}_{name}_{uid}"))
}

/// The live log file of one container.
pub(crate) fn container_log(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.log"))
}

/// The rotated log file of one container.
pub(crate) fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Open the log file for a new process (append, create).
/// Open a container's log for appending; its directory is made 0700 and the file 0600
/// (a pod's output is its own business, not every local user's).
pub(crate) fn open_for_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(d) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The last `n` lines of `data` (a final line without `\n` counts as a line).
pub(crate) fn tail_lines(data: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &data[data.len()..];
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

/// Rotate `path` if it is larger than `max` bytes; returns whether it did.
pub(crate) fn rotate_if_needed(path: &Path, max: u64) -> io::Result<bool> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    let keep = max.min(len);
    f.seek(SeekFrom::Start(len - keep))?;
    let mut buf = Vec::with_capacity(keep as usize);
    Read::by_ref(&mut f).take(keep).read_to_end(&mut buf)?;
    let dest = rotated(path);
    let tmp = dest.with_extension("tmp");
    {
        let mut out = File::create(&tmp)?;
        out.write_all(&buf)?;
    }
    fs::rename(&tmp, &dest)?;
    // Bytes written between the read and here are lost; rotation is rare.
    f.set_len(0)?;
    Ok(true)
}

/// The log of a container: rotated part then live part, optionally only the last lines.
pub(crate) fn read_log(path: &Path, tail: Option<usize>) -> io::Result<(Vec<u8>, u64)> {
    let mut data = fs::read(rotated(path)).unwrap_or_default();
    let live = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !data.is_empty() => Vec::new(),
        Err(e) => return Err(e),
    };
    let offset = live.len() as u64;
    data.extend_from_slice(&live);
    let out = match tail {
        Some(n) => tail_lines(&data, n).to_vec(),
        None => data,
    };
    Ok((out, offset))
}

/// Read what was appended to `path` since `offset`; a shorter file (rotated) restarts at 0.
pub(crate) fn read_new(path: &Path, offset: &mut u64) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len < *offset {
        *offset = 0;
    }
    if len == *offset {
        return Ok(Vec::new());
    }
    f.seek(SeekFrom::Start(*offset))?;
    let mut buf = Vec::new();
    f.take(len - *offset).read_to_end(&mut buf)?;
    *offset += buf.len() as u64;
    Ok(buf)
}

/// Whether a followed log may still grow.
pub(crate) type StillWriting = Arc<dyn Fn() -> bool + Send + Sync>;

/// The body of `follow=true`: the (tailed) log, then whatever is appended, until
/// `still_writing` says the container is done (or the client goes away).
pub(crate) fn follow(
    path: PathBuf,
    tail: Option<usize>,
    still_writing: StillWriting,
) -> impl futures::Stream<Item = Result<Bytes, io::Error>> + Send {
    enum St {
        Start,
        Polling(u64),
        Done,
    }
    futures::stream::unfold(St::Start, move |st| {
        let path = path.clone();
        let still_writing = still_writing.clone();
        async move {
            match st {
                St::Start => match read_log(&path, tail) {
                    Ok((data, off)) => Some((Ok(Bytes::from(data)), St::Polling(off))),
                    // Not started yet: follow from the beginning.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Some((Ok(Bytes::new()), St::Polling(0)))
                    }
                    Err(e) => Some((Err(e), St::Done)),
                },
                St::Polling(mut off) => loop {
                    let writing = still_writing();
                    match read_new(&path, &mut off) {
                        Ok(d) if !d.is_empty() => {
                            return Some((Ok(Bytes::from(d)), St::Polling(off)))
                        }
                        Ok(_) if !writing => return None,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound && writing => {}
                        Err(_) => return None,
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                },
                St::Done => None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_private_to_the_worker() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("pods").join("default_p_u").join("c.log");
        drop(open_for_append(&path).unwrap());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }

    #[test]
    fn tails() {
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail_lines(b"a\nb\n", 0), b"");
        assert_eq!(tail_lines(b"", 3), b"");
        assert_eq!(tail_lines(b"one\n", 1), b"one\n");
    }

    #[test]
    fn rotation_bounds_the_files_and_keeps_the_newest_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = container_log(d.path(), "c");
        let mut f = open_for_append(&p).unwrap();
        f.write_all(b"0123456789abcdef").unwrap();
        assert!(!rotate_if_needed(&p, 16).unwrap());
        f.write_all(b"XYZ").unwrap();
        assert!(rotate_if_needed(&p, 16).unwrap());
        assert_eq!(fs::read(rotated(&p)).unwrap(), b"3456789abcdefXYZ");
        assert_eq!(fs::metadata(&p).unwrap().len(), 0);
        // The writer (O_APPEND) continues at the start of the truncated file.
        f.write_all(b"next\n").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"next\n");
        let (all, off) = read_log(&p, None).unwrap();
        assert_eq!(all, b"3456789abcdefXYZnext\n");
        assert_eq!(off, 5);
        let (last, _) = read_log(&p, Some(1)).unwrap();
        assert_eq!(last, b"3456789abcdefXYZnext\n");
        assert!(!rotate_if_needed(&d.path().join("missing.log"), 1).unwrap());
    }

    #[test]
    fn read_new_follows_appends_and_rotation() {
        let d = tempfile::tempdir().unwrap();
        let p = container_log(d.path(), "c");
        let mut f = open_for_append(&p).unwrap();
        f.write_all(b"hello\n").unwrap();
        let mut off = 0;
        assert_eq!(read_new(&p, &mut off).unwrap(), b"hello\n");
        assert_eq!(read_new(&p, &mut off).unwrap(), b"");
        f.write_all(b"world\n").unwrap();
        assert_eq!(read_new(&p, &mut off).unwrap(), b"world\n");
        rotate_if_needed(&p, 4).unwrap();
        f.write_all(b"x\n").unwrap();
        assert_eq!(read_new(&p, &mut off).unwrap(), b"x\n");
    }

    #[tokio::test]
    async fn follow_ends_when_the_writer_is_done() {
        use futures::StreamExt;
        let d = tempfile::tempdir().unwrap();
        let p = container_log(d.path(), "c");
        let mut f = open_for_append(&p).unwrap();
        f.write_all(b"a\nb\n").unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        let s = follow(
            p.clone(),
            Some(1),
            Arc::new(move || !d2.load(std::sync::atomic::Ordering::SeqCst)),
        );
        let mut s = Box::pin(s);
        assert_eq!(s.next().await.unwrap().unwrap(), Bytes::from_static(b"b\n"));
        f.write_all(b"c\n").unwrap();
        assert_eq!(s.next().await.unwrap().unwrap(), Bytes::from_static(b"c\n"));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(s.next().await.is_none());
    }
}

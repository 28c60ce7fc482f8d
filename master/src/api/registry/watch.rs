//! Watches over a collection: store events filtered by the selectors and turned into
//! Kubernetes watch events (an object leaving the selection is DELETED, one entering ADDED).

use super::*;

impl Registry {
    /// Watch a collection. Events are filtered by the selectors (an object leaving the
    /// selection is sent as DELETED, one entering as ADDED). The channel ends at the
    /// timeout, when the receiver is dropped, or after an ERROR event.
    pub(crate) async fn watch(
        &self,
        def: &'static ResourceDef,
        ns: Option<&str>,
        opts: WatchOptions,
    ) -> Result<mpsc::Receiver<WatchEvent>, ApiError> {
        let prefix = Self::prefix(def, ns);
        let (tx, rx) = mpsc::channel(256);
        let mut initial = Vec::new();
        let start = match opts.resource_version {
            Some(r) if r > 0 => r,
            _ => {
                let r = self.store.range(&prefix, None, 0).await?;
                for kv in &r.kvs {
                    let o = Self::decode(def, kv)?;
                    if opts.label_selector.matches_object(&o) && opts.field_selector.matches(&o) {
                        initial.push(WatchEvent {
                            kind: WatchEventType::Added,
                            object: o,
                        });
                    }
                }
                r.revision
            }
        };
        let mut events = match self.store.watch(&prefix, start).await {
            Ok(e) => e,
            Err(e @ StoreError::Compacted { .. }) => {
                let _ = tx.try_send(WatchEvent {
                    kind: WatchEventType::Error,
                    object: ApiError::from(e).status(),
                });
                return Ok(rx);
            }
            Err(e) => return Err(e.into()),
        };
        tokio::spawn(async move {
            for ev in initial {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
            let bookmark_every = opts.bookmark_interval.unwrap_or(Duration::from_secs(30));
            let mut last_rev = start;
            let matches =
                |o: &Value| opts.label_selector.matches_object(o) && opts.field_selector.matches(o);
            let needle = opts.field_selector.required_json();
            loop {
                let sleep_until = deadline.unwrap_or_else(|| {
                    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
                });
                tokio::select! {
                    _ = tokio::time::sleep_until(sleep_until) => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(bookmark_every), if opts.allow_bookmarks => {
                        let bm = WatchEvent {
                            kind: WatchEventType::Bookmark,
                            object: json!({"kind": def.kind, "apiVersion": def.api_version(),
                                "metadata": {"resourceVersion": last_rev.to_string()}}),
                        };
                        if tx.send(bm).await.is_err() {
                            return;
                        }
                    }
                    ev = events.recv() => {
                        let ev = match ev {
                            None => return,
                            // Leadership lost: end the stream like a stopping API server
                            // does; clients re-watch (through the proxy, on the new active).
                            Some(Err(StoreError::NotActive { .. } | StoreError::Timeout)) => return,
                            Some(Err(e)) => {
                                let _ = tx.send(WatchEvent { kind: WatchEventType::Error, object: ApiError::from(e).status() }).await;
                                return;
                            }
                            Some(Ok(ev)) => ev,
                        };
                        last_rev = ev.revision();
                        let out = match convert_event(def, &ev, needle.as_deref(), &matches) {
                            Ok(Some(e)) => e,
                            Ok(None) => continue,
                            Err(e) => WatchEvent { kind: WatchEventType::Error, object: e.status() },
                        };
                        if tx.send(out).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

pub(super) fn convert_event(
    def: &ResourceDef,
    ev: &Event,
    needle: Option<&[u8]>,
    matches: &dyn Fn(&Value) -> bool,
) -> Result<Option<WatchEvent>, ApiError> {
    // An object whose JSON lacks the selector's required bytes cannot match: skip
    // decoding it (most events, when each node watches only its own pods).
    let may_match =
        |kv: &KeyValue| needle.is_none_or(|n| memchr::memmem::find(&kv.value, n).is_some());
    Ok(match ev {
        Event::Put { kv, prev } => {
            let old_matched = match prev {
                Some(p) if may_match(p) => matches(&Registry::decode(def, p)?),
                _ => false,
            };
            if !old_matched && !may_match(kv) {
                return Ok(None);
            }
            let new = Registry::decode(def, kv)?;
            let kind = match (old_matched, matches(&new)) {
                (false, true) => WatchEventType::Added,
                (true, true) => WatchEventType::Modified,
                (true, false) => WatchEventType::Deleted,
                (false, false) => return Ok(None),
            };
            Some(WatchEvent { kind, object: new })
        }
        Event::Delete { prev, revision } => {
            if !may_match(prev) {
                return Ok(None);
            }
            let mut o = Registry::decode(def, prev)?;
            meta_mut(&mut o).insert("resourceVersion".into(), json!(revision.to_string()));
            matches(&o).then_some(WatchEvent {
                kind: WatchEventType::Deleted,
                object: o,
            })
        }
    })
}

//! Namespace lifecycle: the default namespaces, refusing new content in a terminating
//! namespace, and removing one once its content is gone.

use super::*;

impl Registry {
    pub(super) async fn check_namespace_open(&self, ns: &str) -> Result<(), ApiError> {
        match self.get(&NAMESPACES, None, ns).await {
            Ok(n) => {
                if n.pointer("/metadata/deletionTimestamp").is_some() {
                    Err(ApiError::Forbidden(format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    )))
                } else {
                    Ok(())
                }
            }
            Err(e) if e.is_not_found() && DEFAULT_NAMESPACES.contains(&ns) => {
                ensure_defaults(self.store.as_ref()).await?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Remove a terminating namespace once nothing is left in it.
    pub(super) async fn remove_namespace_if_done(&self, ns: &str) -> Result<(), ApiError> {
        let Some(kv) = self.store.get(&Self::key(&NAMESPACES, None, ns)).await? else {
            return Ok(());
        };
        let n = Self::decode(&NAMESPACES, &kv)?;
        if n.pointer("/metadata/deletionTimestamp").is_none() || !finalizers(&n).is_empty() {
            return Ok(());
        }
        for def in resources::ALL.iter().filter(|d| d.namespaced) {
            if !self
                .store
                .range(&Self::prefix(def, Some(ns)), None, 1)
                .await?
                .kvs
                .is_empty()
            {
                return Ok(());
            }
        }
        self.store
            .write(Command::Delete {
                key: kv.key,
                expect: Precondition::ModRevision(kv.mod_revision),
            })
            .await?;
        Ok(())
    }

    pub(super) async fn delete_namespace(
        &self,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        if UNDELETABLE_NAMESPACES.contains(&name) {
            return Err(ApiError::Forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        if !opts.dry_run.is_empty() {
            return self.get(&NAMESPACES, None, name).await;
        }
        let marked = self
            .update_with(&NAMESPACES, None, name, |o| {
                if o.pointer("/metadata/deletionTimestamp").is_none() {
                    meta_mut(o).insert("deletionTimestamp".into(), json!(now_rfc3339()));
                    meta_mut(o).insert("deletionGracePeriodSeconds".into(), json!(0));
                }
                o["status"] = json!({"phase": "Terminating"});
                Ok(())
            })
            .await?;
        self.finalize_namespace(name).await?;
        Ok(marked)
    }

    /// Delete the content of a terminating namespace; remove it once empty.
    /// Returns whether the namespace is gone.
    pub(crate) async fn finalize_namespace(&self, name: &str) -> Result<bool, ApiError> {
        let mut remaining = 0;
        for def in resources::ALL.iter().filter(|d| d.namespaced) {
            let items = self
                .list(def, Some(name), &ListOptions::default())
                .await?
                .items;
            for o in items {
                let n = meta_str(&o, "name").unwrap_or_default().to_string();
                match self
                    .delete_object(def, Some(name), &n, &DeleteOptions::default())
                    .await
                {
                    // Still there: graceful pod deletion or finalizers pending.
                    Ok(_) => {
                        if self.get(def, Some(name), &n).await.is_ok() {
                            remaining += 1;
                        }
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if remaining > 0 {
            return Ok(false);
        }
        let (cur, rev) = match self.get_kv(&NAMESPACES, None, name).await {
            Ok(x) => x,
            Err(e) if e.is_not_found() => return Ok(true),
            Err(e) => return Err(e),
        };
        if cur.pointer("/metadata/deletionTimestamp").is_none() || !finalizers(&cur).is_empty() {
            return Ok(false);
        }
        self.store
            .write(Command::Delete {
                key: Self::key(&NAMESPACES, None, name),
                expect: Precondition::ModRevision(rev),
            })
            .await?;
        Ok(true)
    }
}

/// Create the default namespaces and the bootstrap RBAC policy when absent (idempotent).
pub(crate) async fn ensure_defaults(store: &dyn Store) -> Result<(), ApiError> {
    for ns in DEFAULT_NAMESPACES {
        let o = json!({
            "kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        create_if_absent(store, &NAMESPACES, o).await?;
    }
    use crate::auth::bootstrap;
    for o in bootstrap::cluster_roles() {
        create_if_absent(store, &super::resources::CLUSTERROLES, o).await?;
    }
    for o in bootstrap::cluster_role_bindings() {
        create_if_absent(store, &super::resources::CLUSTERROLEBINDINGS, o).await?;
    }
    Ok(())
}

/// Store cluster-scoped object `o` (with a new uid and creation time) unless one of its
/// name exists: what an operator changed stays.
pub(super) async fn create_if_absent(
    store: &dyn Store,
    def: &ResourceDef,
    mut o: Value,
) -> Result<(), ApiError> {
    let name = meta_str(&o, "name").unwrap_or_default().to_string();
    let key = Registry::key(def, None, &name);
    if store.get(&key).await?.is_some() {
        return Ok(());
    }
    let meta = meta_mut(&mut o);
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
    // a concurrent creator winning the race is as good as this write
    store
        .write(Command::Put {
            key,
            value: serde_json::to_vec(&o).unwrap_or_default(),
            expect: Precondition::Absent,
        })
        .await?;
    Ok(())
}

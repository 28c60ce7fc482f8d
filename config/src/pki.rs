//! The cluster's PKI: one CA and a certificate + key for every identity, made with rcgen.
//!
//! Layout of a PKI directory (the contract's `DIR/pki`): `ca.crt` + `ca.key` (the cluster
//! CA), and `<name>.crt` + `<name>.key` for every identity: each master (`m1`..), the
//! proxy (`proxy`), each worker (`w1`..) and `admin`. PEM; keys are written mode 0600
//! (the directory 0700). [`init`] never replaces a file that exists, so running it again
//! (as every `ballast up` does) keeps the PKI and only adds what a grown config needs.
//!
//! Who is who: an identity's user is its certificate's CN, its groups the O entries
//! (kube-apiserver's convention):
//!
//! | identity | CN | O | serves (SANs) |
//! | --- | --- | --- | --- |
//! | master `mI` | `master:mI` | `ballast:masters` | its API and peer IPs, `mI.<zone>`, `api.<zone>`, the proxy's names |
//! | proxy | `proxy:<id>` | `ballast:proxies` | its API IP (and the VIP's), `api.<zone>`, `proxy.<zone>` |
//! | worker `wI` | `system:node:wI` | `system:nodes` | its IP, `wI` |
//! | admin | `admin` | `system:masters` | — (client only) |
//!
//! Masters carry the proxy's names too so that a client of the proxy's L4 (`tcp`) mode,
//! which sees the master's certificate, verifies it against the address it dialed.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::schema::ClusterConfig;

/// The group of every master's certificate: peers accept only these.
pub const MASTERS_GROUP: &str = "ballast:masters";
/// The group of every proxy's certificate: masters trust `X-Remote-User` only from these.
pub const PROXIES_GROUP: &str = "ballast:proxies";
/// The group of every worker's certificate (kube's node group).
pub const NODES_GROUP: &str = "system:nodes";
/// The group that may do anything (kube's `system:masters`).
pub const SUPERUSER_GROUP: &str = "system:masters";

/// The CN of master `id`'s certificate.
pub fn master_user(id: &str) -> String {
    format!("master:{id}")
}

/// The CN of proxy `id`'s certificate.
pub fn proxy_user(id: &str) -> String {
    format!("proxy:{id}")
}

/// The CN of worker `id`'s certificate (kube's node user).
pub fn node_user(id: &str) -> String {
    format!("system:node:{id}")
}

/// How long issued certificates are valid. Rotation is by issuing again.
const VALID_DAYS: i64 = 3650;

/// A PKI operation that failed. None is helped by retrying unchanged: a file has to be
/// fixed, removed or made writable.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable {what}: {source}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot make the certificate of {name}: {source}")]
    Issue {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{dir}: has {present} but not {missing}; restore it or remove both to make a new CA")]
    HalfCa {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("invalid identity name `{0}`: use letters, digits, '-', '_' or '.'")]
    BadName(String),
}

/// What to put in one identity's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySpec {
    /// File stem in the PKI directory (`m1`, `proxy`, `w1`, `admin`).
    pub name: String,
    /// The user (CN).
    pub user: String,
    /// The groups (O entries).
    pub groups: Vec<String>,
    /// DNS names this identity serves (empty for a client-only identity).
    pub dns_names: Vec<String>,
    /// IP addresses this identity serves.
    pub ips: Vec<IpAddr>,
}

impl IdentitySpec {
    /// A client-only identity (a user such as `admin`).
    pub fn client(name: &str, user: &str, groups: &[&str]) -> Self {
        Self {
            name: name.into(),
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            dns_names: Vec::new(),
            ips: Vec::new(),
        }
    }

    fn serves(&self) -> bool {
        !self.dns_names.is_empty() || !self.ips.is_empty()
    }
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

/// Every identity a cluster config needs: each master, the proxy, each worker, `admin`.
pub fn identities(c: &ClusterConfig) -> Vec<IdentitySpec> {
    let zone = c.proxy.dns_zone.trim_end_matches('.');
    let api_name = format!("api.{zone}");
    let proxy_name = format!("proxy.{zone}");
    let mut out = Vec::new();
    // every address a client may reach a proxy at: the one proxy's, or the VIP and each
    // of several proxies' own
    let mut proxy_ips = vec![c.proxy.api.ip()];
    for p in &c.proxies {
        push_unique(&mut proxy_ips, p.api.ip());
    }
    if let Some(v) = &c.vip {
        push_unique(&mut proxy_ips, v.address);
    }
    for m in &c.masters {
        let mut ips = Vec::new();
        push_unique(&mut ips, m.api.ip());
        push_unique(&mut ips, m.peer.ip());
        for ip in &proxy_ips {
            push_unique(&mut ips, *ip);
        }
        out.push(IdentitySpec {
            name: m.id.clone(),
            user: master_user(&m.id),
            groups: vec![MASTERS_GROUP.into()],
            dns_names: vec![
                format!("{}.{zone}", m.id),
                m.id.clone(),
                api_name.clone(),
                proxy_name.clone(),
            ],
            ips,
        });
    }
    if c.proxies.is_empty() {
        out.push(IdentitySpec {
            name: c.proxy.id.clone(),
            user: proxy_user(&c.proxy.id),
            groups: vec![PROXIES_GROUP.into()],
            dns_names: vec![api_name.clone(), proxy_name.clone()],
            ips: proxy_ips.clone(),
        });
    }
    for p in &c.proxies {
        // its own address, and the VIP's (any of them may hold it)
        let mut ips = vec![p.api.ip(), c.proxy.api.ip()];
        if let Some(v) = &c.vip {
            push_unique(&mut ips, v.address);
        }
        ips.dedup();
        out.push(IdentitySpec {
            name: p.id.clone(),
            user: proxy_user(&p.id),
            groups: vec![PROXIES_GROUP.into()],
            dns_names: vec![
                api_name.clone(),
                proxy_name.clone(),
                format!("{}.{zone}", p.id),
            ],
            ips,
        });
    }
    for w in &c.workers {
        out.push(IdentitySpec {
            name: w.id.clone(),
            user: node_user(&w.id),
            groups: vec![NODES_GROUP.into()],
            dns_names: vec![w.id.clone()],
            ips: vec![w.address.ip()],
        });
    }
    out.push(IdentitySpec::client("admin", "admin", &[SUPERUSER_GROUP]));
    out
}

/// The cluster CA, able to issue certificates.
pub struct CertAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertAuthority {
    /// Load `dir/ca.crt` + `dir/ca.key`, or make a new CA there when neither exists.
    /// Returns whether it was made.
    pub fn load_or_create(dir: &Path, cluster_name: &str) -> Result<(Self, bool), PkiError> {
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        match (crt.exists(), key.exists()) {
            (true, true) => Ok((Self::load(&crt, &key)?, false)),
            (false, false) => {
                make_dir(dir)?;
                let ca = Self::create(cluster_name)?;
                write_file(&key, ca.issuer.key().serialize_pem().as_bytes(), 0o600)?;
                write_file(&crt, ca.cert_pem.as_bytes(), 0o644)?;
                Ok((ca, true))
            }
            (true, false) => Err(PkiError::HalfCa {
                dir: dir.into(),
                present: "ca.crt",
                missing: "ca.key",
            }),
            (false, true) => Err(PkiError::HalfCa {
                dir: dir.into(),
                present: "ca.key",
                missing: "ca.crt",
            }),
        }
    }

    /// Load a CA from its certificate and key files.
    pub fn load(crt: &Path, key: &Path) -> Result<Self, PkiError> {
        let cert_pem = read_text(crt)?;
        let key_pair = KeyPair::from_pem(&read_text(key)?).map_err(|source| PkiError::Parse {
            path: key.into(),
            what: "private key",
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(|source| PkiError::Parse {
                path: crt.into(),
                what: "CA certificate",
                source,
            })?;
        Ok(Self { cert_pem, issuer })
    }

    fn create(cluster_name: &str) -> Result<Self, PkiError> {
        let fail = |source| PkiError::Issue {
            name: "ca".into(),
            source,
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{cluster_name}-ca"));
        dn.push(DnType::OrganizationName, "ballast");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params);
        let key = KeyPair::generate().map_err(fail)?;
        let cert = params.self_signed(&key).map_err(fail)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issue a certificate for `spec` with a new key: `(certificate PEM, key PEM)`.
    pub fn issue(&self, spec: &IdentitySpec) -> Result<(String, String), PkiError> {
        let fail = |source| PkiError::Issue {
            name: spec.name.clone(),
            source,
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.user.as_str());
        for g in &spec.groups {
            dn.push(DnType::OrganizationName, g.as_str());
        }
        params.distinguished_name = dn;
        for name in &spec.dns_names {
            let name = name.as_str().try_into().map_err(fail)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if spec.serves() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let key = KeyPair::generate().map_err(fail)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issue `spec` into `dir/<name>.crt` + `.key` unless the certificate exists.
    /// Returns whether it was written.
    pub fn issue_into(&self, dir: &Path, spec: &IdentitySpec) -> Result<bool, PkiError> {
        check_name(&spec.name)?;
        let (crt, key) = identity_paths(dir, &spec.name);
        if crt.exists() && key.exists() {
            return Ok(false);
        }
        let (cert_pem, key_pem) = self.issue(spec)?;
        write_file(&key, key_pem.as_bytes(), 0o600)?;
        write_file(&crt, cert_pem.as_bytes(), 0o644)?;
        Ok(true)
    }
}

fn set_validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // a little slack for clocks a few minutes behind the issuer's
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

/// `dir/<name>.crt` and `dir/<name>.key`.
pub fn identity_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.into()))
    }
}

/// What [`init`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub ca_created: bool,
    /// Identities whose certificate was written now (the others existed).
    pub issued: Vec<String>,
}

/// Make `dir` hold the CA and a certificate for every identity of `config` (see
/// [`identities`]), keeping every file that exists.
pub fn init(dir: &Path, config: &ClusterConfig) -> Result<InitReport, PkiError> {
    let (ca, ca_created) = CertAuthority::load_or_create(dir, &config.cluster.name)?;
    let mut report = InitReport {
        ca_created,
        issued: Vec::new(),
    };
    for spec in identities(config) {
        if ca.issue_into(dir, &spec)? {
            report.issued.push(spec.name);
        }
    }
    Ok(report)
}

/// A kubeconfig for `user` (the files of identity `name` in `dir`) reaching the API at
/// `server` (`https://...`), with the CA and the client certificate embedded.
pub fn kubeconfig(
    dir: &Path,
    name: &str,
    cluster_name: &str,
    server: &str,
) -> Result<String, PkiError> {
    use base64::Engine as _;
    let b64 = |p: &Path| read_text(p).map(|t| base64::engine::general_purpose::STANDARD.encode(t));
    let (crt, key) = identity_paths(dir, name);
    let (ca, crt, key) = (b64(&dir.join("ca.crt"))?, b64(&crt)?, b64(&key)?);
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster_name}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: {name}\n  user:\n    client-certificate-data: {crt}\n    client-key-data: {key}\n\
         contexts:\n- name: {name}@{cluster_name}\n  context:\n    cluster: {cluster_name}\n    user: {name}\n    namespace: default\n\
         current-context: {name}@{cluster_name}\npreferences: {{}}\n"
    ))
}

/// Write a kubeconfig (it holds a private key: mode 0600).
pub fn write_kubeconfig(path: &Path, text: &str) -> Result<(), PkiError> {
    write_file(path, text.as_bytes(), 0o600)
}

fn make_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            path: dir.into(),
            source,
        })
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.into(),
        source,
    })
}

/// Write a whole file with `mode` from its creation on (a key is never readable by
/// others, not even for an instant), through a temporary name and a rename.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.into(),
        source,
    };
    if let Some(parent) = path.parent() {
        make_dir(parent)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{local_cluster, AddressPlan};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_makes_every_identity_once_and_keeps_files() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let c = local_cluster(3, 2, AddressPlan::default());
        let first = init(&pki, &c).unwrap();
        assert!(first.ca_created);
        assert_eq!(
            first.issued,
            ["m1", "m2", "m3", "proxy", "w1", "w2", "admin"]
        );
        for name in ["ca", "m1", "proxy", "w2", "admin"] {
            let key = pki.join(format!("{name}.key"));
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let m1 = fs::read(pki.join("m1.crt")).unwrap();
        let again = init(&pki, &c).unwrap();
        assert_eq!(again, InitReport::default());
        assert_eq!(fs::read(pki.join("m1.crt")).unwrap(), m1, "kept as it was");

        // a grown config gets only what is new
        let bigger = local_cluster(3, 3, AddressPlan::default());
        assert_eq!(init(&pki, &bigger).unwrap().issued, ["w3"]);
    }

    #[test]
    fn a_ca_without_its_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = local_cluster(1, 0, AddressPlan::default());
        init(dir.path(), &c).unwrap();
        fs::remove_file(dir.path().join("ca.key")).unwrap();
        let e = init(dir.path(), &c).unwrap_err();
        assert!(matches!(e, PkiError::HalfCa { .. }), "{e}");
    }

    #[test]
    fn names_cannot_leave_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let c = local_cluster(1, 0, AddressPlan::default());
        let (ca, _) = CertAuthority::load_or_create(dir.path(), "t").unwrap();
        let _ = init(dir.path(), &c).unwrap();
        for bad in ["../x", "a/b", "", ".hidden"] {
            let spec = IdentitySpec::client(bad, "u", &[]);
            assert!(matches!(
                ca.issue_into(dir.path(), &spec),
                Err(PkiError::BadName(_))
            ));
        }
    }
}

//! TLS for every Ballast listener and client (rustls, ring): a node's certificate, key and
//! the cluster CA loaded once into server and client configurations, and the identity
//! (user = CN, groups = O) a verified peer certificate carries.
//!
//! Servers and clients verify against the cluster CA only, never the system roots.
//! Clients verify the server's name as they dialed it (an IP SAN, or a DNS SAN), except
//! [`NodeTls::client_config_for_name`], which pins the name to verify for a client that
//! dials an address it learned elsewhere (a DNS answer) while the service keeps one name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Loading TLS material failed. Retrying unchanged does not help: the files have to be
/// made (`ballast pki init`) or fixed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source} (make the cluster's certificates with `ballast pki init --config FILE`)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {what} in it (PEM expected)")]
    Pem { path: PathBuf, what: &'static str },
    #[error("{path}: {source}")]
    Rustls {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS verifier: {0}")]
    Verifier(String),
}

/// The one crypto provider of every Ballast TLS configuration.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A certificate from the cluster CA may be offered; clients without one still connect
    /// (bearer tokens, anonymous health checks).
    Optional,
    /// A certificate from the cluster CA is required: the handshake fails without one.
    Required,
}

/// One node's TLS material: its certificate chain and key, and the cluster CA.
#[derive(Clone)]
pub struct NodeTls {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The files it came from, for error messages.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub ca_path: PathBuf,
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("cert", &self.cert_path)
            .field("ca", &self.ca_path)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// The certificates of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// A root store holding the CA certificates of `path`.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|source| TlsError::Rustls {
            path: path.into(),
            source,
        })?;
    }
    Ok(roots)
}

impl NodeTls {
    /// Load a certificate chain, its key and the CA.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let chain = load_certs(cert)?;
        let key_pem = read(key)?;
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::Pem {
            path: key.into(),
            what: "private key",
        })?;
        let roots = load_roots(ca)?;
        let me = Self {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(private),
            cert_path: cert.into(),
            key_path: key.into(),
            ca_path: ca.into(),
        };
        // fail at start, not at the first handshake, when the key does not fit
        me.client_config()?;
        Ok(me)
    }

    /// The CA roots.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The identity of this node's own certificate.
    pub fn identity(&self) -> Option<Identity> {
        Identity::from_certificate(&self.chain[0])
    }

    /// The verifier of client certificates against the cluster CA.
    pub fn client_verifier(
        &self,
        clients: ClientAuth,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
        let builder = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        match clients {
            ClientAuth::Optional => builder.allow_unauthenticated().build(),
            ClientAuth::Required => builder.build(),
        }
        .map_err(|e| TlsError::Verifier(e.to_string()))
    }

    /// The certificate chain, DER, leaf first.
    pub fn chain_der(&self) -> Vec<Vec<u8>> {
        self.chain.iter().map(|c| c.as_ref().to_vec()).collect()
    }

    /// The private key, DER (PKCS#8 as `ballast pki` writes it).
    pub fn key_der(&self) -> Vec<u8> {
        self.key.secret_der().to_vec()
    }

    /// A server configuration presenting this node's certificate (HTTP/1.1 ALPN).
    pub fn server_config(&self, clients: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = self.client_verifier(clients)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| self.rustls_error(source))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|source| self.rustls_error(source))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A client configuration presenting this node's certificate and verifying servers
    /// against the CA and the name dialed.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| self.rustls_error(source))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|source| self.rustls_error(source))
    }

    /// Like [`Self::client_config`], but the server must prove `name` whatever address
    /// was dialed: for a service reached at addresses learned from DNS answers.
    pub fn client_config_for_name(&self, name: &str) -> Result<ClientConfig, TlsError> {
        let mut config = self.client_config()?;
        let verifier = PinnedName::new(self.roots.clone(), name)?;
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(verifier));
        Ok(config)
    }

    fn rustls_error(&self, source: rustls::Error) -> TlsError {
        TlsError::Rustls {
            path: self.cert_path.clone(),
            source,
        }
    }
}

/// A client configuration without a certificate of its own, trusting the CA at `ca`
/// (an anonymous client: health checks, tests of refusals).
pub fn anonymous_client_config(ca: &Path) -> Result<ClientConfig, TlsError> {
    let roots = load_roots(ca)?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            path: ca.into(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Verifies the chain against the CA and the certificate against one fixed name.
#[derive(Debug)]
struct PinnedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl PinnedName {
    fn new(roots: Arc<RootCertStore>, name: &str) -> Result<Self, TlsError> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| TlsError::Verifier(format!("{name:?}: {e}")))?;
        Ok(Self { inner, name })
    }
}

impl ServerCertVerifier for PinnedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialed: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who a verified certificate (or a token, or a trusted proxy's headers) says a client is:
/// kube-apiserver's user info.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    /// User = the certificate's first CN, groups = its O entries. `None` when the
    /// certificate cannot be parsed or has no CN. Call it only on a certificate the TLS
    /// layer verified.
    pub fn from_certificate(der: &CertificateDer<'_>) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let subject = cert.subject();
        let user = subject
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_string();
        let groups = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_string))
            .collect();
        Some(Self { user, groups })
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// The identity of the verified client certificate of a server-side connection.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<Identity> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(Identity::from_certificate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{local_cluster, AddressPlan};
    use crate::pki;

    #[test]
    fn identities_round_trip_through_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let c = local_cluster(1, 1, AddressPlan::default());
        pki::init(dir.path(), &c).unwrap();
        let load = |name: &str| {
            let (crt, key) = pki::identity_paths(dir.path(), name);
            NodeTls::load(&crt, &key, &dir.path().join("ca.crt")).unwrap()
        };
        let w1 = load("w1").identity().unwrap();
        assert_eq!(w1.user, "system:node:w1");
        assert_eq!(w1.groups, ["system:nodes"]);
        let admin = load("admin").identity().unwrap();
        assert_eq!(admin.user, "admin");
        assert!(admin.in_group(pki::SUPERUSER_GROUP));
        assert!(load("m1").identity().unwrap().in_group(pki::MASTERS_GROUP));
        load("m1").server_config(ClientAuth::Required).unwrap();
        load("proxy")
            .client_config_for_name("api.ballast.local")
            .unwrap();
    }

    #[test]
    fn a_missing_file_names_the_command_that_makes_it() {
        let e = NodeTls::load(
            Path::new("/nonexistent/m1.crt"),
            Path::new("/nonexistent/m1.key"),
            Path::new("/nonexistent/ca.crt"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ballast pki init"), "{e}");
    }
}

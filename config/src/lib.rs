//! The one cluster configuration file that every Ballast process reads.
//!
//! A single TOML file describes the whole cluster: the masters, the proxy and the
//! workers. Every process loads the same file and picks its own part by `--id`.
//!
//! Layout of this crate:
//! - [`schema`]: the serde types (with `deny_unknown_fields`) and their documented defaults.
//! - [`validate`]: semantic checks (duplicate ids or addresses, quorum warnings, ...),
//!   producing typed [`ValidationError`]s that carry the TOML path of the offending key.
//! - [`locate`]: maps a TOML path back to a line and column in the source text, so every
//!   error prints as `FILE:LINE:COL: message`.
//! - [`local`]: the embedded default cluster that `ballast up` writes.
//! - [`pki`]: the cluster CA and every identity's certificate (`ballast pki`, `ballast up`).
//! - [`tls`]: those files loaded into rustls server and client configurations, and the
//!   identity a verified peer certificate carries; [`listener`]: a TLS listener for axum
//!   servers that hands each connection's verified identity to the application.

pub mod listener;
pub mod local;
pub mod locate;
pub mod pki;
pub mod schema;
pub mod tls;
pub mod validate;

use std::path::{Path, PathBuf};

pub use schema::*;
pub use validate::{ValidationError, ValidationErrorKind, Warning};

/// The address a node's outgoing connections leave from: the IP of its own configured
/// address, so that traffic between two nodes carries both nodes' addresses and a network
/// fault (a firewall rule, a cut link) aimed at one node's address really isolates it.
/// `None` for an unspecified address (`0.0.0.0`, `::`): the kernel then picks.
pub fn source_ip(own: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    let ip = own.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// An error loading a config file, printed as `FILE:LINE:COL: message`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{file}: cannot read: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, or a key is unknown, missing or of the wrong type.
    #[error("{file}:{line}:{col}: {message}")]
    Syntax {
        file: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    /// The TOML parsed but describes an impossible cluster.
    #[error("{file}:{line}:{col}: {error}")]
    Invalid {
        file: PathBuf,
        line: usize,
        col: usize,
        error: ValidationError,
    },
}

impl ConfigError {
    /// Config errors never go away on their own: the file has to be edited.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConfigError::Io { .. })
    }
}

/// A parsed and validated config, with the directory that relative paths resolve against.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub config: ClusterConfig,
    pub warnings: Vec<String>,
}

impl LoadedConfig {
    /// The directory containing the config file; relative data dirs are resolved against it.
    pub fn base_dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// Absolute-or-relative-to-cwd data dir of a master.
    pub fn master_data_dir(&self, m: &MasterConfig) -> PathBuf {
        self.resolve(m.data_dir.as_deref().unwrap_or(Path::new(&m.id)))
    }

    /// Data dir of a worker (pod logs, adoption state).
    pub fn worker_data_dir(&self, w: &WorkerConfig) -> PathBuf {
        self.resolve(w.data_dir.as_deref().unwrap_or(Path::new(&w.id)))
    }

    /// A path of the config, resolved against the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir().join(p)
        }
    }

    /// The PKI directory (`tls.dir`).
    pub fn pki_dir(&self) -> PathBuf {
        self.resolve(&self.config.tls.dir)
    }

    /// The cluster CA certificate.
    pub fn ca_path(&self) -> PathBuf {
        match &self.config.tls.ca {
            Some(ca) => self.resolve(ca),
            None => self.pki_dir().join("ca.crt"),
        }
    }

    /// The certificate and key of node `id` with overrides `files`.
    pub fn cert_paths(&self, id: &str, files: &CertFiles) -> (PathBuf, PathBuf) {
        let (crt, key) = pki::identity_paths(&self.pki_dir(), id);
        (
            files.cert.as_deref().map_or(crt, |p| self.resolve(p)),
            files.key.as_deref().map_or(key, |p| self.resolve(p)),
        )
    }

    /// Load the TLS material of node `id` (a master, a worker or the proxy).
    pub fn node_tls(&self, id: &str) -> Result<tls::NodeTls, tls::TlsError> {
        let c = &self.config;
        let files = if let Some(m) = c.master(id) {
            &m.tls
        } else if let Some(w) = c.worker(id) {
            &w.tls
        } else if let Some(p) = c.proxies.iter().find(|p| p.id == id) {
            &p.tls
        } else if c.proxy.id == id {
            &c.proxy.tls
        } else {
            &CertFiles::default()
        };
        let (crt, key) = self.cert_paths(id, files);
        tls::NodeTls::load(&crt, &key, &self.ca_path())
    }

    /// The token file of the API, when configured.
    pub fn token_file(&self) -> Option<PathBuf> {
        self.config
            .auth
            .token_file
            .as_deref()
            .map(|p| self.resolve(p))
    }
}

/// Read, parse and validate a config file.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedConfig, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let (config, warnings) = parse_str(path, &text)?;
    Ok(LoadedConfig {
        path: path.to_path_buf(),
        config,
        warnings,
    })
}

/// Parse and validate config text; `file` is only used in error messages.
pub fn parse_str(file: &Path, text: &str) -> Result<(ClusterConfig, Vec<String>), ConfigError> {
    let config: ClusterConfig = toml::from_str(text).map_err(|e| {
        let (line, col) = e
            .span()
            .map(|s| locate::line_col(text, s.start))
            .unwrap_or((1, 1));
        ConfigError::Syntax {
            file: file.to_path_buf(),
            line,
            col,
            message: e.message().trim().to_string(),
        }
    })?;
    match validate::validate(&config) {
        Ok(warnings) => Ok((
            config,
            warnings
                .into_iter()
                .map(|w| {
                    let (line, col) = locate::locate(text, &w.path);
                    format!("{}:{line}:{col}: warning: {}", file.display(), w.message)
                })
                .collect(),
        )),
        Err(error) => {
            let (line, col) = locate::locate(text, &error.path);
            Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                line,
                col,
                error,
            })
        }
    }
}

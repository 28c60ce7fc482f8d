//! `ballast pki`: the cluster's certificates for real hosts, from the one config file.

use std::path::PathBuf;

use anyhow::Context;
use ballast_config::pki::{self, CertAuthority, IdentitySpec};

/// `ballast pki` subcommands.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum PkiCmd {
    /// Make the cluster CA (when missing) and a certificate + key for every master, worker,
    /// the proxy and `admin` in the config's `tls.dir` (default `pki/` beside the config).
    /// Files that exist are kept; run it again after adding nodes.
    Init {
        /// The cluster config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Issue a client certificate for a user (CN = --user, O = each --group) from the
    /// cluster CA into `tls.dir/NAME.crt|.key`; with --kubeconfig, also a kubeconfig that
    /// reaches the API through the proxy as that user.
    Issue {
        /// The cluster config file.
        #[arg(long, short)]
        config: PathBuf,
        /// File name in the PKI directory (e.g. `alice`).
        #[arg(long)]
        name: String,
        /// The user name (certificate CN). Default: NAME.
        #[arg(long)]
        user: Option<String>,
        /// A group (certificate O); repeat for several.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Also write a kubeconfig for this user here (mode 0600).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
    },
}

pub(crate) fn run(cmd: PkiCmd) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init { config } => {
            let loaded = ballast_config::load(&config)?;
            let dir = loaded.pki_dir();
            let report = pki::init(&dir, &loaded.config)?;
            if report.ca_created {
                println!("{}: new cluster CA (ca.crt, ca.key)", dir.display());
            }
            for name in &report.issued {
                println!("{}: issued {name}.crt, {name}.key", dir.display());
            }
            if !report.ca_created && report.issued.is_empty() {
                println!("{}: every certificate exists; nothing to do", dir.display());
            }
            println!(
                "Copy ca.crt and each node's own .crt/.key to its host; keep ca.key off the nodes."
            );
            Ok(())
        }
        PkiCmd::Issue {
            config,
            name,
            user,
            groups,
            kubeconfig,
        } => {
            let loaded = ballast_config::load(&config)?;
            let dir = loaded.pki_dir();
            let ca = CertAuthority::load(&dir.join("ca.crt"), &dir.join("ca.key"))
                .context("the cluster CA (run `ballast pki init` first)")?;
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            let spec = IdentitySpec::client(&name, user.as_deref().unwrap_or(&name), &groups);
            if !ca.issue_into(&dir, &spec)? {
                anyhow::bail!(
                    "{}/{name}.crt exists; remove it (and {name}.key) to issue it again",
                    dir.display()
                );
            }
            println!(
                "{}: issued {name}.crt, {name}.key (user {:?}, groups {:?})",
                dir.display(),
                spec.user,
                spec.groups
            );
            if let Some(path) = kubeconfig {
                let c = &loaded.config;
                let server = format!("https://{}", c.proxy.api);
                let text = pki::kubeconfig(&dir, &name, &c.cluster.name, &server)?;
                pki::write_kubeconfig(&path, &text)?;
                println!("{}: kubeconfig for {:?}", path.display(), spec.user);
            }
            Ok(())
        }
    }
}

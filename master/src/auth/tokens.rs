//! Bearer tokens from a file in kube-apiserver's `--token-auth-file` format: CSV lines
//! `token,user,uid[,"group1,group2"]`. Blank lines and lines starting with `#` are skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ballast_config::tls::Identity;

/// A token file that cannot be used. Fix the file and restart the master.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: PathBuf,
        line: u64,
        message: String,
    },
}

/// Token → identity.
#[derive(Debug, Default, Clone)]
pub struct TokenFile {
    tokens: HashMap<String, Identity>,
}

impl TokenFile {
    /// Read and check the whole file: a bad line is an error (a master must not start
    /// with tokens silently missing).
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, message)| TokenFileError::Line {
            path: path.into(),
            line,
            message,
        })
    }

    /// Parse the text of a token file; `Err((line, message))`.
    pub fn parse(text: &str) -> Result<Self, (u64, String)> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .comment(Some(b'#'))
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let mut tokens = HashMap::new();
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, |p| p.line());
                (line, e.to_string())
            })?;
            let line = record.position().map_or(0, |p| p.line());
            if record.iter().all(str::is_empty) {
                continue;
            }
            if record.len() < 3 {
                return Err((line, "expected token,user,uid[,\"group1,group2\"]".into()));
            }
            let (token, user) = (&record[0], &record[1]);
            if token.is_empty() || user.is_empty() {
                return Err((line, "the token and the user must not be empty".into()));
            }
            let groups = record
                .get(3)
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            let id = Identity {
                user: user.to_string(),
                groups,
            };
            if tokens.insert(token.to_string(), id).is_some() {
                return Err((line, "this token is listed twice".into()));
            }
        }
        Ok(Self { tokens })
    }

    /// The identity of `token`.
    pub fn lookup(&self, token: &str) -> Option<&Identity> {
        self.tokens.get(token)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kube_apiserver_token_files() {
        let f = TokenFile::parse(
            "# comment\nabc123,alice,1001,\"dev,ops\"\n\nxyz,prometheus,2,system:monitoring\nsolo,bob,3\n",
        )
        .unwrap();
        assert_eq!(f.len(), 3);
        let alice = f.lookup("abc123").unwrap();
        assert_eq!(alice.user, "alice");
        assert_eq!(alice.groups, ["dev", "ops"]);
        assert_eq!(f.lookup("xyz").unwrap().groups, ["system:monitoring"]);
        assert!(f.lookup("solo").unwrap().groups.is_empty());
        assert!(f.lookup("nope").is_none());
    }

    #[test]
    fn bad_lines_name_their_line() {
        assert_eq!(TokenFile::parse("a,b,c\nonly,two\n").unwrap_err().0, 2);
        assert_eq!(TokenFile::parse("t,u,1\nt,v,2\n").unwrap_err().0, 2);
        assert!(TokenFile::parse(",u,1\n").is_err());
    }
}

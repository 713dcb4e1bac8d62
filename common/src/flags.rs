//! Command-line flags that the worker and orderctl share.

use std::path::PathBuf;

use crate::names;
use crate::nats::NatsAuth;

/// NATS connection flags, shared by `order-worker` and `orderctl`.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL(s), comma separated for a cluster.
    #[arg(long, env = "NATS_URL", default_value = names::DEFAULT_NATS_URL)]
    pub nats_url: String,
    /// NATS credentials (JWT + nkey) file.
    #[arg(long, env = "NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,
    /// NATS user (with NATS_PASSWORD).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (with NATS_USER).
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS auth token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// File holding an nkey seed (SU...).
    #[arg(long, env = "NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server; enables TLS.
    #[arg(long, env = "NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with NATS_TLS_KEY_FILE).
    #[arg(long, env = "NATS_TLS_CERT_FILE")]
    pub nats_tls_cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS (with NATS_TLS_CERT_FILE).
    #[arg(long, env = "NATS_TLS_KEY_FILE")]
    pub nats_tls_key_file: Option<PathBuf>,
    /// The prefix of reply subjects (default `_INBOX`); an identity minted by
    /// the operator may subscribe only to its own (`_INBOX_<pipeline uid>`).
    #[arg(long, env = "NATS_INBOX_PREFIX")]
    pub nats_inbox_prefix: Option<String>,
}

impl NatsArgs {
    /// Only a URL: no credentials, no TLS files, the default inbox prefix.
    pub fn with_url(url: &str) -> Self {
        Self {
            nats_url: url.to_string(),
            nats_creds_file: None,
            nats_user: None,
            nats_password: None,
            nats_token: None,
            nats_nkey_seed_file: None,
            nats_tls_ca_file: None,
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
            nats_inbox_prefix: None,
        }
    }

    pub fn auth(&self) -> anyhow::Result<NatsAuth> {
        let nkey_seed = match &self.nats_nkey_seed_file {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                anyhow::anyhow!("NATS_NKEY_SEED_FILE {}: cannot read it: {e}", p.display())
            })?),
            None => None,
        };
        Ok(NatsAuth {
            creds_file: self.nats_creds_file.clone(),
            creds: None,
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            nkey_seed,
            tls_ca: self.nats_tls_ca_file.clone(),
            tls_cert: self.nats_tls_cert_file.clone(),
            tls_key: self.nats_tls_key_file.clone(),
            inbox_prefix: self.nats_inbox_prefix.clone(),
            signer: None,
        })
    }
}

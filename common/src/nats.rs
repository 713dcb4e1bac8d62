//! How the operator and the worker connect to NATS: one set of auth/TLS options,
//! one connect function, and errors that name the problem and its fix.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions};

/// Credentials and TLS material for a NATS connection. At most one of
/// creds file, user/password, token and nkey seed is used.
#[derive(Clone, Debug, Default)]
pub struct NatsAuth {
    pub creds_file: Option<PathBuf>,
    /// The contents of a creds file (e.g. read from a Secret).
    pub creds: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub nkey_seed: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The prefix of the client's reply subjects (`_INBOX` when unset); a
    /// minted identity may subscribe only to its own.
    pub inbox_prefix: Option<String>,
    /// Mint an identity of this account on every connect (the operator's own
    /// connection for pipelines with minted identities).
    pub signer: Option<std::sync::Arc<crate::natsauth::AccountSigner>>,
}

/// Why a NATS connection could not be made, in words that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    #[error(
        "NATS authentication failed at {url}: the server refused the credentials ({detail}); check the user/password, token, nkey seed or creds file"
    )]
    Authentication { url: String, detail: String },
    #[error(
        "TLS with NATS at {url} failed ({detail}); check the CA, client certificate and key, and that the server expects TLS"
    )]
    Tls { url: String, detail: String },
    #[error(
        "cannot reach NATS at {url} ({detail}); check that nats-server runs there and the URL is right"
    )]
    Unreachable { url: String, detail: String },
    #[error("invalid NATS options: {0}")]
    Options(String),
}

impl NatsConnectError {
    /// A short label for metrics and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Authentication { .. } => "NatsAuthenticationFailed",
            Self::Tls { .. } => "NatsTlsFailed",
            Self::Unreachable { .. } => "NatsUnreachable",
            Self::Options(_) => "NatsOptionsInvalid",
        }
    }
}

impl NatsAuth {
    /// Builds connect options; fails when the auth settings contradict each other.
    pub async fn options(&self) -> Result<ConnectOptions, NatsConnectError> {
        let methods = [
            self.creds_file.is_some() || self.creds.is_some() || self.signer.is_some(),
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if methods > 1 {
            return Err(NatsConnectError::Options(
                "more than one of creds file, user/password, token and nkey seed is set; set only one".into(),
            ));
        }
        let mut opts = match (&self.creds_file, &self.signer) {
            (Some(path), _) => renewing_creds(path)?,
            (None, Some(signer)) => minting(signer.clone()),
            (None, None) => ConnectOptions::new(),
        };
        if let Some(prefix) = &self.inbox_prefix {
            opts = opts.custom_inbox_prefix(prefix);
        }
        if let Some(c) = &self.creds {
            opts = opts.credentials(c).map_err(|e| {
                NatsConnectError::Options(format!(
                    "the NATS creds are not a valid credentials file: {e}"
                ))
            })?;
        }
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
            (None, None) => {}
            _ => {
                return Err(NatsConnectError::Options(
                    "a NATS user needs a password and a password needs a user; set both".into(),
                ));
            }
        }
        if let Some(t) = &self.token {
            opts = opts.token(t.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            opts = opts.nkey(seed.trim().to_string());
        }
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => {
                opts = opts
                    .add_client_certificate(c.clone(), k.clone())
                    .require_tls(true);
            }
            (None, None) => {}
            _ => {
                return Err(NatsConnectError::Options(
                    "a TLS client certificate needs its key and a key its certificate; set both"
                        .into(),
                ));
            }
        }
        Ok(opts)
    }
}

/// Options that authenticate with the creds file at `path`: read now, so a
/// missing or broken file is reported at once, and again on every
/// (re)connect, so credentials renewed in place (a minted identity's Secret,
/// updated by the kubelet) are used without a restart.
fn renewing_creds(path: &std::path::Path) -> Result<ConnectOptions, NatsConnectError> {
    crate::natsauth::sign_with_creds_file(path, b"check").map_err(|e| {
        NatsConnectError::Options(format!(
            "the NATS creds file (NATS_CREDS_FILE): {e}; point it at a creds file (JWT and nkey seed) as nsc or the operator writes it"
        ))
    })?;
    let path = path.to_path_buf();
    Ok(signing(move |nonce| {
        crate::natsauth::sign_with_creds_file(&path, nonce)
    }))
}

/// Options that authenticate as a user of the signer's account minted afresh
/// for every (re)connect.
fn minting(signer: std::sync::Arc<crate::natsauth::AccountSigner>) -> ConnectOptions {
    signing(move |nonce| {
        let minted = signer.mint("order-operator", &crate::natsauth::Permissions::default())?;
        crate::natsauth::sign_with_creds(&minted.creds, nonce)
    })
}

/// Options whose every (re)connect presents the JWT and nonce signature `sign`
/// gives then.
fn signing<F>(sign: F) -> ConnectOptions
where
    F: Fn(&[u8]) -> Result<(String, Vec<u8>), crate::natsauth::AuthError> + Send + Sync + 'static,
{
    let sign = std::sync::Arc::new(sign);
    ConnectOptions::with_auth_callback(move |nonce| {
        let sign = sign.clone();
        async move {
            let (jwt, sig) = sign(&nonce).map_err(|e| async_nats::AuthError::new(e.to_string()))?;
            let mut auth = async_nats::Auth::new();
            auth.jwt = Some(jwt);
            auth.signature = Some(sig);
            Ok(auth)
        }
    })
}

/// The servers of a NATS URL: comma separated for a cluster, blanks ignored.
pub fn servers(url: &str) -> impl Iterator<Item = &str> {
    url.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Connects to `url` (comma-separated for a cluster). The first connection
/// attempt must succeed, so a wrong URL or credential is reported at once; after
/// that the client reconnects forever.
pub async fn connect(
    url: &str,
    auth: &NatsAuth,
    name: &str,
) -> Result<async_nats::Client, NatsConnectError> {
    let opts = auth
        .options()
        .await?
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(|e| async move { log_event(e) });
    let servers: Vec<&str> = servers(url).collect();
    if servers.is_empty() {
        return Err(NatsConnectError::Options(
            "the NATS URL is empty; set it like nats://127.0.0.1:4222".into(),
        ));
    }
    let addrs = servers
        .iter()
        .map(|s| s.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            NatsConnectError::Options(format!(
                "invalid NATS URL '{url}': {e}; use nats://host:port, comma separated for a cluster"
            ))
        })?;
    opts.connect(addrs).await.map_err(|e| classify(url, &e))
}

/// Logs what happens to a connection after it was made: a lost connection
/// (the server restarting, a minted JWT expiring), the server's errors (a
/// permissions violation names the subject), a slow consumer.
fn log_event(e: async_nats::Event) {
    use async_nats::Event;
    match e {
        Event::Connected => tracing::info!("NATS connection established"),
        Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
        Event::ServerError(err) => tracing::warn!(error = %err, "NATS server error"),
        Event::ClientError(err) => tracing::warn!(error = %err, "NATS client error"),
        Event::SlowConsumer(sid) => {
            tracing::warn!(subscription = sid, "NATS slow consumer: messages dropped")
        }
        Event::LameDuckMode => tracing::info!("NATS server entering lame duck mode"),
        Event::Draining | Event::Closed => {}
    }
}

fn classify(url: &str, e: &async_nats::ConnectError) -> NatsConnectError {
    let detail = e.to_string();
    let url = url.to_string();
    match e.kind() {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            NatsConnectError::Authentication { url, detail }
        }
        ConnectErrorKind::Tls => NatsConnectError::Tls { url, detail },
        ConnectErrorKind::ServerParse => NatsConnectError::Options(detail),
        _ if detail.to_ascii_lowercase().contains("authoriz") => {
            NatsConnectError::Authentication { url, detail }
        }
        _ => NatsConnectError::Unreachable { url, detail },
    }
}

/// The input-stream sequence a sourced message was copied from
/// (`Nats-Stream-Source: <stream> <seq> ...`), e.g. a dead letter's marker.
pub fn source_sequence(headers: &async_nats::HeaderMap) -> Option<u64> {
    let v = headers.get("Nats-Stream-Source")?.as_str();
    v.split_whitespace().nth(1)?.parse().ok()
}

/// Whether a JetStream error (or any error in its source chain) is the server's
/// "not found" (HTTP-like code 404: no such stream, consumer or bucket). The one
/// place this is decided; never match error texts for it.
pub fn is_not_found(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::context::{
        ConsumerInfoError, ConsumerInfoErrorKind, GetStreamError, GetStreamErrorKind,
    };
    use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
    let mut cur = Some(e);
    while let Some(err) = cur {
        let code = if let Some(j) = err.downcast_ref::<async_nats::jetstream::Error>() {
            Some(j.code())
        } else if let Some(g) = err.downcast_ref::<GetStreamError>() {
            match g.kind() {
                GetStreamErrorKind::JetStream(j) => Some(j.code()),
                _ => None,
            }
        } else if let Some(c) = err.downcast_ref::<ConsumerInfoError>() {
            match c.kind() {
                ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound => {
                    Some(404)
                }
                ConsumerInfoErrorKind::JetStream(j) => Some(j.code()),
                _ => None,
            }
        } else if let Some(c) = err.downcast_ref::<ConsumerError>() {
            match c.kind() {
                ConsumerErrorKind::JetStream(j) => Some(j.code()),
                _ => None,
            }
        } else {
            None
        };
        if let Some(code) = code {
            return code == 404;
        }
        cur = err.source();
    }
    false
}

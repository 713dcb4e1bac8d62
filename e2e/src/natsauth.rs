//! NATS decentralized auth for tests: mints an operator, an account (with
//! JetStream) and a user as signed JWTs, the server configuration that trusts
//! them, and the user's `.creds` file. (nsc is not available from the module
//! proxy here, so the JWTs are minted the way nats-io/jwt encodes them.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nkeys::KeyPair;
use orderpipeline_common::natsauth::{self, Permissions};

fn jwt(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    nats: serde_json::Value,
) -> anyhow::Result<String> {
    Ok(natsauth::encode_jwt(issuer, subject, name, nats, None)?)
}

/// What a test needs for creds-file auth.
pub struct Decentralized {
    /// Server configuration lines (operator, resolver, preloaded account).
    pub server_config: String,
    /// The user's `.creds` file contents.
    pub creds: String,
}

/// An operator-mode server's configuration with one account (JetStream
/// enabled) that has an unscoped signing key, as the operator's minted
/// identities need it.
pub struct OperatorMode {
    pub server_config: String,
    /// The account's public key (`A...`).
    pub account: String,
    /// The account's signing key.
    pub signing_key: KeyPair,
    /// A user of the account without restrictions (for setting up streams).
    pub admin_creds: String,
}

fn account_limits() -> serde_json::Value {
    serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        "max_ack_pending": -1, "mem_max_stream_bytes": 0, "disk_max_stream_bytes": 0, "max_bytes_required": false
    })
}

/// The operator, the system account and `accounts` (public key, JWT) as
/// server configuration lines with a MEMORY resolver.
fn server_config(operator: &KeyPair, accounts: &[(String, String)]) -> anyhow::Result<String> {
    // JetStream in operator mode needs a system account.
    let system = KeyPair::new_account();
    let sys_jwt = jwt(
        operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2, "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1}}),
    )?;
    let op_jwt = jwt(
        operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({"type": "operator", "version": 2}),
    )?;
    let preload: String = accounts
        .iter()
        .map(|(k, j)| format!("  {k}: {j}\n"))
        .collect();
    Ok(format!(
        "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n{preload}  {sys}: {sys_jwt}\n}}\n",
        sys = system.public_key(),
    ))
}

/// An account's JWT with JetStream, issued by `operator`, with the unscoped
/// `signing_keys`.
fn account_jwt(
    operator: &KeyPair,
    account: &KeyPair,
    name: &str,
    signing_keys: &[String],
) -> anyhow::Result<String> {
    jwt(
        operator,
        &account.public_key(),
        name,
        serde_json::json!({
            "type": "account", "version": 2,
            "signing_keys": signing_keys,
            "limits": account_limits(),
        }),
    )
}

pub fn mint() -> anyhow::Result<Decentralized> {
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let acct_jwt = account_jwt(&operator, &account, "orders", &[])?;
    let user = natsauth::mint_user(
        &account,
        &account.public_key(),
        "worker",
        &Permissions::default(),
        None,
    )?;
    Ok(Decentralized {
        server_config: server_config(&operator, &[(account.public_key(), acct_jwt)])?,
        creds: user.creds,
    })
}

/// An operator-mode configuration whose account has a signing key.
pub fn operator_mode() -> anyhow::Result<OperatorMode> {
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let signing_key = KeyPair::new_account();
    let acct_jwt = account_jwt(&operator, &account, "tenants", &[signing_key.public_key()])?;
    let admin = natsauth::mint_user(
        &signing_key,
        &account.public_key(),
        "admin",
        &Permissions::default(),
        None,
    )?;
    Ok(OperatorMode {
        server_config: server_config(&operator, &[(account.public_key(), acct_jwt)])?,
        account: account.public_key(),
        signing_key,
        admin_creds: admin.creds,
    })
}

/// JetStream as the user of `creds`, replies on `inbox` when given (a minted
/// identity may subscribe only to its own inbox).
pub async fn jetstream_as(
    url: &str,
    creds: &str,
    inbox: Option<&str>,
) -> anyhow::Result<async_nats::jetstream::Context> {
    let mut opts = async_nats::ConnectOptions::with_credentials(creds)?;
    if let Some(inbox) = inbox {
        opts = opts.custom_inbox_prefix(inbox);
    }
    Ok(async_nats::jetstream::new(opts.connect(url).await?))
}

/// A client on a minted identity that records the server's errors.
pub struct Probe {
    pub client: async_nats::Client,
    errors: Arc<Mutex<Vec<String>>>,
}

pub async fn probe(url: &str, creds: &str, inbox: &str) -> anyhow::Result<Probe> {
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = errors.clone();
    let client = async_nats::ConnectOptions::with_credentials(creds)?
        .custom_inbox_prefix(inbox)
        .event_callback(move |e| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = e {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(url)
        .await?;
    Ok(Probe { client, errors })
}

impl Probe {
    /// Waits for the server's permissions violation naming `what` and `subject`.
    async fn violation(&self, what: &str, subject: &str) -> anyhow::Result<()> {
        let want = format!("Permissions Violation for {what} to \"{subject}\"");
        crate::wait_for(&want, Duration::from_secs(5), || async {
            let e = self.errors.lock().unwrap();
            Ok(e.iter().any(|e| e.contains(&want)).then_some(()))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; server errors: {:?}", self.errors.lock().unwrap()))
    }

    pub async fn publish_denied(&self, subject: &str) -> anyhow::Result<()> {
        self.client.publish(subject.to_string(), "x".into()).await?;
        self.client.flush().await?;
        self.violation("Publish", subject).await
    }

    pub async fn subscribe_denied(&self, subject: &str) -> anyhow::Result<()> {
        let _sub = self.client.subscribe(subject.to_string()).await?;
        self.client.flush().await?;
        self.violation("Subscription", subject).await
    }

    pub async fn publish_allowed(&self, subject: &str) -> anyhow::Result<()> {
        self.client.publish(subject.to_string(), "x".into()).await?;
        self.client.flush().await?;
        // A round trip after it: a violation would have arrived before.
        self.client.flush().await?;
        let e = self.errors.lock().unwrap();
        anyhow::ensure!(
            !e.iter().any(|e| e.contains(&format!("\"{subject}\""))),
            "publish to {subject} denied: {e:?}"
        );
        Ok(())
    }
}

/// A user nkey pair: (seed, public key).
pub fn user_nkey() -> anyhow::Result<(String, String)> {
    let kp = KeyPair::new_user();
    Ok((
        kp.seed().map_err(|e| anyhow::anyhow!("{e}"))?,
        kp.public_key(),
    ))
}

/// A CA and a server certificate for 127.0.0.1, written into `dir` with openssl:
/// returns (ca.crt, server.crt, server.key) paths.
pub fn tls_files(
    dir: &std::path::Path,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ])?;
    Ok((
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    ))
}

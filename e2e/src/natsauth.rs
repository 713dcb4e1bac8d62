//! NATS decentralized auth for tests: mints an operator, an account (with
//! JetStream) and a user as signed JWTs, the server configuration that trusts
//! them, and the user's `.creds` file. (nsc is not available from the module
//! proxy here, so the JWTs are minted the way nats-io/jwt encodes them.)

use base64::Engine as _;
use nkeys::KeyPair;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn jwt(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    nats: serde_json::Value,
) -> anyhow::Result<String> {
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{:X}", iat ^ 0x5eed),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let payload = b64(serde_json::to_string(&claims)?.as_bytes());
    let signing_input = format!("{header}.{payload}");
    let sig = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing a JWT: {e}"))?;
    Ok(format!("{signing_input}.{}", b64(&sig)))
}

/// What a test needs for creds-file auth.
pub struct Decentralized {
    /// Server configuration lines (operator, resolver, preloaded account).
    pub server_config: String,
    /// The user's `.creds` file contents.
    pub creds: String,
}

pub fn mint() -> anyhow::Result<Decentralized> {
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let user = KeyPair::new_user();
    // JetStream in operator mode needs a system account.
    let system = KeyPair::new_account();
    let sys_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2, "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1}}),
    )?;
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({"type": "operator", "version": 2}),
    )?;
    let acct_jwt = jwt(
        &operator,
        &account.public_key(),
        "orders",
        serde_json::json!({
            "type": "account", "version": 2,
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
                "max_ack_pending": -1, "mem_max_stream_bytes": 0, "disk_max_stream_bytes": 0, "max_bytes_required": false
            }
        }),
    )?;
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "worker",
        serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    )?;
    let seed = user.seed().map_err(|e| anyhow::anyhow!("user seed: {e}"))?;
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below can be used to sign and prove identity.\nNKEYs are sensitive and should be treated as secrets.\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n*************************************************************\n"
    );
    let server_config = format!(
        "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {acct_jwt}\n  {sys}: {sys_jwt}\n}}\n",
        account.public_key(),
        sys = system.public_key(),
    );
    Ok(Decentralized {
        server_config,
        creds,
    })
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

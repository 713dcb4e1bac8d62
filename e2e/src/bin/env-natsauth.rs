//! `env-natsauth DIR`: the local environment's NATS operator mode (hack/env up
//! --nats-operator-mode). Mints an operator, a system account and an account
//! `tenants` with JetStream and an unscoped signing key, and writes into DIR:
//! `auth.conf` (the server's operator, system account and MEMORY resolver
//! lines, to include), `account` (the account's public key), `signing-key` (the
//! signing key's seed: what the operator's NATS account Secret holds) and
//! `admin.creds` (a user of the account without restrictions, for orderctl).
//! Files that exist are kept, so a restarted server trusts the same keys.

use std::path::Path;

fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: env-natsauth DIR");
        return std::process::ExitCode::from(2);
    };
    match write(Path::new(&dir)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("env-natsauth: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn write(dir: &Path) -> anyhow::Result<()> {
    if dir.join("auth.conf").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let m = orderpipeline_e2e::natsauth::operator_mode()?;
    let seed = m
        .signing_key
        .seed()
        .map_err(|e| anyhow::anyhow!("signing key seed: {e}"))?;
    let private = |name: &str, text: &str| -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(name))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    };
    private("account", &m.account)?;
    private("signing-key", &seed)?;
    private("admin.creds", &m.admin_creds)?;
    // Last: its presence says the set is complete.
    private("auth.conf", &m.server_config)?;
    Ok(())
}

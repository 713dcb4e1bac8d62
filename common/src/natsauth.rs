//! NATS decentralized auth (operator mode): user JWTs signed with an account
//! signing key, the permissions a pipeline's worker and producer get, creds
//! files, and a connect-time signer that reads a creds file on every
//! (re)connect, so credentials renewed in place are used without a restart.
//!
//! The JWTs are encoded the way nats-io/jwt v2 encodes them (header
//! `{"typ":"JWT","alg":"ed25519-nkey"}`, base64url without padding, an ed25519
//! signature by the issuer's nkey). A user signed by a signing key names its
//! account in `issuer_account`; the key must be an unscoped signing key of the
//! account, or the server replaces the user's permissions with the scope's.

use base64::Engine as _;
pub use nkeys::KeyPair;
use sha2::Digest as _;

/// Why credentials could not be minted or read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Key(String),
    #[error("not a NATS creds file: {0}")]
    Creds(String),
    #[error("cannot read {0}")]
    Read(String),
    #[error("{0}")]
    Expired(String),
    #[error("not a NATS JWT: {0}")]
    Jwt(String),
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Encodes and signs a JWT with `claims` (the `nats` section and anything
/// else), issued by `issuer` for `subject`, valid until `expires` (Unix
/// seconds) when set.
pub fn encode_jwt(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    nats: serde_json::Value,
    expires: Option<u64>,
) -> Result<String, AuthError> {
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let mut claims = serde_json::json!({
        "iat": now(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    if let Some(exp) = expires {
        claims["exp"] = exp.into();
    }
    // Like nats-io/jwt: the id is a hash of the claims without it.
    let digest = sha2::Sha256::digest(claims.to_string().as_bytes());
    claims["jti"] = hex(&digest[..20]).into();
    let payload = b64(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{payload}");
    let sig = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| AuthError::Key(format!("signing a JWT: {e}")))?;
    Ok(format!("{signing_input}.{}", b64(&sig)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The claims of a JWT, decoded without checking its signature (the server
/// checks it; the operator reads only its own JWTs' expiry back).
pub fn claims_of(jwt: &str) -> Result<serde_json::Value, AuthError> {
    let payload = jwt
        .split('.')
        .nth(1)
        .ok_or_else(|| AuthError::Jwt("no payload".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| AuthError::Jwt(format!("payload is not base64url: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| AuthError::Jwt(format!("payload: {e}")))
}

/// What a user may publish and subscribe to. An empty `publish` or
/// `subscribe` list with no denials leaves that direction unrestricted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub deny_publish: Vec<String>,
    pub subscribe: Vec<String>,
    pub deny_subscribe: Vec<String>,
}

impl Permissions {
    fn claims(&self) -> serde_json::Value {
        let side = |allow: &[String], deny: &[String]| {
            let mut v = serde_json::json!({});
            if !allow.is_empty() {
                v["allow"] = allow.into();
            }
            if !deny.is_empty() {
                v["deny"] = deny.into();
            }
            v
        };
        serde_json::json!({
            "pub": side(&self.publish, &self.deny_publish),
            "sub": side(&self.subscribe, &self.deny_subscribe),
        })
    }
}

/// A minted user: its creds file, public key and expiry.
#[derive(Clone, Debug)]
pub struct Minted {
    pub creds: String,
    pub public_key: String,
    pub expires: Option<u64>,
}

/// Mints a new user (a fresh nkey) of `account` (its public key), signed by
/// `signing_key`, with `permissions`, valid until `expires` when set.
pub fn mint_user(
    signing_key: &KeyPair,
    account: &str,
    name: &str,
    permissions: &Permissions,
    expires: Option<u64>,
) -> Result<Minted, AuthError> {
    let user = KeyPair::new_user();
    let mut nats = permissions.claims();
    nats["type"] = "user".into();
    nats["version"] = 2.into();
    nats["subs"] = (-1).into();
    nats["data"] = (-1).into();
    nats["payload"] = (-1).into();
    if signing_key.public_key() != account {
        nats["issuer_account"] = account.into();
    }
    let jwt = encode_jwt(signing_key, &user.public_key(), name, nats, expires)?;
    let seed = user
        .seed()
        .map_err(|e| AuthError::Key(format!("user seed: {e}")))?;
    Ok(Minted {
        creds: creds_file(&jwt, &seed),
        public_key: user.public_key(),
        expires,
    })
}

/// A creds file, as `nsc` writes it.
pub fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below can be used to sign and prove identity.\nNKEYs are sensitive and should be treated as secrets.\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n*************************************************************\n"
    )
}

/// The JWT and the seed of a creds file.
pub fn parse_creds(text: &str) -> Result<(String, String), AuthError> {
    let block = |begin: &str| {
        let mut lines = text.lines().map(str::trim);
        lines.find(|l| l.starts_with("-----BEGIN") && l.contains(begin))?;
        lines
            .find(|l| !l.is_empty())
            .filter(|l| !l.starts_with("---"))
            .map(str::to_string)
    };
    let jwt = block("USER JWT").ok_or_else(|| AuthError::Creds("no user JWT block".into()))?;
    let seed =
        block("NKEY SEED").ok_or_else(|| AuthError::Creds("no user nkey seed block".into()))?;
    Ok((jwt, seed))
}

/// The JWT of the creds file at `path` and the signature of `nonce` by its
/// seed, read now (a renewed file is picked up at the next connect).
pub fn sign_with_creds_file(
    path: &std::path::Path,
    nonce: &[u8],
) -> Result<(String, Vec<u8>), AuthError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuthError::Read(format!("{}: {e}", path.display())))?;
    sign_with_creds(&text, nonce).map_err(|e| match e {
        AuthError::Creds(d) => AuthError::Creds(format!("{}: {d}", path.display())),
        e => e,
    })
}

/// When the JWT of the creds `text` expires (Unix seconds), if it says.
pub fn creds_expiry(text: &str) -> Option<u64> {
    let (jwt, _) = parse_creds(text).ok()?;
    claims_of(&jwt).ok()?["exp"].as_u64()
}

/// The JWT of the creds `text` and the signature of `nonce` by its seed; an
/// expired JWT is refused here (the server would refuse it, and the client
/// would try again at once instead of backing off).
pub fn sign_with_creds(text: &str, nonce: &[u8]) -> Result<(String, Vec<u8>), AuthError> {
    let (jwt, seed) = parse_creds(text)?;
    if let Some(exp) = creds_expiry(text)
        && exp <= now()
    {
        return Err(AuthError::Expired(format!(
            "the credentials expired {} s ago; whoever minted them renews them (for a pipeline with spec.nats.accountRef: the operator, at half their lifetime; is it running?)",
            now() - exp
        )));
    }
    let key = KeyPair::from_seed(&seed)
        .map_err(|e| AuthError::Creds(format!("the seed is invalid: {e}")))?;
    let sig = key
        .sign(nonce)
        .map_err(|e| AuthError::Key(format!("signing the server's nonce: {e}")))?;
    Ok((jwt, sig))
}

/// An account's signing key held to mint identities in it: the operator's own
/// (unrestricted within the account, minted afresh for every connect, so it
/// never needs renewing) and the pipelines' (see [`PipelineScope`]).
pub struct AccountSigner {
    key: KeyPair,
    /// The account's public key (`A...`).
    pub account: String,
    /// How long a minted identity is valid.
    pub ttl: std::time::Duration,
}

impl std::fmt::Debug for AccountSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountSigner")
            .field("account", &self.account)
            .field("signing_key", &self.key.public_key())
            .finish()
    }
}

impl AccountSigner {
    /// From the account's public key and a signing key's seed (`SA...`).
    pub fn new(account: &str, seed: &str, ttl: std::time::Duration) -> Result<Self, AuthError> {
        let key = KeyPair::from_seed(seed.trim())
            .map_err(|e| AuthError::Key(format!("the signing key is not an nkey seed: {e}")))?;
        if key.key_pair_type() != nkeys::KeyPairType::Account {
            return Err(AuthError::Key(
                "the signing key is not an account key (its seed starts with SA)".into(),
            ));
        }
        let account = account.trim();
        if !(account.starts_with('A') && KeyPair::from_public_key(account).is_ok()) {
            return Err(AuthError::Key(format!(
                "{account:?} is not an account's public key (A...)"
            )));
        }
        Ok(Self {
            key,
            account: account.to_string(),
            ttl,
        })
    }

    /// The signing key's public key.
    pub fn signing_key(&self) -> String {
        self.key.public_key()
    }

    /// A new user `name` with `permissions`, valid for the signer's ttl.
    pub fn mint(&self, name: &str, permissions: &Permissions) -> Result<Minted, AuthError> {
        let expires = now() + self.ttl.as_secs().max(1);
        mint_user(&self.key, &self.account, name, permissions, Some(expires))
    }
}

/// The JetStream objects and subjects one pipeline's identities are scoped to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineScope {
    pub stream: String,
    pub consumer: String,
    pub dlq_stream: String,
    /// The consumer's filter subject (the input subject).
    pub input_subject: String,
    /// The legacy KV bucket, for a pipeline upgraded from protocol v1.
    pub legacy_bucket: Option<String>,
    /// The inbox prefix its clients use (`_INBOX_<id>`): replies to this
    /// pipeline's requests reach only its own identities.
    pub inbox_prefix: String,
}

/// The JetStream API requests no minted identity may make: creating or
/// changing consumers and streams (a consumer's filter or a direct get is not
/// limited by subject permissions, nats-server #3295), deleting, purging.
const JS_ADMIN: &[&str] = &[
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl PipelineScope {
    /// The inbox prefix of a pipeline with Kubernetes uid `uid`.
    pub fn inbox_prefix_for(uid: &str) -> String {
        let token: String = uid
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("_INBOX_{token}")
    }

    /// The worker: pull from its consumer and ack, read its stream and DLQ
    /// (info, messages by sequence or subject), publish its outcomes, read the
    /// legacy bucket, receive replies on its own inbox; nothing else.
    pub fn worker(&self) -> Result<Permissions, AuthError> {
        let (s, c, d) = (&self.stream, &self.consumer, &self.dlq_stream);
        let outcomes =
            crate::names::OutcomeSubjects::for_filter(&self.input_subject).ok_or_else(|| {
                AuthError::Key(format!(
                    "the input subject {} has no outcome prefix",
                    self.input_subject
                ))
            })?;
        let mut publish = vec![
            format!("$JS.API.CONSUMER.MSG.NEXT.{s}.{c}"),
            format!("$JS.API.CONSUMER.INFO.{s}.{c}"),
            format!("$JS.ACK.{s}.{c}.>"),
            format!("$JS.API.STREAM.INFO.{s}"),
            format!("$JS.API.STREAM.MSG.GET.{s}"),
            format!("$JS.API.DIRECT.GET.{s}"),
            format!("$JS.API.DIRECT.GET.{s}.>"),
            format!("$JS.API.STREAM.INFO.{d}"),
            format!("$JS.API.STREAM.MSG.GET.{d}"),
            format!("$JS.API.DIRECT.GET.{d}"),
            format!("$JS.API.DIRECT.GET.{d}.>"),
        ];
        for kind in crate::names::OutcomeKind::ALL {
            publish.push(outcomes.all_of(kind));
        }
        if let Some(b) = &self.legacy_bucket {
            publish.extend([
                format!("$JS.API.STREAM.INFO.KV_{b}"),
                format!("$JS.API.STREAM.MSG.GET.KV_{b}"),
                format!("$JS.API.DIRECT.GET.KV_{b}.>"),
            ]);
        }
        Ok(Permissions {
            publish,
            deny_publish: strings(JS_ADMIN),
            subscribe: vec![format!("{}.>", self.inbox_prefix)],
            deny_subscribe: Vec::new(),
        })
    }

    /// The producer: publish the input subject (with JetStream acks to its own
    /// inbox) and nothing else.
    pub fn producer(&self) -> Permissions {
        Permissions {
            publish: vec![self.input_subject.clone()],
            deny_publish: strings(JS_ADMIN),
            subscribe: vec![format!("{}.>", self.inbox_prefix)],
            deny_subscribe: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_user_is_signed_by_the_signing_key_for_its_account() {
        let account = KeyPair::new_account();
        let signing = KeyPair::new_account();
        let perms = Permissions {
            publish: vec!["ORDER.created".into()],
            ..Default::default()
        };
        let m = mint_user(
            &signing,
            &account.public_key(),
            "p",
            &perms,
            Some(now() + 60),
        )
        .unwrap();
        let (jwt, seed) = parse_creds(&m.creds).unwrap();
        assert_eq!(
            KeyPair::from_seed(&seed).unwrap().public_key(),
            m.public_key
        );
        let c = claims_of(&jwt).unwrap();
        assert_eq!(c["iss"], signing.public_key());
        assert_eq!(c["sub"], m.public_key);
        assert_eq!(c["nats"]["issuer_account"], account.public_key());
        assert_eq!(c["nats"]["pub"]["allow"][0], "ORDER.created");
        assert_eq!(c["exp"].as_u64(), m.expires);
        // The signature verifies with the issuer's public key.
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap();
        KeyPair::from_public_key(&signing.public_key())
            .unwrap()
            .verify(input.as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn a_creds_file_without_a_seed_is_refused_by_name() {
        let text = "-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n";
        let e = parse_creds(text).unwrap_err().to_string();
        assert!(e.contains("no user nkey seed"), "{e}");
    }

    #[test]
    fn the_worker_may_not_create_consumers_or_touch_other_streams() {
        let scope = PipelineScope {
            stream: "A".into(),
            consumer: "w".into(),
            dlq_stream: "A_DLQ".into(),
            input_subject: "A.created".into(),
            legacy_bucket: None,
            inbox_prefix: PipelineScope::inbox_prefix_for("1-2"),
        };
        let p = scope.worker().unwrap();
        let allowed = |s: &str| {
            p.publish
                .iter()
                .any(|a| crate::names::subject_matches(a, s))
                && !p
                    .deny_publish
                    .iter()
                    .any(|d| crate::names::subject_matches(d, s))
        };
        assert!(allowed("$JS.API.CONSUMER.MSG.NEXT.A.w"));
        assert!(allowed("A.processed.k1"));
        assert!(!allowed("A.created"), "a worker does not produce orders");
        assert!(!allowed("$JS.API.CONSUMER.MSG.NEXT.B.w"));
        assert!(!allowed("$JS.API.CONSUMER.CREATE.A.x.A.created"));
        assert!(!allowed("B.processed.k1"));
        assert_eq!(p.subscribe, vec!["_INBOX_1_2.>".to_string()]);
        assert!(scope.producer().publish == vec!["A.created".to_string()]);
    }
}

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt as _};
use orderpipeline_common::nats::NatsAuth;
use orderpipeline_common::topology::Topology;

use k8s_openapi::api::apps::v1::Deployment;

use crate::crd::{OrderPipeline, OrderPipelineStatus};
use crate::render::{self, Credentials, SecretsView};

use super::apply::jetstream::Seen;
use super::jetstream_api::{ConsumerView, JetStream, JsError, StreamView};
use super::*;

/// The pipeline's status as stored: the one this process last wrote or read
/// (it is the only writer while it leads, and a leader that loses the Lease
/// exits), else read from the API server, not the watch cache: a reconcile
/// triggered right after our own status write may see the cache without it,
/// and the scaler's clocks and lastScaleTime must not be lost.
pub(crate) async fn fresh_status(p: &OrderPipeline, ctx: &Context) -> OrderPipelineStatus {
    let key = key_of(p);
    let known = ctx.statuses.lock().unwrap().get(&key).cloned();
    if let Some((uid, status)) = known
        && uid == p.metadata.uid
    {
        return status;
    }
    let api: Api<OrderPipeline> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    match api.get_status(&p.name_any()).await {
        Ok(fresh) => {
            ctx.remember_status(&key, &fresh);
            fresh.status.unwrap_or_default()
        }
        Err(_) => p.status.clone().unwrap_or_default(),
    }
}

/// What the pipeline's references resolve to: its Secrets (as the pods see
/// them) and JetStream on its NATS.
pub(crate) struct World {
    pub(crate) secrets: SecretsView,
    pub(crate) js: Arc<dyn JetStream>,
    /// Which server and credentials `js` stands for (see [`connection_key`]).
    pub(crate) connection: String,
    /// The NATS account the pipeline's identities are minted in.
    pub(crate) account: Option<super::identity::Account>,
    /// Its minted identities, once [`World::mint`] kept them current.
    pub(crate) identity: Option<crate::crd::NatsIdentityStatus>,
}

impl World {
    /// Keeps the pipeline's minted identities current (after the conflict
    /// check: an identity is scoped to names the pipeline may use) and points
    /// the workers at theirs.
    pub(crate) async fn mint(
        &mut self,
        p: &OrderPipeline,
        ctx: &Context,
        plan: &render::Plan,
    ) -> Result<(), NotReady> {
        let Some(account) = &self.account else {
            return Ok(());
        };
        let scope = super::identity::scope(p, plan);
        let status = super::identity::ensure(p, ctx, account, &scope).await?;
        self.secrets.credentials = Some((status.worker_secret.clone(), Credentials::CredsFile));
        self.secrets.inbox_prefix = Some(status.inbox_prefix.clone());
        self.identity = Some(status);
        Ok(())
    }
}

/// Reads the Secrets and connects to NATS with them (a cached connection while
/// the URL and the Secrets are unchanged).
pub(crate) async fn world(p: &OrderPipeline, ctx: &Context) -> Result<World, NotReady> {
    if let (false, Some(why)) = (
        ctx.allow_plaintext_credentials,
        render::credentials_in_clear(p),
    ) {
        return Err(NotReady::new(Cause::InvalidSpec, why));
    }
    let (mut auth, mut secrets, files) = read_secrets(p, &ctx.client).await?;
    let account = super::identity::account(p, ctx).await?;
    if let Some(a) = &account {
        // The operator's own connection: a user of the account, minted for
        // every connect; pooled per account.
        auth.signer = Some(a.signer.clone());
        let tls = secrets.content.as_deref().unwrap_or("-");
        secrets.content = Some(format!("{tls}|account:{}", a.digest));
    }
    let connection = connection_key(&p.spec.nats.url, &secrets);
    write_tls_files(&tls_dir(&connection), &files, &mut auth)?;
    let js = ctx.jetstream(p, &auth, &connection).await?;
    Ok(World {
        secrets,
        js,
        connection,
        account,
        identity: None,
    })
}

/// Where the TLS files of the connection `connection` (see [`connection_key`])
/// live: the client reads them on every reconnect, so they stay while the
/// connection does and go with it (the pool removes them when it closes it).
pub(crate) fn tls_dir(connection: &str) -> std::path::PathBuf {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(connection.as_bytes());
    let name: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    std::env::temp_dir().join("order-operator").join(name)
}

/// What identifies a NATS connection the pipelines can share: the server and
/// the credentials (a SHA-256 of the referenced Secrets' data: two pipelines
/// share a connection only when their credentials are the same).
pub(crate) fn connection_key(url: &str, secrets: &SecretsView) -> String {
    format!("{url}|{}", secrets.content.as_deref().unwrap_or("-"))
}

/// The worker Deployment as it is now, if there is one: as the controller's
/// watch last saw it, else (not seen, e.g. before the first list) read. A
/// reconcile runs at least the debounce after the trigger it follows, by when
/// the watch has brought our own last write; were it ever older, the apply
/// step finds that out (its generation is not the one applied) and applies
/// again, which changes nothing.
pub(crate) async fn live_deployment(
    p: &OrderPipeline,
    ctx: &Context,
) -> Result<Option<Deployment>, Error> {
    let ns = p.namespace().unwrap_or_default();
    let name = render::deployment_name(p);
    if let Some(store) = ctx.deployments.get()
        && let Some(d) = store.get(&kube::runtime::reflector::ObjectRef::new(&name).within(&ns))
    {
        return Ok(Some(d.as_ref().clone()));
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    api.get_opt(&name).await.map_err(Error::Kube)
}

/// Reads the referenced Secrets: the auth for the operator's connection, what to
/// project into the pods, and a checksum that rolls the pods when they change.
pub(crate) async fn read_secrets(
    p: &OrderPipeline,
    client: &Client,
) -> Result<(NatsAuth, SecretsView, Vec<(String, String)>), NotReady> {
    let ns = p.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut auth = NatsAuth::default();
    let mut view = SecretsView::default();
    let mut files = Vec::new();
    let mut digest = digest::Secrets::default();
    if let Some(r) = &p.spec.nats.credentials_secret_ref {
        let s = get_secret(&api, &ns, &r.name).await?;
        digest.update(&s);
        view.credentials = Some((r.name.clone(), credentials_of(&r.name, &s, &mut auth)?));
    }
    if let Some(r) = &p.spec.nats.tls_secret_ref {
        let s = get_secret(&api, &ns, &r.name).await?;
        digest.update(&s);
        let (tls_files, client_cert) = tls_of(&r.name, &s)?;
        files = tls_files;
        view.tls = Some((r.name.clone(), client_cert));
    }
    if view.credentials.is_some() || view.tls.is_some() {
        let (content, version) = digest.finish();
        view.content = Some(content);
        view.checksum = Some(version);
    }
    Ok((auth, view, files))
}

/// The type of the Kubernetes token Secrets, which never go to NATS.
const SERVICE_ACCOUNT_TOKEN: &str = "kubernetes.io/service-account-token";

async fn get_secret(api: &Api<Secret>, ns: &str, name: &str) -> Result<Secret, NotReady> {
    match api.get_opt(name).await {
        Ok(Some(s)) if s.type_.as_deref() == Some(SERVICE_ACCOUNT_TOKEN) => Err(NotReady::new(
            Cause::SecretInvalid,
            format!(
                "Secret {ns}/{name} is a ServiceAccount token ({SERVICE_ACCOUNT_TOKEN}); the operator never sends Kubernetes tokens to NATS: put the NATS credentials in an Opaque Secret and reference that"
            ),
        )),
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(NotReady::new(
            Cause::SecretMissing,
            format!(
                "Secret {ns}/{name} referenced by the pipeline does not exist; create it or fix the reference"
            ),
        )),
        Err(e) => Err(NotReady::new(
            Cause::KubernetesError,
            format!("reading Secret {name}: {e}"),
        )),
    }
}

pub(crate) fn secret_text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).to_string())
        .or_else(|| s.string_data.as_ref().and_then(|d| d.get(key).cloned()))
}

/// Which credentials the Secret `name` holds (one kind), written into `auth`.
fn credentials_of(name: &str, s: &Secret, auth: &mut NatsAuth) -> Result<Credentials, NotReady> {
    let text = |key| secret_text(s, key);
    if text("user").is_some() || text("password").is_some() {
        auth.user = text("user");
        auth.password = text("password");
        if auth.user.is_none() || auth.password.is_none() {
            return Err(NotReady::new(
                Cause::SecretInvalid,
                format!("Secret {name} has only one of the keys user and password; set both"),
            ));
        }
        Ok(Credentials::UserPassword)
    } else if let Some(t) = text("token") {
        auth.token = Some(t);
        Ok(Credentials::Token)
    } else if let Some(c) = text("creds") {
        auth.creds = Some(c);
        Ok(Credentials::CredsFile)
    } else if let Some(n) = text("nkey") {
        auth.nkey_seed = Some(n);
        Ok(Credentials::NkeySeed)
    } else {
        Err(NotReady::new(
            Cause::SecretInvalid,
            format!(
                "Secret {name} has none of the keys user+password, token, creds or nkey; add one"
            ),
        ))
    }
}

/// The TLS files the Secret `name` holds (the CA, and a client certificate
/// and key, both or neither), and whether it has the client pair.
fn tls_of(name: &str, s: &Secret) -> Result<(Vec<(String, String)>, bool), NotReady> {
    let Some(ca) = secret_text(s, "ca.crt") else {
        return Err(NotReady::new(
            Cause::SecretInvalid,
            format!(
                "TLS Secret {name} has no ca.crt; add the CA that signed the NATS server's certificate"
            ),
        ));
    };
    let mut files = vec![("ca.crt".to_string(), ca)];
    match (secret_text(s, "tls.crt"), secret_text(s, "tls.key")) {
        (Some(c), Some(k)) => {
            files.push(("tls.crt".into(), c));
            files.push(("tls.key".into(), k));
            Ok((files, true))
        }
        (None, None) => Ok((files, false)),
        _ => Err(NotReady::new(
            Cause::SecretInvalid,
            format!("TLS Secret {name} has only one of tls.crt and tls.key; set both"),
        )),
    }
}

/// Writes TLS material where the NATS client can read it (a private directory).
pub(crate) fn write_tls_files(
    dir: &std::path::Path,
    files: &[(String, String)],
    auth: &mut NatsAuth,
) -> Result<(), NotReady> {
    if files.is_empty() {
        return Ok(());
    }
    let io = |e: std::io::Error| {
        NotReady::new(Cause::KubernetesError, format!("writing TLS files: {e}"))
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        match name.as_str() {
            "ca.crt" => auth.tls_ca = Some(path),
            "tls.crt" => auth.tls_cert = Some(path),
            "tls.key" => auth.tls_key = Some(path),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Clone)]
pub(crate) struct Figures {
    pub(crate) consumer_paused: bool,
    /// Records in the state bucket (left by the protocol before v2); `None` when
    /// the bucket could not be read (then the workers keep what they have).
    pub(crate) legacy_records: Option<u64>,
    pub(crate) stream: crate::crd::StreamStatus,
    pub(crate) consumer: crate::crd::ConsumerStatus,
    pub(crate) dead_letters: i64,
    /// The consumer's position and the stream's sequences, for counting the
    /// inputs removed unprocessed (see [`super::retention`]).
    pub(crate) observation: super::retention::Observation,
    /// Seconds since the oldest unprocessed input was stored; `None`: none.
    pub(crate) oldest_unprocessed_age_seconds: Option<i64>,
    /// The input stream's configuration as read (the hold changes its maxAge).
    pub(crate) stream_config: async_nats::jetstream::stream::Config,
    /// An input was stored since the last look that the consumer does not
    /// count (nothing pending, nothing delivered since): its position is past
    /// the stream's, and it will not deliver it (see [`super::stall`]).
    pub(crate) unseen_input: bool,
}

/// What the last status says of the stream and the consumer, for telling an
/// input the consumer does not see.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LastLook {
    pub(crate) last_seq: u64,
    pub(crate) deliveries: u64,
}

impl LastLook {
    pub(crate) fn of(old: &crate::crd::OrderPipelineStatus) -> Option<Self> {
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        Some(Self {
            last_seq: u(old.stream.as_ref()?.last_sequence),
            deliveries: u(old.consumer.as_ref()?.delivered),
        })
    }
}

pub(crate) async fn read_figures(
    js: &dyn JetStream,
    t: &Topology,
    seen: Seen,
    bytes_per_subject: u64,
    last: Option<LastLook>,
) -> Result<Figures, String> {
    let i64_of = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let missing = |what: &str| format!("{what} does not exist (yet)");
    let stream = async |name: &str, seen: Option<StreamView>| match seen {
        Some(v) => Ok(Some(v)),
        None => js.stream(name).await,
    };
    let st = stream(&t.stream, seen.stream)
        .await
        .map_err(|e| format!("reading stream {}: {e}", t.stream))?
        .ok_or_else(|| missing(&format!("stream {}", t.stream)))?;
    let c = match seen.consumer {
        Some(c) => c,
        None => js
            .consumer(&t.stream, &t.consumer)
            .await
            .map_err(|e| format!("reading consumer {}: {e}", t.consumer))?
            .ok_or_else(|| missing(&format!("consumer {}", t.consumer)))?,
    };
    let dead = stream(&t.dlq_stream, seen.dlq)
        .await
        .map_err(|e| format!("reading stream {}: {e}", t.dlq_stream))?
        .ok_or_else(|| missing(&format!("stream {}", t.dlq_stream)))?
        .messages;
    // The bucket is absent unless the pipeline was upgraded from v1: no records then.
    let bucket = match seen.bucket {
        Some(read) => Ok(read),
        None => js.stream(&format!("KV_{}", t.bucket)).await,
    };
    let legacy_records = bucket.ok().map(|b| b.map_or(0, |b| b.messages));
    let oldest_unprocessed_age_seconds = oldest_unprocessed_age(js, t, &st, &c)
        .await
        .map_err(|e| format!("reading the oldest unprocessed order in {}: {e}", t.stream))?;
    let unseen_input = unseen_input(js, t, &st, &c, last).await.map_err(|e| {
        format!(
            "reading the inputs stored since the last look in {}: {e}",
            t.stream
        )
    })?;
    Ok(Figures {
        consumer_paused: c.paused,
        legacy_records,
        stream: crate::crd::StreamStatus {
            messages: i64_of(st.messages),
            bytes: i64_of(st.bytes),
            first_sequence: i64_of(st.first_sequence),
            last_sequence: i64_of(st.last_sequence),
            subjects: i64_of(st.subjects),
            estimated_server_memory_bytes: i64_of(st.subjects.saturating_mul(bytes_per_subject)),
            created: st.created.and_then(created_of),
        },
        consumer: crate::crd::ConsumerStatus {
            pending: i64_of(c.pending),
            ack_pending: i64::try_from(c.ack_pending).unwrap_or(i64::MAX),
            redelivered: i64::try_from(c.redelivered).unwrap_or(i64::MAX),
            delivered: i64_of(c.cursor.deliveries),
            ack_floor: i64_of(c.cursor.ack_floor_stream_seq),
            waiting_since: None,
        },
        dead_letters: i64_of(dead),
        observation: super::retention::Observation {
            cursor: c.cursor,
            pending: c.pending,
            ack_pending: u64::try_from(c.ack_pending).unwrap_or(u64::MAX),
            first_seq: st.first_sequence,
            last_seq: st.last_sequence,
        },
        oldest_unprocessed_age_seconds,
        stream_config: st.config,
        unseen_input,
    })
}

/// A stream's creation time (unix ns) as the status shows it: RFC 3339 to the
/// nanosecond (the API's `Time` keeps whole seconds, too coarse to tell a
/// stream from one recreated in the same second).
pub(crate) fn created_of(ns: i128) -> Option<String> {
    k8s_openapi::jiff::Timestamp::from_nanosecond(ns)
        .ok()
        .map(|t| t.to_string())
}

/// Whether an input stored since the last look is one the consumer does not
/// count. Asked only when the consumer reports nothing pending, nothing
/// awaiting ack and no delivery since the last look while the stream grew:
/// then no worker wrote an outcome, so the growth is inputs (or other
/// subjects), and an input among it is one the consumer will not deliver
/// (its position is past the stream's last sequence, as after a server lost
/// the stream's tail). One request, and none on a pipeline that moves or
/// rests.
async fn unseen_input(
    js: &dyn JetStream,
    t: &Topology,
    st: &StreamView,
    c: &ConsumerView,
    last: Option<LastLook>,
) -> Result<bool, JsError> {
    let Some(last) = last else { return Ok(false) };
    let quiet = c.pending == 0 && c.ack_pending == 0 && c.cursor.deliveries == last.deliveries;
    if !quiet || st.last_sequence <= last.last_seq {
        return Ok(false);
    }
    let from = (last.last_seq + 1).max(st.first_sequence);
    Ok(js
        .stored_at(&t.stream, &t.filter_subject, from)
        .await?
        .is_some())
}

/// The age of the first input above the consumer's ack floor (every input at
/// or below it is acknowledged, so this one is not): one request, made only
/// when the consumer has inputs pending.
async fn oldest_unprocessed_age(
    js: &dyn JetStream,
    t: &Topology,
    st: &StreamView,
    c: &ConsumerView,
) -> Result<Option<i64>, JsError> {
    if c.pending == 0 && c.ack_pending == 0 {
        return Ok(None);
    }
    let from = (c.cursor.ack_floor_stream_seq + 1).max(st.first_sequence);
    let filter = c.config.filter_subject.as_str();
    let Some(stored) = js.stored_at(&t.stream, filter, from).await? else {
        return Ok(None);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Ok(Some((now - stored).max(0)))
}

/// Digests of the referenced Secrets.
pub(crate) mod digest {
    use k8s_openapi::api::core::v1::Secret;
    use sha2::{Digest as _, Sha256};

    /// Two SHA-256 digests over the same Secrets: their `content` (the data:
    /// what the connection pool is keyed by, never shown) and their `version`
    /// (uid and resourceVersion: the checksum the status and the worker pods
    /// carry, so a changed Secret rolls the workers, and nothing of its data is
    /// published, not even hashed).
    #[derive(Default)]
    pub struct Secrets {
        content: Sha256,
        version: Sha256,
    }

    /// Length-prefixed, so that no two different inputs feed the same bytes.
    fn field(h: &mut Sha256, b: &[u8]) {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    }

    impl Secrets {
        pub fn update(&mut self, s: &Secret) {
            let m = &s.metadata;
            field(
                &mut self.content,
                m.name.as_deref().unwrap_or("").as_bytes(),
            );
            let data: super::BTreeMap<&String, &Vec<u8>> =
                s.data.iter().flatten().map(|(k, v)| (k, &v.0)).collect();
            for (k, v) in data {
                field(&mut self.content, k.as_bytes());
                field(&mut self.content, v);
            }
            let strings: super::BTreeMap<&String, &String> =
                s.string_data.iter().flatten().collect();
            for (k, v) in strings {
                field(&mut self.content, k.as_bytes());
                field(&mut self.content, v.as_bytes());
            }
            field(&mut self.version, m.uid.as_deref().unwrap_or("").as_bytes());
            let rv = m.resource_version.as_deref().unwrap_or("");
            field(&mut self.version, rv.as_bytes());
        }

        /// (content, version), hex.
        pub fn finish(self) -> (String, String) {
            let hex = |h: Sha256| {
                h.finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            };
            (hex(self.content), hex(self.version)[..32].to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(yaml: &str) -> Secret {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// The pool shares a connection only between the same credentials (a
    /// SHA-256 of the data), and what the status and the pods show is not a
    /// digest of the data at all (a weak password cannot be guessed from it).
    #[test]
    fn the_pool_key_digests_the_data_and_the_shown_checksum_only_the_version() {
        let of = |yaml: &str| {
            let mut d = digest::Secrets::default();
            d.update(&secret(yaml));
            d.finish()
        };
        let (content, version) = of(
            "{metadata: {name: a, uid: u1, resourceVersion: '7'}, stringData: {password: hunter2}}",
        );
        assert_eq!(content.len(), 64, "a SHA-256: {content}");
        // The same data in another object, or the same object at another version:
        // the same connection, another checksum.
        let (c2, v2) = of(
            "{metadata: {name: a, uid: u1, resourceVersion: '8'}, stringData: {password: hunter2}}",
        );
        assert_eq!(c2, content);
        assert_ne!(v2, version);
        // Other data, the same version: another connection, the same checksum.
        let (c3, v3) = of(
            "{metadata: {name: a, uid: u1, resourceVersion: '7'}, stringData: {password: hunter3}}",
        );
        assert_ne!(c3, content);
        assert_eq!(v3, version, "the checksum does not depend on the data");
        // Fields are length-prefixed: moving bytes between key and value changes it.
        let (c4, _) = of("{metadata: {name: a}, stringData: {ab: c}}");
        let (c5, _) = of("{metadata: {name: a}, stringData: {a: bc}}");
        assert_ne!(c4, c5);
    }

    #[test]
    fn a_credentials_secret_holds_one_kind_or_says_what_is_missing() {
        let table = [
            (
                "{stringData: {user: u, password: p}}",
                Ok(Credentials::UserPassword),
            ),
            ("{stringData: {token: t}}", Ok(Credentials::Token)),
            ("{stringData: {creds: c}}", Ok(Credentials::CredsFile)),
            ("{data: {nkey: U1VBQQ==}}", Ok(Credentials::NkeySeed)),
            (
                "{stringData: {user: u}}",
                Err("only one of the keys user and password"),
            ),
            (
                "{stringData: {other: x}}",
                Err("none of the keys user+password, token, creds or nkey"),
            ),
        ];
        for (yaml, want) in table {
            let mut auth = NatsAuth::default();
            let s = secret(yaml);
            let got = credentials_of("nats-auth", &s, &mut auth);
            match (got, want) {
                (Ok(k), Ok(w)) => assert_eq!(k, w, "{yaml}"),
                (Err(e), Err(w)) => {
                    assert_eq!(e.cause, Cause::SecretInvalid, "{yaml}");
                    assert!(
                        e.message.contains(w) && e.message.contains("nats-auth"),
                        "{yaml}: {}",
                        e.message
                    );
                }
                (got, _) => panic!("{yaml}: {got:?}"),
            }
        }
    }

    #[test]
    fn a_tls_secret_needs_the_ca_and_both_or_neither_client_files() {
        let (files, client) = tls_of("tls", &secret("{stringData: {ca.crt: CA}}")).unwrap();
        assert_eq!((files.len(), client), (1, false));
        let (files, client) = tls_of(
            "tls",
            &secret("{stringData: {ca.crt: CA, tls.crt: C, tls.key: K}}"),
        )
        .unwrap();
        assert_eq!((files.len(), client), (3, true));
        let e = tls_of("tls", &secret("{stringData: {tls.crt: C, tls.key: K}}")).unwrap_err();
        assert!(e.message.contains("has no ca.crt"), "{}", e.message);
        let e = tls_of("tls", &secret("{stringData: {ca.crt: CA, tls.crt: C}}")).unwrap_err();
        assert!(
            e.message.contains("only one of tls.crt and tls.key"),
            "{}",
            e.message
        );
    }
}

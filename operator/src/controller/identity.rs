//! Minted NATS identities (`spec.nats.accountRef`, NATS in operator mode).
//!
//! The administrator offers a NATS account to namespaces with a Secret in the
//! operator's namespace, labelled [`ACCOUNT_LABEL`], holding the account's
//! public key (`account`), an unscoped signing key's seed (`signingKey`), the
//! server URLs pipelines may use with it (`urls`) and the namespaces it is
//! offered to (`namespaces`, comma separated, or `*`). For each pipeline that
//! references it the operator connects as a user of that account minted for
//! every connect, and keeps two Secrets in the pipeline's namespace, owned by
//! the pipeline: `<name>-nats-worker` (mounted by the workers) and
//! `<name>-nats-producer` (for the application that publishes orders), each a
//! creds file whose permissions [`PipelineScope`] derives from the spec. They
//! expire after the operator's `--nats-identity-ttl` and are renewed at half
//! of it; the workers read the file on every reconnect, so a renewal needs no
//! rollout. A deleted pipeline's identities stop working when they expire.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource as _, ResourceExt as _};
use orderpipeline_common::natsauth::{self, AccountSigner, PipelineScope};

use crate::crd::{NatsIdentityStatus, OrderPipeline};
use crate::render::Plan;

use super::error::{Cause, NotReady};
use super::{Context, MANAGER};

/// The label that makes a Secret in the operator's namespace a NATS account
/// pipelines may reference.
pub const ACCOUNT_LABEL: &str = "orderpipeline.dev/nats-account";
/// The annotation on a minted Secret: a digest of what it was minted for
/// (account, signing key, permissions); another digest means mint again.
const MINTED_FOR: &str = "orderpipeline.dev/minted-for";

/// An account a pipeline may mint identities in.
pub(crate) struct Account {
    pub(crate) signer: Arc<AccountSigner>,
    /// A SHA-256 of the account Secret's data: the connection pool's key.
    pub(crate) digest: String,
}

/// A key of the account Secret, trimmed; `None` when missing or blank.
fn text(s: &Secret, key: &str) -> Option<String> {
    super::dereference::secret_text(s, key)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn invalid(why: String) -> NotReady {
    NotReady::new(Cause::InvalidSpec, why)
}

/// Reads the account `spec.nats.accountRef` names and checks that it is
/// offered to the pipeline's namespace and its NATS URL.
pub(crate) async fn account(p: &OrderPipeline, ctx: &Context) -> Result<Option<Account>, NotReady> {
    let Some(r) = &p.spec.nats.account_ref else {
        return Ok(None);
    };
    let Some(home) = &ctx.accounts_namespace else {
        return Err(invalid(format!(
            "spec.nats.accountRef ({}) needs NATS accounts, and this operator has no namespace to read them from: set its --accounts-namespace (or POD_NAMESPACE)",
            r.name
        )));
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), home);
    let s = match api.get_opt(&r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(NotReady::new(
                Cause::SecretMissing,
                format!(
                    "NATS account {} (spec.nats.accountRef) does not exist; ask the administrator for the name of an account offered to this namespace",
                    r.name
                ),
            ));
        }
        Err(e) => {
            return Err(NotReady::new(
                Cause::KubernetesError,
                format!("reading NATS account {}: {e}", r.name),
            ));
        }
    };
    check_account(p, &r.name, &s, ctx.identity_ttl).map(Some)
}

/// The account Secret `s`, checked against the pipeline (pure).
fn check_account(
    p: &OrderPipeline,
    name: &str,
    s: &Secret,
    ttl: std::time::Duration,
) -> Result<Account, NotReady> {
    let ns = p.namespace().unwrap_or_default();
    let labelled = s.labels().get(ACCOUNT_LABEL).is_some_and(|v| v == "true");
    if !labelled {
        return Err(invalid(format!(
            "NATS account {name} (spec.nats.accountRef) does not exist; ask the administrator for the name of an account offered to this namespace"
        )));
    }
    let offered = text(s, "namespaces").unwrap_or_default();
    if !offered
        .split(',')
        .map(str::trim)
        .any(|n| n == "*" || n == ns)
    {
        return Err(invalid(format!(
            "NATS account {name} is not offered to namespace {ns}; ask the administrator to add {ns} to its namespaces"
        )));
    }
    let urls = text(s, "urls").unwrap_or_default();
    let allowed: Vec<&str> = orderpipeline_common::nats::servers(&urls).collect();
    if let Some(other) =
        orderpipeline_common::nats::servers(&p.spec.nats.url).find(|u| !allowed.contains(u))
    {
        return Err(invalid(format!(
            "spec.nats.url names {other}, which NATS account {name} is not used with (its servers: {}); use one of them",
            allowed.join(", ")
        )));
    }
    let (Some(account), Some(seed)) = (text(s, "account"), text(s, "signingKey")) else {
        return Err(NotReady::new(
            Cause::SecretInvalid,
            format!(
                "NATS account {name} lacks the key account (its public key) or signingKey (an account signing key's seed); the administrator must add them"
            ),
        ));
    };
    let signer = AccountSigner::new(&account, &seed, ttl).map_err(|e| {
        NotReady::new(
            Cause::SecretInvalid,
            format!("NATS account {name}: {e}; the administrator must fix it"),
        )
    })?;
    let mut d = super::dereference::digest::Secrets::default();
    d.update(s);
    let (digest, _) = d.finish();
    Ok(Account {
        signer: Arc::new(signer),
        digest,
    })
}

/// The names and subjects the pipeline's identities are scoped to.
pub(crate) fn scope(p: &OrderPipeline, plan: &Plan) -> PipelineScope {
    let t = &plan.topology;
    PipelineScope {
        stream: t.stream.clone(),
        consumer: t.consumer.clone(),
        dlq_stream: t.dlq_stream.clone(),
        input_subject: t.filter_subject.clone(),
        legacy_bucket: plan.legacy_bucket.clone(),
        inbox_prefix: PipelineScope::inbox_prefix_for(p.uid().as_deref().unwrap_or_default()),
    }
}

pub(crate) fn worker_secret(p: &OrderPipeline) -> String {
    orderpipeline_common::names::minted_worker_secret(&p.name_any())
}

pub(crate) fn producer_secret(p: &OrderPipeline) -> String {
    orderpipeline_common::names::minted_producer_secret(&p.name_any())
}

/// What a minted Secret was minted for: it is minted again when this changes.
fn minted_for(account: &Account, perms: &natsauth::Permissions) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(account.signer.account.as_bytes());
    h.update(account.signer.signing_key().as_bytes());
    h.update(format!("{perms:?}").as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `s` is a Secret minted for a pipeline of `p`'s name: `p`'s own, or
/// a deleted namesake's that the garbage collector has not removed yet (both
/// are written over). Any other Secret of that name is the tenant's and is
/// never overwritten.
fn owned_by(s: &Secret, p: &OrderPipeline) -> bool {
    s.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.kind == "OrderPipeline" && o.name == p.name_any())
}

/// When the creds in `s` expire, if `s` was minted for `want`.
fn current_expiry(s: &Secret, want: &str) -> Option<u64> {
    if s.annotations().get(MINTED_FOR).map(String::as_str) != Some(want) {
        return None;
    }
    natsauth::creds_expiry(&text(s, "creds")?)
}

/// Whether credentials expiring at `expires` are to be renewed now: past half
/// of their lifetime `ttl`.
pub(crate) fn due(expires: u64, now: u64, ttl: std::time::Duration) -> bool {
    expires <= now + ttl.as_secs() / 2
}

/// Keeps the pipeline's worker and producer Secrets current: minted for the
/// account and permissions of now, and not past half their lifetime.
pub(crate) async fn ensure(
    p: &OrderPipeline,
    ctx: &Context,
    account: &Account,
    scope: &PipelineScope,
) -> Result<NatsIdentityStatus, NotReady> {
    let ns = p.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let worker = scope
        .worker()
        .map_err(|e| invalid(format!("the workers' NATS identity: {e}")))?;
    let mut expires = u64::MAX;
    for (name, role, perms) in [
        (worker_secret(p), "worker", worker),
        (producer_secret(p), "producer", scope.producer()),
    ] {
        let want = minted_for(account, &perms);
        let live = api.get_opt(&name).await.map_err(|e| {
            NotReady::new(
                Cause::KubernetesError,
                format!("reading Secret {ns}/{name}: {e}"),
            )
        })?;
        if let Some(s) = &live
            && !owned_by(s, p)
        {
            return Err(invalid(format!(
                "Secret {ns}/{name} exists and is not this pipeline's (no owner reference to an OrderPipeline {}): the operator keeps the pipeline's {role} identity there and will not overwrite it; rename or delete that Secret",
                p.name_any()
            )));
        }
        let now = natsauth::now();
        let current = live
            .as_ref()
            .and_then(|s| current_expiry(s, &want))
            .filter(|&exp| !due(exp, now, account.signer.ttl));
        let exp = match current {
            Some(exp) => exp,
            None => {
                let user = format!("{ns}/{}:{role}", p.name_any());
                let minted = account.signer.mint(&user, &perms).map_err(|e| {
                    NotReady::new(Cause::SecretInvalid, format!("minting {user}: {e}"))
                })?;
                let s = minted_secret(p, &name, role, &want, &minted.creds);
                api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&s))
                    .await
                    .map_err(|e| {
                        NotReady::new(
                            Cause::KubernetesError,
                            format!(
                                "writing Secret {ns}/{name}: {e}; the operator needs create and patch on Secrets in this namespace"
                            ),
                        )
                    })?;
                minted.expires.unwrap_or(u64::MAX)
            }
        };
        expires = expires.min(exp);
    }
    let expires = k8s_openapi::jiff::Timestamp::from_second(expires.min(i64::MAX as u64) as i64)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
    Ok(NatsIdentityStatus {
        worker_secret: worker_secret(p),
        producer_secret: producer_secret(p),
        inbox_prefix: scope.inbox_prefix.clone(),
        expires: Time(expires),
    })
}

fn minted_secret(p: &OrderPipeline, name: &str, role: &str, want: &str, creds: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: p.namespace(),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".into(), MANAGER.into()),
                ("orderpipeline.dev/pipeline".into(), p.name_any()),
                ("orderpipeline.dev/identity".into(), role.into()),
            ])),
            annotations: Some(BTreeMap::from([(MINTED_FOR.into(), want.into())])),
            owner_references: p.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            "creds".into(),
            ByteString(creds.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(ns: &str, url: &str) -> OrderPipeline {
        let mut p: OrderPipeline = serde_yaml::from_str(&format!(
            "apiVersion: orderpipeline.dev/v1alpha1\nkind: OrderPipeline\nmetadata: {{name: p, namespace: {ns}, uid: u-1}}\nspec: {{nats: {{url: '{url}', accountRef: {{name: tenants}}}}}}"
        ))
        .unwrap();
        p.metadata.generation = Some(1);
        p
    }

    fn account_secret(namespaces: &str, labelled: bool) -> Secret {
        let signing = orderpipeline_common::natsauth::KeyPair::new_account();
        let account = orderpipeline_common::natsauth::KeyPair::new_account();
        let data = [
            ("account", account.public_key()),
            ("signingKey", signing.seed().unwrap()),
            (
                "urls",
                "tls://nats.nats.svc:4222, tls://nats-2.nats.svc:4222".into(),
            ),
            ("namespaces", namespaces.into()),
        ];
        Secret {
            metadata: ObjectMeta {
                name: Some("tenants".into()),
                labels: labelled.then(|| BTreeMap::from([(ACCOUNT_LABEL.into(), "true".into())])),
                ..Default::default()
            },
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn refusal(p: &OrderPipeline, s: &Secret) -> String {
        match check_account(p, "tenants", s, std::time::Duration::from_secs(60)) {
            Ok(_) => "accepted".into(),
            Err(e) => e.message,
        }
    }

    #[test]
    fn an_account_is_used_only_where_and_how_it_is_offered() {
        let p = pipeline("shop", "tls://nats.nats.svc:4222");
        assert_eq!(
            refusal(&p, &account_secret("billing, shop", true)),
            "accepted"
        );
        assert_eq!(refusal(&p, &account_secret("*", true)), "accepted");
        let e = refusal(&p, &account_secret("billing", true));
        assert!(e.contains("not offered to namespace shop"), "{e}");
        // An unlabelled Secret in the operator's namespace is no account.
        let e = refusal(&p, &account_secret("*", false));
        assert!(e.contains("does not exist"), "{e}");
        // The operator's own identity never goes to a server the account
        // does not name.
        let p = pipeline("shop", "tls://evil.example:4222");
        let e = refusal(&p, &account_secret("*", true));
        assert!(
            e.contains("evil.example:4222") && e.contains("nats-2.nats.svc"),
            "{e}"
        );
    }

    #[test]
    fn a_secret_of_the_same_name_that_is_not_the_pipelines_is_never_overwritten() {
        let p = pipeline("shop", "tls://nats.nats.svc:4222");
        let minted = minted_secret(&p, "p-nats-worker", "worker", "x", "creds");
        assert!(owned_by(&minted, &p));
        let mut theirs = minted.clone();
        theirs.metadata.owner_references = None;
        assert!(!owned_by(&theirs, &p), "a tenant's own Secret");
        // A deleted namesake's, not yet collected: written over.
        let mut recreated = p.clone();
        recreated.metadata.uid = Some("u-2".into());
        assert!(owned_by(&minted, &recreated));
    }

    #[test]
    fn credentials_are_renewed_at_half_their_lifetime() {
        let ttl = std::time::Duration::from_secs(100);
        assert!(!due(1_000, 949, ttl));
        assert!(due(1_000, 950, ttl));
        assert!(due(1_000, 2_000, ttl), "expired");
    }
}

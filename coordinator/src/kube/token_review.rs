//! Agent authentication in a cluster: a projected ServiceAccount token
//! (audience `baton`) sent as `authorization: Bearer ...`, checked with a
//! TokenReview, and bound to the node the agent's pod runs on.
//!
//! RBAC cannot say "only my own node", so the binding is done here: the
//! token must belong to the agents' ServiceAccount, and the identity may act
//! only for the node named in the token's node-name claim (Kubernetes 1.30+
//! puts it in the review's `extra`), else the node the token's pod is bound
//! to (looked up by name, and checked against the token's pod uid so a
//! token of a deleted pod does not carry over to a new pod of the same
//! name). Listed admin users may act for any node.
//!
//! An accepted token's identity is reused for [`CACHE_TTL`] so agents'
//! frequent calls do not each cost a review.
//!
//! Outcomes: no or invalid token, or wrong audience (or a review that does
//! not name the audiences it checked): UNAUTHENTICATED;
//! a valid token of another account, or one not bound to a pod:
//! PERMISSION_DENIED; the API unreachable: UNAVAILABLE.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::kube::api::PostParams;
use ::kube::{Api, Client};
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tracing::warn;

use super::KubeArgs;
use crate::auth::{Authenticator, Credentials, Identity, Scope};

/// The node-name claim of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The pod-name claim of a pod-bound token.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The pod-uid claim of a pod-bound token.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// What a token must be to be accepted.
#[derive(Clone, Debug)]
pub struct ReviewPolicy {
    /// The audience requested and required.
    pub audience: String,
    /// `system:serviceaccount:NAMESPACE:NAME` of the agents.
    pub agent_username: String,
    /// Users that may act for any node and administer.
    pub admins: Vec<String>,
}

/// Whom a reviewed token stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// An admin user.
    Admin(String),
    /// The agent on this node (from the token's node-name claim).
    Node {
        /// The account.
        username: String,
        /// The node.
        node: String,
    },
    /// The agent in this pod; its node must be looked up.
    Pod {
        /// The account.
        username: String,
        /// The pod's name.
        pod: String,
        /// The pod's uid, when the token names it.
        uid: Option<String>,
    },
}

/// Decides whom a TokenReview status stands for (pure).
pub fn bind(status: &TokenReviewStatus, policy: &ReviewPolicy) -> Result<Binding, Status> {
    if status.authenticated != Some(true) {
        return Err(Status::unauthenticated(format!(
            "token refused by the Kubernetes API: {}",
            status.error.as_deref().unwrap_or("not authenticated")
        )));
    }
    // An API server that leaves `audiences` out did not check the audience
    // the review asked for (an old or non-conforming authenticator): such a
    // token could have been issued for anyone, so it is refused.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.contains(&policy.audience))
    {
        return Err(Status::unauthenticated(format!(
            "token is not issued for audience {:?}{}",
            policy.audience,
            if status.audiences.is_none() {
                " (the TokenReview did not say which audiences it checked)"
            } else {
                ""
            }
        )));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if policy.admins.contains(&username) {
        return Ok(Binding::Admin(username));
    }
    if username != policy.agent_username {
        return Err(Status::permission_denied(format!(
            "{username} is not the agents' service account {}",
            policy.agent_username
        )));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    match (first(NODE_NAME_EXTRA), first(POD_NAME_EXTRA)) {
        (Some(node), _) => Ok(Binding::Node { username, node }),
        (None, Some(pod)) => Ok(Binding::Pod {
            username,
            pod,
            uid: first(POD_UID_EXTRA),
        }),
        (None, None) => Err(Status::permission_denied(format!(
            "the token of {username} is not bound to a pod; agents must use a projected service account token"
        ))),
    }
}

/// The bearer token of a request.
fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated(
                "a bearer token (projected service account token, audience baton) is required",
            )
        })
}

/// How long an accepted token's identity is reused without a new review
/// (as the API server's own webhook token cache does): agents call every few
/// seconds, and a review per call would load the API server. A deleted pod's
/// token keeps working at most this long.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// The most identities cached; the cache is emptied when it is full.
const CACHE_MAX: usize = 10_000;

/// TokenReview authentication.
pub struct TokenReviewAuth {
    reviews: Api<TokenReview>,
    pods: Api<Pod>,
    policy: ReviewPolicy,
    /// Accepted tokens: identity and when it was reviewed. Refusals are
    /// never cached.
    accepted: Mutex<HashMap<String, (Identity, Instant)>>,
}

impl TokenReviewAuth {
    /// Checks tokens through `client`, per the flags.
    pub fn new(client: Client, args: &KubeArgs) -> Self {
        Self {
            reviews: Api::all(client.clone()),
            pods: Api::namespaced(client, &args.namespace),
            policy: ReviewPolicy {
                audience: args.token_audience.clone(),
                agent_username: format!(
                    "system:serviceaccount:{}:{}",
                    args.namespace, args.agent_service_account
                ),
                admins: args.admins.clone(),
            },
            accepted: Mutex::new(HashMap::new()),
        }
    }

    async fn review(&self, token: &str) -> Result<TokenReviewStatus, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.policy.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                warn!(error = %e, "token review failed");
                Status::unavailable(format!(
                    "cannot check the token with the Kubernetes API: {e}"
                ))
            })?;
        Ok(reviewed.status.unwrap_or_default())
    }

    async fn node_of_pod(&self, pod: &str, uid: Option<&str>) -> Result<String, Status> {
        let found = self
            .pods
            .get_opt(pod)
            .await
            .map_err(|e| Status::unavailable(format!("cannot look up pod {pod}: {e}")))?
            .ok_or_else(|| {
                Status::permission_denied(format!("the token's pod {pod} does not exist"))
            })?;
        if uid.is_some_and(|u| found.metadata.uid.as_deref() != Some(u)) {
            return Err(Status::permission_denied(format!(
                "the token was issued to an earlier pod named {pod}"
            )));
        }
        found.spec.and_then(|s| s.node_name).ok_or_else(|| {
            Status::permission_denied(format!("the token's pod {pod} is not bound to a node"))
        })
    }
}

impl Authenticator for TokenReviewAuth {
    fn authenticate<'a>(
        &'a self,
        credentials: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Identity, Status>> {
        Box::pin(async move {
            let token = bearer(credentials.metadata)?;
            if let Some(identity) = self.cached(token) {
                return Ok(identity);
            }
            let identity = self.identify(token).await?;
            let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
            if accepted.len() >= CACHE_MAX {
                accepted.clear();
            }
            accepted.insert(token.to_string(), (identity.clone(), Instant::now()));
            Ok(identity)
        })
    }
}

impl TokenReviewAuth {
    fn cached(&self, token: &str) -> Option<Identity> {
        let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        match accepted.get(token) {
            Some((identity, at)) if at.elapsed() < CACHE_TTL => Some(identity.clone()),
            Some(_) => {
                accepted.remove(token);
                None
            }
            None => None,
        }
    }

    /// Reviews `token` and binds it to its node (or admin).
    async fn identify(&self, token: &str) -> Result<Identity, Status> {
        let status = self.review(token).await?;
        let (username, node) = match bind(&status, &self.policy)? {
            Binding::Admin(username) => {
                return Ok(Identity {
                    name: format!("k8s:{username}"),
                    scope: Scope::AnyNode,
                    admin: true,
                });
            }
            Binding::Node { username, node } => (username, node),
            Binding::Pod { username, pod, uid } => {
                let node = self.node_of_pod(&pod, uid.as_deref()).await?;
                (username, node)
            }
        };
        Ok(Identity {
            name: format!("k8s:{username} on node {node}"),
            scope: Scope::Nodes(vec![node]),
            admin: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;
    use tonic::Code;

    use super::*;

    fn policy() -> ReviewPolicy {
        ReviewPolicy {
            audience: "baton".to_string(),
            agent_username: "system:serviceaccount:baton-system:baton-agent".to_string(),
            admins: vec!["ops".to_string()],
        }
    }

    fn reviewed(username: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["baton".to_string()]),
            user: Some(UserInfo {
                username: Some(username.to_string()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect(),
                ),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        }
    }

    const AGENT: &str = "system:serviceaccount:baton-system:baton-agent";

    #[test]
    fn node_claim_binds_the_agent_to_its_node() {
        let b = bind(
            &reviewed(
                AGENT,
                &[(NODE_NAME_EXTRA, "n1"), (POD_NAME_EXTRA, "agent-x")],
            ),
            &policy(),
        )
        .unwrap();
        assert_eq!(
            b,
            Binding::Node {
                username: AGENT.to_string(),
                node: "n1".to_string()
            }
        );
    }

    #[test]
    fn without_node_claim_the_pod_is_looked_up() {
        let b = bind(
            &reviewed(AGENT, &[(POD_NAME_EXTRA, "agent-x"), (POD_UID_EXTRA, "u1")]),
            &policy(),
        )
        .unwrap();
        assert!(
            matches!(b, Binding::Pod { ref pod, ref uid, .. } if pod == "agent-x" && uid.as_deref() == Some("u1"))
        );
    }

    #[test]
    fn refusals() {
        let invalid = TokenReviewStatus {
            error: Some("invalid bearer token".to_string()),
            ..TokenReviewStatus::default()
        };
        assert_eq!(
            bind(&invalid, &policy()).unwrap_err().code(),
            Code::Unauthenticated
        );
        let mut wrong_audience = reviewed(AGENT, &[(NODE_NAME_EXTRA, "n1")]);
        wrong_audience.audiences = Some(vec!["https://kubernetes.default.svc".to_string()]);
        assert_eq!(
            bind(&wrong_audience, &policy()).unwrap_err().code(),
            Code::Unauthenticated
        );
        let mut unchecked_audience = reviewed(AGENT, &[(NODE_NAME_EXTRA, "n1")]);
        unchecked_audience.audiences = None;
        let err = bind(&unchecked_audience, &policy()).unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("did not say"), "{err}");
        let foreign = reviewed(
            "system:serviceaccount:default:web",
            &[(NODE_NAME_EXTRA, "n1")],
        );
        assert_eq!(
            bind(&foreign, &policy()).unwrap_err().code(),
            Code::PermissionDenied
        );
        let unbound = reviewed(AGENT, &[]);
        assert_eq!(
            bind(&unbound, &policy()).unwrap_err().code(),
            Code::PermissionDenied
        );
        assert_eq!(
            bind(&reviewed("ops", &[]), &policy()).unwrap(),
            Binding::Admin("ops".to_string())
        );
    }
}

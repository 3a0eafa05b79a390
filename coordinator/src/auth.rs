//! Who is calling, and what they may do.
//!
//! An [`Authenticator`] turns a request into an [`Identity`]:
//! - [`MutualTls`]: the client certificate (already verified against
//!   `--client-ca` by the TLS layer) names the caller; its common name and
//!   DNS subject-alternative names are the nodes it may act for, and names
//!   listed with `--admin-name` may act for any node and call the mutating
//!   Admin methods;
//! - [`Unauthenticated`]: `--insecure` labs only; everyone may do everything;
//! - [`CertificateOrToken`]: mutual TLS for callers that present a client
//!   certificate, another scheme (Kubernetes TokenReview) for the rest, so
//!   hosts outside the cluster keep using certificates when agents in it use
//!   tokens.
//!
//! Other schemes (Kubernetes TokenReview) implement the same trait.

use std::sync::Arc;

use futures::future::BoxFuture;
use tonic::Status;
use tonic::metadata::MetadataMap;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::node::NodeName;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// How the caller is named in logs and the audit trail.
    pub name: String,
    /// The nodes the caller may act for.
    pub scope: Scope,
    /// True when the caller may pause, resume and force-release.
    pub admin: bool,
}

/// The nodes an identity may act for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Any node.
    AnyNode,
    /// Only these nodes.
    Nodes(Vec<String>),
}

impl Identity {
    /// Allows acting for `node`, or PERMISSION_DENIED naming both sides.
    pub fn may_act_for(&self, node: &NodeName) -> Result<(), Status> {
        match &self.scope {
            Scope::AnyNode => Ok(()),
            Scope::Nodes(nodes) if nodes.iter().any(|n| n == node.as_str()) => Ok(()),
            Scope::Nodes(nodes) => Err(Status::permission_denied(format!(
                "{} may act only for node(s) [{}], not for node {node}",
                self.name,
                nodes.join(", ")
            ))),
        }
    }

    /// Allows operator actions, or PERMISSION_DENIED.
    pub fn may_administer(&self) -> Result<(), Status> {
        if self.admin {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{} is not an admin identity (see --admin-name)",
                self.name
            )))
        }
    }
}

/// What a request carries that authentication may use.
pub struct Credentials<'a> {
    /// gRPC metadata (headers).
    pub metadata: &'a MetadataMap,
    /// The verified client certificate chain, leaf first, if any.
    pub peer_certs: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
}

/// Turns credentials into an identity.
pub trait Authenticator: Send + Sync + 'static {
    /// The caller's identity, or UNAUTHENTICATED.
    fn authenticate<'a>(
        &'a self,
        credentials: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Identity, Status>>;
}

/// `--insecure`: every caller may do everything.
#[derive(Debug, Default)]
pub struct Unauthenticated;

impl Authenticator for Unauthenticated {
    fn authenticate<'a>(&'a self, _: Credentials<'a>) -> BoxFuture<'a, Result<Identity, Status>> {
        Box::pin(async {
            Ok(Identity {
                name: "anonymous (insecure)".to_string(),
                scope: Scope::AnyNode,
                admin: true,
            })
        })
    }
}

/// Mutual TLS: the client certificate names the caller.
#[derive(Debug, Default)]
pub struct MutualTls {
    /// Certificate names that are admins.
    pub admin_names: Vec<String>,
}

impl Authenticator for MutualTls {
    fn authenticate<'a>(
        &'a self,
        credentials: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Identity, Status>> {
        Box::pin(async move {
            let certs = credentials.peer_certs.unwrap_or_default();
            let leaf = certs.first().ok_or_else(|| {
                Status::unauthenticated("a client certificate is required (mutual TLS)")
            })?;
            let names = certificate_names(leaf.as_ref()).map_err(|e| {
                Status::unauthenticated(format!("client certificate unreadable: {e}"))
            })?;
            if names.is_empty() {
                return Err(Status::unauthenticated(
                    "client certificate has neither a common name nor DNS names",
                ));
            }
            let admin = names.iter().any(|n| self.admin_names.contains(n));
            Ok(Identity {
                name: format!("cert:{}", names[0]),
                scope: if admin {
                    Scope::AnyNode
                } else {
                    Scope::Nodes(names)
                },
                admin,
            })
        })
    }
}

/// The common name(s) and DNS subject-alternative names of a DER certificate.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name
                && !names.iter().any(|n| n == dns)
            {
                names.push((*dns).to_string());
            }
        }
    }
    Ok(names)
}

/// Mutual TLS for callers that present a client certificate, `tokens` for
/// the rest. A presented certificate was already verified against
/// `--client-ca` by the TLS layer (a certificate from another CA never gets
/// this far), so it decides alone: a caller cannot present a certificate for
/// one node and a token for another and pick the better.
pub struct CertificateOrToken {
    /// Checks client certificates.
    pub certificates: MutualTls,
    /// Checks everyone without one.
    pub tokens: Arc<dyn Authenticator>,
}

impl Authenticator for CertificateOrToken {
    fn authenticate<'a>(
        &'a self,
        credentials: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Identity, Status>> {
        if credentials
            .peer_certs
            .as_ref()
            .is_some_and(|certs| !certs.is_empty())
        {
            self.certificates.authenticate(credentials)
        } else {
            self.tokens.authenticate(credentials)
        }
    }
}

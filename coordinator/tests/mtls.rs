//! Mutual TLS: an agent's certificate name must equal the node it acts for;
//! admin names may do everything; no certificate, no service.

mod support;

use baton_proto::v1::{
    self as pb, admin_client::AdminClient, coordinator_client::CoordinatorClient,
};
use support::pki::{Issued, Pki};
use support::{TestServer, serve_args, until_granted};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

async fn channel(
    server: &TestServer,
    ca: &std::path::Path,
    client: Option<&Issued>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("coordinator.baton.test");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&c.cert).unwrap(),
            std::fs::read(&c.key).unwrap(),
        ));
    }
    Channel::from_shared(format!("https://{}", server.running.grpc_addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test]
async fn client_certificates_bind_callers_to_their_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "baton");
    let foreign = Pki::new(dir.path(), "foreign");
    let server_cert = pki.issue("server", "coordinator", &["coordinator.baton.test"]);
    let n1 = pki.issue("n1", "n1", &["n1"]);
    let admin = pki.issue("admin", "baton-admin", &[]);
    let forged = foreign.issue("forged", "n2", &["n2"]);
    let data = dir.path().join("data");
    let args = serve_args(
        &data,
        &[
            &format!("--tls-cert={}", server_cert.cert.display()),
            &format!("--tls-key={}", server_cert.key.display()),
            &format!("--client-ca={}", pki.ca.display()),
        ],
    );
    let server = TestServer::start(args).await;

    // n1 acts for n1.
    let ch = channel(&server, &pki.ca, Some(&n1)).await.unwrap();
    let mut lease = CoordinatorClient::new(ch.clone());
    let acquire = |node: &str| pb::AcquireRequest {
        node: node.into(),
        ..Default::default()
    };
    let (granted, _) =
        until_granted(&mut lease.acquire(acquire("n1")).await.unwrap().into_inner()).await;

    // ... but not for n2, and may not pause.
    let err = lease.acquire(acquire("n2")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("not for node n2"),
        "{}",
        err.message()
    );
    let err = lease
        .release(pb::ReleaseRequest {
            node: "n2".into(),
            fencing_token: granted.fencing_token,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Status and Watch are for operators: an agent sees neither other
    // nodes' errors nor the audit trail.
    let mut n1_admin = AdminClient::new(ch);
    let err = n1_admin.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = n1_admin.watch(pb::WatchRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = n1_admin
        .pause(pb::PauseRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The admin may force-release n1; the audit names the certificate.
    let mut op = AdminClient::new(channel(&server, &pki.ca, Some(&admin)).await.unwrap());
    op.force_release(pb::ForceReleaseRequest {
        node: "n1".into(),
        reason: "test".into(),
        any_token: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let status = op.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let record = status
        .audit
        .iter()
        .find(|a| a.action == "force-release")
        .unwrap();
    assert_eq!(record.actor, "cert:baton-admin");

    // No certificate, or one from another CA: no call gets through.
    for client in [None, Some(&forged)] {
        let outcome = match channel(&server, &pki.ca, client).await {
            Err(_) => None,
            Ok(ch) => Some(AdminClient::new(ch).status(pb::StatusRequest {}).await),
        };
        assert!(
            !matches!(outcome, Some(Ok(_))),
            "a call without a valid client certificate succeeded"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_keeps_working_with_token_review_on() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "baton");
    let server_cert = pki.issue("server", "coordinator", &["coordinator.baton.test"]);
    let n1 = pki.issue("n1", "n1", &["n1"]);
    let foreign = Pki::new(dir.path(), "foreign").issue("forged", "n1", &["n1"]);
    // The API server is unreachable: a certificate must not need it.
    let args = serve_args(
        &dir.path().join("data"),
        &[
            &format!("--tls-cert={}", server_cert.cert.display()),
            &format!("--tls-key={}", server_cert.key.display()),
            &format!("--client-ca={}", pki.ca.display()),
            "--token-review",
            "--kube-api-url=http://127.0.0.1:1",
        ],
    );
    let server = TestServer::start(args).await;

    // A host outside the cluster with a certificate acts for its node...
    let ch = channel(&server, &pki.ca, Some(&n1)).await.unwrap();
    let mut lease = CoordinatorClient::new(ch);
    let request = pb::AcquireRequest {
        node: "n1".into(),
        ..Default::default()
    };
    until_granted(&mut lease.acquire(request).await.unwrap().into_inner()).await;
    let err = lease
        .acquire(pb::AcquireRequest {
            node: "n2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // ... a client without a certificate is asked for a token (the TLS
    // handshake lets it in; authentication is TokenReview's) ...
    let ch = channel(&server, &pki.ca, None).await.unwrap();
    let err = CoordinatorClient::new(ch)
        .renew(pb::RenewRequest {
            node: "n1".into(),
            fencing_token: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("bearer token"), "{err}");

    // ... and a certificate from another CA still gets nowhere.
    let outcome = match channel(&server, &pki.ca, Some(&foreign)).await {
        Err(_) => None,
        Ok(ch) => Some(
            CoordinatorClient::new(ch)
                .renew(pb::RenewRequest {
                    node: "n1".into(),
                    fencing_token: 1,
                })
                .await,
        ),
    };
    assert!(
        !matches!(outcome, Some(Ok(_))),
        "a forged certificate got through"
    );
    server.stop().await;
}

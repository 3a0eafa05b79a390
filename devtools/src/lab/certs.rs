//! The lab's certificate authority: one CA, the coordinators' server
//! certificate (valid for 127.0.0.1 and localhost, where the nodes reach the
//! coordinators), a client certificate per node (its name is the node: the
//! coordinator lets a node act only for itself) and an admin certificate
//! (`baton-admin`) for batonctl and the lab's own observer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// Every certificate of a lab run, written under one directory.
pub struct LabCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (agents, batonctl and the coordinators trust it).
    pub ca: PathBuf,
}

/// The name admin clients present (the coordinator's default `--admin-name`).
pub const ADMIN_NAME: &str = "baton-admin";

impl LabCa {
    /// A new CA under `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "baton lab CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).with_context(|| ca.display().to_string())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca,
        })
    }

    fn issue(&self, file: &str, name: &str, sans: &[&str], server: bool) -> Result<Pair> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let pair = Pair {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        std::fs::write(&pair.cert, cert.pem())?;
        std::fs::write(&pair.key, key.serialize_pem())?;
        Ok(pair)
    }

    /// The coordinators' server certificate (both replicas share it: the
    /// nodes reach whichever leads through one address).
    pub fn server(&self) -> Result<Pair> {
        self.issue(
            "coordinator",
            "baton-coordinator",
            &["127.0.0.1", "localhost"],
            true,
        )
    }

    /// A node's client certificate: common name and DNS name are the node.
    pub fn node(&self, node: &str) -> Result<Pair> {
        self.issue(node, node, &[node], false)
    }

    /// The admin client certificate.
    pub fn admin(&self) -> Result<Pair> {
        self.issue("admin", ADMIN_NAME, &[], false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_files_that_parse_as_pem() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LabCa::create(dir.path()).unwrap();
        for pair in [ca.server().unwrap(), ca.node("etcd-1").unwrap()] {
            let cert = std::fs::read_to_string(&pair.cert).unwrap();
            assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
            let key = std::fs::read_to_string(&pair.key).unwrap();
            assert!(key.contains("PRIVATE KEY"), "{key}");
        }
        assert!(
            std::fs::read_to_string(&ca.ca)
                .unwrap()
                .contains("CERTIFICATE")
        );
    }
}

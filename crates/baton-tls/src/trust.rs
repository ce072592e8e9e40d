//! Outbound TLS trust: the CA store (the system's, plus `[delivery] tls_ca_file`), checking a
//! server's certificate chain for a host name, DANE TLSA matching (RFC 7672), and the
//! verifying client configuration for HTTPS (MTA-STS policy fetches).
//!
//! Owns certificate verification only; which policy applies to a destination is delivery's
//! business, and it opens no connections.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

pub struct Trust {
    /// None when no CA certificate could be loaded: nothing verifies.
    verifier: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl Trust {
    /// The system's CA certificates plus those in `ca_file`.
    pub fn load(ca_file: Option<&Path>) -> Result<Trust, String> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            for cert in load_roots(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
            }
        }
        tracing::debug!(
            system = added,
            total = roots.len(),
            "outbound TLS trust anchors"
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(Trust {
            verifier: verifier(roots, &provider),
            provider,
        })
    }

    /// Checks `chain` (leaf first) for `host`: issued by a trusted CA, in date, naming `host`.
    pub fn verify(&self, chain: &[CertificateDer<'_>], host: &str) -> Result<(), String> {
        let verifier = self
            .verifier
            .as_ref()
            .ok_or("no trusted CA certificates are loaded")?;
        verify_with(verifier, chain, host)
    }

    /// A client configuration that verifies servers against this store (for HTTPS).
    pub fn https_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let verifier = self
            .verifier
            .clone()
            .ok_or("no trusted CA certificates are loaded")?;
        let config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }
}

fn verifier(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Option<Arc<WebPkiServerVerifier>> {
    if roots.is_empty() {
        return None;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .ok()
}

fn verify_with(
    verifier: &WebPkiServerVerifier,
    chain: &[CertificateDer<'_>],
    host: &str,
) -> Result<(), String> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or("the server sent no certificate")?;
    let name = server_name(host)?;
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A host name or address literal as TLS names it.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let bare = host
        .trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']');
    let bare = bare
        .strip_prefix("IPv6:")
        .or_else(|| bare.strip_prefix("ipv6:"))
        .unwrap_or(bare);
    ServerName::try_from(bare.to_string()).map_err(|_| format!("{host:?} is not a TLS server name"))
}

/// The certificates in a PEM file.
pub fn load_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// One TLSA record (RFC 6698): usage, selector, matching type, data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Tlsa {
    /// RFC 7672 §3.1: SMTP uses DANE-TA(2) and DANE-EE(3) with known selectors and matching
    /// types; PKIX usages (0, 1) are unusable for MX hosts.
    pub fn usable(&self) -> bool {
        matches!(self.usage, 2 | 3) && self.selector <= 1 && self.matching <= 2
    }

    fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let selected: Vec<u8> = match self.selector {
            0 => cert.as_ref().to_vec(),
            _ => match spki(cert) {
                Some(s) => s,
                None => return false,
            },
        };
        let digest: Vec<u8> = match self.matching {
            0 => selected,
            1 => ring::digest::digest(&ring::digest::SHA256, &selected)
                .as_ref()
                .to_vec(),
            2 => ring::digest::digest(&ring::digest::SHA512, &selected)
                .as_ref()
                .to_vec(),
            _ => return false,
        };
        digest == self.data
    }
}

/// Authenticates a chain by its TLSA records (RFC 7672 §3): DANE-EE matches the server's own
/// certificate (no name or date check); DANE-TA matches a certificate of the chain, which then
/// anchors an ordinary chain check for `host`.
pub fn dane_verify(
    records: &[Tlsa],
    chain: &[CertificateDer<'_>],
    host: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<(), String> {
    let leaf = chain.first().ok_or("the server sent no certificate")?;
    let usable: Vec<&Tlsa> = records.iter().filter(|r| r.usable()).collect();
    if usable.iter().any(|r| r.usage == 3 && r.matches(leaf)) {
        return Ok(());
    }
    for anchor in chain.iter().skip(1) {
        if !usable.iter().any(|r| r.usage == 2 && r.matches(anchor)) {
            continue;
        }
        let mut roots = RootCertStore::empty();
        if roots.add(anchor.clone().into_owned()).is_err() {
            continue;
        }
        if let Some(v) = verifier(roots, provider)
            && verify_with(&v, chain, host).is_ok()
        {
            return Ok(());
        }
    }
    Err("no TLSA record matches the server's certificate chain".into())
}

/// The DER SubjectPublicKeyInfo of a certificate (with its outer SEQUENCE).
fn spki(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(parsed.subject_public_key_info().as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_is_found_in_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["mx.example.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        assert_eq!(
            spki(&der).unwrap(),
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
    }

    #[test]
    fn spki_of_garbage_is_none() {
        assert_eq!(spki(&CertificateDer::from(vec![0x30, 0x85, 1])), None);
        assert_eq!(spki(&CertificateDer::from(Vec::new())), None);
    }

    #[test]
    fn server_names_strip_brackets_and_dots() {
        assert!(server_name("mx.example.com.").is_ok());
        assert!(server_name("[192.0.2.1]").is_ok());
        assert!(server_name("[IPv6:2001:db8::1]").is_ok());
        assert!(server_name("bad name").is_err());
    }
}

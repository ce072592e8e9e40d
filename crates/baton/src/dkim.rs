//! DKIM signing (RFC 6376) with Stalwart's mail-auth: keys per signing domain from
//! `[[dkim]]` (RSA or Ed25519, PEM), relaxed/relaxed, a fixed set of signed header fields.
//! Messages are signed when they leave (after X-Baton-* headers are stripped), for the domain
//! of their From: address. `baton dkim keygen` makes keys and prints the DNS record.
//!
//! Owns keys and signatures; it must not decide where mail goes.

use std::path::Path;

use base64::Engine;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

/// Header fields signed when present (RFC 6376 §5.4.1's recommendations).
const SIGNED: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// A ready signer (domain, selector, headers and canonicalization set).
enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// One signing identity (its domain and selector live in the signer).
pub struct DkimKey {
    signer: Signer,
}

fn configure<T: mail_auth::common::crypto::SigningKey>(
    key: T,
    domain: &str,
    selector: &str,
) -> DkimSigner<T, Done> {
    DkimSigner::from_key(key)
        .domain(domain.to_string())
        .selector(selector.to_string())
        .headers(SIGNED.iter().copied())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
}

impl DkimKey {
    /// Loads a PEM private key: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
    pub fn load(domain: &str, selector: &str, path: &Path) -> Result<DkimKey, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let der = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("{}: not a PEM private key: {e}", path.display()))?;
        let domain = domain.to_ascii_lowercase();
        let rsa = || {
            RsaKey::<Sha256>::from_key_der(der.clone_key())
                .map(|k| Signer::Rsa(configure(k, &domain, selector)))
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        let signer = match &der {
            PrivateKeyDer::Pkcs8(p) => match Ed25519Key::from_pkcs8_der(p.secret_pkcs8_der()) {
                Ok(k) => Signer::Ed25519(configure(k, &domain, selector)),
                Err(_) => rsa()?,
            },
            _ => rsa()?,
        };
        Ok(DkimKey { signer })
    }

    /// The DKIM-Signature header field (with CRLF) for `message`.
    pub fn sign(&self, message: &[u8]) -> Result<String, String> {
        let signature = match &self.signer {
            Signer::Rsa(s) => s.sign(message),
            Signer::Ed25519(s) => s.sign(message),
        };
        signature.map(|s| s.to_header()).map_err(|e| e.to_string())
    }
}

/// Generates a key pair for `domain`/`selector`: returns the private key PEM and the DNS TXT
/// record to publish.
pub fn keygen(domain: &str, selector: &str, ed25519: bool) -> Result<(String, String), String> {
    use mail_auth::dkim::generate::DkimKeyPair;
    let (pair, k, label) = if ed25519 {
        (DkimKeyPair::generate_ed25519(), "ed25519", "PRIVATE KEY")
    } else {
        (DkimKeyPair::generate_rsa(2048), "rsa", "RSA PRIVATE KEY")
    };
    let pair = pair.map_err(|e| e.to_string())?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = b64.encode(pair.private_key());
    let mut pem = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    // RSA: the record carries SubjectPublicKeyInfo, which is what verifiers expect; mail-auth
    // returns PKCS#1, so wrap it. Ed25519: the raw 32-byte key (RFC 8463).
    let public = if ed25519 {
        pair.public_key().to_vec()
    } else {
        rsa_spki(pair.public_key())
    };
    let record = format!(
        "{selector}._domainkey.{domain}. IN TXT \"v=DKIM1; k={k}; p={}\"",
        b64.encode(public)
    );
    Ok((pem, record))
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (DER).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption, NULL }
    const ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0u8];
    bit_string.extend_from_slice(pkcs1);
    let bits = der(0x03, &bit_string);
    let mut inner = ALG.to_vec();
    inner.extend_from_slice(&bits);
    der(0x30, &inner)
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

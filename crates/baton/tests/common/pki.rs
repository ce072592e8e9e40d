//! A test certificate authority made at test time (rcgen), server certificates it issues, and
//! a small HTTPS server on loopback (for MTA-STS policies).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub der: Vec<u8>,
    pem: String,
}

/// A certificate the CA issued, with its key.
pub struct Issued {
    /// Leaf first, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
    /// The leaf's SubjectPublicKeyInfo (DER), for TLSA records.
    pub spki: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA certificate as PEM into `dir`; returns its path.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, &self.pem).unwrap();
        path
    }

    /// A certificate for `names` (subject alternative names).
    pub fn issue(&self, names: &[&str]) -> Issued {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        Issued {
            chain: vec![
                CertificateDer::from(cert.der().to_vec()),
                CertificateDer::from(self.der.clone()),
            ],
            key_der: key.serialize_der(),
            spki: rcgen::PublicKeyData::subject_public_key_info(&key),
        }
    }
}

impl Issued {
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(self.chain.clone(), key)
                .unwrap(),
        )
    }
}

/// An HTTPS server answering every GET with one text/plain body; counts the requests and keeps
/// the request lines with their Host header.
pub struct HttpsServer {
    pub addr: SocketAddr,
    pub body: Arc<Mutex<String>>,
    pub requests: Arc<Mutex<Vec<String>>>,
    pub count: Arc<AtomicUsize>,
}

impl HttpsServer {
    /// Serves `body` over TLS on `listener` (see `World::listener`).
    pub fn start(listener: TcpListener, tls: Arc<rustls::ServerConfig>, body: &str) -> HttpsServer {
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body.to_string()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (b, r, c) = (body.clone(), requests.clone(), count.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let Ok(session) = rustls::ServerConnection::new(tls.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(session, stream);
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                if request.is_empty() {
                    continue; // the handshake failed (a client that refused our certificate)
                }
                c.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&request).to_string();
                let host = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("host: ")
                            .or_else(|| l.strip_prefix("Host: "))
                    })
                    .unwrap_or("")
                    .to_string();
                let line = text.lines().next().unwrap_or("").to_string();
                r.lock().unwrap().push(format!("{line} host={host}"));
                let body = b.lock().unwrap().clone();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        HttpsServer {
            addr,
            body,
            requests,
            count,
        }
    }
}

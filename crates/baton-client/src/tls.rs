//! STARTTLS on an open connection: opportunistic (any certificate, RFC 7435), or verified
//! for the host name against the CA store, or against DANE TLSA records; and what was
//! negotiated, for the delivery record.

use std::sync::Arc;

use tokio::time::timeout;

use crate::connection::{Client, ConnectOptions, Stream};
use crate::{COMMAND_TIMEOUT, Capabilities, ClientError};

/// What TLS was negotiated, for the delivery record.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
    /// Whether the certificate chain was authenticated (CA-issued for the host, or by DANE).
    pub verified: bool,
    /// The policy the connection was made under ("opportunistic", "mta-sts", "dane"...).
    pub policy: String,
}

impl std::fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let check = if self.verified {
            "verified"
        } else {
            "not verified"
        };
        write!(
            f,
            "{} {} ({check}, {})",
            self.version, self.cipher, self.policy
        )
    }
}

impl Client {
    /// Negotiates TLS. The handshake accepts any certificate (opportunistic TLS must not fail
    /// on a self-signed one); the chain is then checked against the trust store or the DANE
    /// records, and the outcome returned for the caller's policy to act on.
    pub(crate) async fn starttls(
        &mut self,
        host: &str,
        options: &ConnectOptions<'_>,
    ) -> Result<Result<(), String>, ClientError> {
        self.command("STARTTLS").await?;
        let reply = self.read_reply(COMMAND_TIMEOUT, "after STARTTLS").await?;
        if reply.code != 220 {
            // Offered but refused: carry on in plaintext, as opportunistic TLS allows.
            tracing::info!(remote = %self.remote, reply = %reply.line(), "STARTTLS refused");
            return Ok(Err("STARTTLS refused".into()));
        }
        if !self.rbuf.is_empty() {
            // Anything the server sent before the handshake could be an injection
            // (CVE-2011-0411 in reverse): never read it as part of the TLS session.
            return Err(ClientError::Protocol(
                self.remote.clone(),
                "data received after the STARTTLS reply, before TLS".into(),
            ));
        }
        let Stream::Tcp(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(ClientError::Protocol(
                self.remote.clone(),
                "STARTTLS on a non-TCP stream".into(),
            ));
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap_or_else(|_| {
            rustls::pki_types::ServerName::IpAddress(
                tcp.peer_addr()
                    .map(|a| a.ip())
                    .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
                    .into(),
            )
        });
        let connector = tokio_rustls::TlsConnector::from(opportunistic_tls_config());
        let tls = timeout(COMMAND_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| ClientError::Timeout(self.remote.clone(), "in the TLS handshake"))?
            .map_err(|e| ClientError::Tls(self.remote.clone(), e.to_string()))?;
        let (_, session) = tls.get_ref();
        let chain = session.peer_certificates().unwrap_or(&[]);
        let authenticated = match (options.dane, options.trust) {
            (Some(records), Some(trust)) if !records.is_empty() => {
                baton_tls::trust::dane_verify(records, chain, host, trust.provider())
            }
            (_, Some(trust)) => trust.verify(chain, host),
            (_, None) => Err("no trust store".into()),
        };
        self.tls = Some(TlsInfo {
            version: session
                .protocol_version()
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_default(),
            cipher: session
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .map(str::to_string)
                .unwrap_or_default(),
            verified: authenticated.is_ok(),
            policy: options.policy.to_string(),
        });
        self.stream = Stream::Tls(Box::new(tls));
        self.caps = Capabilities::default();
        Ok(authenticated)
    }
}

/// The handshake's configuration: it accepts any certificate, so that opportunistic TLS
/// (RFC 7435) never fails on a self-signed one; `starttls` then checks the chain against the
/// trust store or DANE records and the caller's policy decides what a failed check means.
pub(crate) fn opportunistic_tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.dangerous()
                        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
                        .with_no_client_auth()
                });
            match config {
                Ok(c) => Arc::new(c),
                Err(_) => unreachable!("ring supports the default protocol versions"),
            }
        })
        .clone()
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

//! tokio-postgres's TLS hooks on tokio-rustls: the connector, the three ways to check the
//! server's certificate, and the `tls-server-end-point` channel binding for SCRAM.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

/// How much of the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Nothing (libpq's `prefer` and `require` without a root certificate): encryption against
    /// a passive listener only. The handshake signatures are still checked.
    Nothing,
    /// The chain up to the given roots, not the host name (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    ChainAndName,
}

/// Why a TLS handshake with the server failed, kept for the error the store reports.
#[derive(Clone, Debug)]
pub(crate) enum HandshakeFailure {
    /// The server's certificate was refused.
    Verification(String),
    /// Anything else (a protocol error, a closed connection).
    Other(String),
}

/// A tokio-postgres `MakeTlsConnect` over rustls, remembering why a handshake failed.
#[derive(Clone)]
pub(crate) struct RustlsConnect {
    config: Arc<ClientConfig>,
    failure: Arc<Mutex<Option<HandshakeFailure>>>,
}

impl RustlsConnect {
    /// A connector that checks what `verify` says against `roots` (needed unless `Nothing`).
    pub(crate) fn new(verify: Verify, roots: RootCertStore) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match verify {
            Verify::Nothing => Arc::new(NoCertificateCheck(provider.clone())),
            Verify::Chain | Verify::ChainAndName => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("cannot verify with the root certificates: {e}"))?;
                if verify == Verify::Chain {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                }
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(RustlsConnect {
            config: Arc::new(config),
            failure: Arc::default(),
        })
    }

    /// Why the last handshake failed, if one did.
    pub(crate) fn take_failure(&self) -> Option<HandshakeFailure> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsHandshake;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsHandshake, io::Error> {
        let name = ServerName::try_from(domain.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{domain:?} is not a host name TLS can check"),
            )
        })?;
        Ok(RustlsHandshake {
            connector: self.clone(),
            name,
        })
    }
}

/// One handshake, to one host.
pub(crate) struct RustlsHandshake {
    connector: RustlsConnect,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsHandshake {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream, io::Error>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let RustlsHandshake { connector, name } = self;
            let connecting =
                tokio_rustls::TlsConnector::from(connector.config.clone()).connect(name, stream);
            match connecting.await {
                Ok(tls) => {
                    let channel_binding = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| tls_server_end_point(leaf));
                    Ok(RustlsStream {
                        inner: tls,
                        channel_binding,
                    })
                }
                Err(e) => {
                    let failure = match e.get_ref().and_then(|inner| inner.downcast_ref()) {
                        Some(rustls::Error::InvalidCertificate(cert)) => {
                            HandshakeFailure::Verification(describe_refusal(cert))
                        }
                        _ => HandshakeFailure::Other(e.to_string()),
                    };
                    *connector
                        .failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(failure);
                    Err(e)
                }
            }
        })
    }
}

/// Why the server's certificate was refused, in rustls's words and an operator's.
fn describe_refusal(error: &CertificateError) -> String {
    let hint = match error {
        CertificateError::UnknownIssuer => "it is not signed by a CA in the root certificates",
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "it is not valid for the host name in the URL"
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "it has expired",
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "it is not valid yet"
        }
        _ => "it cannot be trusted",
    };
    format!("{error:?}: {hint}")
}

/// A TLS session with the server.
pub(crate) struct RustlsStream {
    inner: tokio_rustls::client::TlsStream<Socket>,
    channel_binding: Option<Vec<u8>>,
}

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.channel_binding {
            Some(hash) => ChannelBinding::tls_server_end_point(hash.clone()),
            None => ChannelBinding::none(),
        }
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts any certificate, checking only that the handshake is signed by its key.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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

/// The full web PKI check, except that a certificate for another name passes (`verify-ca`).
/// The chain is checked before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// RFC 5929 `tls-server-end-point`: the hash of the server's certificate, with the hash of
/// its signature algorithm (SHA-256 for MD5 and SHA-1), as PostgreSQL computes it for
/// SCRAM-SHA-256-PLUS. `None` for an algorithm whose hash is not fixed by its identifier
/// (RSA-PSS, Ed25519): SCRAM then runs without channel binding.
pub(crate) fn tls_server_end_point(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use aws_lc_rs::digest;
    let algorithm = match signature_algorithm_oid(cert)? {
        // sha256/sha1/md5 WithRSAEncryption, ecdsa-with-SHA256 / SHA1
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b | 0x05 | 0x04]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01] => &digest::SHA256,
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] => &digest::SHA384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04] => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(algorithm, cert.as_ref()).as_ref().to_vec())
}

/// The OID (content bytes) of `Certificate.signatureAlgorithm`: the second element of the
/// outer SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }.
fn signature_algorithm_oid<'a>(cert: &'a CertificateDer<'_>) -> Option<&'a [u8]> {
    let (tag, certificate, _) = der_element(cert.as_ref())?;
    if tag != 0x30 {
        return None;
    }
    let (_tbs_tag, _tbs, rest) = der_element(certificate)?;
    let (tag, algorithm, _) = der_element(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_element(algorithm)?;
    (tag == 0x06).then_some(oid)
}

/// One DER element at the start of `input`: its tag, its contents, and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_elements_parse_short_and_long_lengths_and_refuse_truncation() {
        assert_eq!(
            der_element(&[0x06, 0x02, 1, 2, 9]),
            Some((0x06, &[1u8, 2][..], &[9u8][..]))
        );
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend([7u8; 0x80]);
        assert_eq!(der_element(&long).map(|(_, c, _)| c.len()), Some(0x80));
        assert_eq!(der_element(&[0x04, 0x03, 1]), None);
        assert_eq!(der_element(&[0x04, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(der_element(&[]), None);
    }

    #[test]
    fn channel_binding_hashes_an_ecdsa_sha256_certificate_with_sha256() {
        let key = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256 with SHA-256
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let binding = tls_server_end_point(cert.der()).expect("a binding");
        let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.der());
        assert_eq!(binding, expected.as_ref());

        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&ed)
            .unwrap();
        assert_eq!(tls_server_end_point(cert.der()), None);
        assert_eq!(
            tls_server_end_point(&CertificateDer::from(vec![0x30, 0x00])),
            None
        );
    }
}

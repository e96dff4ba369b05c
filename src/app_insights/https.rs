//! The HTTPS client the exporter posts with: the OpenTelemetry hyper client (the one the OTLP trace exporter uses) over
//! rustls with the ring provider, trusting the Mozilla roots bundled in the binary (no dependence on the image's CA
//! store) and, when `SSL_CERT_FILE` names a PEM file, its certificates too (a TLS-inspecting proxy's CA, a test's).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_http::hyper::HyperClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// The client the exporter is built with.
pub type Client = HyperClient<HttpsConnector<HttpConnector>>;

/// A client whose requests each get `timeout` (connect, TLS, response), trusting the bundled roots and the
/// certificates of `extra_roots`, if given. A file that cannot be read, or holds no certificate, is refused.
pub fn client(timeout: Duration, extra_roots: Option<&Path>) -> Result<Client, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_roots {
        let refuse = |why: String| format!("SSL_CERT_FILE={}: {why}", path.display());
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| refuse(format!("cannot read PEM certificates: {e}")))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| refuse(format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(refuse("holds no certificate".into()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| refuse(format!("a certificate cannot be trusted: {e}")))?;
        }
    }
    let tls = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(HyperClient::new(connector, timeout, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ssl_cert_file_is_refused_with_its_path() {
        let dir = std::env::temp_dir().join(format!("amlserve-https-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        for path in [dir.join("missing.pem"), empty] {
            let err = client(Duration::from_secs(1), Some(&path)).expect_err("refused");
            assert!(err.starts_with(&format!("SSL_CERT_FILE={}", path.display())), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(client(Duration::from_secs(1), None).is_ok());
    }
}

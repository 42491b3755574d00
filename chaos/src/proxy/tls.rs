//! TLS the proxy terminates, both ways: it is the TLS server its agent talks to (with a
//! certificate for its loopback address, from the run's CA) and a TLS client of the
//! coordinator's agent listener (trusting that CA). In between it sees the decrypted HTTP/1.1
//! exchanges and places its faults on them exactly as over plain TCP; a reset or a blackhole
//! then cuts a real TLS session, so agents reconnect and resume their sessions for real.
//!
//! rustls with the ring provider only, through Kiln's own TLS code (`kiln::http::tls`): the
//! server side keeps a session cache and issues tickets, as the coordinator does; the client
//! side keeps one session store per proxy, so its reconnections to the coordinator resume too.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Both TLS ends of a proxy.
#[derive(Clone)]
pub struct ProxyTls {
    pub(super) acceptor: TlsAcceptor,
    pub(super) connector: TlsConnector,
    pub(super) upstream_name: ServerName<'static>,
}

impl std::fmt::Debug for ProxyTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyTls")
            .field("upstream_name", &self.upstream_name)
            .finish_non_exhaustive()
    }
}

impl ProxyTls {
    /// Serve `cert_file`/`key_file` (PEM; the certificate must name the address agents dial,
    /// `127.0.0.1`) to agents, and verify the coordinator's certificate against `ca_file`
    /// under `upstream_name` (a DNS name or IP its certificate names).
    pub fn from_files(
        cert_file: &Path,
        key_file: &Path,
        ca_file: &Path,
        upstream_name: &str,
    ) -> anyhow::Result<ProxyTls> {
        let cert = kiln::http::tls::ReloadingCert::load(cert_file, key_file)
            .context("failed to load the proxy's server certificate")?;
        let server = kiln::http::tls::server_config(cert, None)
            .context("failed to make the proxy's TLS server config")?;
        let client = kiln::http::tls::client_config(ca_file, None)
            .context("failed to make the proxy's TLS client config")?;
        let upstream_name = ServerName::try_from(upstream_name.to_string()).map_err(|e| {
            anyhow::anyhow!(
                "{upstream_name:?} is not a DNS name or IP address to verify the coordinator's certificate against: {e}"
            )
        })?;
        Ok(ProxyTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            upstream_name,
        })
    }
}

//! TLS for both listeners (rustls, ring provider only): server configs whose certificate is
//! read through a [`ReloadingCert`] that SIGHUP swaps without a restart, optional client
//! certificates for agents (mutual TLS), session resumption (a session cache and tickets);
//! the client config the CLI uses with `--ca-file`; and `kiln tls init` (rcgen), which makes a
//! CA, a server certificate and an agent client certificate for self-hosting.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

/// The one crypto provider Kiln uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Make ring the process default, so no library that asks for "the default provider" panics.
pub fn install_default_provider() {
    // Err only means one is installed already (by an earlier call): nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("failed to read certificate file {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("certificate file {} is not valid PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "certificate file {} holds no CERTIFICATE block: give a PEM certificate (kiln tls init writes one)",
        path.display()
    );
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| {
        format!(
            "failed to read a PEM private key from {} (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })
}

/// A certificate and key from PEM files, ready to serve.
pub fn load_certified_key(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = read_certs(cert)?;
    let key_der = read_key(key)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
        anyhow::anyhow!(
            "private key {} is not usable (RSA, ECDSA or Ed25519 expected): {e}",
            key.display()
        )
    })?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        anyhow::anyhow!(
            "private key {} does not belong to certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(ck))
}

/// The served certificate, re-read from its files by [`ReloadingCert::reload`]; new
/// connections get the new one, open ones keep theirs.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<ReloadingCert>> {
        Ok(Arc::new(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(load_certified_key(cert, key)?),
        }))
    }

    /// Read the files again; on an error the old certificate stays in service.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = load_certified_key(&self.cert, &self.key)?;
        match self.current.write() {
            Ok(mut g) => *g = fresh,
            // A panic while holding the lock cannot leave the Arc half-written: replace it.
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    pub fn cert_file(&self) -> &Path {
        &self.cert
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }
}

/// A server config serving `cert`; with `client_ca`, every client must present a certificate
/// that CA signed (mutual TLS).
pub fn server_config(
    cert: Arc<ReloadingCert>,
    client_ca: Option<&Path>,
) -> anyhow::Result<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("the ring provider supports no TLS version")?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c).with_context(|| {
                    format!(
                        "client CA file {} holds an unusable certificate",
                        ca.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .with_context(|| {
                    format!("client CA file {} cannot verify clients", ca.display())
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    // Resumption: the default in-memory session cache, plus stateless tickets (agents on lossy
    // links reconnect often).
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| anyhow::anyhow!("failed to make a TLS session ticketer: {e}"))?;
    Ok(config)
}

/// A client config trusting only the CA certificates in `ca_file`, optionally presenting a
/// client certificate. Its session store keeps resumption data for reconnects.
pub fn client_config(
    ca_file: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca_file)? {
        roots.add(c).with_context(|| {
            format!(
                "CA file {} holds an unusable certificate",
                ca_file.display()
            )
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("the ring provider supports no TLS version")?
        .with_root_certificates(roots);
    Ok(match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .with_context(|| {
                format!(
                    "client certificate {} and key {} cannot be used together",
                    cert.display(),
                    key.display()
                )
            })?,
        None => builder.with_no_client_auth(),
    })
}

/// `kiln tls init DIR`: what it wrote.
#[derive(Debug)]
pub struct InitFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
}

/// Make a CA (`ca.pem`, `ca-key.pem`), a server certificate for `names` (DNS names or IPs;
/// `server.pem`, `server-key.pem`) and an agent client certificate (`agent.pem`,
/// `agent-key.pem`) in `dir`. Keys are written with mode 0600. Refuses to overwrite a CA.
pub fn init(dir: &Path, names: &[String]) -> anyhow::Result<InitFiles> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    anyhow::ensure!(
        !names.is_empty(),
        "give at least one --name (a DNS name or IP the agents and clients use)"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let ca_path = dir.join("ca.pem");
    anyhow::ensure!(
        !ca_path.exists(),
        "{} exists already: kiln tls init does not overwrite a CA (use another directory)",
        ca_path.display()
    );
    let gen = |what: &str| {
        KeyPair::generate().map_err(|e| anyhow::anyhow!("failed to generate the {what} key: {e}"))
    };
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Kiln CA");
    ca_params.distinguished_name = dn;
    let ca_key = gen("CA")?;
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(|e| anyhow::anyhow!("failed to sign the CA certificate: {e}"))?;

    let mut sans = Vec::new();
    for n in names {
        sans.push(match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|e| anyhow::anyhow!("--name {n:?} is not a DNS name or IP: {e}"))?,
            ),
        });
    }
    let leaf = |cn: &str, eku: ExtendedKeyUsagePurpose, sans: Vec<SanType>| {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p
    };
    let server_key = gen("server")?;
    let server = leaf(&names[0], ExtendedKeyUsagePurpose::ServerAuth, sans)
        .signed_by(&server_key, &ca, &ca_key)
        .map_err(|e| anyhow::anyhow!("failed to sign the server certificate: {e}"))?;
    let agent_key = gen("agent")?;
    let agent = leaf("kiln-agent", ExtendedKeyUsagePurpose::ClientAuth, vec![])
        .signed_by(&agent_key, &ca, &ca_key)
        .map_err(|e| anyhow::anyhow!("failed to sign the agent certificate: {e}"))?;

    let files = InitFiles {
        ca: ca_path,
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        agent_cert: dir.join("agent.pem"),
        agent_key: dir.join("agent-key.pem"),
    };
    write_file(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), 0o600)?;
    write_file(&files.server_key, &server_key.serialize_pem(), 0o600)?;
    write_file(&files.agent_key, &agent_key.serialize_pem(), 0o600)?;
    write_file(&files.server_cert, &server.pem(), 0o644)?;
    write_file(&files.agent_cert, &agent.pem(), 0o644)?;
    // The CA certificate last: its presence means the set is complete.
    write_file(&files.ca, &ca.pem(), 0o644)?;
    Ok(files)
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("failed to set mode {mode:o} on {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_usable_set_with_private_keys() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = init(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        for k in [&f.server_key, &f.agent_key, &dir.path().join("ca-key.pem")] {
            let mode = std::fs::metadata(k).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", k.display());
        }
        let cert = ReloadingCert::load(&f.server_cert, &f.server_key).unwrap();
        server_config(cert.clone(), Some(&f.ca)).unwrap();
        client_config(&f.ca, Some((&f.agent_cert, &f.agent_key))).unwrap();
        cert.reload().unwrap();
        // Mismatched key and certificate are refused with both named.
        let err = load_certified_key(&f.server_cert, &f.agent_key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not belong"), "{err}");
        // A second init into the same directory does not overwrite the CA.
        let err = init(dir.path(), &["localhost".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not overwrite"), "{err}");
    }
}

//! One TLS policy for both outbound clients (token endpoint and upstream).
//!
//! A server certificate is trusted when it chains to one of:
//! - the web PKI roots bundled in the binary (`webpki-roots`), so a container
//!   image without CA certificates still reaches public endpoints;
//! - the operating system's trust store, read once at start by
//!   `rustls-native-certs`: `SSL_CERT_FILE` and `SSL_CERT_DIR` when either is
//!   set (then only those), else the system's bundle. This is where a private
//!   CA added "the usual way" (to the image, or by `SSL_CERT_FILE`) comes from;
//! - the client's `ca_file`, if set. It is re-read when it changes on disk
//!   (checked at each new TLS handshake: one `stat`), so a CA rotated in a
//!   mounted ConfigMap or Secret applies to new connections without a
//!   restart. A replacement that cannot be used keeps the previous roots, is
//!   logged at error level and counted in
//!   `token_sidecar_ca_file_reload_errors_total`.
//!
//! The reload lives in a [`ServerCertVerifier`] that holds its current
//! webpki verifier in an `ArcSwap`, so the `rustls::ClientConfig` each client
//! builds once at start never changes and the clients need not know. TLS
//! session resumption would skip the verifier (a resumed session presents no
//! certificate), so the config's session cache asks the verifier first and
//! forgets every session once the roots have changed.
//! Certificate verification cannot be switched off; there is no key for it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue, WebPkiServerVerifier,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{DigitallySignedStruct, NamedGroup, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {path} holds no usable certificate")]
    Empty { path: PathBuf },
}

/// Replacements of a `ca_file` that could not be used, in this process (both
/// clients). Registered in each sidecar's registry by [`crate::metrics`].
pub fn ca_file_reload_errors() -> IntCounter {
    static COUNTER: LazyLock<IntCounter> = LazyLock::new(|| {
        IntCounter::new(
            "token_sidecar_ca_file_reload_errors_total",
            "Replacements of a ca_file that could not be used; the previous roots stay in use.",
        )
        .expect("static metric definition is valid")
    });
    COUNTER.clone()
}

/// A rustls client config (no ALPN set: each client sets its own) trusting
/// the bundled roots, the operating system's and `ca_file`'s (kept current).
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(ReloadingVerifier::new(ca_file, provider.clone())?);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        // Not "dangerous": it is webpki's verifier, whose roots can be reloaded.
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.resumption = Resumption::store(Arc::new(Sessions::new(verifier)));
    Ok(config)
}

/// The bundled roots plus the operating system's trust store, read, parsed
/// and logged once per process (both clients share them). Certificates webpki
/// cannot use are skipped, as OpenSSL skips them in a bundle. A verifier
/// without a `ca_file` shares this store rather than holding a copy.
fn base_roots() -> &'static Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let native = rustls_native_certs::load_native_certs();
        let source = match (
            std::env::var_os("SSL_CERT_FILE"),
            std::env::var_os("SSL_CERT_DIR"),
        ) {
            (None, None) => "the system trust store",
            _ => "SSL_CERT_FILE / SSL_CERT_DIR",
        };
        for e in &native.errors {
            // Not fatal: the bundled roots and ca_file still apply.
            warn!(error = %e, source, "cannot load part of the operating system's trust store");
        }
        let mut store = RootCertStore::empty();
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let (system, unusable) = store.add_parsable_certificates(native.certs);
        info!(
            bundled = webpki_roots::TLS_SERVER_ROOTS.len(),
            system, unusable, source, "trust store loaded"
        );
        Arc::new(store)
    })
}

/// Reads a PEM file of CA certificates; an error unless at least one is usable.
fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    let mut probe = RootCertStore::empty();
    let (added, _) = probe.add_parsable_certificates(certs.iter().cloned());
    if added == 0 {
        return Err(TlsError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// What identifies one version of a file: following symlinks (a Kubernetes
/// volume swaps its `..data` link), so a replaced file has a new inode, size
/// or modification time. `None`: the file cannot be examined.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// The verifier in use and the version of `ca_file` last looked at (used or
/// rejected: a rejected version is not read again until it changes).
struct Current {
    verifier: Arc<WebPkiServerVerifier>,
    seen: Option<Stamp>,
    /// How many times the roots have changed.
    generation: u64,
}

/// webpki's verifier over the roots described in the module docs, rebuilt
/// when `ca_file` changes.
struct ReloadingVerifier {
    ca_file: Option<PathBuf>,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Current>,
    /// One reload at a time; handshakes that find the file unchanged never take it.
    reloading: Mutex<()>,
}

impl fmt::Debug for ReloadingVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingVerifier")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl ReloadingVerifier {
    /// Fails, as at start it must, when `ca_file` cannot be used.
    fn new(ca_file: Option<&Path>, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let (seen, extra) = match ca_file {
            Some(path) => {
                let seen = stamp(path);
                (seen, read_ca_file(path)?)
            }
            None => (None, Vec::new()),
        };
        let verifier = build(extra, &provider);
        Ok(ReloadingVerifier {
            ca_file: ca_file.map(Path::to_owned),
            provider,
            current: ArcSwap::from_pointee(Current {
                verifier,
                seen,
                generation: 0,
            }),
            reloading: Mutex::new(()),
        })
    }

    /// Reloads `ca_file` if it changed; returns the roots' generation.
    fn refresh(&self) -> u64 {
        if let Some(path) = &self.ca_file {
            let now = stamp(path);
            if now != self.current.load().seen {
                self.reload(path, now);
            }
        }
        self.current.load().generation
    }

    /// The verifier for a new handshake, after reloading `ca_file` if it changed.
    fn verifier(&self) -> Arc<WebPkiServerVerifier> {
        self.refresh();
        self.current.load().verifier.clone()
    }

    fn reload(&self, path: &Path, now: Option<Stamp>) {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current.load_full();
        if current.seen == now {
            return; // another handshake reloaded it meanwhile
        }
        let (verifier, generation) = match read_ca_file(path) {
            Ok(extra) => {
                let certificates = extra.len();
                info!(path = %path.display(), certificates, "ca_file changed; new connections use its roots");
                (build(extra, &self.provider), current.generation + 1)
            }
            Err(e) => {
                error!(error = %e, cause = %SourceChain(&e), "ca_file changed but cannot be used; keeping the previous roots");
                ca_file_reload_errors().inc();
                (current.verifier.clone(), current.generation)
            }
        };
        self.current.store(Arc::new(Current {
            verifier,
            seen: now,
            generation,
        }));
    }
}

/// webpki's verifier over the base roots plus `extra` (a `ca_file`'s).
fn build(
    extra: Vec<CertificateDer<'static>>,
    provider: &Arc<CryptoProvider>,
) -> Arc<WebPkiServerVerifier> {
    let store = if extra.is_empty() {
        base_roots().clone()
    } else {
        let mut store = RootCertStore::clone(base_roots());
        store.add_parsable_certificates(extra);
        Arc::new(store)
    };
    WebPkiServerVerifier::builder_with_provider(store, provider.clone())
        .build()
        .expect("the bundled roots are never empty, and no CRLs are given")
}

impl ServerCertVerifier for ReloadingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().verifier.supported_verify_schemes()
    }
}

/// Sessions kept for resumption by default in rustls.
const SESSIONS: usize = 256;

/// rustls's in-memory session cache, emptied when the roots change: a
/// session verified under the old roots is not resumed. Each lookup (one per
/// new connection) is where a changed `ca_file` is noticed, also for a
/// connection that then resumes a session.
#[derive(Debug)]
struct Sessions {
    verifier: Arc<ReloadingVerifier>,
    cache: Mutex<(u64, Arc<ClientSessionMemoryCache>)>,
}

impl Sessions {
    fn new(verifier: Arc<ReloadingVerifier>) -> Self {
        let generation = verifier.current.load().generation;
        Sessions {
            verifier,
            cache: Mutex::new((
                generation,
                Arc::new(ClientSessionMemoryCache::new(SESSIONS)),
            )),
        }
    }

    /// The cache for a lookup, after checking `ca_file`.
    fn checked(&self) -> Arc<ClientSessionMemoryCache> {
        let generation = self.verifier.refresh();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != generation {
            *cache = (
                generation,
                Arc::new(ClientSessionMemoryCache::new(SESSIONS)),
            );
        }
        cache.1.clone()
    }

    /// The cache to store into.
    fn current(&self) -> Arc<ClientSessionMemoryCache> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }
}

impl ClientSessionStore for Sessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.current().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.current().kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.current().set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.checked().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.current().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.current().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.checked().take_tls13_ticket(server_name)
    }
}

/// The sources of an error, `": "`-joined (the log line's `cause`).
struct SourceChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for SourceChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cur = self.0.source();
        let mut first = true;
        while let Some(e) = cur {
            if !first {
                f.write_str(": ")?;
            }
            write!(f, "{e}")?;
            first = false;
            cur = e.source();
        }
        Ok(())
    }
}

/// Whether an error chain has a TLS failure in it (for a 502 that says TLS).
///
/// `io::Error::source` skips the error an `io::Error` wraps (it returns that
/// error's own source), and hyper-rustls wraps tokio-rustls's `io::Error`
/// around the `rustls::Error` in another `io::Error`; so an `io::Error` is
/// followed through [`std::io::Error::get_ref`] instead.
pub fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        cur = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connect failed")]
    struct Outer(#[source] Box<dyn std::error::Error + Send + Sync>);

    #[test]
    fn finds_rustls_errors_inside_nested_io_errors() {
        let rustls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls);
        let outer = Outer(Box::new(std::io::Error::other(inner)));
        assert!(is_tls_error(&outer));

        let refused = Outer(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(!is_tls_error(&refused));
    }
}

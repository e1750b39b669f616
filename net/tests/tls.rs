//! The cluster CA and mutual TLS over real TCP on loopback.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ferry_net::pki::{self, ClusterCa, Identity};
use ferry_net::tls::{self, ClientAuth};
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferry-tls-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A CA of its own and a node certificate issued by it, in one directory.
struct Cluster {
    dir: TempDir,
    ca: ClusterCa,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let dir = TempDir::new();
        let ca = ClusterCa::load_or_create(dir.path(), name).unwrap();
        Cluster { dir, ca }
    }

    fn node(&self, name: &str) -> Identity {
        let ips: [IpAddr; 1] = ["127.0.0.1".parse().unwrap()];
        self.ca
            .issue(self.dir.path(), name, &["localhost".to_string()], &ips)
            .unwrap()
    }

    fn roots(&self) -> rustls::RootCertStore {
        pki::load_roots(self.dir.path()).unwrap()
    }
}

/// What each side saw of one connection.
struct Outcome {
    /// The server: the client's node name, or why the handshake failed.
    server: io::Result<Option<String>>,
    /// The client: what the server sent after the handshake, or why that failed.
    client: io::Result<Vec<u8>>,
}

/// One TLS connection over TCP loopback to `server_name`: after the handshake the server
/// sends "ok" and the client reads it (in TLS 1.3 a client only learns that the server
/// refused its certificate when it reads).
async fn connect(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: &str,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let name = tls::peer_name(tls.get_ref().1);
        tls.write_all(b"ok").await?;
        tls.shutdown().await?;
        Ok(name)
    });
    let server_name = ServerName::try_from(server_name.to_string()).unwrap();
    let client_result = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(client).connect(server_name, tcp).await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        Ok(buf)
    }
    .await;
    let server_result = server_task.await.unwrap();
    Outcome {
        server: server_result,
        client: client_result,
    }
}

/// The rustls error inside an I/O error from tokio-rustls.
fn rustls_error(result: &io::Result<impl std::fmt::Debug>) -> Option<&rustls::Error> {
    result.as_ref().err()?.get_ref()?.downcast_ref()
}

fn is_unknown_issuer(result: &io::Result<impl std::fmt::Debug>) -> bool {
    matches!(
        rustls_error(result),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    )
}

#[tokio::test]
async fn mutual_handshake_between_two_nodes_names_the_client() {
    let c = Cluster::new("test");
    let a = c.node("node-a");
    let b = c.node("node-b");
    for auth in [ClientAuth::Required, ClientAuth::Optional] {
        let server = tls::server_config(c.roots(), &a, auth).unwrap();
        let client = tls::client_config(c.roots(), Some(&b)).unwrap();
        let out = connect(server.clone(), client.clone(), "node-a").await;
        assert_eq!(out.server.unwrap().as_deref(), Some("node-b"));
        assert_eq!(out.client.unwrap(), b"ok");
        // "localhost" is in node certificates too.
        let out = connect(server, client, "localhost").await;
        assert_eq!(out.client.unwrap(), b"ok");
    }
}

#[tokio::test]
async fn client_checks_the_server_name() {
    let c = Cluster::new("test");
    let a = c.node("node-a");
    let b = c.node("node-b");
    let server = tls::server_config(c.roots(), &a, ClientAuth::Required).unwrap();
    let client = tls::client_config(c.roots(), Some(&b)).unwrap();
    let out = connect(server, client, "node-b").await;
    assert!(
        matches!(
            rustls_error(&out.client),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{:?}",
        out.client
    );
}

#[tokio::test]
async fn client_cert_of_a_foreign_ca_is_refused() {
    let ours = Cluster::new("ours");
    let theirs = Cluster::new("theirs");
    let server_id = ours.node("node-a");
    let intruder = theirs.node("node-b");
    for auth in [ClientAuth::Required, ClientAuth::Optional] {
        let server = tls::server_config(ours.roots(), &server_id, auth).unwrap();
        // The client trusts our CA, so only its own certificate is wrong.
        let client = tls::client_config(ours.roots(), Some(&intruder)).unwrap();
        let out = connect(server, client, "node-a").await;
        assert!(
            is_unknown_issuer(&out.server),
            "{auth:?}: server {:?}",
            out.server
        );
        assert!(out.client.is_err(), "{auth:?}: client {:?}", out.client);
    }
}

#[tokio::test]
async fn no_client_cert_is_refused_by_required_and_let_in_by_optional() {
    let c = Cluster::new("test");
    let a = c.node("node-a");
    let client = tls::client_config(c.roots(), None).unwrap();

    let required = tls::server_config(c.roots(), &a, ClientAuth::Required).unwrap();
    let out = connect(required, client.clone(), "node-a").await;
    assert!(
        matches!(
            rustls_error(&out.server),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "server {:?}",
        out.server
    );
    assert!(out.client.is_err(), "client {:?}", out.client);

    let optional = tls::server_config(c.roots(), &a, ClientAuth::Optional).unwrap();
    let out = connect(optional, client, "node-a").await;
    assert_eq!(out.server.unwrap(), None);
    assert_eq!(out.client.unwrap(), b"ok");
}

#[tokio::test]
async fn client_refuses_a_server_of_a_foreign_ca() {
    let ours = Cluster::new("ours");
    let theirs = Cluster::new("theirs");
    let impostor = theirs.node("node-a");
    let me = ours.node("node-b");
    let server = tls::server_config(theirs.roots(), &impostor, ClientAuth::Optional).unwrap();
    for id in [Some(&me), None] {
        let client = tls::client_config(ours.roots(), id).unwrap();
        let out = connect(server.clone(), client, "node-a").await;
        assert!(is_unknown_issuer(&out.client), "client {:?}", out.client);
        assert!(out.server.is_err(), "server {:?}", out.server);
    }
}

#[test]
fn load_or_create_twice_gives_the_same_ca() {
    let dir = TempDir::new();
    let nested = dir.path().join("etc/ferry/tls");
    let first = ClusterCa::load_or_create(&nested, "prod").unwrap();
    let second = ClusterCa::load_or_create(&nested, "prod").unwrap();
    assert_eq!(first.cert_pem(), second.cert_pem());
    assert!(first.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(mode(&nested), 0o700);
    assert_eq!(mode(&nested.join("ca.key")), 0o600);
    // A leaf the first instance issued chains to what the second one loaded.
    let id = first.issue(&nested, "n1", &[], &[]).unwrap();
    let again = second.issue(&nested, "n1", &[], &[]).unwrap();
    assert_eq!(id.cert_chain(), again.cert_chain());
}

#[test]
fn issue_twice_reuses_the_files_unless_the_names_change() {
    let c = Cluster::new("test");
    let dir = c.dir.path();
    let ips: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap(), "::1".parse().unwrap()];
    let dns = vec!["localhost".to_string()];
    let first = c.ca.issue(dir, "node-a", &dns, &ips).unwrap();
    let pem = fs::read(dir.join("node-a.pem")).unwrap();
    let key = fs::read(dir.join("node-a.key")).unwrap();
    assert_eq!(mode(&dir.join("node-a.key")), 0o600);
    assert_eq!(first.name, "node-a");
    assert_eq!(first.dns_names(), ["node-a", "localhost"]);
    assert_eq!(first.ips(), ips);

    // Same SANs, in another order: reused.
    let reversed: Vec<IpAddr> = ips.iter().rev().copied().collect();
    let second = c.ca.issue(dir, "node-a", &dns, &reversed).unwrap();
    assert_eq!(second.cert_chain(), first.cert_chain());
    assert_eq!(fs::read(dir.join("node-a.pem")).unwrap(), pem);
    assert_eq!(fs::read(dir.join("node-a.key")).unwrap(), key);

    // Loaded from disk: the same identity.
    let loaded = Identity::load(dir, "node-a").unwrap();
    assert_eq!(loaded.cert_chain(), first.cert_chain());

    // Another IP: issued anew, still 0600.
    let third = c.ca.issue(dir, "node-a", &dns, &ips[..1]).unwrap();
    assert_ne!(third.cert_chain(), first.cert_chain());
    assert_eq!(third.ips(), &ips[..1]);
    assert_eq!(mode(&dir.join("node-a.key")), 0o600);
}

#[test]
fn issue_replaces_a_certificate_of_another_ca() {
    let ours = Cluster::new("ours");
    let theirs = Cluster::new("theirs");
    theirs.node("node-a");
    for ext in ["pem", "key"] {
        fs::copy(
            theirs.dir.path().join(format!("node-a.{ext}")),
            ours.dir.path().join(format!("node-a.{ext}")),
        )
        .unwrap();
    }
    let foreign = Identity::load(ours.dir.path(), "node-a").unwrap();
    let id = ours.node("node-a");
    assert_ne!(id.cert_chain(), foreign.cert_chain());
}

#[test]
fn issue_in_another_directory_brings_the_ca_certificate() {
    let c = Cluster::new("test");
    let node_dir = TempDir::new();
    let id = c.ca.issue(node_dir.path(), "node-a", &[], &[]).unwrap();
    assert_eq!(
        fs::read_to_string(node_dir.path().join("ca.pem")).unwrap(),
        c.ca.cert_pem()
    );
    assert!(!node_dir.path().join("ca.key").exists());
    assert_eq!(mode(node_dir.path()), 0o700);
    assert_eq!(mode(&node_dir.path().join("node-a.key")), 0o600);
    let roots = pki::load_roots(node_dir.path()).unwrap();
    tls::server_config(roots.clone(), &id, ClientAuth::Required).unwrap();
    tls::client_config(roots, Some(&id)).unwrap();
}

#[test]
fn tokens_are_random_hex() {
    let a = pki::random_token();
    assert_eq!(a.len(), 64);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, pki::random_token());
}

#[test]
fn empty_roots_are_an_error() {
    let c = Cluster::new("test");
    let id = c.node("node-a");
    let empty = rustls::RootCertStore::empty();
    assert!(matches!(
        tls::server_config(empty.clone(), &id, ClientAuth::Optional),
        Err(tls::TlsError::NoRoots)
    ));
    assert!(matches!(
        tls::client_config(empty, None),
        Err(tls::TlsError::NoRoots)
    ));
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

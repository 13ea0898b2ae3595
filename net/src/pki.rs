//! The engine's small PKI and the tokens that bootstrap trust (kubeadm / k3s style).
//!
//! On first start the engine creates a CA, a server certificate for
//! [`seedcast_core::protocol::SERVER_NAME`], and `DATA/admin.token` (for clients). A token
//! is `<kind>.<CA fingerprint>.<secret>`: the fingerprint (BLAKE3 of the CA certificate's
//! DER) lets the dialer verify the engine before it sends the secret; the secret lets the
//! engine verify the dialer.
//!
//! Sites enroll with a *site token* (`scsite1`), made by the admin for one site name
//! (`seedcast site add NAME`), single-use and expiring; the engine keeps only its hash.
//! With open enrollment the engine also writes `DATA/join.token` (`scjoin1`), good for any
//! new site name. Enrolling gives the agent a certificate for its site with a bounded
//! life, signed by the CA, which it keeps and renews over its authenticated connection.
//! Each site has its own certificate, so one site can be revoked without touching the
//! others.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use seedcast_core::protocol::SERVER_NAME;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: not a valid {what}")]
    Corrupt { path: PathBuf, what: &'static str },
    #[error("invalid token: {0}")]
    Token(String),
    #[error("invalid site name {0:?}: use 1-63 characters from a-z, 0-9, '-' and '_'")]
    SiteName(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// BLAKE3 of a certificate's DER: what tokens pin.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    *blake3::hash(der).as_bytes()
}

/// Site names become certificate subjects, catalog keys and directory names.
pub fn validate_site_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PkiError::SiteName(name.to_string()))
    }
}

/// Which door a token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Agents, at an engine with open enrollment: enroll any new site name.
    Join,
    /// Clients: push, adapt, status, sites.
    Admin,
    /// One agent, once: enroll the site the admin made the token for.
    Site,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            TokenKind::Join => "scjoin1",
            TokenKind::Admin => "scadmin1",
            TokenKind::Site => "scsite1",
        }
    }

    /// May an agent enroll with it?
    pub fn enrolls(self) -> bool {
        matches!(self, TokenKind::Join | TokenKind::Site)
    }
}

/// `<kind>.<64 hex CA fingerprint>.<secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    pub ca_fingerprint: [u8; 32],
    pub secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log the secret.
        write!(
            f,
            "Token({:?}, ca {}…)",
            self.kind,
            &hex::encode(self.ca_fingerprint)[..12]
        )
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}",
            self.kind.prefix(),
            hex::encode(self.ca_fingerprint),
            self.secret
        )
    }
}

impl FromStr for Token {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut parts = s.splitn(3, '.');
        let (Some(kind), Some(fp), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(PkiError::Token(
                "expected <kind>.<fingerprint>.<secret> (a site token, admin.token or join.token)"
                    .into(),
            ));
        };
        let kind = match kind {
            "scjoin1" => TokenKind::Join,
            "scadmin1" => TokenKind::Admin,
            "scsite1" => TokenKind::Site,
            k => return Err(PkiError::Token(format!("unknown token kind {k:?}"))),
        };
        let fp: [u8; 32] = hex::decode(fp)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| PkiError::Token("the fingerprint must be 64 hex digits".into()))?;
        if secret.len() < 16 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PkiError::Token(
                "the secret must be at least 16 hex digits".into(),
            ));
        }
        Ok(Token {
            kind,
            ca_fingerprint: fp,
            secret: secret.to_string(),
        })
    }
}

impl Token {
    /// A token given as its text, or as the path of a file holding it (as the command line
    /// and config files take it: the text never has to appear in a process list).
    pub fn from_text_or_file(s: &str) -> Result<Token, PkiError> {
        match s.parse::<Token>() {
            Ok(t) => Ok(t),
            Err(e) => {
                let p = Path::new(s.trim());
                if !p.is_file() {
                    return Err(e);
                }
                let text = fs::read_to_string(p).map_err(io_err(p))?;
                text.parse::<Token>().map_err(|e| match e {
                    PkiError::Token(why) => PkiError::Token(format!("{}: {why}", p.display())),
                    e => e,
                })
            }
        }
    }
}

/// Compare secrets in time independent of where they differ.
pub fn secrets_match(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn new_secret() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// What the engine stores of a site token: its secret's hash, never the secret.
pub fn token_key(secret: &str) -> [u8; 32] {
    *blake3::hash(secret.as_bytes()).as_bytes()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn validity(years: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::days(1),
        now + time::Duration::days(365 * years),
    )
}

fn random_serial() -> SerialNumber {
    let mut b = rand::random::<[u8; 16]>();
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

/// The CA's parameters. Rebuilt identically on every start: an [`Issuer`] needs only the
/// subject, key usages and key-id method, which are constants here.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "seedcast");
    dn.push(DnType::CommonName, "seedcast engine CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Write a file atomically with the given mode: a temporary file of a unique name (created
/// exclusively, with `mode` from the start, so a key is never readable by others even for a
/// moment, and two files written at once never share a temporary), synced, renamed over
/// `path`, and the directory synced so the rename survives a crash.
pub fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.as_deref().unwrap_or("file")))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    tmp.persist(path).map_err(|e| PkiError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(io_err(path))
}

fn load_key(path: &Path) -> Result<KeyPair, PkiError> {
    let pem = String::from_utf8(read(path)?).map_err(|_| PkiError::Corrupt {
        path: path.into(),
        what: "PEM private key",
    })?;
    KeyPair::from_pem(&pem).map_err(|_| PkiError::Corrupt {
        path: path.into(),
        what: "PEM private key",
    })
}

fn key_der(k: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der()))
}

/// Everything the engine needs to prove who it is and to admit others.
pub struct EnginePki {
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    server_cert: CertificateDer<'static>,
    server_key: KeyPair,
    /// Only with open enrollment.
    pub join: Option<Token>,
    pub admin: Token,
}

impl fmt::Debug for EnginePki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnginePki(ca {})", hex::encode(&self.fingerprint()[..6]))
    }
}

impl EnginePki {
    /// Load the CA, server certificate and tokens from `data`, creating them on first start.
    /// The join token exists only with `open_enrollment`; without it a join token left
    /// from an earlier start is deleted, so it cannot be mistaken for a working one.
    pub fn load_or_create(data: &Path, open_enrollment: bool) -> Result<Self, PkiError> {
        let tls = data.join("tls");
        fs::create_dir_all(&tls).map_err(io_err(&tls))?;
        let (ca_key_p, ca_crt_p) = (tls.join("ca.key"), tls.join("ca.der"));
        let (srv_key_p, srv_crt_p) = (tls.join("engine.key"), tls.join("engine.der"));

        if !ca_crt_p.exists() {
            let key = KeyPair::generate()?;
            let mut params = ca_params();
            (params.not_before, params.not_after) = validity(20);
            params.serial_number = Some(random_serial());
            let cert = params.self_signed(&key)?;
            write_private(&ca_key_p, key.serialize_pem().as_bytes(), 0o600)?;
            write_private(&ca_crt_p, cert.der(), 0o644)?;
        }
        let ca_key = load_key(&ca_key_p)?;
        let ca_der = CertificateDer::from(read(&ca_crt_p)?);
        let issuer = Issuer::new(ca_params(), ca_key);

        if !srv_crt_p.exists() {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
            p.distinguished_name.push(DnType::CommonName, SERVER_NAME);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.use_authority_key_identifier_extension = true;
            (p.not_before, p.not_after) = validity(10);
            p.serial_number = Some(random_serial());
            let cert = p.signed_by(&key, &issuer)?;
            write_private(&srv_key_p, key.serialize_pem().as_bytes(), 0o600)?;
            write_private(&srv_crt_p, cert.der(), 0o644)?;
        }
        let server_key = load_key(&srv_key_p)?;
        let server_cert = CertificateDer::from(read(&srv_crt_p)?);

        let fp = fingerprint(&ca_der);
        let join_p = data.join("join.token");
        let join = if open_enrollment {
            Some(load_or_create_token(&join_p, TokenKind::Join, fp)?)
        } else {
            match fs::remove_file(&join_p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(PkiError::Io {
                        path: join_p,
                        source: e,
                    });
                }
                _ => None,
            }
        };
        let admin = load_or_create_token(&data.join("admin.token"), TokenKind::Admin, fp)?;
        Ok(EnginePki {
            ca_der,
            issuer,
            server_cert,
            server_key,
            join,
            admin,
        })
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.ca_der)
    }

    /// The chain the engine presents: its certificate, then the CA (so dialers holding
    /// only the CA's fingerprint can find and check it).
    pub fn server_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.server_cert.clone(), self.ca_der.clone()]
    }

    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        key_der(&self.server_key)
    }

    /// A new site token (its text is shown once; the engine keeps [`token_key`] of it).
    pub fn new_site_token(&self) -> Token {
        Token {
            kind: TokenKind::Site,
            ca_fingerprint: self.fingerprint(),
            secret: new_secret(),
        }
    }

    /// Issue a client certificate for `site` to the key in `csr_der`, valid for `lifetime`
    /// (and from a minute ago, for clocks slightly behind); returns it and its expiry (Unix
    /// seconds). Only the key is taken from the request; subject and usages are the
    /// engine's.
    pub fn issue_site_cert(
        &self,
        site: &str,
        csr_der: &[u8],
        lifetime: std::time::Duration,
    ) -> Result<(CertificateDer<'static>, u64), PkiError> {
        validate_site_name(site)?;
        let mut csr = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr_der),
        )?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::OrganizationName, "seedcast site");
        p.distinguished_name.push(DnType::CommonName, site);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        let lifetime = time::Duration::seconds(lifetime.as_secs().min(i64::MAX as u64) as i64);
        let not_after = now.checked_add(lifetime).unwrap_or(now);
        (p.not_before, p.not_after) = (now - time::Duration::minutes(1), not_after);
        p.serial_number = Some(random_serial());
        csr.params = p;
        let expires = not_after.unix_timestamp().max(0) as u64;
        Ok((csr.signed_by(&self.issuer)?.der().clone(), expires))
    }
}

fn load_or_create_token(path: &Path, kind: TokenKind, fp: [u8; 32]) -> Result<Token, PkiError> {
    if path.exists() {
        let text = String::from_utf8(read(path)?).map_err(|_| PkiError::Corrupt {
            path: path.into(),
            what: "token",
        })?;
        let t: Token = text.parse()?;
        if t.kind != kind || t.ca_fingerprint != fp {
            return Err(PkiError::Corrupt {
                path: path.into(),
                what: "token for this engine's CA",
            });
        }
        return Ok(t);
    }
    let t = Token {
        kind,
        ca_fingerprint: fp,
        secret: new_secret(),
    };
    write_private(path, format!("{t}\n").as_bytes(), 0o600)?;
    Ok(t)
}

/// A site's credentials, kept in the agent's data dir after enrollment.
pub struct SiteCredentials {
    pub site: String,
    pub cert: CertificateDer<'static>,
    key: KeyPair,
    pub ca: CertificateDer<'static>,
    /// When the certificate was issued and when it expires (Unix seconds). 0 when unknown
    /// (credentials saved before certificates expired): such a certificate is renewed at
    /// the next connection.
    pub issued_unix: u64,
    pub expires_unix: u64,
    /// The engine's manifest signing key, pinned at enrollment (or, for credentials saved
    /// before manifests were signed, at the first connection after): every manifest must
    /// verify against it.
    pub signing_key: Option<[u8; 32]>,
}

impl fmt::Debug for SiteCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SiteCredentials({})", self.site)
    }
}

/// A key and the request to certify it, made before enrolling or renewing.
pub struct PendingEnrollment {
    key: KeyPair,
    pub csr_der: Vec<u8>,
}

impl fmt::Debug for PendingEnrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PendingEnrollment")
    }
}

impl PendingEnrollment {
    pub fn new(site: &str) -> Result<Self, PkiError> {
        validate_site_name(site)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, site);
        let csr = p.serialize_request(&key)?;
        Ok(PendingEnrollment {
            key,
            csr_der: csr.der().to_vec(),
        })
    }

    pub fn complete(
        self,
        site: &str,
        cert_der: Vec<u8>,
        ca_der: Vec<u8>,
        expires_unix: u64,
        signing_key: Option<[u8; 32]>,
    ) -> SiteCredentials {
        SiteCredentials {
            site: site.to_string(),
            cert: CertificateDer::from(cert_der),
            key: self.key,
            ca: CertificateDer::from(ca_der),
            issued_unix: unix_now(),
            expires_unix,
            signing_key,
        }
    }
}

/// The credentials file: one file, so a renewal replaces key and certificate together.
#[derive(serde::Serialize, serde::Deserialize)]
struct CredentialsFile {
    site: String,
    key_pem: String,
    cert_hex: String,
    ca_hex: String,
    issued_unix: u64,
    expires_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signing_key_hex: Option<String>,
}

impl SiteCredentials {
    fn file(dir: &Path) -> PathBuf {
        dir.join("tls").join("site.json")
    }

    /// The layout before certificates expired: four files, the certificate written last.
    fn legacy_paths(dir: &Path) -> [PathBuf; 4] {
        let t = dir.join("tls");
        [
            t.join("site.key"),
            t.join("site.der"),
            t.join("ca.der"),
            t.join("site.name"),
        ]
    }

    /// Load credentials saved by [`SiteCredentials::save`], if any.
    pub fn load(dir: &Path) -> Result<Option<Self>, PkiError> {
        let p = Self::file(dir);
        if p.exists() {
            let corrupt = || PkiError::Corrupt {
                path: p.clone(),
                what: "site credentials file",
            };
            let f: CredentialsFile = serde_json::from_slice(&read(&p)?).map_err(|_| corrupt())?;
            let der = |h: &str| hex::decode(h).map_err(|_| corrupt());
            return Ok(Some(SiteCredentials {
                site: f.site,
                cert: CertificateDer::from(der(&f.cert_hex)?),
                key: KeyPair::from_pem(&f.key_pem).map_err(|_| corrupt())?,
                ca: CertificateDer::from(der(&f.ca_hex)?),
                issued_unix: f.issued_unix,
                expires_unix: f.expires_unix,
                signing_key: match f.signing_key_hex {
                    Some(h) => Some(
                        hex::decode(h)
                            .ok()
                            .and_then(|k| k.try_into().ok())
                            .ok_or_else(corrupt)?,
                    ),
                    None => None,
                },
            }));
        }
        let [key_p, crt_p, ca_p, name_p] = Self::legacy_paths(dir);
        if !crt_p.exists() {
            return Ok(None);
        }
        let site = String::from_utf8(read(&name_p)?).map_err(|_| PkiError::Corrupt {
            path: name_p.clone(),
            what: "site name",
        })?;
        Ok(Some(SiteCredentials {
            site: site.trim().to_string(),
            cert: CertificateDer::from(read(&crt_p)?),
            key: load_key(&key_p)?,
            ca: CertificateDer::from(read(&ca_p)?),
            issued_unix: 0,
            expires_unix: 0,
            signing_key: None,
        }))
    }

    /// Save atomically (one file, written aside and renamed), then drop the legacy files.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        let t = dir.join("tls");
        fs::create_dir_all(&t).map_err(io_err(&t))?;
        let f = CredentialsFile {
            site: self.site.clone(),
            key_pem: self.key.serialize_pem(),
            cert_hex: hex::encode(&self.cert),
            ca_hex: hex::encode(&self.ca),
            issued_unix: self.issued_unix,
            expires_unix: self.expires_unix,
            signing_key_hex: self.signing_key.map(hex::encode),
        };
        let bytes = serde_json::to_vec_pretty(&f).expect("plain data");
        write_private(&Self::file(dir), &bytes, 0o600)?;
        for p in Self::legacy_paths(dir) {
            let _ = fs::remove_file(p);
        }
        Ok(())
    }

    pub fn ca_fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.ca)
    }

    pub fn cert_fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert)
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        key_der(&self.key)
    }

    /// Has the certificate expired at `now` (Unix seconds)? Unknown expiry: no.
    pub fn expired(&self, now: u64) -> bool {
        self.expires_unix != 0 && now >= self.expires_unix
    }

    /// Should it be renewed at `now`: within the last third of its life, or of unknown
    /// expiry?
    pub fn renew_due(&self, now: u64) -> bool {
        if self.expires_unix == 0 || self.issued_unix == 0 {
            return true;
        }
        let life = self.expires_unix.saturating_sub(self.issued_unix);
        now + life / 3 >= self.expires_unix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_garbage() {
        let t = Token {
            kind: TokenKind::Join,
            ca_fingerprint: [3; 32],
            secret: "0123456789abcdef0123".into(),
        };
        assert_eq!(t.to_string().parse::<Token>().unwrap(), t);
        for bad in [
            "",
            "x.y.z",
            "scjoin1.00.0123456789abcdef",
            "scjoin1.zz.0123",
        ] {
            assert!(bad.parse::<Token>().is_err(), "{bad}");
        }
        assert!(!format!("{t:?}").contains("0123456789"));
    }

    #[test]
    fn tokens_are_read_as_text_or_from_a_file() {
        let t = Token {
            kind: TokenKind::Admin,
            ca_fingerprint: [5; 32],
            secret: "0123456789abcdef0123".into(),
        };
        assert_eq!(Token::from_text_or_file(&t.to_string()).unwrap(), t);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.token");
        std::fs::write(&p, format!("{t}\n")).unwrap();
        assert_eq!(Token::from_text_or_file(p.to_str().unwrap()).unwrap(), t);
        std::fs::write(&p, "garbage").unwrap();
        let e = Token::from_text_or_file(p.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("admin.token"), "{e}");
        let e = Token::from_text_or_file("/nonexistent/token").unwrap_err();
        assert!(e.to_string().contains("invalid token"), "{e}");
    }

    #[test]
    fn engine_pki_persists_and_issues_site_certs() {
        let dir = tempfile::tempdir().unwrap();
        let a = EnginePki::load_or_create(dir.path(), true).unwrap();
        let b = EnginePki::load_or_create(dir.path(), true).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.join, b.join);
        assert_ne!(a.join.as_ref().unwrap().secret, a.admin.secret);
        // Without open enrollment there is no join token, on disk or in memory.
        let c = EnginePki::load_or_create(dir.path(), false).unwrap();
        assert!(c.join.is_none() && !dir.path().join("join.token").exists());
        assert_eq!(c.admin, a.admin);
        let pending = PendingEnrollment::new("site-a").unwrap();
        let day = std::time::Duration::from_secs(86_400);
        let (cert, expires) = b.issue_site_cert("site-a", &pending.csr_der, day).unwrap();
        assert!(expires.abs_diff(unix_now() + 86_400) < 5, "{expires}");
        let key = Some([5; 32]);
        let creds = pending.complete("site-a", cert.to_vec(), b.ca_der().to_vec(), expires, key);
        let agent_dir = tempfile::tempdir().unwrap();
        creds.save(agent_dir.path()).unwrap();
        let back = SiteCredentials::load(agent_dir.path()).unwrap().unwrap();
        assert_eq!(back.site, "site-a");
        assert_eq!(back.ca_fingerprint(), a.fingerprint());
        assert_eq!(back.expires_unix, expires);
        assert_eq!(back.signing_key, key);
        assert!(!back.expired(unix_now()) && back.expired(expires));
        assert!(!back.renew_due(unix_now()) && back.renew_due(expires - 86_400 / 3));
        assert!(b.issue_site_cert("Bad Name", &[1, 2, 3], day).is_err());
        assert!(b.issue_site_cert("ok", &[1, 2, 3], day).is_err());
        let t = b.new_site_token();
        assert_eq!(t.kind, TokenKind::Site);
        assert_eq!(t.to_string().parse::<Token>().unwrap(), t);
    }

    #[test]
    fn private_files_are_written_whole_with_their_mode_and_no_shared_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // Files written at once in one directory (as ca.key and ca.der are) each land
        // whole, with their own mode, and leave no temporary behind.
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let p = dir.path().join(format!("f{i}.key"));
                s.spawn(move || write_private(&p, &[i; 5000], 0o600 | ((i as u32 & 1) * 0o044)));
            }
        });
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 8, "{names:?}");
        for i in 0..8u8 {
            let p = dir.path().join(format!("f{i}.key"));
            assert_eq!(std::fs::read(&p).unwrap(), vec![i; 5000]);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600 | ((i as u32 & 1) * 0o044), "f{i}");
        }
        // The engine's CA key is private from its first start.
        let e = tempfile::tempdir().unwrap();
        EnginePki::load_or_create(e.path(), false).unwrap();
        let key = e.path().join("tls").join("ca.key");
        assert_eq!(
            std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn secrets_compare() {
        assert!(secrets_match("abcd", "abcd"));
        assert!(!secrets_match("abcd", "abce"));
        assert!(!secrets_match("abcd", "abc"));
    }
}

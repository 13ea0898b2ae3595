//! Authenticating to an OpenStack cloud as every OpenStack tool does: Keystone v3 with the
//! standard `OS_*` environment variables or a `clouds.yaml` entry (password or application
//! credential), a token renewed before it expires, and Glance found in the token's service
//! catalog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::Mutex;

use crate::adapter::AdapterError;

/// A token is renewed when it has less than this left.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// How to prove who we are.
#[derive(Clone, PartialEq, Eq)]
pub enum Method {
    Password {
        username: String,
        password: String,
        user_domain: Domain,
        project: Scope,
    },
    ApplicationCredential {
        id: String,
        secret: String,
    },
}

/// A domain by id or by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Domain {
    Id(String),
    Name(String),
}

/// The project a password token is scoped to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Id(String),
    Name { name: String, domain: Domain },
}

/// Everything needed to get a token and find Glance.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Keystone's v3 URL.
    pub auth_url: String,
    pub method: Method,
    pub region: Option<String>,
    /// `public` unless told otherwise.
    pub interface: String,
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password or secret.
        match self {
            Method::Password {
                username,
                user_domain,
                project,
                ..
            } => write!(f, "Password({username}, {user_domain:?}, {project:?})"),
            Method::ApplicationCredential { id, .. } => write!(f, "ApplicationCredential({id})"),
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password or secret.
        let who = match &self.method {
            Method::Password { username, .. } => format!("user {username}"),
            Method::ApplicationCredential { id, .. } => format!("application credential {id}"),
        };
        write!(f, "AuthConfig({}, {who})", self.auth_url)
    }
}

fn config(why: impl Into<String>) -> AdapterError {
    AdapterError::Config(format!("OpenStack credentials: {}", why.into()))
}

/// `…/v3` for an auth URL given with or without it.
fn v3(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/v3") {
        u.to_string()
    } else {
        format!("{u}/v3")
    }
}

impl AuthConfig {
    /// From the standard `OS_*` variables; `None` when there is no `OS_AUTH_URL` (then the
    /// Glance is one without authentication).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Option<AuthConfig>, AdapterError> {
        let v: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("OS_"))
            .collect();
        let get = |k: &str| v.get(k).filter(|s| !s.is_empty()).cloned();
        let Some(auth_url) = get("OS_AUTH_URL") else {
            return Ok(None);
        };
        let fields: BTreeMap<&str, Option<String>> = [
            ("username", get("OS_USERNAME")),
            ("password", get("OS_PASSWORD")),
            ("user_domain_name", get("OS_USER_DOMAIN_NAME")),
            ("user_domain_id", get("OS_USER_DOMAIN_ID")),
            (
                "project_name",
                get("OS_PROJECT_NAME").or(get("OS_TENANT_NAME")),
            ),
            ("project_id", get("OS_PROJECT_ID").or(get("OS_TENANT_ID"))),
            ("project_domain_name", get("OS_PROJECT_DOMAIN_NAME")),
            ("project_domain_id", get("OS_PROJECT_DOMAIN_ID")),
            (
                "application_credential_id",
                get("OS_APPLICATION_CREDENTIAL_ID"),
            ),
            (
                "application_credential_secret",
                get("OS_APPLICATION_CREDENTIAL_SECRET"),
            ),
        ]
        .into_iter()
        .collect();
        let method = method(&fields, "OS_")?;
        Ok(Some(AuthConfig {
            auth_url: v3(&auth_url),
            method,
            region: get("OS_REGION_NAME"),
            interface: get("OS_INTERFACE").unwrap_or_else(|| "public".into()),
        }))
    }

    /// The `clouds.yaml` entry `cloud` in `text`.
    pub fn from_clouds_yaml(text: &str, cloud: &str) -> Result<AuthConfig, AdapterError> {
        let docs = yaml_rust2::YamlLoader::load_from_str(text)
            .map_err(|e| config(format!("clouds.yaml: {e}")))?;
        let doc = docs.first().ok_or_else(|| config("clouds.yaml is empty"))?;
        let entry = &doc["clouds"][cloud];
        if entry.is_badvalue() {
            return Err(config(format!("clouds.yaml has no cloud {cloud:?}")));
        }
        let s = |y: &yaml_rust2::Yaml| y.as_str().map(str::to_string);
        let auth = &entry["auth"];
        let keys = [
            "username",
            "password",
            "user_domain_name",
            "user_domain_id",
            "project_name",
            "project_id",
            "project_domain_name",
            "project_domain_id",
            "application_credential_id",
            "application_credential_secret",
        ];
        let fields: BTreeMap<&str, Option<String>> =
            keys.into_iter().map(|k| (k, s(&auth[k]))).collect();
        let auth_url = s(&auth["auth_url"])
            .ok_or_else(|| config(format!("cloud {cloud:?} has no auth.auth_url")))?;
        Ok(AuthConfig {
            auth_url: v3(&auth_url),
            method: method(&fields, "auth.")?,
            region: s(&entry["region_name"]),
            interface: s(&entry["interface"]).unwrap_or_else(|| "public".into()),
        })
    }

    /// The entry `cloud` of the first `clouds.yaml` found where OpenStack tools look:
    /// `$OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`, `~/.config/openstack/clouds.yaml`,
    /// `/etc/openstack/clouds.yaml`.
    pub fn from_cloud(cloud: &str) -> Result<AuthConfig, AdapterError> {
        let mut paths: Vec<PathBuf> = Vec::new();
        if let Ok(p) = std::env::var("OS_CLIENT_CONFIG_FILE") {
            paths.push(p.into());
        }
        paths.push("clouds.yaml".into());
        if let Ok(h) = std::env::var("HOME") {
            paths.push(Path::new(&h).join(".config/openstack/clouds.yaml"));
        }
        paths.push("/etc/openstack/clouds.yaml".into());
        let found = paths.iter().find(|p| p.is_file()).ok_or_else(|| {
            config(format!(
                "no clouds.yaml for --os-cloud {cloud} (looked in {paths:?})"
            ))
        })?;
        let text = std::fs::read_to_string(found).map_err(AdapterError::io("read", found))?;
        Self::from_clouds_yaml(&text, cloud)
            .map_err(|e| config(format!("{}: {e}", found.display())))
    }
}

/// The method the fields describe: an application credential when one is given, else a
/// password with its user and project.
fn method(f: &BTreeMap<&str, Option<String>>, prefix: &str) -> Result<Method, AdapterError> {
    let get = |k: &str| f.get(k).cloned().flatten();
    if let (Some(id), Some(secret)) = (
        get("application_credential_id"),
        get("application_credential_secret"),
    ) {
        return Ok(Method::ApplicationCredential { id, secret });
    }
    let need =
        |k: &str| get(k).ok_or_else(|| config(format!("{prefix}{} is not set", k.to_uppercase())));
    let domain = |id: &str, name: &str| match (get(id), get(name)) {
        (Some(i), _) => Domain::Id(i),
        (None, Some(n)) => Domain::Name(n),
        (None, None) => Domain::Id("default".into()),
    };
    let project = match (get("project_id"), get("project_name")) {
        (Some(id), _) => Scope::Id(id),
        (None, Some(name)) => Scope::Name {
            name,
            domain: domain("project_domain_id", "project_domain_name"),
        },
        (None, None) => return Err(config(format!("{prefix}PROJECT_NAME is not set"))),
    };
    Ok(Method::Password {
        username: need("username")?,
        password: need("password")?,
        user_domain: domain("user_domain_id", "user_domain_name"),
        project,
    })
}

fn domain_json(d: &Domain) -> serde_json::Value {
    match d {
        Domain::Id(i) => serde_json::json!({ "id": i }),
        Domain::Name(n) => serde_json::json!({ "name": n }),
    }
}

/// The body of `POST /v3/auth/tokens`.
fn auth_body(m: &Method) -> serde_json::Value {
    match m {
        Method::ApplicationCredential { id, secret } => serde_json::json!({
            "auth": {"identity": {"methods": ["application_credential"],
                "application_credential": {"id": id, "secret": secret}}}
        }),
        Method::Password {
            username,
            password,
            user_domain,
            project,
        } => {
            let scope = match project {
                Scope::Id(i) => serde_json::json!({"project": {"id": i}}),
                Scope::Name { name, domain } => {
                    serde_json::json!({"project": {"name": name, "domain": domain_json(domain)}})
                }
            };
            serde_json::json!({
                "auth": {"identity": {"methods": ["password"], "password": {"user": {
                    "name": username, "domain": domain_json(user_domain), "password": password}}},
                 "scope": scope}
            })
        }
    }
}

#[derive(Deserialize)]
struct TokenBody {
    token: TokenInfo,
}

#[derive(Deserialize)]
struct TokenInfo {
    expires_at: String,
    #[serde(default)]
    catalog: Vec<CatalogEntry>,
}

#[derive(Deserialize)]
struct CatalogEntry {
    #[serde(rename = "type")]
    kind: String,
    endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
struct Endpoint {
    interface: String,
    url: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    region_id: Option<String>,
}

/// A token and what came with it.
#[derive(Clone)]
struct Token {
    value: String,
    expires: SystemTime,
    /// Glance's URL from the catalog, if it lists one.
    image_url: Option<String>,
}

/// A Keystone session: hands out a valid token, renewing it before it expires.
pub struct Session {
    cfg: AuthConfig,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({:?})", self.cfg)
    }
}

impl Session {
    pub fn new(cfg: AuthConfig, http: reqwest::Client) -> Session {
        Session {
            cfg,
            http,
            token: Mutex::new(None),
        }
    }

    /// A token valid for at least a few more minutes, and Glance's URL from the catalog.
    pub async fn token(&self) -> Result<(String, Option<String>), AdapterError> {
        let mut t = self.token.lock().await;
        let fresh = t.as_ref().is_some_and(|t| {
            t.expires
                .duration_since(SystemTime::now())
                .is_ok_and(|left| left > RENEW_BEFORE)
        });
        if !fresh {
            *t = Some(self.issue().await?);
        }
        let t = t.as_ref().expect("just set");
        Ok((t.value.clone(), t.image_url.clone()))
    }

    /// Forget the token (the service refused it): the next call gets a new one.
    pub async fn invalidate(&self) {
        *self.token.lock().await = None;
    }

    async fn issue(&self) -> Result<Token, AdapterError> {
        let url = format!("{}/auth/tokens", self.cfg.auth_url);
        let fail = |e: &dyn std::fmt::Display| {
            AdapterError::Service(format!("Keystone at {}: {e}", self.cfg.auth_url))
        };
        let resp = self
            .http
            .post(&url)
            .json(&auth_body(&self.cfg.method))
            .send()
            .await
            .map_err(|e| fail(&e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(fail(&format!("{status}: {}", body.trim())));
        }
        let value = resp
            .headers()
            .get("X-Subject-Token")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| fail(&"no X-Subject-Token in the answer"))?
            .to_string();
        let body: TokenBody = resp.json().await.map_err(|e| fail(&e))?;
        let expires = time::OffsetDateTime::parse(
            &body.token.expires_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| fail(&format!("expires_at {:?}: {e}", body.token.expires_at)))?;
        let expires =
            SystemTime::UNIX_EPOCH + Duration::from_secs(expires.unix_timestamp().max(0) as u64);
        let image_url = body
            .token
            .catalog
            .iter()
            .filter(|c| c.kind == "image")
            .flat_map(|c| &c.endpoints)
            .find(|e| {
                e.interface == self.cfg.interface
                    && self.cfg.region.as_ref().is_none_or(|r| {
                        e.region.as_ref() == Some(r) || e.region_id.as_ref() == Some(r)
                    })
            })
            .map(|e| e.url.trim_end_matches('/').to_string());
        Ok(Token {
            value,
            expires,
            image_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_standard_variables_give_password_or_application_credentials() {
        assert_eq!(
            AuthConfig::from_vars(vars(&[("HOME", "/root")])).unwrap(),
            None
        );
        let c = AuthConfig::from_vars(vars(&[
            ("OS_AUTH_URL", "http://k:5000"),
            ("OS_USERNAME", "agent"),
            ("OS_PASSWORD", "pw"),
            ("OS_PROJECT_NAME", "sites"),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_PROJECT_DOMAIN_NAME", "Default"),
            ("OS_REGION_NAME", "RegionOne"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.auth_url, "http://k:5000/v3");
        assert_eq!(c.region.as_deref(), Some("RegionOne"));
        assert_eq!(
            c.method,
            Method::Password {
                username: "agent".into(),
                password: "pw".into(),
                user_domain: Domain::Name("Default".into()),
                project: Scope::Name {
                    name: "sites".into(),
                    domain: Domain::Name("Default".into())
                },
            }
        );
        assert!(!format!("{c:?}").contains("pw"), "no secret in logs");
        let a = AuthConfig::from_vars(vars(&[
            ("OS_AUTH_URL", "http://k:5000/v3/"),
            ("OS_APPLICATION_CREDENTIAL_ID", "id1"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "s"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            a.method,
            Method::ApplicationCredential {
                id: "id1".into(),
                secret: "s".into()
            }
        );
        let e = AuthConfig::from_vars(vars(&[("OS_AUTH_URL", "http://k"), ("OS_USERNAME", "u")]))
            .unwrap_err();
        assert!(e.to_string().contains("OS_PROJECT_NAME"), "{e}");
    }

    #[test]
    fn a_clouds_yaml_entry_is_read_like_the_variables() {
        let y = r#"
clouds:
  site:
    auth:
      auth_url: http://keystone:5000/v3
      username: agent
      password: pw
      project_id: p1
      user_domain_id: default
    region_name: RegionOne
    interface: internal
  app:
    auth_type: v3applicationcredential
    auth:
      auth_url: http://keystone:5000
      application_credential_id: a
      application_credential_secret: b
"#;
        let c = AuthConfig::from_clouds_yaml(y, "site").unwrap();
        assert_eq!(c.interface, "internal");
        assert!(
            matches!(c.method, Method::Password { project: Scope::Id(ref p), .. } if p == "p1")
        );
        let a = AuthConfig::from_clouds_yaml(y, "app").unwrap();
        assert!(matches!(a.method, Method::ApplicationCredential { .. }));
        let e = AuthConfig::from_clouds_yaml(y, "other").unwrap_err();
        assert!(e.to_string().contains("no cloud \"other\""), "{e}");
    }
}

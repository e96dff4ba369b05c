//! Where the metrics go, read once at start: an Application Insights connection string, checked field by field
//! so that one that cannot work stops the start with a message naming the field (never its secret value).
//!
//! A connection string is `;`-separated `Name=value` fields (names in any case): `InstrumentationKey` (required),
//! `IngestionEndpoint`, else `EndpointSuffix` (and `Location`) to derive it, else the global endpoint; `Authorization`
//! may only be `ikey` (amlserve authenticates with the key, not Microsoft Entra ID); other fields (`LiveEndpoint`,
//! `ApplicationId`) are ignored. The exporter is handed the two fields it uses, normalized.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

/// The setting an explicit connection string comes from (the flag and its environment variable).
const FLAG: &str = "--app-insights-connection-string / APPLICATIONINSIGHTS_CONNECTION_STRING";

/// The setting the instrumentation key comes from on Azure ML (`app_insights_enabled: true` in the deployment).
const AZUREML_KEY: &str = "AML_APP_INSIGHTS_KEY (Azure ML app_insights_enabled)";

/// Where telemetry goes when the connection string names no endpoint (as in the Azure Monitor SDKs).
const GLOBAL_INGESTION: &str = "https://dc.services.visualstudio.com";

/// The longest instrumentation key an envelope carries (a GUID has 36 characters).
const MAX_KEY_CHARS: usize = 40;

/// Where and how often the metrics are exported. `Debug` leaves the instrumentation key out.
#[derive(Clone, PartialEq, Eq)]
pub struct AppInsightsConfig {
    key: String,
    /// The ingestion endpoint (`https://...`, without a trailing `/`): telemetry is posted to `<it>/v2/track`.
    pub ingestion: String,
    /// Which setting it came from, for the start-up log line.
    pub source: &'static str,
    /// Time between exports (`--metrics-export-interval-secs`).
    pub interval: Duration,
    /// A PEM file of certificates to trust beside the bundled roots (`SSL_CERT_FILE`).
    pub extra_roots: Option<PathBuf>,
}

impl fmt::Debug for AppInsightsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppInsightsConfig")
            .field("key", &"<redacted>")
            .field("ingestion", &self.ingestion)
            .field("source", &self.source)
            .field("interval", &self.interval)
            .field("extra_roots", &self.extra_roots)
            .finish()
    }
}

impl AppInsightsConfig {
    /// The export target from `flag` (the value of `--app-insights-connection-string`, whose environment variable is
    /// `APPLICATIONINSIGHTS_CONNECTION_STRING`), else the instrumentation key Azure ML passes when the deployment has
    /// `app_insights_enabled: true` (`AML_APP_INSIGHTS_ENABLED=true` and `AML_APP_INSIGHTS_KEY`, the variables its
    /// inference server reads); `None` (no export) when neither is set, or `OTEL_SDK_DISABLED=true`. `env` reads a
    /// variable (the process environment in production). A connection string that cannot work is refused with a
    /// message that names the field and never holds the key.
    pub fn resolve(
        flag: Option<&str>,
        interval: Duration,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, String> {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let (source, fields) = match flag.filter(|v| !v.trim().is_empty()) {
            Some(v) => (FLAG, parse(v)?),
            None => {
                let enabled = set("AML_APP_INSIGHTS_ENABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
                match set("AML_APP_INSIGHTS_KEY").filter(|_| enabled) {
                    Some(key) => (
                        AZUREML_KEY,
                        vec![("instrumentationkey".to_string(), key.trim().to_string())],
                    ),
                    None => return Ok(None),
                }
            }
        };
        let field = |name: &str| fields.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let refuse = |why: String| Err(format!("{source}: {why}"));
        if let Some(auth) = field("authorization").filter(|a| !a.eq_ignore_ascii_case("ikey")) {
            return refuse(format!(
                "Authorization={auth} is not supported: amlserve sends telemetry with the instrumentation key; use the \
                 resource's connection string without an Authorization field (and a resource that allows local \
                 authentication)"
            ));
        }
        let key = field("instrumentationkey").unwrap_or_default();
        if key.is_empty() {
            return refuse(
                "no InstrumentationKey: expected InstrumentationKey=<key>;IngestionEndpoint=https://... as \
                 the resource's Overview page shows it"
                    .into(),
            );
        }
        if key.len() > MAX_KEY_CHARS || !key.chars().all(|c| c.is_ascii_graphic()) {
            return refuse(format!(
                "the InstrumentationKey is not a key (at most {MAX_KEY_CHARS} printable characters, a GUID)"
            ));
        }
        let ingestion = match (field("ingestionendpoint"), field("endpointsuffix")) {
            (Some(endpoint), _) => endpoint_url("IngestionEndpoint", endpoint)?,
            (None, Some(suffix)) => {
                let location = field("location").map(|l| format!("{l}.")).unwrap_or_default();
                endpoint_url("EndpointSuffix", &format!("https://{location}dc.{suffix}"))?
            }
            (None, None) => GLOBAL_INGESTION.to_string(),
        };
        Ok(Some(Self {
            key: key.to_string(),
            ingestion,
            source,
            interval,
            extra_roots: set("SSL_CERT_FILE").map(PathBuf::from),
        }))
    }

    /// The connection string the exporter parses: the two fields it uses, normalized.
    pub(super) fn connection_string(&self) -> String {
        format!("InstrumentationKey={};IngestionEndpoint={}", self.key, self.ingestion)
    }
}

/// The fields of a connection string, names lowercased, values trimmed; empty fields (a trailing `;`) skipped.
fn parse(value: &str) -> Result<Vec<(String, String)>, String> {
    value
        .split(';')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| match f.split_once('=') {
            Some((name, v)) if !name.trim().is_empty() => Ok((name.trim().to_ascii_lowercase(), v.trim().to_string())),
            // The field may be the bare key: name nothing of it.
            _ => Err(format!(
                "{FLAG}: not a connection string (a field without a Name=: expected \
                 InstrumentationKey=<key>;IngestionEndpoint=https://...)"
            )),
        })
        .collect()
}

/// An endpoint as the exporter takes it: `https://host[:port][/path]` without a trailing `/`. `http://` is taken as
/// `https://`, as the Azure Monitor SDKs do: telemetry is only sent over TLS.
fn endpoint_url(field: &str, value: &str) -> Result<String, String> {
    let value = value.trim().trim_end_matches('/');
    let https = match value.strip_prefix("http://") {
        Some(rest) => format!("https://{rest}"),
        None => value.to_string(),
    };
    let bad = || format!("{FLAG}: {field} '{value}' is not an https://host URL");
    let uri: Uri = https.parse().map_err(|_| bad())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https"), Some(host)) if !host.is_empty() && uri.query().is_none() => Ok(https),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "00000000-1111-2222-3333-444444444444";
    const MINUTE: Duration = Duration::from_secs(60);

    fn resolve(flag: Option<&str>, vars: &[(&str, &str)]) -> Result<Option<AppInsightsConfig>, String> {
        AppInsightsConfig::resolve(flag, MINUTE, |name| {
            vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        })
    }

    fn on(flag: Option<&str>, vars: &[(&str, &str)]) -> AppInsightsConfig {
        resolve(flag, vars).expect("valid").expect("on")
    }

    #[test]
    fn off_unless_a_connection_string_or_the_azureml_key_is_set() {
        assert_eq!(resolve(None, &[]), Ok(None));
        assert_eq!(resolve(Some("  "), &[]), Ok(None));
        let key_only = [("AML_APP_INSIGHTS_KEY", KEY)];
        assert_eq!(resolve(None, &key_only), Ok(None), "the key alone is not the switch");
        let disabled = [("AML_APP_INSIGHTS_ENABLED", "false"), key_only[0]];
        assert_eq!(resolve(None, &disabled), Ok(None));
        let sdk_off = [("OTEL_SDK_DISABLED", "true")];
        assert_eq!(resolve(Some(&format!("InstrumentationKey={KEY}")), &sdk_off), Ok(None));
    }

    #[test]
    fn connection_strings_are_normalized_for_the_exporter() {
        let c = on(
            Some(&format!(
                " InstrumentationKey={KEY};IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/;\
                 LiveEndpoint=https://westeurope.livediagnostics.monitor.azure.com/;ApplicationId=x; "
            )),
            &[],
        );
        assert_eq!(c.ingestion, "https://westeurope-5.in.applicationinsights.azure.com");
        assert_eq!(c.source, FLAG);
        assert_eq!(
            c.connection_string(),
            format!("InstrumentationKey={KEY};IngestionEndpoint={}", c.ingestion)
        );
        assert_eq!(
            on(Some(&format!("instrumentationkey={KEY}")), &[]).ingestion,
            GLOBAL_INGESTION
        );
        let sovereign =
            format!("InstrumentationKey={KEY};EndpointSuffix=applicationinsights.azure.cn;Location=chinaeast2");
        assert_eq!(
            on(Some(&sovereign), &[]).ingestion,
            "https://chinaeast2.dc.applicationinsights.azure.cn"
        );
        let plain = format!("InstrumentationKey={KEY};IngestionEndpoint=http://127.0.0.1:8443/");
        assert_eq!(on(Some(&plain), &[]).ingestion, "https://127.0.0.1:8443", "TLS only");
        let with_ca = on(Some(&plain), &[("SSL_CERT_FILE", "/tmp/ca.pem")]);
        assert_eq!(with_ca.extra_roots, Some(PathBuf::from("/tmp/ca.pem")));
    }

    #[test]
    fn the_azureml_key_makes_a_connection_string_and_an_explicit_one_wins() {
        let vars = [("AML_APP_INSIGHTS_ENABLED", "True"), ("AML_APP_INSIGHTS_KEY", KEY)];
        let c = on(None, &vars);
        assert_eq!((c.source, c.ingestion.as_str()), (AZUREML_KEY, GLOBAL_INGESTION));
        assert!(c.connection_string().starts_with(&format!("InstrumentationKey={KEY};")));
        let explicit = "InstrumentationKey=11111111-1111-1111-1111-111111111111;IngestionEndpoint=https://e";
        let c = on(Some(explicit), &vars);
        assert_eq!((c.source, c.ingestion.as_str()), (FLAG, "https://e"));
    }

    #[test]
    fn strings_that_cannot_work_are_refused_without_the_key() {
        for (value, says) in [
            ("garbage", "not a connection string"),
            (KEY, "not a connection string"),
            ("IngestionEndpoint=https://e", "no InstrumentationKey"),
            ("InstrumentationKey=", "no InstrumentationKey"),
            ("InstrumentationKey=a b", "not a key"),
            (
                &format!("InstrumentationKey={KEY};Authorization=AAD"),
                "Authorization=AAD",
            ),
            (
                &format!("InstrumentationKey={KEY};IngestionEndpoint=ftp://e"),
                "not an https://host URL",
            ),
            (
                &format!("InstrumentationKey={KEY};IngestionEndpoint=e"),
                "not an https://host URL",
            ),
            (
                &format!("InstrumentationKey={KEY};IngestionEndpoint=https://e/?k=1"),
                "not an https://host URL",
            ),
        ] {
            let err = resolve(Some(value), &[]).expect_err(value);
            assert!(err.contains(says) && err.contains(FLAG), "{value}: {err}");
            assert!(
                !err.contains(KEY) && !err.contains("a b"),
                "{value}: the key leaked: {err}"
            );
        }
        let debug = format!("{:?}", on(Some(&format!("InstrumentationKey={KEY}")), &[]));
        assert!(!debug.contains(KEY), "{debug}");
    }
}

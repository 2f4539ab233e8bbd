//! The OpenAPI 3.1 description of the HTTP API, generated (utoipa) from the
//! route handlers' annotations in `routes` and the body types in
//! [`crate::api`]. Served at `GET /v1/openapi.json` and committed as
//! `docs/openapi.json`; a test keeps the two equal.
//!
//! Each operation lists its own error statuses; the ones every operation
//! of a kind shares (a bad body, a bad or missing token, a busy or broken
//! server) are added here by [`CommonErrors`], so they are written once.

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{admin, fleet, routes};
use crate::api;

/// Security scheme of the admin routes: the bootstrap admin token.
pub const ADMIN: &str = "admin_token";
/// Security scheme of the storage routes: a session token.
pub const SESSION: &str = "session_token";
/// Security scheme of `/metrics` when `metrics_token_file` is set.
pub const METRICS: &str = "metrics_token";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "chunkvault",
        description = "The HTTP API of a chunkvault server: device activation and sessions (auth role), \
                       chunk uploads, snapshots and restores (storage role), and administration. \
                       Errors are `{\"error\": CODE, \"message\": TEXT}` with the status and codes each \
                       response lists. A device's long-lived device token is not a header: it goes in \
                       the body of `POST /v1/session`, which answers with a session token.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        routes::healthz,
        routes::metrics,
        routes::openapi_json,
        routes::activate,
        routes::session,
        routes::session_key,
        admin::whoami,
        admin::create_deployment_token,
        admin::deployment_tokens,
        admin::revoke_deployment_token,
        admin::devices,
        admin::device_action,
        admin::delete_device,
        admin::add_users,
        admin::users,
        admin::remove_user,
        admin::create_admin_token,
        admin::admin_tokens,
        admin::revoke_admin_token,
        admin::tenants,
        admin::set_quota,
        admin::audit_log,
        fleet::storage_nodes,
        fleet::tenant_history,
        fleet::device_snapshots,
        admin::checkin,
        admin::checkin_report,
        routes::chunking,
        routes::missing,
        routes::put_chunk,
        routes::put_bundle,
        routes::commit,
        routes::snapshots,
        routes::tree,
        routes::file,
        routes::restore_plan,
        routes::read_chunks,
    ),
    components(schemas(api::ErrorBody)),
    modifiers(&CommonErrors),
    tags(
        (name = "operator", description = "Liveness, metrics and this document."),
        (name = "device", description = "Activation and sessions (auth role; relayed by edge and storage roles)."),
        (name = "admin", description = "Deployment tokens, devices and users (auth role)."),
        (name = "storage", description = "Chunks, snapshots and restores under a session token (storage role)."),
    )
)]
struct ApiDoc;

/// The document, as `GET /v1/openapi.json` serves it.
pub fn document() -> Document {
    ApiDoc::openapi()
}

/// The document as pretty JSON with a final newline (the form of
/// `docs/openapi.json`).
pub fn json() -> String {
    let mut text = document().to_pretty_json().expect("the document serializes");
    text.push('\n');
    text
}

/// Ids are 32 bytes written as 64 lowercase hex digits.
fn hex_id(what: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[0-9a-f]{64}$")).description(Some(what)).into()
}

impl utoipa::PartialSchema for crate::id::BlobId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        hex_id("A chunk id: the chunk's BLAKE3 keyed with the tenant repository's id key")
    }
}

impl utoipa::ToSchema for crate::id::BlobId {}

impl utoipa::PartialSchema for crate::id::SnapshotId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        hex_id("A snapshot id")
    }
}

impl utoipa::ToSchema for crate::id::SnapshotId {}

/// Adds the security schemes, and to each operation the error responses
/// its kind shares.
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |what: &str| {
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(what)).build())
        };
        components.add_security_scheme(
            ADMIN,
            bearer("The administrator's token (CHUNKVAULT_ADMIN_TOKEN or the config's admin_token_file)."),
        );
        components.add_security_scheme(
            SESSION,
            bearer("A session token from POST /v1/session; signed, short-lived, for one tenant, user and device."),
        );
        components.add_security_scheme(
            METRICS,
            bearer("The config's metrics_token_file, when set; without it /metrics is open."),
        );
        for item in doc.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete].into_iter().flatten() {
                add_common_errors(op);
            }
        }
    }
}

/// The error responses an operation shares with others of its kind (by
/// its security scheme and whether it takes a body); those it documents
/// itself are left as they are.
fn add_common_errors(op: &mut Operation) {
    let schemes: Vec<String> = op
        .security
        .iter()
        .flatten()
        .filter_map(|req| serde_json::to_value(req).ok()?.as_object()?.keys().next().cloned())
        .collect();
    let has = |s: &str| schemes.iter().any(|x| x == s);
    let mut errors: Vec<(&str, String)> = Vec::new();
    if op.request_body.is_some() || op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
        errors.push((
            "400",
            "`invalid_request`, `malformed_json`, `bad_id`, `bad_body`: the request is malformed".into(),
        ));
    }
    if op.request_body.is_some() {
        errors.push(("408", "`body_timeout`: the request body stopped arriving".into()));
        errors.push(("413", "`too_large`: the request body is larger than this route accepts".into()));
    }
    if has(ADMIN) || has(SESSION) || has(METRICS) {
        errors.push(("401", "`invalid_token`, `token_expired`: the bearer token is missing, wrong or expired".into()));
    }
    if has(ADMIN) {
        errors.push((
            "403",
            "`forbidden`: the admin token's role or tenant does not cover this (a tenant admin elsewhere, \
             a read-only token changing something)"
                .into(),
        ));
        errors.push(("503", "`registry_unavailable`: the auth role could not reach its registry; retry later".into()));
    }
    if has(SESSION) {
        errors.push((
            "403",
            "`device_retired`, `device_blocked`, `device_wiped`, `device_reset`, `restore_to_other_device_denied`, `forbidden`: the token is valid but the device \
             or user may not do this"
                .into(),
        ));
        errors.push((
            "503",
            "`auth_unreachable`, `registry_unavailable`, `repository_locked`, `unavailable`: the node cannot serve this now; retry later"
                .into(),
        ));
    }
    if has(ADMIN) || has(SESSION) {
        errors.push((
            "404",
            "`not_found`: no such thing, or this server does not run the role that serves the route".into(),
        ));
        errors.push(("500", "`internal`, `damaged_data`: the server failed; the message says no more".into()));
    }
    errors.push(("414", "`uri_too_long`: the request target is over 16 KiB".into()));
    errors.push(("431", "`headers_too_large`: the request headers are over 64 KiB".into()));
    for (status, description) in errors {
        if !op.responses.responses.contains_key(status) {
            op.responses.responses.insert(status.to_owned(), error_response(&description).into());
        }
    }
}

/// A response with the JSON error body.
pub fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", Content::new(Some(Ref::from_schema_name("ErrorBody"))))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_documents_its_errors_with_the_error_body() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 20, "{:?}", paths.keys());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.keys().any(|s| s.starts_with('2')), "{method} {path}: no success");
                for (status, r) in responses.iter().filter(|(s, _)| s.starts_with('4') || s.starts_with('5')) {
                    let schema = &r["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(schema, "#/components/schemas/ErrorBody", "{method} {path} {status}");
                    assert!(r["description"].as_str().unwrap().contains('`'), "{method} {path} {status}: codes");
                }
                if path.starts_with("/v1/snapshots") || path.starts_with("/v1/chunk") {
                    assert_eq!(op["security"][0][SESSION], serde_json::json!([]), "{method} {path}");
                }
                if path.starts_with("/v1/admin") {
                    assert_eq!(op["security"][0][ADMIN], serde_json::json!([]), "{method} {path}");
                }
            }
        }
        let put = &paths["/v1/chunks/{id}"]["put"];
        assert!(put["requestBody"]["content"]["application/octet-stream"].is_object());
    }

    /// The codes a response description names, in backticks before its colon.
    fn documented_codes(description: &str) -> Vec<&str> {
        let names = description.split(':').next().unwrap_or_default();
        names.split('`').skip(1).step_by(2).collect()
    }

    /// Every error code the document names comes with the status the server
    /// sends it with (`ErrorCode`, the one table of codes and statuses), and
    /// every code a handler can send is documented on some route.
    #[test]
    fn documented_error_codes_match_the_statuses_the_server_sends() {
        use crate::server::error::ErrorCode;
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let mut seen = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, r) in op["responses"].as_object().unwrap() {
                    if !(status.starts_with('4') || status.starts_with('5')) {
                        continue;
                    }
                    for name in documented_codes(r["description"].as_str().unwrap()) {
                        let code = ErrorCode::from_wire(name)
                            .unwrap_or_else(|| panic!("{method} {path} {status}: `{name}` is not an error code"));
                        assert_eq!(code.status().as_str(), status, "{method} {path}: `{name}`");
                        seen.insert(name);
                    }
                }
            }
        }
        // Made only outside the handlers, for requests no route documents
        // (a wrong method, a layer's refusal), or not by this server's layers.
        let outside = [
            "method_not_allowed",
            "request_timeout",
            "unsupported_media_type",
            "unprocessable_entity",
            "too_many_requests",
        ];
        for code in ErrorCode::ALL {
            let name = code.as_str();
            assert!(seen.contains(name) || outside.contains(&name), "`{name}` is documented on no route");
        }
    }

    /// Every `pattern` in the document, with where it is.
    fn patterns(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("pattern", serde_json::Value::String(p)) => out.push((at.to_owned(), p.clone())),
                        _ => patterns(x, &format!("{at}/{k}"), out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| patterns(x, at, out)),
            _ => {}
        }
    }

    /// The input patterns a client (or schemathesis) reads from the document
    /// accept exactly what the server's own checks accept.
    #[test]
    fn input_patterns_agree_with_the_server_checks() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let mut found = Vec::new();
        patterns(&doc, "", &mut found);
        assert!(found.len() >= 10, "{found:?}");
        for (at, pattern) in found {
            let re = regex::Regex::new(&pattern).unwrap_or_else(|e| panic!("{at}: {e}"));
            let check: fn(&str) -> bool = match pattern.as_str() {
                "^[0-9a-f]{64}$" => {
                    |s| s.parse::<crate::id::BlobId>().is_ok() && !s.bytes().any(|b| b.is_ascii_uppercase())
                }
                "^[a-z0-9_][a-z0-9_-]{0,63}$" => |s| crate::api::check_tenant(s).is_ok(),
                "^[A-Za-z0-9_.:-]{1,128}$" => |s| crate::api::check_device_id(s).is_ok(),
                "^[^@\\s]+@[^@\\s]+$" => |s| crate::api::check_email(s).is_ok(),
                other => panic!("{at}: pattern {other:?} has no check to agree with"),
            };
            let mut runner = TestRunner::new(Config { cases: 2000, ..Config::default() });
            // Strings near the pattern's alphabet, and arbitrary ones.
            let near = "[a-zA-Z0-9_.:@ /-]{0,70}|[0-9a-fA-F]{63,65}";
            runner
                .run(&prop_oneof![near.prop_map(|s| s), any::<String>()], |s| {
                    // An email's control characters are left to the server's check.
                    if pattern.contains('@') && s.chars().any(char::is_control) {
                        return Ok(());
                    }
                    let ok = re.is_match(&s) && (s.len() <= 254 || !pattern.contains('@'));
                    prop_assert_eq!(ok, check(&s), "{}: {:?}", at, s);
                    Ok(())
                })
                .unwrap();
        }
    }
}

//! The HTTP transport of the broker (axum, HTTP/1.1): routes, cookies and
//! headers in, JSON and RFC 7807 problems (Trustee's error types) out.
//! Every decision is the [`Broker`]'s; this module only translates.
//!
//! It must never log a request body (evidence is fine, but admin bodies
//! carry secrets) nor an `Authorization` header.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::Serialize;
use tracing::Instrument;

use super::broker::{Admin, Broker};
use super::error::BrokerError;
use crate::kbs::protocol::LEASE_HEADER;
use crate::kbs::protocol::SESSION_COOKIE;

type Shared = State<Arc<Broker>>;

/// The broker's routes.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/kbs/v0/auth", post(auth))
        .route("/kbs/v0/attest", post(attest))
        .route("/kbs/v0/resource/{*path}", get(resource))
        .route("/hsev/v0/lease/{*path}", post(renew_lease))
        .route(
            "/admin/v0/leases/{*path}",
            get(show_lease).delete(end_lease),
        )
        .route("/admin/v0/resources", get(list_resources))
        .route(
            "/admin/v0/resources/{*path}",
            put(put_resource).delete(delete_resource),
        )
        .route(
            "/admin/v0/reference-values/{*route}",
            put(put_reference_values).delete(delete_reference_values),
        )
        .route("/admin/v0/announcements", get(list_announcements))
        .route("/admin/v0/announcements/{*route}", put(announce))
        .fallback(no_route)
        .method_not_allowed_fallback(no_route)
        .with_state(broker)
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(error) => problem(&BrokerError::Internal(format!("answer: {error}"))),
    }
}

fn problem(error: &BrokerError) -> Response {
    let kind = error.kind();
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if error.is_failure() {
        tracing::error!(kind = kind.name(), detail = %error, "request failed");
    } else {
        tracing::info!(kind = kind.name(), detail = %error, "request refused");
    }
    let body = kind.problem(error.to_string());
    match serde_json::to_vec(&body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            bytes,
        )
            .into_response(),
        Err(_) => status.into_response(),
    }
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn answer<T: Serialize>(result: Result<T, BrokerError>) -> Response {
    match result {
        Ok(value) => json(StatusCode::OK, &value),
        Err(error) => problem(&error),
    }
}

async fn auth(State(broker): Shared, body: Bytes) -> Response {
    let span = tracing::info_span!("kbs", call = "auth");
    match broker.auth(&body).instrument(span).await {
        Ok((challenge, session)) => {
            let mut response = json(StatusCode::OK, &challenge);
            let cookie = format!(
                "{SESSION_COOKIE}={session}; Path=/kbs/v0; HttpOnly; Max-Age={}",
                broker.session_ttl().as_secs()
            );
            match HeaderValue::from_str(&cookie) {
                Ok(value) => {
                    response.headers_mut().insert(header::SET_COOKIE, value);
                    tracing::debug!(%session, "challenge issued");
                    response
                }
                Err(error) => problem(&BrokerError::Internal(format!("cookie: {error}"))),
            }
        }
        Err(error) => problem(&error),
    }
}

async fn attest(State(broker): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let span = tracing::info_span!("kbs", call = "attest");
    answer(
        broker
            .attest(header_text(&headers, header::COOKIE), &body)
            .instrument(span)
            .await,
    )
}

async fn resource(State(broker): Shared, headers: HeaderMap, Path(path): Path<String>) -> Response {
    let span = tracing::info_span!("kbs", call = "resource", resource = %path);
    let released = broker
        .resource(
            header_text(&headers, header::COOKIE),
            header_text(&headers, header::AUTHORIZATION),
            &path,
        )
        .instrument(span)
        .await;
    match released {
        Ok((jwe, lease_seconds)) => {
            let mut response = json(StatusCode::OK, &jwe);
            if let Some(seconds) = lease_seconds {
                response
                    .headers_mut()
                    .insert(LEASE_HEADER, HeaderValue::from(seconds));
            }
            response
        }
        Err(error) => problem(&error),
    }
}

async fn renew_lease(
    State(broker): Shared,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Response {
    let span = tracing::info_span!("kbs", call = "lease", resource = %path);
    answer(
        broker
            .renew_lease(
                header_text(&headers, header::COOKIE),
                header_text(&headers, header::AUTHORIZATION),
                &path,
            )
            .instrument(span)
            .await,
    )
}

/// Runs an admin call in its span, once its bearer token is accepted.
async fn admin_call<F, Fut>(
    broker: Arc<Broker>,
    headers: &HeaderMap,
    call: &'static str,
    work: F,
) -> Response
where
    F: FnOnce(Arc<Broker>, Admin) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let span = tracing::info_span!("admin", call);
    async move {
        match broker
            .authorize_admin(header_text(headers, header::AUTHORIZATION), call)
            .await
        {
            Ok(admin) => work(broker, admin).await,
            Err(error) => problem(&error),
        }
    }
    .instrument(span)
    .await
}

fn done(result: Result<(), BrokerError>) -> Response {
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => problem(&error),
    }
}

async fn list_resources(State(broker): Shared, headers: HeaderMap) -> Response {
    admin_call(
        broker,
        &headers,
        "list_resources",
        |broker, admin| async move { answer(broker.list_resources(&admin).await) },
    )
    .await
}

async fn list_announcements(State(broker): Shared, headers: HeaderMap) -> Response {
    admin_call(
        broker,
        &headers,
        "list_announcements",
        |broker, admin| async move { answer(broker.announcements(&admin).await) },
    )
    .await
}

async fn announce(
    State(broker): Shared,
    headers: HeaderMap,
    Path(route): Path<String>,
    body: Bytes,
) -> Response {
    admin_call(broker, &headers, "announce", |broker, admin| async move {
        done(broker.announce(&admin, &route, &body).await)
    })
    .await
}

async fn put_resource(
    State(broker): Shared,
    headers: HeaderMap,
    Path(path): Path<String>,
    body: Bytes,
) -> Response {
    admin_call(
        broker,
        &headers,
        "put_resource",
        |broker, admin| async move { done(broker.put_resource(&admin, &path, &body).await) },
    )
    .await
}

async fn delete_resource(
    State(broker): Shared,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Response {
    admin_call(
        broker,
        &headers,
        "delete_resource",
        |broker, admin| async move { done(broker.delete_resource(&admin, &path).await) },
    )
    .await
}

async fn show_lease(
    State(broker): Shared,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Response {
    admin_call(broker, &headers, "show_lease", |broker, admin| async move {
        answer(broker.lease(&admin, &path).await)
    })
    .await
}

async fn end_lease(
    State(broker): Shared,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Response {
    admin_call(broker, &headers, "end_lease", |broker, admin| async move {
        answer(broker.end_lease(&admin, &path).await)
    })
    .await
}

async fn put_reference_values(
    State(broker): Shared,
    headers: HeaderMap,
    Path(route): Path<String>,
    body: Bytes,
) -> Response {
    admin_call(broker, &headers, "put_reference_values", |broker, admin| async move {
        done(broker.put_reference_values(&admin, &route, &body).await)
    })
    .await
}

async fn delete_reference_values(
    State(broker): Shared,
    headers: HeaderMap,
    Path(route): Path<String>,
) -> Response {
    admin_call(
        broker,
        &headers,
        "delete_reference_values",
        |broker, admin| async move { done(broker.delete_reference_values(&admin, &route).await) },
    )
    .await
}

/// Anything not routed: under `/kbs/v0/`, a Trustee "plugin" this broker
/// does not serve; elsewhere, a path that names nothing.
async fn no_route(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let served = "this broker serves POST /kbs/v0/auth, POST /kbs/v0/attest, GET /kbs/v0/resource/<repository>/<type>/<tag>, POST /hsev/v0/lease/<repository>/<type>/<tag> and /admin/v0/{resources,reference-values,announcements,leases}/...";
    let error = if path.starts_with("/kbs/v0/") {
        BrokerError::NoEndpoint(format!("{method} {path}: not served ({served})"))
    } else {
        BrokerError::NotFound(format!("{method} {path}: no such endpoint ({served})"))
    };
    problem(&error)
}

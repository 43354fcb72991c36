//! The one place where errors become responses.

use askama::Template;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use super::pages::ErrorPage;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("There is no page here.")]
    NotFound,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("The form had expired or did not come from this site. Go back, reload the page and try again.")]
    Csrf,
    #[error("The form could not be read. Go back and try again.")]
    BadForm,
    #[error("The server is busy. Try again in a moment.")]
    Busy,
    #[error("{}", db_message(.0))]
    Db(#[from] sqlx::Error),
}

/// Whether a database error means the database cannot be reached now (it is restarting, the
/// network dropped, the pool is exhausted): worth a retry, unlike a failed query.
fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_))
}

fn db_message(e: &sqlx::Error) -> &'static str {
    if is_unavailable(e) {
        "The database cannot be reached for a moment. Try again shortly."
    } else {
        "Something went wrong on our side. Try again later."
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Forbidden(_) | Self::Csrf => StatusCode::FORBIDDEN,
            Self::BadForm => StatusCode::BAD_REQUEST,
            Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Db(e) if is_unavailable(e) => {
                tracing::warn!(error = %e, "database unavailable");
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Db(e) => {
                tracing::error!(error = %e, "database error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let page =
            ErrorPage { title: status.canonical_reason().unwrap_or("Error").to_owned(), message: self.to_string() };
        let body = page.render().unwrap_or_else(|_| self.to_string());
        let mut response = (status, Html(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

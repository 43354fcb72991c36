//! The page templates (askama, in `server/templates/`) and the data each one shows.

use askama::Template;
use askama_web::WebTemplate;

/// What every page's frame needs: who is signed in, and the CSRF token for its forms.
pub struct Layout {
    pub user: Option<String>,
    pub csrf: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "home.html")]
pub struct HomePage {
    pub layout: Layout,
}

/// The register and login forms, which share one template.
#[derive(Template, WebTemplate)]
#[template(path = "auth.html")]
pub struct AuthPage {
    pub layout: Layout,
    pub register: bool,
    pub username: String,
    pub error: Option<String>,
}

impl AuthPage {
    pub fn register(layout: Layout, username: &str, error: Option<String>) -> Self {
        Self {
            layout,
            register: true,
            username: keep(username),
            error,
        }
    }

    pub fn login(layout: Layout, username: &str, error: Option<String>) -> Self {
        Self {
            layout,
            register: false,
            username: keep(username),
            error,
        }
    }
}

/// The username typed, kept for the form shown again (bounded: it is echoed back).
fn keep(username: &str) -> String {
    username.chars().take(64).collect()
}

#[derive(Template, WebTemplate)]
#[template(path = "play.html")]
pub struct PlayPage {
    pub layout: Layout,
}

#[derive(Template, WebTemplate)]
#[template(path = "account.html")]
pub struct AccountPage {
    pub layout: Layout,
    pub member_since: String,
    pub sessions: i64,
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub title: String,
    pub message: String,
}

/// A Unix time as a calendar date, `YYYY-MM-DD` (UTC).
pub fn date(unix_seconds: i64) -> String {
    use time::OffsetDateTime;
    OffsetDateTime::from_unix_timestamp(unix_seconds)
        .map(|t| t.date().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::date(0), "1970-01-01");
        assert_eq!(super::date(951_782_400), "2000-02-29");
        assert_eq!(super::date(1_795_000_000), "2026-11-18");
    }
}

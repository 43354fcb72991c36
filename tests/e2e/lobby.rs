//! Two people in two browsers: register, see each other online, chat both ways, log out.

use rallypoint_tests::{Browser, Driver, Server};

const PASSWORD: &str = "a long enough password";

async fn register(browser: &Browser, server: &Server, name: &str) {
    browser.goto(&server.url("/register")).await;
    browser.submit(&[("username", name), ("password", PASSWORD), ("password_confirm", PASSWORD)]).await;
    browser.wait_for_path("/play").await;
    browser.find("#status[data-state='online']").await;
}

async fn say(browser: &Browser, text: &str) {
    let input = browser.find("#chat-input").await;
    input.send_keys(text).await.expect("typing");
    browser.find("#chat-form button").await.click().await.expect("send");
}

/// The texts of the chat lines on screen.
async fn chat_texts(browser: &Browser) -> Vec<String> {
    let value = browser.js("return [...document.querySelectorAll('#chat-log .text')].map(e => e.textContent)").await;
    serde_json::from_value(value).expect("a list of strings")
}

#[tokio::test]
async fn two_people_meet_in_the_lobby_chat_and_one_leaves() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let server = Server::start().await;
    let driver = Driver::start().await;
    let alice = driver.browser(&[]).await;
    let bob = driver.browser(&[]).await;

    register(&alice, &server, "alice").await;
    register(&bob, &server, "bob").await;
    // Each sees both, live: alice learned of bob after she joined.
    alice.find("#online-list li[data-user='bob']").await;
    bob.find("#online-list li[data-user='alice']").await;
    assert_eq!(alice.find("#online-count").await.text().await.unwrap(), "2");

    // A second tab of bob's (same browser profile, same session) does not count twice.
    bob.client.new_window(true).await.unwrap();
    let tabs = bob.client.windows().await.unwrap();
    bob.client.switch_to_window(tabs[1].clone()).await.unwrap();
    bob.goto(&server.url("/play")).await;
    bob.find("#status[data-state='online']").await;
    assert_eq!(alice.find("#online-count").await.text().await.unwrap(), "2");

    // Chat both ways; markup arrives as text.
    say(&alice, "hi bob <b>bold?</b>").await;
    bob.wait_until("bob's second tab sees alice's line", || async {
        chat_texts(&bob).await.contains(&"hi bob <b>bold?</b>".to_owned())
    })
    .await;
    assert!(!bob.exists("#chat-log b").await, "chat is shown as text, never as HTML");
    bob.client.switch_to_window(tabs[0].clone()).await.unwrap();
    bob.wait_until("bob's first tab sees it too", || async {
        chat_texts(&bob).await.contains(&"hi bob <b>bold?</b>".to_owned())
    })
    .await;
    say(&bob, "hello alice").await;
    alice
        .wait_until("alice sees bob's answer", || async {
            chat_texts(&alice).await.contains(&"hello alice".to_owned())
        })
        .await;

    alice.screenshot("lobby").await;

    // A newcomer sees the history from the database.
    let carol = driver.browser(&[]).await;
    register(&carol, &server, "carol").await;
    carol
        .wait_until("carol sees the history", || async {
            chat_texts(&carol).await == ["hi bob <b>bold?</b>", "hello alice"]
        })
        .await;
    carol.close().await;

    // Bob logs out with the button: both his tabs lose their sockets, alice sees him go, and his
    // lobby now sends him to the login page.
    bob.find("form[action='/logout'] button").await.click().await.unwrap();
    alice
        .wait_until("bob leaves alice's list", || async { !alice.exists("#online-list li[data-user='bob']").await })
        .await;
    assert_eq!(alice.find("#online-count").await.text().await.unwrap(), "1");
    bob.goto(&server.url("/play")).await;
    bob.wait_for_path("/login").await;
    bob.client.switch_to_window(tabs[1].clone()).await.unwrap();
    bob.wait_for_path("/login").await;

    alice.close().await;
    bob.close().await;
    server.stop().await;
}

#[tokio::test]
async fn pages_work_without_javascript() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let server = Server::start().await;
    let driver = Driver::start().await;
    // Chromium with JavaScript turned off by policy for every site.
    let browser = driver.browser(&["--blink-settings=scriptEnabled=false"]).await;
    browser.goto(&server.url("/register")).await;
    // (Chromium itself checks lengths and patterns; a mismatch only the server can see.)
    browser.submit(&[("username", "nojs"), ("password", PASSWORD), ("password_confirm", "another password")]).await;
    let error = browser.find(".error").await.text().await.unwrap();
    assert!(error.contains("differ"), "{error}");
    let kept = browser.find("input[name='username']").await.prop("value").await.unwrap();
    assert_eq!(kept.as_deref(), Some("nojs"), "the username is kept");
    browser.submit(&[("password", PASSWORD), ("password_confirm", PASSWORD)]).await;
    browser.wait_for_path("/play").await;
    browser.find("form[action='/logout'] button").await.click().await.unwrap();
    browser.wait_for_path("/").await;
    browser.goto(&server.url("/play")).await;
    browser.wait_for_path("/login").await;
    browser.submit(&[("username", "nojs"), ("password", PASSWORD)]).await;
    browser.wait_for_path("/play").await;
    browser.close().await;
    server.stop().await;
}

/// Served over TLS with `__Host-` cookies: logging out must clear the session cookie in the
/// browser too (a clearing cookie without `Secure` is ignored, and the dead one stays).
#[tokio::test]
async fn over_https_logging_out_clears_the_session_cookie_in_the_browser() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let server = Server::start_tls().await;
    let driver = Driver::start().await;
    let browser = driver.browser(&["--ignore-certificate-errors"]).await;
    register(&browser, &server, "secure_sam").await;
    let names = || async {
        let cookies = browser.client.get_all_cookies().await.expect("cookies");
        cookies.iter().map(|c| c.name().to_owned()).collect::<Vec<_>>()
    };
    assert!(names().await.contains(&"__Host-rp_session".to_owned()), "{:?}", names().await);
    browser.find("form[action='/logout'] button").await.click().await.unwrap();
    // The form goes to /, or the lobby, told its session ended, goes to /login first.
    browser.wait_until("the browser leaves the lobby", || async { browser.path().await != "/play" }).await;
    assert!(!names().await.contains(&"__Host-rp_session".to_owned()), "{:?}", names().await);
    server.stop().await;
}

-- Accounts, sessions and lobby chat.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    username      TEXT    NOT NULL,
    -- Lower-case form of the username: names are unique without regard to case.
    username_key  TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    created_at    INTEGER NOT NULL -- Unix seconds
);

CREATE TABLE sessions (
    -- SHA-256 of the cookie's token; the token itself is never stored.
    token_hash BLOB    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX sessions_by_user ON sessions (user_id);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);

CREATE TABLE chat_messages (
    id      INTEGER PRIMARY KEY,
    -- Which lobby (0-based) the line was said in.
    lobby   INTEGER NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    body    TEXT    NOT NULL,
    sent_at INTEGER NOT NULL -- Unix milliseconds
);

CREATE INDEX chat_messages_by_lobby ON chat_messages (lobby, id);

-- Secrets the server generates once and keeps across restarts (for example the key that signs
-- room tickets).
CREATE TABLE server_secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;

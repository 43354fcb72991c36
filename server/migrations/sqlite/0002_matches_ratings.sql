-- Finished matches, who played them, and ratings per mode.

CREATE TABLE matches (
    id         INTEGER PRIMARY KEY,
    mode       TEXT    NOT NULL,
    room       TEXT    NOT NULL,
    end_reason TEXT    NOT NULL,
    ticks      INTEGER NOT NULL,
    ended_at   INTEGER NOT NULL -- Unix seconds
);

CREATE TABLE match_players (
    match_id      INTEGER NOT NULL REFERENCES matches (id) ON DELETE CASCADE,
    user_id       INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    seat          INTEGER NOT NULL,
    rank          INTEGER NOT NULL,
    score         INTEGER NOT NULL,
    rating_before REAL    NOT NULL,
    rating_after  REAL    NOT NULL,
    PRIMARY KEY (match_id, user_id)
) WITHOUT ROWID;

CREATE INDEX match_players_by_user ON match_players (user_id, match_id DESC);

-- Glicko-2, one row per user and mode they have played.
CREATE TABLE ratings (
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    mode       TEXT    NOT NULL,
    rating     REAL    NOT NULL,
    deviation  REAL    NOT NULL,
    volatility REAL    NOT NULL,
    matches    INTEGER NOT NULL,
    wins       INTEGER NOT NULL,
    PRIMARY KEY (user_id, mode)
) WITHOUT ROWID;

CREATE INDEX ratings_by_mode ON ratings (mode, rating DESC);

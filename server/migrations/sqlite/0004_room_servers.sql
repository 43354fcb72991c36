-- Room servers: processes that host rooms for the hub (issue 10). Each authenticates with a
-- token printed once by `rallypoint room-token create`; only its SHA-256 is kept.
CREATE TABLE room_servers (
    id         INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    token_hash BLOB    NOT NULL UNIQUE,
    -- Community servers' results are history only: marked unofficial, no rating change.
    community  INTEGER NOT NULL,
    -- Where browsers reach it, as it said when it last registered (for the pages' CSP).
    public_url TEXT,
    created_at INTEGER NOT NULL, -- Unix seconds
    revoked_at INTEGER           -- Unix seconds; a revoked token is refused
);

-- Where a match was played, and whether it counts.
ALTER TABLE matches ADD COLUMN server TEXT;          -- a room server's name; NULL: the hub's own rooms
ALTER TABLE matches ADD COLUMN official INTEGER NOT NULL DEFAULT 1;
-- A room server's match id: a result reported again (after a lost acknowledgement) is
-- recorded once.
ALTER TABLE matches ADD COLUMN match_key TEXT;
CREATE UNIQUE INDEX matches_by_key ON matches (match_key) WHERE match_key IS NOT NULL;

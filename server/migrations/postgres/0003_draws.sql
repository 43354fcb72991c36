-- Ties for first place are draws, not wins for everyone tied (PostgreSQL's form of
-- sqlite/0003_draws.sql).
ALTER TABLE ratings ADD COLUMN draws BIGINT NOT NULL DEFAULT 0;

-- Recount what was stored before: a first place shared with someone else was counted as a win.
UPDATE ratings SET
    wins = (SELECT COUNT(*) FROM match_players mp JOIN matches m ON m.id = mp.match_id
            WHERE mp.user_id = ratings.user_id AND m.mode = ratings.mode AND mp.rank = 1
              AND NOT EXISTS (SELECT 1 FROM match_players o
                              WHERE o.match_id = mp.match_id AND o.user_id != mp.user_id AND o.rank = 1)),
    draws = (SELECT COUNT(*) FROM match_players mp JOIN matches m ON m.id = mp.match_id
             WHERE mp.user_id = ratings.user_id AND m.mode = ratings.mode AND mp.rank = 1
               AND EXISTS (SELECT 1 FROM match_players o
                           WHERE o.match_id = mp.match_id AND o.user_id != mp.user_id AND o.rank = 1));

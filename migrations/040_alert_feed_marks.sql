-- replayguard 040: each alert feed's mark, written with every read of the alert changes.
--
-- An alert change that writes no ledger entry (a `ledger_rollback`, `witness_unreachable`
-- or `ledger_tamper` alert) leaves the ledger's head as it was, and a database that went
-- back in time (a restore, a failover to a standby behind) may number as many changes as
-- it lost before a feed reads again, the alert the feed read last changed once more among
-- them. Each feed (one per service process, a random id) writes a random tag here in the
-- statement that reads the changes, whenever it read any: a database that holds the
-- feed's last tag committed that read, so it holds every change the feed took from it; a
-- copy older than that read cannot hold a tag drawn after it was taken
-- (replayguard/services/alertfeed.py). The leader deletes the marks of feeds gone for a
-- day; a live feed writes its mark again every hour.
CREATE TABLE alert_feed_marks (
    feed   bytea       PRIMARY KEY,
    tag    bytea       NOT NULL,
    marked timestamptz NOT NULL DEFAULT now()
);

-- replayguard 015: autovacuum for the insert-heavy tables, in passes of bounded size.
--
-- `ledger` only ever grows, `uses` grows at the decision rate and loses rows to retention.
-- PostgreSQL's defaults start an insert-triggered vacuum once 20 % of the table is new
-- (and a dead-tuple vacuum at 20 % dead): the longer the history, the larger and rarer
-- each pass, and the larger its burst of reads and WAL beside the decisions. A fixed
-- threshold and no scale factor make every pass cover about the same number of new rows
-- (its visibility-map work, freezing included), whatever the table's size.
ALTER TABLE ledger SET (autovacuum_vacuum_insert_threshold = 200000,
                        autovacuum_vacuum_insert_scale_factor = 0);
ALTER TABLE uses SET (autovacuum_vacuum_insert_threshold = 200000,
                      autovacuum_vacuum_insert_scale_factor = 0,
                      autovacuum_vacuum_threshold = 100000,
                      autovacuum_vacuum_scale_factor = 0.02);

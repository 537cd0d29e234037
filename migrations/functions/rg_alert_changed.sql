-- Each insert or update of an alert takes the next `change_seq`: the SSE event id, the
-- position a stream resumes from (Last-Event-ID) and the position the sink feeder keeps.
-- Readers take changes up to the highest they saw as all they will see, so changes must
-- commit in `change_seq` order: the number is taken under the ledger head's lock, which
-- decisions, events and acknowledgements hold already and every other writer of alerts
-- (a tamper or continuity alert, a witness's) takes here until it commits.
CREATE OR REPLACE FUNCTION rg_alert_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM ledger_head WHERE id FOR UPDATE;
    NEW.change_seq := nextval('alert_changes');
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER alerts_change_seq BEFORE INSERT OR UPDATE ON alerts
    FOR EACH ROW EXECUTE FUNCTION rg_alert_changed();

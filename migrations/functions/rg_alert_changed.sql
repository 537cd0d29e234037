-- Each insert or update of an alert takes the next `change_seq`: the SSE event id, the
-- position a stream resumes from (Last-Event-ID) and the position the sink feeder keeps.
CREATE OR REPLACE FUNCTION rg_alert_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_seq := nextval('alert_changes');
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER alerts_change_seq BEFORE INSERT OR UPDATE ON alerts
    FOR EACH ROW EXECUTE FUNCTION rg_alert_changed();

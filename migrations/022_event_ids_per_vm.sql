-- replayguard 022: an event id names an event of one VM.
--
-- With one namespace for every token, a hypervisor token bound to some VMs could report
-- its own VM under the id another VM's relay would use next; that relay's revert was then
-- a 409 `conflict`, which relays count as delivered, and no window opened. An event is now
-- keyed by (vm_id, event_id): a token can only take ids of the VMs it is bound to. The same
-- id for the same VM with another body is still a conflict.
ALTER TABLE hypervisor_events DROP CONSTRAINT hypervisor_events_pkey;
ALTER TABLE hypervisor_events ADD PRIMARY KEY (vm_id, event_id);
-- Windows name the entry of the event that opened them; an alert's events are found by it.
CREATE UNIQUE INDEX hypervisor_events_seq ON hypervisor_events (seq);

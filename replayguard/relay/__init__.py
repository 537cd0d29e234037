"""Hypervisor relays: separate processes that watch a hypervisor and post its events.

A relay runs beside the hypervisor, not inside the service: it turns what the hypervisor
says (or what polling reveals when it says nothing) into the native JSON the service's
``POST /v1/hypervisor/events`` accepts, and keeps every event in a durable on-disk spool
until the service has acknowledged it, so neither a dead service nor a crashed relay
loses a revert.
"""

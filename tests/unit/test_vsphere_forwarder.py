"""The VEBA forwarder's pure part: CloudEvents in binary or structured mode → structured JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from replayguard.core.events import IgnoredPayload
from replayguard.errors import ConfigError
from replayguard.hypervisors import vsphere as parser
from replayguard.relay.vsphere import InvalidCloudEvent, load_config, to_structured

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "hypervisors" / "vsphere"
FILES = sorted(p.name for p in SAMPLES.glob("*.json"))


def recorded(name: str) -> dict[str, Any]:
    return dict(orjson.loads((SAMPLES / name).read_bytes()))


def binary(event: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """The recorded structured event as Knative delivers it in binary mode."""
    headers = {f"Ce-{k}": str(v) for k, v in event.items() if k not in ("data", "datacontenttype")}
    headers["Content-Type"] = event["datacontenttype"]
    return headers, orjson.dumps(event["data"])


@pytest.mark.parametrize("name", FILES)
def test_binary_mode_becomes_the_recorded_structured_event(name: str) -> None:
    """Every recorded VEBA event sent in binary mode comes out as the structured original."""
    assert to_structured(*binary(recorded(name))) == recorded(name)


@pytest.mark.parametrize("name", [n for n in FILES if not n.startswith("malformed_")])
def test_forwarded_body_parses_like_the_original(name: str) -> None:
    """The service's parser sees the same events (or the same ignore) in what is forwarded."""
    forwarded = to_structured(*binary(recorded(name)))
    try:
        expected = parser.parse(recorded(name))
    except IgnoredPayload as exc:
        with pytest.raises(IgnoredPayload, match=exc.reason):
            parser.parse(forwarded)
    else:
        assert parser.parse(forwarded) == expected


@pytest.mark.parametrize("content_type", ["application/cloudevents+json; charset=utf-8", "application/json"])
def test_structured_mode_passes_through(content_type: str) -> None:
    """A structured body (or a JSON body holding specversion, without ce- headers) is kept as is."""
    event = recorded("revert_knative_type.json")
    assert to_structured({"content-type": content_type}, orjson.dumps(event)) == event


def test_binary_headers_are_case_insensitive_percent_decoded_and_keep_extensions() -> None:
    """Header names of any case map to lower-case attributes; values are percent-decoded."""
    headers = {"CE-SPECVERSION": "1.0", "ce-Id": "e-1", "ce-source": "https://vc%3A443/sdk",
               "ce-type": "com.vmware.vsphere.VmPoweredOnEvent.v0", "ce-subject": "Vm%20web-01",
               "ce-vsphereapiversion": "8.0.2.0"}
    event = to_structured(headers, b'{"Key": 1}')
    assert event == {"specversion": "1.0", "id": "e-1", "source": "https://vc:443/sdk",
                     "type": "com.vmware.vsphere.VmPoweredOnEvent.v0", "subject": "Vm web-01",
                     "vsphereapiversion": "8.0.2.0", "data": {"Key": 1}}


@pytest.mark.parametrize(("headers", "body", "status"), [
    ({"ce-specversion": "1.0", "ce-source": "s", "ce-type": "t"}, b"{}", 400),  # no id
    ({"ce-specversion": "0.3", "ce-id": "i", "ce-source": "s", "ce-type": "t"}, b"{}", 400),
    ({"ce-specversion": "1.0", "ce-id": "i", "ce-source": "s", "ce-type": "t"}, b"{nope", 400),
    ({"ce-specversion": "1.0", "ce-id": "i", "ce-source": "s", "ce-type": "t",
      "content-type": "application/xml"}, b"<a/>", 415),
    ({"content-type": "application/cloudevents+json"}, b"[1]", 400),
    ({"content-type": "application/cloudevents+json"}, b'{"specversion": "1.0", "id": ""}', 400),
])
def test_what_is_not_a_json_cloudevent_is_refused(headers: dict[str, str], body: bytes, status: int) -> None:
    """Missing attributes, another specversion, bad JSON or non-JSON data are refused with a status."""
    with pytest.raises(InvalidCloudEvent) as caught:
        to_structured(headers, body)
    assert caught.value.status == status


def test_config_takes_the_port_knative_sets(tmp_path: Path) -> None:
    """Without --port the forwarder listens on $PORT, as Knative Serving expects."""
    env = {"PORT": "9090", "REPLAYGUARD_RELAY_TOKEN": "t"}
    _, host, port = load_config(["--service-url", "http://127.0.0.1:1", "--spool-dir", str(tmp_path)], env)
    assert (host, port) == ("127.0.0.1", 9090)
    with pytest.raises(ConfigError):
        load_config(["--service-url", "http://x", "--spool-dir", str(tmp_path), "--port", "0"], env)

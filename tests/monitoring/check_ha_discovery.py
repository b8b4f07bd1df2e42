#!/usr/bin/env python3
"""Checks Home Assistant MQTT discovery configs as Home Assistant would read them.

Input (stdin): `mosquitto_sub -v --retained-only` output, one `topic payload`
per line, holding the discovery configs and the state topics they point to.

For every config under `<prefix>/<component>/<object>/<key>/config` it checks
the fields against Home Assistant's MQTT documentation (sensor.mqtt,
binary_sensor.mqtt, the discovery page: required fields, known keys only,
device and origin blocks, device classes with their units, state classes),
then renders the `value_template` with Jinja2, as Home Assistant does, against
the payload retained on the `state_topic`, and checks the kind of the value.

Output (stdout): one JSON object per entity: unique_id, component, topic,
value and available (the availability topic's retained payload read as Home
Assistant would). Problems go to stderr; the exit status is 1 if there were any.
"""

import json
import sys

import jinja2

COMMON = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "default_entity_id", "device", "device_class", "enabled_by_default", "encoding",
    "entity_category", "entity_picture", "expire_after", "force_update", "icon",
    "json_attributes_template", "json_attributes_topic", "name", "object_id", "origin",
    "payload_available", "payload_not_available", "platform", "qos", "state_topic",
    "unique_id", "value_template",
}
KEYS = {
    "sensor": COMMON | {"last_reset_value_template", "options", "state_class",
                        "suggested_display_precision", "unit_of_measurement"},
    "binary_sensor": COMMON | {"off_delay", "payload_off", "payload_on"},
}
REQUIRED = {"sensor": {"state_topic"}, "binary_sensor": {"state_topic"}}
DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer",
               "model", "model_id", "name", "serial_number", "suggested_area", "sw_version",
               "via_device"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
# Sensor device classes used here, with the units Home Assistant accepts for them.
SENSOR_UNITS = {
    "temperature": {"°C", "°F", "K"},
    "data_size": {"bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB",
                  "YB", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"},
}
BINARY_CLASSES = {
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door",
    "garage_door", "gas", "heat", "light", "lock", "moisture", "motion", "moving", "occupancy",
    "opening", "plug", "power", "presence", "problem", "running", "safety", "smoke", "sound",
    "tamper", "update", "vibration", "window",
}

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def render(template, payload):
    """Renders like Home Assistant's MQTT value templates: `value` and `value_json`."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    variables = {"value": payload}
    try:
        variables["value_json"] = json.loads(payload)
    except ValueError:
        pass
    return env.from_string(template).render(**variables).strip()


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def check(topic, config, retained):
    parts = topic.split("/")
    if len(parts) != 5 or parts[4] != "config":
        problem(topic, "not <prefix>/<component>/<object_id>/<key>/config")
        return None
    component = parts[1]
    if component not in KEYS:
        problem(topic, f"unexpected component {component}")
        return None
    for key in sorted(set(config) - KEYS[component]):
        problem(topic, f"{key} is not a {component} option")
    for key in sorted(REQUIRED[component] - set(config)):
        problem(topic, f"required {key} missing")
    for key in ("unique_id", "name", "device", "origin"):
        if key not in config:
            problem(topic, f"{key} missing (needed for the device registry)")
    device = config.get("device", {})
    if not device.get("identifiers"):
        problem(topic, "device.identifiers missing")
    for key in sorted(set(device) - DEVICE_KEYS):
        problem(topic, f"device.{key} is not a device option")
    origin = config.get("origin", {})
    if not origin.get("name"):
        problem(topic, "origin.name missing")
    for key in sorted(set(origin) - ORIGIN_KEYS):
        problem(topic, f"origin.{key} is not an origin option")
    for item in config.get("availability", []):
        if "topic" not in item:
            problem(topic, "availability item without topic")
        for key in sorted(set(item) - AVAILABILITY_KEYS):
            problem(topic, f"availability.{key} is not an availability option")
    device_class = config.get("device_class")
    unit = config.get("unit_of_measurement")
    if component == "sensor":
        if device_class is not None:
            if device_class not in SENSOR_UNITS:
                problem(topic, f"device_class {device_class} not expected here")
            elif unit not in SENSOR_UNITS[device_class]:
                problem(topic, f"unit {unit} is not a unit of device_class {device_class}")
        if config.get("state_class", "measurement") not in STATE_CLASSES:
            problem(topic, f"state_class {config['state_class']} unknown")
    elif device_class is not None and device_class not in BINARY_CLASSES:
        problem(topic, f"binary_sensor device_class {device_class} unknown")

    state_topic = config.get("state_topic")
    if state_topic not in retained:
        problem(topic, f"nothing retained on its state_topic {state_topic}")
        return None
    payload = retained[state_topic]
    template = config.get("value_template", "{{ value }}")
    try:
        value = render(template, payload)
    except jinja2.TemplateError as e:
        problem(topic, f"value_template {template!r} fails on {payload[:200]}: {e}")
        return None
    if component == "binary_sensor":
        allowed = {config.get("payload_on", "ON"), config.get("payload_off", "OFF")}
        if value not in allowed:
            problem(topic, f"rendered {value!r}, expected one of {sorted(allowed)}")
    elif unit is not None or "state_class" in config or device_class is not None:
        if not is_number(value):
            problem(topic, f"rendered {value!r}, expected a number")
    available = True
    for item in config.get("availability", []):
        state = retained.get(item.get("topic"))
        available = available and state == item.get("payload_available", "online")
    return {"unique_id": config.get("unique_id"), "component": component, "topic": topic,
            "device": device.get("identifiers", [None])[0], "value": value,
            "available": available}


def main():
    retained = {}
    for line in sys.stdin.read().splitlines():
        topic, _, payload = line.partition(" ")
        retained[topic] = payload
    entities = []
    for topic, payload in sorted(retained.items()):
        if not topic.endswith("/config") or not payload:
            continue
        try:
            config = json.loads(payload)
        except ValueError as e:
            problem(topic, f"not JSON: {e}")
            continue
        entity = check(topic, config, retained)
        if entity:
            entities.append(entity)
    ids = [e["unique_id"] for e in entities]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problem(dup, "unique_id used twice")
    for entity in entities:
        print(json.dumps(entity))
    for p in problems:
        print(p, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

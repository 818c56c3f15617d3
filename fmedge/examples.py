"""Pipelines bundled with fm-edge, runnable by id with no set-up and no LLM.

`fm-edge run data-processor --input '{"sensor_data": [...]}'` works on a fresh device: the
examples are plain Python data (no files), so they run from inside fm-edge.pyz too. A
cached pipeline with the same id takes precedence.
"""

import copy

_MEAN = "sum(input.sensor_data) / len(input.sensor_data)"
_STDEV = ("math.sqrt(sum([(x - " + _MEAN + ") ** 2 for x in input.sensor_data]) / "
          "len(input.sensor_data))")

DATA_PROCESSOR = {
    "id": "data-processor",
    "name": "Sensor data processor",
    "version": "1.0.0",
    "description": "Statistics over a list of sensor readings, anomaly flags (readings more "
                   "than `threshold` standard deviations from the mean) and an alert branch.",
    "input_schema": {
        "type": "object",
        "required": ["sensor_data"],
        "properties": {
            "sensor_data": {"type": "array", "description": "numeric readings"},
            "threshold": {"type": "number", "default": 2.0},
            "sensor_id": {"type": "string", "default": "sensor"},
        },
    },
    "stages": [
        {"id": "stats", "type": "json_transform", "config": {"data": {
            "count": "{{len(input.sensor_data)}}",
            "mean": "{{round(" + _MEAN + ", 4)}}",
            "min": "{{min(input.sensor_data)}}",
            "max": "{{max(input.sensor_data)}}",
            "stdev": "{{round(" + _STDEV + ", 4)}}"}}},
        {"id": "anomalies", "type": "json_transform", "depends_on": ["stats"], "config": {
            "data": {"values": "{{[x for x in input.sensor_data if upstream.stats.result.stdev "
                               "> 0 and abs(x - upstream.stats.result.mean) > input.threshold "
                               "* upstream.stats.result.stdev]}}"}}},
        {"id": "gate", "type": "conditional", "depends_on": ["anomalies"], "config": {
            "condition": "{{len(upstream.anomalies.result.values) > 0}}",
            "true_branch_stages": ["alert"], "false_branch_stages": ["all-clear"]}},
        {"id": "alert", "type": "logger", "depends_on": ["gate"], "config": {
            "level": "warning",
            "message": "{{input.sensor_id}}: {{len(upstream.anomalies.result.values)}} "
                       "anomalous readings",
            "passthrough": {"status": "alert"}}},
        {"id": "all-clear", "type": "logger", "depends_on": ["gate"], "config": {
            "message": "{{input.sensor_id}}: all readings normal",
            "passthrough": {"status": "ok"}}},
        {"id": "report", "type": "json_transform", "depends_on": ["alert", "all-clear"],
         "config": {"template": {
             "sensor_id": "{{input.sensor_id}}",
             "statistics": "{{upstream.stats.result}}",
             "anomalies": "{{upstream.anomalies.result.values}}",
             "alert": "{{upstream.gate.branch_taken == 'true'}}"}}},
    ],
    "output_stage_id": "report",
}

EXAMPLES = {"data-processor": DATA_PROCESSOR}


def example(pipeline_id):
    """A fresh copy of the bundled pipeline ``pipeline_id``, or None."""
    document = EXAMPLES.get(pipeline_id)
    return copy.deepcopy(document) if document is not None else None
